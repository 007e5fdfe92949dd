-- Stores one message: idempotency check, gap-free seq, stream entry, retention
-- and publication, as ONE atomic step. Every key is under the conversation's
-- hash tag, so the script runs on one Cluster slot.
--
-- KEYS[1] meta hash     (field `last`: the last seq; `group`: 1 for groups)
-- KEYS[2] message stream (entry id `<seq>-0`; fields f=frame, t=ts ms, u=sender, k=idempotency key)
-- KEYS[3] idempotency hash (`<sender>\n<client_msg_id>` -> seq)
-- KEYS[4] members set   (checked when ARGV[8] == "1")
-- KEYS[5] the sender's send bucket (hash: tk = tokens, ts = ms of the last take)
-- KEYS[6] message-seq index (sorted set: history pages and unread counts skip
--         updates, v1.2)   KEYS[7] current-state hash (seq -> state of a changed message)
-- KEYS[8] the sender's send byte bucket (limits.send_bytes_per_s)
-- ARGV[1] idempotency key        ARGV[2] ts (ms)          ARGV[3] sender id
-- ARGV[4] frame head (`..."seq":`) ARGV[5] frame tail (`,"ts":...}`)
-- ARGV[6] max messages kept      ARGV[7] min ts kept (ms, 0 = no age limit)
-- ARGV[8] "1": sender must be in KEYS[4]
-- ARGV[9] own-seqs key prefix (+ sender id: a sorted set of the sender's seqs, for unread counts)
-- ARGV[10] pub/sub: "p" PUBLISH, "s" SPUBLISH, "n" none (the caller publishes)
-- ARGV[11] pub/sub payload head (`<seq>:<epoch>`, "\n" and the frame follow)
-- ARGV[12] a fresh epoch, used when the conversation has none (first message,
--          or its history was lost: seqs start again, under a new epoch)
-- ARGV[13] sends per second per user, ARGV[14] burst (token bucket, across
--          every node; Valkey's clock); rate "0": no bucket (the service API)
-- ARGV[15] the body's bytes (as stored), ARGV[16] bytes per second, ARGV[17]
--          byte burst (the byte bucket, in the same step: one round trip);
--          rate "0": no byte bucket
-- ARGV[18..] channels
-- Returns {seq, ts, duplicate(0|1), epoch}, {-1} when the sender is not a
-- member, {-2, retry_after_ms} when the sender's bucket is empty, {-5,
-- retry_after_ms} when their byte bucket is short. Nothing is written before
-- these checks pass, so a refused write (OOM) stores nothing; a repeat (same
-- idempotency key) costs no token.

if ARGV[8] == '1' and redis.call('SISMEMBER', KEYS[4], ARGV[3]) == 0 then
  return {-1}
end

local known = redis.call('HGET', KEYS[3], ARGV[1])
if known then
  local e = redis.call('XRANGE', KEYS[2], known .. '-0', known .. '-0')
  local ts = 0
  if e[1] then ts = tonumber(field(e[1], 't')) end
  return {tonumber(known), ts, 1, redis.call('HGET', KEYS[1], 'epoch') or ''}
end

local refused, take_budget = send_budget(KEYS[5], ARGV[13], ARGV[14], KEYS[8], ARGV[15], ARGV[16], ARGV[17])
if refused then
  return refused
end

local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[12]
  -- A new history: its message-seq index is complete from the start.
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'mseq', '1')
end
local seq = redis.call('HINCRBY', KEYS[1], 'last', 1)
take_budget()
local frame = ARGV[4] .. seq .. ARGV[5]
redis.call('XADD', KEYS[2], seq .. '-0', 'f', frame, 't', ARGV[2], 'u', ARGV[3], 'k', ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], seq)
redis.call('ZADD', ARGV[9] .. ARGV[3], seq, seq)

redis.call('ZADD', KEYS[6], seq, seq)
retain(KEYS[2], KEYS[3], KEYS[6], KEYS[7], ARGV[9], tonumber(ARGV[6]), tonumber(ARGV[7]), seq)

if ARGV[10] ~= 'n' then
  local payload = ARGV[11] .. seq .. ':' .. epoch .. '\n' .. frame
  local cmd = 'PUBLISH'
  if ARGV[10] == 's' then cmd = 'SPUBLISH' end
  for i = 18, #ARGV do
    redis.call(cmd, ARGV[i], payload)
  end
end
return {seq, tonumber(ARGV[2]), 0, epoch}
