-- The message.unread schedule, shared by every node (hash tag {wh}).
--
-- KEYS[1] sorted set: conversation -> due ms (one entry per conversation)
-- ARGV[1] op:
--   schedule ARGV[2] conversation, ARGV[3] due ms: keeps the earlier time
--   due      ARGV[2] now ms, ARGV[3] max -> conversations due, removed (so
--            each goes to one node)
if ARGV[1] == 'schedule' then
  local cur = redis.call('ZSCORE', KEYS[1], ARGV[2])
  if not cur or tonumber(ARGV[3]) < tonumber(cur) then
    redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
  end
  return 1
end
if ARGV[1] == 'due' then
  local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
  for _, c in ipairs(due) do
    redis.call('ZREM', KEYS[1], c)
  end
  return due
end
return redis.error_reply('unread.lua: unknown op ' .. tostring(ARGV[1]))
