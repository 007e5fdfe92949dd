-- Creates/replaces a group, or adds/removes members, atomically.
-- KEYS[1] members set   KEYS[2] meta hash
-- ARGV[1] mode: "put" (ARGV[2] title, ARGV[3..] members) or
--               "update" (ARGV[2] count of additions, then additions, then removals)
-- Returns {title, last_seq, {added...}, {removed...}, {members...}}, or {} when
-- "update" names a group that does not exist.
local added, removed = {}, {}
if ARGV[1] == 'put' then
  local want = {}
  for i = 3, #ARGV do want[ARGV[i]] = true end
  for _, m in ipairs(redis.call('SMEMBERS', KEYS[1])) do
    if not want[m] then
      table.insert(removed, m)
      redis.call('SREM', KEYS[1], m)
    end
  end
  for i = 3, #ARGV do
    if redis.call('SADD', KEYS[1], ARGV[i]) == 1 then table.insert(added, ARGV[i]) end
  end
  redis.call('HSET', KEYS[2], 'group', '1', 'title', ARGV[2])
else
  if redis.call('HGET', KEYS[2], 'group') ~= '1' then
    return {}
  end
  local n = tonumber(ARGV[2])
  local was = {}
  for i = 3 + n, #ARGV do
    if redis.call('SREM', KEYS[1], ARGV[i]) == 1 then was[ARGV[i]] = true end
  end
  for i = 3, 2 + n do
    if redis.call('SADD', KEYS[1], ARGV[i]) == 1 then
      -- Removed and added in one call: still a member, no change.
      if was[ARGV[i]] then was[ARGV[i]] = nil else table.insert(added, ARGV[i]) end
    end
  end
  for m, _ in pairs(was) do table.insert(removed, m) end
end
local meta = redis.call('HMGET', KEYS[2], 'title', 'last')
return {meta[1] or '', tonumber(meta[2] or '0'), added, removed, redis.call('SMEMBERS', KEYS[1])}
