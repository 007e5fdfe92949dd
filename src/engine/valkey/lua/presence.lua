-- Presence across nodes. Every key is under the {presence} hash tag.
-- KEYS[1] live nodes (sorted set: node -> lease expiry, ms)
-- ARGV[1] per-node hash prefix (+ node id: user -> open connections there)
-- ARGV[2] this node   ARGV[3] now (ms)   ARGV[4] op: "up" | "down" | "online" | "all"
-- up/down: ARGV[5] user. Returns 1 when the user went online (up) or offline
--   (down) on the cluster as a whole, else 0.
-- online: ARGV[5..] users. Returns those online on some live node.
-- all: returns every user online on some live node.
-- count: ARGV[5] user. Returns the user's open connections on live nodes.
local live = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[3], '+inf')
local function elsewhere(user)
  for _, n in ipairs(live) do
    if n ~= ARGV[2] then
      local c = tonumber(redis.call('HGET', ARGV[1] .. n, user) or '0')
      if c > 0 then return true end
    end
  end
  return false
end
local op = ARGV[4]
if op == 'up' then
  local mine = redis.call('HINCRBY', ARGV[1] .. ARGV[2], ARGV[5], 1)
  if mine > 1 or elsewhere(ARGV[5]) then return 0 end
  return 1
elseif op == 'down' then
  local mine = redis.call('HINCRBY', ARGV[1] .. ARGV[2], ARGV[5], -1)
  if mine <= 0 then redis.call('HDEL', ARGV[1] .. ARGV[2], ARGV[5]) end
  if mine > 0 or elsewhere(ARGV[5]) then return 0 end
  return 1
elseif op == 'count' then
  local n = 0
  for _, nd in ipairs(live) do
    n = n + tonumber(redis.call('HGET', ARGV[1] .. nd, ARGV[5]) or '0')
  end
  return n
elseif op == 'online' then
  local out = {}
  for i = 5, #ARGV do
    for _, n in ipairs(live) do
      if tonumber(redis.call('HGET', ARGV[1] .. n, ARGV[i]) or '0') > 0 then
        table.insert(out, ARGV[i])
        break
      end
    end
  end
  return out
else
  local seen, out = {}, {}
  for _, n in ipairs(live) do
    for _, u in ipairs(redis.call('HKEYS', ARGV[1] .. n)) do
      if not seen[u] then
        seen[u] = true
        table.insert(out, u)
      end
    end
  end
  return out
end
