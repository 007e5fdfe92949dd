-- Erases the bodies of one sender's messages in one conversation (every key
-- under the conversation's hash tag), in steps that each block Valkey briefly,
-- while readers see the erasure all at once.
--
-- A stream entry cannot be edited, and XDEL only flags an entry as deleted:
-- its bytes stay in the stream's node (and in DUMP, RDB and replication). So
-- the stream is copied, a range of seqs per call ("copy"), into a scratch
-- stream, the erased entries with their erased frame; "finish" copies what was
-- appended meanwhile, drops from the copy what retention dropped from the
-- stream meanwhile (always its oldest entries), and swaps the copy in with
-- RENAME: one atomic step, after which no byte of an erased body is left in
-- Valkey's memory (its persistence files lose it at the next RDB save or AOF
-- rewrite). The stream itself is never changed before that swap, so appends,
-- history pages and gap fills go on as usual while the copy is made.
--
-- One erasure per conversation at a time: a lock key holds the erasing call's
-- token; every step checks it, and a group delete removes it (with the
-- scratch), so an erasure that overlapped a delete gives up instead of
-- swapping an old history back in.
--
-- KEYS[1] message stream   KEYS[2] scratch stream   KEYS[3] lock
-- ARGV[1] step   ARGV[2] token   ARGV[3] sender
-- "begin"  ARGV[4] lock ttl (ms). Takes the lock and clears the scratch.
--          Returns {1, first seq held, last seq held}, or {0} while another
--          erasure holds the lock.
-- "copy"   ARGV[4] lock ttl (ms), ARGV[5] from seq (exclusive), ARGV[6] to seq
--          (inclusive), ARGV[7..] pairs: seq, erased frame (rendered by the
--          caller). Copies the entries in (from, to].
-- "finish" ARGV[4] unused, ARGV[5] from seq (exclusive), ARGV[6] how many
--          ARGV are pairs, ARGV[7..] pairs, then every erased seq. Copies the
--          entries above `from`, swaps, and empties the current state (v1.2)
--          of every erased seq.
-- "abort"  releases the lock and drops the scratch (the caller failed midway).
-- "copy" and "finish" return how many messages they erased, or -1 when the
-- lock is not this call's any more (the caller starts again).
-- Every entry keeps its id and its fields t (ts), u (sender), k (idempotency
-- key); an erased one gets f = the erased frame and d = "1". A seq whose
-- entry is gone (retention), of another sender, or already erased is skipped.
-- An edit update of the sender (v1.2: x = "e") gets f = its erased frame
-- (field fe, stored with it), so no edited body outlives the swap either.
-- KEYS[4] the current-state hash (v1.2).

local step = ARGV[1]

if step == 'begin' then
  if not redis.call('SET', KEYS[3], ARGV[2], 'NX', 'PX', ARGV[4]) then
    return {0}
  end
  redis.call('DEL', KEYS[2])
  local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
  local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
  if not first then return {1, 0, 0} end
  return {1, tonumber(string.match(first[1], '^(%d+)-')), tonumber(string.match(last[1], '^(%d+)-'))}
end

if redis.call('GET', KEYS[3]) ~= ARGV[2] then
  return -1
end

if step == 'abort' then
  redis.call('DEL', KEYS[2], KEYS[3])
  return 0
end

local function field(entry, name)
  local f = entry[2]
  for i = 1, #f, 2 do
    if f[i] == name then return f[i + 1] end
  end
  return nil
end

local want = {}
local pairs_end = #ARGV
if step == 'finish' then pairs_end = 6 + tonumber(ARGV[6]) end
for i = 7, pairs_end, 2 do
  want[ARGV[i] .. '-0'] = ARGV[i + 1]
end

-- Copies the stream's entries from `start` (an XRANGE bound) to `stop`.
local function copy(start, stop)
  local n = 0
  while true do
    local batch = redis.call('XRANGE', KEYS[1], start, stop, 'COUNT', 1000)
    if #batch == 0 then break end
    for _, e in ipairs(batch) do
      local id, f = e[1], e[2]
      if want[id] and field(e, 'u') == ARGV[3] and field(e, 'd') ~= '1' then
        local out = {}
        for i = 1, #f, 2 do
          if f[i] == 'f' then
            table.insert(out, 'f')
            table.insert(out, want[id])
          elseif f[i] ~= 'd' then
            table.insert(out, f[i])
            table.insert(out, f[i + 1])
          end
        end
        table.insert(out, 'd')
        table.insert(out, '1')
        redis.call('XADD', KEYS[2], id, unpack(out))
        n = n + 1
      elseif field(e, 'x') == 'e' and field(e, 'u') == ARGV[3] and field(e, 'fe') then
        local out = {}
        for i = 1, #f, 2 do
          if f[i] == 'f' then
            table.insert(out, 'f')
            table.insert(out, field(e, 'fe'))
          elseif f[i] ~= 'fe' then
            table.insert(out, f[i])
            table.insert(out, f[i + 1])
          end
        end
        redis.call('XADD', KEYS[2], id, unpack(out))
      else
        redis.call('XADD', KEYS[2], id, unpack(f))
      end
    end
    start = '(' .. batch[#batch][1]
  end
  return n
end

if step == 'copy' then
  redis.call('PEXPIRE', KEYS[3], ARGV[4])
  return copy('(' .. ARGV[5] .. '-0', ARGV[6] .. '-0')
end

-- finish
local n = copy('(' .. ARGV[5] .. '-0', '+')
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
if first then
  redis.call('XTRIM', KEYS[2], 'MINID', first[1])
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('RENAME', KEYS[2], KEYS[1])
else
  redis.call('DEL', KEYS[1])
end
redis.call('DEL', KEYS[3])
for i = pairs_end + 1, #ARGV do
  local state = redis.call('HGET', KEYS[4], ARGV[i])
  if state then
    local st = cjson.decode(state)
    st['b'] = ''
    st['d'] = true
    redis.call('HSET', KEYS[4], ARGV[i], cjson.encode(st))
  end
end
return n
