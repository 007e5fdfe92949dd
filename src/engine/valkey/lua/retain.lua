-- Age retention on a timer: drops a conversation's oldest events (messages
-- and v1.2 updates) stored before a cutoff, with a message's side records
-- (idempotency record, own-seq entry, message-seq index, current state), so
-- an idle conversation is trimmed too (append.lua and update.lua trim only
-- on a write). The meta hash (last seq, epoch) is left alone: seqs are never
-- reused. `retain` is retention.lua's (prepended), which drops at most 64
-- expired events per call.
--
-- KEYS[1] event stream   KEYS[2] idempotency hash   KEYS[3] message-seq index
-- KEYS[4] current states
-- ARGV[1] min ts kept (ms)  ARGV[2] own-seqs key prefix
-- Returns the number of events dropped (64: call again).

local before = redis.call('XLEN', KEYS[1])
retain(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[2], before, tonumber(ARGV[1]), math.huge)
return before - redis.call('XLEN', KEYS[1])
