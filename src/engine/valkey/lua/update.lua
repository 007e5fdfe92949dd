-- Stores one change of a message (v1.2) as ONE atomic step: the update entry
-- under the conversation's next seq (the same counter as messages), the
-- target's new current state, retention, the send bucket and publication.
-- The change was decided by the caller on the state it read; this script
-- stores it only if that state is still the current one (compare and set),
-- else answers {-3} and the caller decides again.
--
-- KEYS[1] meta hash   KEYS[2] message stream   KEYS[3] idempotency hash
-- KEYS[4] members set   KEYS[5] the user's send bucket
-- KEYS[6] message-seq index   KEYS[7] current-state hash
-- KEYS[8] the user's send byte bucket (limits.send_bytes_per_s)
-- ARGV[1] target seq   ARGV[2] the target's state as read ("" = none)
-- ARGV[3] the epoch read   ARGV[4] "1": user must be in KEYS[4]
-- ARGV[5] user id   ARGV[6] ts (ms)   ARGV[7] kind (e, d, r)
-- ARGV[8], ARGV[9] the update frame around its seq
-- ARGV[10], ARGV[11] the same frame with an empty body (edits; erasure swaps
--                    it in), else ""
-- ARGV[12], ARGV[13] the target's new state around the seq of this update
-- ARGV[14] max entries kept   ARGV[15] min ts kept (0 = no age limit)
-- ARGV[16] own-seqs key prefix   ARGV[17] sends per second (0: no bucket)   ARGV[18] burst
-- ARGV[19] pub/sub: "p", "s" or "n"   ARGV[20] payload head
-- ARGV[21] an edit's body bytes (as stored)   ARGV[22] bytes per second
--          (0: no byte bucket)   ARGV[23] byte burst
-- ARGV[24..] channels
-- Returns {seq}, {-1} not a member, {-2, retry_after_ms} bucket empty,
-- {-3} the state or the epoch changed meanwhile, {-4} no such message,
-- {-5, retry_after_ms} the byte bucket is short.

if ARGV[4] == '1' and redis.call('SISMEMBER', KEYS[4], ARGV[5]) == 0 then
  return {-1}
end
if (redis.call('HGET', KEYS[1], 'epoch') or '') ~= ARGV[3] then
  return {-3}
end
local target = redis.call('XRANGE', KEYS[2], ARGV[1] .. '-0', ARGV[1] .. '-0')[1]
if not target or field(target, 'x') then
  return {-4}
end
if (redis.call('HGET', KEYS[7], ARGV[1]) or '') ~= ARGV[2] then
  return {-3}
end

-- rate 0: no bucket (the service API's moderation, as for its posts).
local refused, take_budget = send_budget(KEYS[5], ARGV[17], ARGV[18], KEYS[8], ARGV[21], ARGV[22], ARGV[23])
if refused then
  return refused
end
take_budget()

local seq = redis.call('HINCRBY', KEYS[1], 'last', 1)
local frame = ARGV[8] .. seq .. ARGV[9]
if ARGV[10] ~= '' then
  redis.call('XADD', KEYS[2], seq .. '-0', 'f', frame, 't', ARGV[6], 'u', ARGV[5], 'x', ARGV[7], 'g', ARGV[1],
    'fe', ARGV[10] .. seq .. ARGV[11])
else
  redis.call('XADD', KEYS[2], seq .. '-0', 'f', frame, 't', ARGV[6], 'u', ARGV[5], 'x', ARGV[7], 'g', ARGV[1])
end
redis.call('HSET', KEYS[7], ARGV[1], ARGV[12] .. seq .. ARGV[13])
retain(KEYS[2], KEYS[3], KEYS[6], KEYS[7], ARGV[16], tonumber(ARGV[14]), tonumber(ARGV[15]), seq)

if ARGV[19] ~= 'n' then
  local payload = ARGV[20] .. seq .. ':' .. ARGV[3] .. '\n' .. frame
  local cmd = 'PUBLISH'
  if ARGV[19] == 's' then cmd = 'SPUBLISH' end
  for i = 24, #ARGV do
    redis.call(cmd, ARGV[i], payload)
  end
end
return {seq}
