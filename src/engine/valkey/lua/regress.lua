-- The stored history of a conversation ends before a seq a node delivered
-- under the same epoch: a failover to a replica that missed writes. Gives the
-- conversation a new epoch (data loss is announced, never silent) and keeps
-- the old one as `prev`, so every node that delivered under it knows.
--
-- KEYS[1] meta hash
-- ARGV[1] the epoch the node delivered under, ARGV[2] the highest seq it
-- delivered, ARGV[3] a fresh epoch
-- Returns {epoch, prev} after the call ('' for a missing field).
local e = redis.call('HGET', KEYS[1], 'epoch')
local p = redis.call('HGET', KEYS[1], 'prev') or ''
if e ~= ARGV[1] then return {e or '', p} end
local last = tonumber(redis.call('HGET', KEYS[1], 'last') or '0')
if last >= tonumber(ARGV[2]) then return {e, p} end
redis.call('HSET', KEYS[1], 'epoch', ARGV[3], 'prev', ARGV[1])
return {ARGV[3], ARGV[1]}
