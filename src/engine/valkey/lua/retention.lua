-- Shared by append.lua and update.lua (prepended to each when embedded).

local function field(entry, name)
  local f = entry[2]
  for i = 1, #f, 2 do
    if f[i] == name then return f[i + 1] end
  end
  return nil
end

-- Retention: drops the oldest entries (messages and updates, v1.2) beyond
-- `max`, and (a bounded number per write) those older than `min_ts` (ms, 0 =
-- no age limit), with a message's side records (idempotency record, own-seq,
-- message-seq index, current state). `seq` was just written and stays.
local function retain(stream, idem, mseq, st, own_prefix, max, min_ts, seq)
  local function drop(entries)
    for _, e in ipairs(entries) do
      local id = e[1]
      local s = string.match(id, '^(%d+)-')
      if not field(e, 'x') then
        redis.call('HDEL', idem, field(e, 'k'))
        redis.call('ZREM', own_prefix .. field(e, 'u'), s)
        redis.call('ZREM', mseq, s)
        redis.call('HDEL', st, s)
      end
      redis.call('XDEL', stream, id)
    end
  end
  local excess = redis.call('XLEN', stream) - max
  if excess > 0 then
    drop(redis.call('XRANGE', stream, '-', '+', 'COUNT', excess))
  end
  if min_ts > 0 then
    local old = redis.call('XRANGE', stream, '-', '+', 'COUNT', 64)
    local expired = {}
    for _, e in ipairs(old) do
      if tonumber(field(e, 't')) < min_ts and tonumber(string.match(e[1], '^(%d+)-')) < seq then
        table.insert(expired, e)
      else
        break
      end
    end
    drop(expired)
  end
end

