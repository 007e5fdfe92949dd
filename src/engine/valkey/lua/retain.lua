-- Age retention on a timer: drops a conversation's oldest messages stored
-- before a cutoff, with their idempotency records and own-seq entries, so an
-- idle conversation is trimmed too (append.lua trims only on a write). The
-- meta hash (last seq, epoch) is left alone: seqs are never reused.
--
-- KEYS[1] message stream   KEYS[2] idempotency hash
-- ARGV[1] min ts kept (ms)  ARGV[2] own-seqs key prefix  ARGV[3] most entries dropped per call
-- Returns the number of entries dropped (ARGV[3]: call again).

local function field(entry, name)
  local f = entry[2]
  for i = 1, #f, 2 do
    if f[i] == name then return f[i + 1] end
  end
  return nil
end

local min_ts = tonumber(ARGV[1])
local dropped = 0
local old = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', tonumber(ARGV[3]))
for _, e in ipairs(old) do
  local ts = tonumber(field(e, 't'))
  if not ts or ts >= min_ts then
    break
  end
  local k, u = field(e, 'k'), field(e, 'u')
  if k then redis.call('HDEL', KEYS[2], k) end
  if u then redis.call('ZREM', ARGV[2] .. u, string.match(e[1], '^(%d+)-')) end
  redis.call('XDEL', KEYS[1], e[1])
  dropped = dropped + 1
end
return dropped
