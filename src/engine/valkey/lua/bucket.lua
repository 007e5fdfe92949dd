-- Token buckets, shared by append.lua, update.lua and connect.lua (prepended
-- to each when embedded). A bucket is a hash: tk = tokens left, ts = ms of
-- the last take, on Valkey's clock, so every node sees one bucket.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The tokens in bucket `key` at `now`: refilled at `rate` per second since
-- the last take, up to `burst`; a bucket never used is full.
local function bucket_level(key, rate, burst, now)
  local b = redis.call('HMGET', key, 'tk', 'ts')
  local tokens = tonumber(b[1]) or burst
  local last = tonumber(b[2]) or now
  return math.min(burst, tokens + math.max(0, now - last) * rate / 1000)
end

-- Milliseconds until a bucket at `tokens` holds `need` (at least 1).
local function bucket_wait(tokens, need, rate)
  return math.max(1, math.ceil((need - tokens) * 1000 / rate))
end

-- Takes `need` from bucket `key`, read at `tokens`; the key expires once the
-- bucket would be full again.
local function bucket_take(key, tokens, need, rate, burst, now)
  redis.call('HSET', key, 'tk', tostring(tokens - need), 'ts', now)
  redis.call('PEXPIRE', key, math.ceil(burst * 1000 / rate) + 1000)
end

-- A sender's two budgets, checked together before anything is written: the
-- send bucket `key` (one token; `rate` 0: none) and the byte bucket `bkey`
-- (`need` bytes; `brate` 0: none). Returns the refusal ({-2, ms}: no send
-- token, {-5, ms}: too few bytes), or nil and a function that takes both.
local function send_budget(key, rate, burst, bkey, need, brate, bburst)
  local now = now_ms()
  rate, burst = tonumber(rate), tonumber(burst)
  need, brate, bburst = tonumber(need), tonumber(brate), tonumber(bburst)
  local tokens, btokens = 0, 0
  if rate > 0 then
    tokens = bucket_level(key, rate, burst, now)
    if tokens < 1 then
      return {-2, bucket_wait(tokens, 1, rate)}
    end
  end
  if brate > 0 then
    btokens = bucket_level(bkey, brate, bburst, now)
    if btokens < need then
      return {-5, bucket_wait(btokens, need, brate)}
    end
  end
  return nil, function()
    if rate > 0 then
      bucket_take(key, tokens, 1, rate, burst, now)
    end
    if brate > 0 then
      bucket_take(bkey, btokens, need, brate, bburst, now)
    end
  end
end
