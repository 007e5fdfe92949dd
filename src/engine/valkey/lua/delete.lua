-- Deletes a group conversation and its whole history as ONE atomic step
-- (every key under the conversation's hash tag). The next message of a group
-- created again under this id gets seq 1 under a fresh epoch (append.lua sets
-- one when the meta hash has none), so no seq is reused within an epoch.
--
-- KEYS[1] meta hash   KEYS[2] members set   KEYS[3] message stream
-- KEYS[4] idempotency hash   KEYS[5] receipts hash
-- KEYS[6] erasure scratch stream   KEYS[7] erasure lock (an erasure under
--         way gives up when its lock is gone)
-- KEYS[8] message-seq index (sorted set)   KEYS[9] current-state hash (v1.2)
-- ARGV[1] own-seqs key prefix (+ sender id)
-- Returns {} when no group has this id (a repeat, or never created), else
-- {title, {members...}}: the members just before.
-- Linear in the retained messages (the senders' own-seq sets are found in
-- the stream); UNLINK frees the memory in the background.

if redis.call('HGET', KEYS[1], 'group') ~= '1' then
  return {}
end
local title = redis.call('HGET', KEYS[1], 'title') or ''
local members = redis.call('SMEMBERS', KEYS[2])

local senders, start = {}, '-'
while true do
  local batch = redis.call('XRANGE', KEYS[3], start, '+', 'COUNT', 1000)
  if #batch == 0 then break end
  for _, e in ipairs(batch) do
    local f = e[2]
    for i = 1, #f, 2 do
      if f[i] == 'u' then senders[f[i + 1]] = true end
    end
  end
  start = '(' .. batch[#batch][1]
end
for u, _ in pairs(senders) do
  redis.call('UNLINK', ARGV[1] .. u)
end
redis.call('UNLINK', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9])
return {title, members}
