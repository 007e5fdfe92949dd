-- The webhook outbox, shared by every node: a stream read through a consumer
-- group (each event goes to one node; a dead node's entries are claimed by
-- another), and events waiting for a retry in a sorted set by due time.
-- Every key is under the hash tag {wh}: one Cluster slot.
--
-- KEYS[1] stream of ready events (field e = the envelope, JSON)
-- KEYS[2] sorted set: event id -> due ms (retries)
-- KEYS[3] sorted set: event id -> created ms (retries, for the size bound)
-- KEYS[4] hash: event id -> envelope (retries)
-- ARGV[1] op:
--   push  ARGV[2] max, ARGV[3..] envelopes
--         -> number of the oldest events dropped to keep at most max
--   take  ARGV[2] group, ARGV[3] consumer, ARGV[4] max, ARGV[5] now ms,
--         ARGV[6] claim idle ms (0: claim nothing this time)
--         -> {entry id, envelope, entry id, envelope, ...}
--   done  ARGV[2] group, ARGV[3] entry id
--   retry ARGV[2] group, ARGV[3] entry id, ARGV[4] event id, ARGV[5] due ms,
--         ARGV[6] created ms, ARGV[7] envelope

local op = ARGV[1]

local function ensure_group(group)
  -- BUSYGROUP when it exists; created again after Valkey lost its data.
  pcall(redis.call, 'XGROUP', 'CREATE', KEYS[1], group, '0', 'MKSTREAM')
end

if op == 'push' then
  local max = tonumber(ARGV[2])
  for i = 3, #ARGV do
    redis.call('XADD', KEYS[1], '*', 'e', ARGV[i])
  end
  local excess = redis.call('XLEN', KEYS[1]) + redis.call('ZCARD', KEYS[2]) - max
  local dropped = 0
  -- The oldest first, whether ready or waiting for a retry (a stream id
  -- starts with the time it was queued).
  while excess > 0 do
    local ready = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
    local waiting = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
    local ready_ms = ready and tonumber(string.match(ready[1], '^(%d+)-')) or nil
    local waiting_ms = waiting[2] and tonumber(waiting[2]) or nil
    if ready_ms and (not waiting_ms or ready_ms <= waiting_ms) then
      redis.call('XDEL', KEYS[1], ready[1])
    elseif waiting_ms then
      redis.call('ZREM', KEYS[2], waiting[1])
      redis.call('ZREM', KEYS[3], waiting[1])
      redis.call('HDEL', KEYS[4], waiting[1])
    else
      break
    end
    excess = excess - 1
    dropped = dropped + 1
  end
  return dropped
end

if op == 'take' then
  local group, consumer, max = ARGV[2], ARGV[3], tonumber(ARGV[4])
  ensure_group(group)
  -- Due retries go back to the stream.
  local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[5], 'LIMIT', 0, max)
  for _, id in ipairs(due) do
    local env = redis.call('HGET', KEYS[4], id)
    if env then
      redis.call('XADD', KEYS[1], '*', 'e', env)
    end
    redis.call('ZREM', KEYS[2], id)
    redis.call('ZREM', KEYS[3], id)
    redis.call('HDEL', KEYS[4], id)
  end
  local out = {}
  local function add(entries)
    for _, e in ipairs(entries) do
      if e and e[2] then
        local f = e[2]
        for i = 1, #f, 2 do
          if f[i] == 'e' then
            table.insert(out, e[1])
            table.insert(out, f[i + 1])
          end
        end
      end
    end
  end
  if tonumber(ARGV[6]) > 0 then
    -- Entries another node took and left unfinished for claim idle ms.
    local r = redis.call('XAUTOCLAIM', KEYS[1], group, consumer, ARGV[6], '0-0', 'COUNT', max)
    add(r[2])
  end
  local left = max - #out / 2
  if left > 0 then
    local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', left, 'STREAMS', KEYS[1], '>')
    if r and r[1] then
      add(r[1][2])
    end
  end
  return out
end

if op == 'done' then
  redis.call('XACK', KEYS[1], ARGV[2], ARGV[3])
  redis.call('XDEL', KEYS[1], ARGV[3])
  return 1
end

if op == 'retry' then
  redis.call('XACK', KEYS[1], ARGV[2], ARGV[3])
  -- Gone: dropped past the bound meanwhile; it stays dropped.
  if redis.call('XDEL', KEYS[1], ARGV[3]) == 0 then
    return 0
  end
  redis.call('ZADD', KEYS[2], ARGV[5], ARGV[4])
  redis.call('ZADD', KEYS[3], ARGV[6], ARGV[4])
  redis.call('HSET', KEYS[4], ARGV[4], ARGV[7])
  return 1
end

return redis.error_reply('outbox.lua: unknown op ' .. tostring(op))
