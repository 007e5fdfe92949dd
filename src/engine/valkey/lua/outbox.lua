-- The webhook outbox, shared by every node: a stream read through a consumer
-- group (each event goes to one node; a dead node's entries are claimed by
-- another), and events waiting for a retry in a sorted set by due time.
-- Every key is under the hash tag {wh}: one Cluster slot.
--
-- KEYS[1] stream of ready events (field e = the envelope, JSON)
-- KEYS[2] sorted set: event id -> due ms (retries)
-- KEYS[3] sorted set: event id -> created ms (retries, for the size bound)
-- KEYS[4] hash: event id -> envelope (retries)
-- KEYS[5] hash: user -> erasure (ms): `message.created` events of the user's
--         messages that arrived up to then must go out erased
-- KEYS[6] counter: bytes of the envelopes waiting (stream and retries)
-- ARGV[1] op:
--   push  ARGV[2] max events, ARGV[3] max bytes, ARGV[4..] envelopes
--         -> {number of the oldest events dropped to keep within both,
--             positions (from 1) of envelopes refused as erased: the caller
--             pushes their erased form}
--   take  ARGV[2] group, ARGV[3] consumer, ARGV[4] max, ARGV[5] now ms,
--         ARGV[6] claim idle ms (0: claim nothing this time)
--         -> {entry id, envelope, erased (1|0), ...}
--   done  ARGV[2] group, ARGV[3] entry id
--   retry ARGV[2] group, ARGV[3] entry id, ARGV[4] event id, ARGV[5] due ms,
--         ARGV[6] created ms, ARGV[7] envelope
--         -> -1 (nothing done) when the envelope is erased: the caller
--            retries with its erased form
--   mark  ARGV[2] user, ARGV[3] erased up to ms, ARGV[4] forget erasures before ms
--   find  ARGV[2] 's' (stream) or 'r' (retries), ARGV[3] cursor ('-' or '0'
--         to start), ARGV[4] count -> {next cursor ('' when done), id,
--         envelope, ...}: the erased events among the next count
--   replace ARGV[2] 's' or 'r', ARGV[3..] pairs id, erased envelope: each
--         still waiting is replaced (a stream entry by a new entry)

local op = ARGV[1]

-- The byte counter: never below 0, and 0 when nothing waits (entries
-- written before the counter existed are forgotten as they leave).
local function count(delta)
  if delta == 0 then return end
  if redis.call('INCRBY', KEYS[6], delta) < 0
    or (redis.call('XLEN', KEYS[1]) == 0 and redis.call('HLEN', KEYS[4]) == 0) then
    redis.call('SET', KEYS[6], 0)
  end
end

-- The envelope of a stream entry (nil when gone).
local function entry(id)
  local e = redis.call('XRANGE', KEYS[1], id, id)[1]
  if not e then return nil end
  local f = e[2]
  for i = 1, #f, 2 do
    if f[i] == 'e' then return f[i + 1] end
  end
  return ''
end

-- XDEL with the counter; 1 when it was there.
local function xdel(id)
  local env = entry(id)
  if not env then return 0 end
  redis.call('XDEL', KEYS[1], id)
  count(-#env)
  return 1
end

-- Whether an erasure covers the envelope: `message.created` envelopes start
-- with {"erasable":{"sender":...,"ts_ms":...}} (user ids have no quotes).
local function erased(env)
  local user, ts = string.match(env, '^{"erasable":{"sender":"([^"]+)","ts_ms":(%-?%d+)}')
  if not user then return false end
  local upto = redis.call('HGET', KEYS[5], user)
  return upto and tonumber(upto) >= tonumber(ts) or false
end

local function ensure_group(group)
  -- BUSYGROUP when it exists; created again after Valkey lost its data.
  pcall(redis.call, 'XGROUP', 'CREATE', KEYS[1], group, '0', 'MKSTREAM')
end

if op == 'push' then
  local max, max_bytes = tonumber(ARGV[2]), tonumber(ARGV[3])
  local refused = {}
  local added = 0
  for i = 4, #ARGV do
    if erased(ARGV[i]) then
      table.insert(refused, i - 3)
    else
      redis.call('XADD', KEYS[1], '*', 'e', ARGV[i])
      added = added + #ARGV[i]
    end
  end
  count(added)
  local excess = redis.call('XLEN', KEYS[1]) + redis.call('ZCARD', KEYS[2]) - max
  local dropped = 0
  -- The oldest first, whether ready or waiting for a retry (a stream id
  -- starts with the time it was queued), past either bound.
  while excess > 0 or tonumber(redis.call('GET', KEYS[6]) or '0') > max_bytes do
    local ready = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
    local waiting = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
    local ready_ms = ready and tonumber(string.match(ready[1], '^(%d+)-')) or nil
    local waiting_ms = waiting[2] and tonumber(waiting[2]) or nil
    if ready_ms and (not waiting_ms or ready_ms <= waiting_ms) then
      xdel(ready[1])
    elseif waiting_ms then
      local env = redis.call('HGET', KEYS[4], waiting[1])
      redis.call('ZREM', KEYS[2], waiting[1])
      redis.call('ZREM', KEYS[3], waiting[1])
      redis.call('HDEL', KEYS[4], waiting[1])
      count(-(env and #env or 0))
    else
      break
    end
    excess = excess - 1
    dropped = dropped + 1
  end
  table.insert(refused, 1, dropped)
  return refused
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
            table.insert(out, erased(f[i + 1]) and '1' or '0')
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
  local left = max - #out / 3
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
  xdel(ARGV[3])
  return 1
end

if op == 'retry' then
  if erased(ARGV[7]) then
    return -1
  end
  redis.call('XACK', KEYS[1], ARGV[2], ARGV[3])
  -- Gone: dropped past the bound meanwhile; it stays dropped.
  if xdel(ARGV[3]) == 0 then
    return 0
  end
  redis.call('ZADD', KEYS[2], ARGV[5], ARGV[4])
  redis.call('ZADD', KEYS[3], ARGV[6], ARGV[4])
  redis.call('HSET', KEYS[4], ARGV[4], ARGV[7])
  count(#ARGV[7])
  return 1
end

if op == 'mark' then
  local before = tonumber(redis.call('HGET', KEYS[5], ARGV[2]) or '0')
  redis.call('HSET', KEYS[5], ARGV[2], math.max(before, tonumber(ARGV[3])))
  -- Old erasures: their events are past webhooks.max_age_s.
  if redis.call('HLEN', KEYS[5]) > 64 then
    local all = redis.call('HGETALL', KEYS[5])
    for i = 1, #all, 2 do
      if tonumber(all[i + 1]) < tonumber(ARGV[4]) then
        redis.call('HDEL', KEYS[5], all[i])
      end
    end
  end
  return 1
end

if op == 'find' then
  local count = tonumber(ARGV[4])
  local out = {''}
  if ARGV[2] == 's' then
    local start = ARGV[3] == '-' and '-' or '(' .. ARGV[3]
    local entries = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', count)
    for _, e in ipairs(entries) do
      local f = e[2]
      for i = 1, #f, 2 do
        if f[i] == 'e' and erased(f[i + 1]) then
          table.insert(out, e[1])
          table.insert(out, f[i + 1])
        end
      end
    end
    if #entries == count then out[1] = entries[#entries][1] end
  else
    local r = redis.call('HSCAN', KEYS[4], ARGV[3], 'COUNT', count)
    local kv = r[2]
    for i = 1, #kv, 2 do
      if erased(kv[i + 1]) then
        table.insert(out, kv[i])
        table.insert(out, kv[i + 1])
      end
    end
    if r[1] ~= '0' then out[1] = r[1] end
  end
  return out
end

if op == 'replace' then
  local n = 0
  for i = 3, #ARGV, 2 do
    if ARGV[2] == 's' then
      -- Taken by a node meanwhile: its retry finds the entry gone and
      -- leaves it to this copy; its done acknowledges the old one.
      if xdel(ARGV[i]) == 1 then
        redis.call('XADD', KEYS[1], '*', 'e', ARGV[i + 1])
        count(#ARGV[i + 1])
        n = n + 1
      end
    else
      local old = redis.call('HGET', KEYS[4], ARGV[i])
      if old then
        redis.call('HSET', KEYS[4], ARGV[i], ARGV[i + 1])
        count(#ARGV[i + 1] - #old)
        n = n + 1
      end
    end
  end
  return n
end

return redis.error_reply('outbox.lua: unknown op ' .. tostring(op))
