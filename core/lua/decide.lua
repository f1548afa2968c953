-- ratewarden: decide one request atomically (check | acquire | reserve).
--
-- Mirrors core/src/eval.rs formula for formula; every number stays below 2^53
-- (times are microseconds since the epoch, amounts are integer base units), so
-- Lua's doubles compute exactly what the embedded engine computes.
--
-- KEYS[1..n]  one hash per limit instance, in plan order
--               rate:            d = debt, t = time of d
--               quota / budget:  w = window id, u = used, h:<id> = "amount|expires"
--               concurrency:     h:<id> = "amount|expires"
-- KEYS[n+1]   the caller's starvation tracker (s = since, l = last); background only
-- KEYS[n+2]   the reservation record hash (reserve only)
--
-- ARGV[1]  now in µs, or "-1" to read the server clock (TIME) — production always does
-- ARGV[2]  mode: "check" | "acquire" | "reserve"
-- ARGV[3]  n, the number of limits
-- ARGV[4]  requested priority rank: 0 critical, 1 standard, 2 background
-- ARGV[5]  promote_after (µs)
-- ARGV[6]  1 if KEYS[n+1] is a starvation tracker, else 0
-- ARGV[7]  reservation id (reserve), else ""
-- ARGV[8]  lease (µs)
-- ARGV[9]  how long an ended reservation record is kept (µs)
-- ARGV[10] the request's scope (stored in the record)
-- ARGV[11 + 13*(i-1) ...] per limit i, 13 fields:
--   kind ("r" rate, "c" quota/budget, "s" concurrency), amount, capacity
--   (rate: burst), usable for rank 0, 1, 2 (capacity minus the floor),
--   p, l (rate), window kind ("n" none, "l" lifetime, "f" fixed, "w" week,
--   "m" month, "y" year), window length (µs, fixed), window offset (µs),
--   unit, overage ("charge" | "cap")
--
-- Returns { served rank, expires_at (reserve) or 0, then per limit:
--           allowed (0|1), remaining, reset (µs), retry (µs, -1 = never) }

-- (helpers: common.lua, prepended at load time)

local now = tonumber(ARGV[1])
if now < 0 then
  local t = redis.call("TIME")
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local mode = ARGV[2]
local n = tonumber(ARGV[3])
local rank = tonumber(ARGV[4])
local promote_after = tonumber(ARGV[5])
local has_caller = ARGV[6] == "1"
local rid = ARGV[7]
local lease = tonumber(ARGV[8])
local tombstone = tonumber(ARGV[9])

-- Starvation promotion (background only).
local starve = KEYS[n + 1]
if has_caller and rank == 2 then
  local s = redis.call("HMGET", starve, "s", "l")
  if s[1] then
    local since, last = tonumber(s[1]), tonumber(s[2])
    if now - last <= promote_after and now - since >= promote_after then rank = 1 end
  end
end

local items, results, all = {}, {}, true
for i = 1, n do
  local b = 11 + 13 * (i - 1)
  local it = {
    key = KEYS[i], kind = ARGV[b], amount = tonumber(ARGV[b + 1]), cap = tonumber(ARGV[b + 2]),
    usable = tonumber(ARGV[b + 3 + rank]), p = tonumber(ARGV[b + 6]), l = tonumber(ARGV[b + 7]),
    wk = ARGV[b + 8], wlen = tonumber(ARGV[b + 9]), woff = tonumber(ARGV[b + 10]),
    unit = ARGV[b + 11], overage = ARGV[b + 12],
  }
  local allowed, remaining, reset, retry
  if it.kind == "r" then
    local st = redis.call("HMGET", it.key, "d", "t")
    local debt = 0
    if st[1] then
      local d, t = tonumber(st[1]), tonumber(st[2])
      if d > 0 and now > t then
        local elapsed = now - t
        if elapsed >= ceil_div(d, it.l) then d = 0 else d = d - elapsed * it.l end
      end
      debt = math.max(d, 0)
    end
    local need = debt + it.amount * it.p
    allowed = it.amount == 0 or need <= it.usable * it.p
    local after = allowed and need or debt
    remaining = math.floor(math.max(it.cap * it.p - after, 0) / it.p)
    reset = ceil_div(after, it.l)
    retry = NEVER
    if not allowed and it.amount <= it.usable then retry = ceil_div(need - it.usable * it.p, it.l) end
    it.debt_after = need
  else
    local wid, wend = window_at(it.wk, it.wlen, it.woff, now)
    local used = 0
    if it.kind == "c" then
      local st = redis.call("HMGET", it.key, "w", "u")
      if st[1] and tonumber(st[1]) == wid then used = tonumber(st[2]) end
    end
    local holds, held = live_holds(it.key, now)
    allowed = it.amount == 0 or used + held + it.amount <= it.usable
    local taken = allowed and it.amount or 0
    remaining = math.max(it.cap - used - held - taken, 0)
    reset = wend == NEVER and 0 or math.max(wend - now, 0)
    retry = NEVER
    if not allowed and it.amount <= it.usable then
      local by_holds, by_window = NEVER, NEVER
      if used + it.amount <= it.usable then
        by_holds = time_to_free(used + held + it.amount - it.usable, now, holds)
      end
      if wend ~= NEVER then
        local after = time_to_free(held + it.amount - it.usable, now, holds)
        if after ~= NEVER then by_window = math.max(after, wend - now) end
      end
      if by_holds == NEVER then retry = by_window
      elseif by_window == NEVER then retry = by_holds
      else retry = math.min(by_holds, by_window) end
    end
    it.wid, it.wend, it.used, it.holds = wid, wend, used, holds
  end
  if not allowed then all = false end
  items[i] = it
  results[#results + 1] = allowed and 1 or 0
  results[#results + 1] = remaining
  results[#results + 1] = reset
  results[#results + 1] = retry
end

-- Keeps a key only while its state differs from a fresh one (bounded memory).
local function expire_at(key, at)
  if at == NEVER then
    redis.call("PERSIST", key)
  else
    redis.call("PEXPIRE", key, math.max(math.floor((at - now) / 1000) + 1000, 1000))
  end
end

local expires_at = 0
if all and mode ~= "check" then
  local reserving = mode == "reserve"
  if reserving then expires_at = now + lease end
  local record = {}
  for i = 1, n do
    local it = items[i]
    if it.kind == "r" then
      redis.call("HSET", it.key, "d", it.debt_after, "t", now)
      expire_at(it.key, now + ceil_div(it.debt_after, it.l))
    else
      local last = it.wend
      if it.kind == "c" then
        local used = it.used
        if not reserving then used = used + it.amount end
        redis.call("HSET", it.key, "w", it.wid, "u", used)
        if it.wend == NEVER and used > 0 then last = NEVER end
        if it.wend == NEVER and used == 0 then last = now end
      else
        last = now
      end
      if reserving and it.amount > 0 then
        redis.call("HSET", it.key, "h:" .. rid, num(it.amount) .. "|" .. num(expires_at))
        if last ~= NEVER then last = math.max(last, expires_at) end
      end
      for _, h in ipairs(it.holds) do
        if last ~= NEVER then last = math.max(last, h[1]) end
      end
      if it.kind == "s" and not reserving and #it.holds == 0 then
        -- concurrency acquire holds nothing; leave the key as it was
      else
        expire_at(it.key, last)
      end
    end
    if reserving then
      record[#record + 1] = "i" .. i
      record[#record + 1] = table.concat({ it.key, it.kind, num(it.amount), num(it.p), num(it.l), it.wk, num(it.wlen), num(it.woff), it.unit, it.overage }, "\t")
    end
  end
  if reserving then
    local rec = KEYS[n + 2]
    redis.call("DEL", rec)
    redis.call("HSET", rec, "st", "a", "exp", expires_at, "n", n, "scope", ARGV[10], unpack(record))
    redis.call("PEXPIRE", rec, math.floor((lease + tombstone) / 1000) + 1000)
  end
end

if has_caller and mode ~= "check" and tonumber(ARGV[4]) == 2 then
  if all then
    redis.call("DEL", starve)
  else
    local s = redis.call("HMGET", starve, "s", "l")
    local since = now
    if s[1] and now - tonumber(s[2]) <= promote_after then since = tonumber(s[1]) end
    redis.call("HSET", starve, "s", since, "l", now)
    redis.call("PEXPIRE", starve, math.floor(promote_after / 1000) + 1000)
  end
end

table.insert(results, 1, expires_at)
table.insert(results, 1, rank)
return results
