-- Erases the bodies of one sender's messages in one conversation, as ONE
-- atomic step (every key under the conversation's hash tag).
--
-- A stream entry cannot be edited, and XDEL only flags an entry as deleted:
-- its bytes stay in the stream's node (and in DUMP, RDB and replication).
-- So the stream is copied, entry by entry, into a scratch stream of the same
-- slot, the erased entries with their erased frame, and the copy replaces the
-- original (RENAME): the body leaves Valkey's memory at once, and its
-- persistence files at the next RDB save or AOF rewrite. The cost is linear
-- in the conversation's retained messages (an admin operation, rare).
--
-- KEYS[1] message stream   KEYS[2] scratch stream (absent, or a leftover)
-- ARGV[1] sender   ARGV[2..] pairs: seq, erased frame (rendered by the caller)
-- Every entry keeps its id and its fields t (ts), u (sender), k (idempotency
-- key); an erased one gets f = the erased frame and d = "1". A seq whose
-- entry is gone (retention), of another sender, or already erased is skipped.
-- Returns the number of messages erased by this call.

local function field(entry, name)
  local f = entry[2]
  for i = 1, #f, 2 do
    if f[i] == name then return f[i + 1] end
  end
  return nil
end

local function erasable(e)
  return e and field(e, 'u') == ARGV[1] and field(e, 'd') ~= '1'
end

local want, any = {}, false
for i = 2, #ARGV, 2 do
  local id = ARGV[i] .. '-0'
  want[id] = ARGV[i + 1]
  if not any and erasable(redis.call('XRANGE', KEYS[1], id, id)[1]) then any = true end
end
if not any then return 0 end

redis.call('DEL', KEYS[2])
local n, start = 0, '-'
while true do
  local batch = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', 1000)
  if #batch == 0 then break end
  for _, e in ipairs(batch) do
    local id, f = e[1], e[2]
    if want[id] and erasable(e) then
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
    else
      redis.call('XADD', KEYS[2], id, unpack(f))
    end
  end
  start = '(' .. batch[#batch][1]
end
redis.call('RENAME', KEYS[2], KEYS[1])
return n
