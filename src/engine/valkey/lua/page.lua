-- One page of a conversation (v1.2), in one step so a page never mixes two
-- states: history pages read messages only, through the message-seq index
-- (a page costs its messages, whatever the updates between them), each with
-- its current state; sync pages read the stream (messages and updates).
--
-- KEYS[1] meta hash   KEYS[2] message stream   KEYS[3] message-seq index
-- KEYS[4] current-state hash
-- ARGV[1] "b": messages with seq < ARGV[2] ("+inf": all), newest first;
--         "a": messages with seq > ARGV[2], oldest first;
--         "s": messages and updates with seq > ARGV[2], oldest first
-- ARGV[3] how many (the caller asks one more than its limit)
-- Returns {epoch, then per entry: frame, ts, state ("" = unchanged), kind
-- ("" for a message, else e, d or r)}.
-- A conversation stored before v1.2 has no index yet: it is built from the
-- stream on its first page (once; linear in its retained entries).

local function field(entry, name)
  local f = entry[2]
  for i = 1, #f, 2 do
    if f[i] == name then return f[i + 1] end
  end
  return nil
end

local out = {redis.call('HGET', KEYS[1], 'epoch') or ''}
local function push(e)
  local kind = field(e, 'x') or ''
  local state = ''
  if kind == '' then
    state = redis.call('HGET', KEYS[4], string.match(e[1], '^(%d+)-')) or ''
  end
  table.insert(out, field(e, 'f') or '')
  table.insert(out, field(e, 't') or '0')
  table.insert(out, state)
  table.insert(out, kind)
end

local n = tonumber(ARGV[3])
if ARGV[1] == 's' then
  for _, e in ipairs(redis.call('XRANGE', KEYS[2], '(' .. ARGV[2] .. '-0', '+', 'COUNT', n)) do
    push(e)
  end
  return out
end

if redis.call('HGET', KEYS[1], 'mseq') ~= '1' and redis.call('EXISTS', KEYS[2]) == 1 then
  local start = '-'
  while true do
    local batch = redis.call('XRANGE', KEYS[2], start, '+', 'COUNT', 1000)
    if #batch == 0 then break end
    for _, e in ipairs(batch) do
      if not field(e, 'x') then
        local s = string.match(e[1], '^(%d+)-')
        redis.call('ZADD', KEYS[3], s, s)
      end
    end
    start = '(' .. batch[#batch][1]
  end
  redis.call('HSET', KEYS[1], 'mseq', '1')
end

local seqs
if ARGV[1] == 'b' then
  seqs = redis.call('ZREVRANGEBYSCORE', KEYS[3], '(' .. ARGV[2], '-inf', 'LIMIT', 0, n)
else
  seqs = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. ARGV[2], '+inf', 'LIMIT', 0, n)
end
for _, s in ipairs(seqs) do
  local e = redis.call('XRANGE', KEYS[2], s .. '-0', s .. '-0')[1]
  if e then push(e) end
end
return out
