-- ratewarden: helpers shared by decide.lua and settle.lua (prepended to each
-- script when it is loaded; this file is not a script of its own).

-- Numbers in strings: Lua 5.1 turns numbers into text with "%.14g", which
-- would mangle 16-digit microsecond timestamps; "%.0f" is exact below 2^53.
local function num(x)
  return string.format("%.0f", x)
end

local function ceil_div(a, b)
  if a <= 0 then return 0 end
  return math.floor((a - 1) / b) + 1
end

local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m, d
end

local DAY = 86400000000
local NEVER = -1

-- Window containing `now`: id, end (NEVER end for lifetime / none).
local function window_at(wk, wlen, off, now)
  if wk == "n" or wk == "l" then return 0, NEVER end
  local l = now + off
  if wk == "f" then
    local id = math.floor(l / wlen)
    return id, id * wlen - off + wlen
  end
  local day = math.floor(l / DAY)
  if wk == "w" then
    local id = math.floor((day - 4) / 7)
    return id, (id * 7 + 4) * DAY - off + 7 * DAY
  end
  local y, m = civil_from_days(day)
  if wk == "m" then
    local ny, nm = y, m + 1
    if m == 12 then ny, nm = y + 1, 1 end
    return y * 12 + m - 1, days_from_civil(ny, nm, 1) * DAY - off
  end
  return y, days_from_civil(y + 1, 1, 1) * DAY - off
end

-- A hold is "amount|expires|parent" (parent: the delegation it was carved from, or empty).
local function split_hold(v)
  local a, e, p = string.match(v, "^(-?%d+)|(-?%d+)|?(%x*)")
  return tonumber(a), tonumber(e), p
end

local function hold_value(amount, expires, parent)
  return num(amount) .. "|" .. num(expires) .. "|" .. (parent or "")
end

-- Adds `delta` (may be negative, never below zero) to hold `id` of `key`, if it is live.
local function adjust_hold(key, id, delta, now)
  if not id or id == "" or delta == 0 then return end
  local v = redis.call("HGET", key, "h:" .. id)
  if not v then return end
  local a, e, p = split_hold(v)
  if e <= now then return end
  redis.call("HSET", key, "h:" .. id, hold_value(math.max(a + delta, 0), e, p))
end

-- Soft allocations of a pool (pool.rs): field "a:<owner>" of the limit's hash
-- = "amount|drawn|window|active_until|lease" (window "n": none drawn yet).
local function allot_parse(f, v)
  local amount, drawn, win, active, lease = string.match(v, "^(%d+)|(%d+)|([n%d-]+)|(%d+)|(%d+)$")
  return {
    field = f, owner = string.sub(f, 3), amount = tonumber(amount) or 0,
    drawn = tonumber(drawn) or 0, window = tonumber(win),
    active_until = tonumber(active) or 0, lease = tonumber(lease) or 0,
  }
end

local function allot_value(a)
  local win = a.window and num(a.window) or "n"
  return num(a.amount) .. "|" .. num(a.drawn) .. "|" .. win .. "|" .. num(a.active_until) .. "|" .. num(a.lease)
end

-- 0 active, 1 idle (its unused part donated), 2 dead (pool.rs Phase).
local function allot_phase(a, now)
  if now < a.active_until then return 0 end
  if now < a.active_until + a.lease then return 1 end
  return 2
end

local function allot_unused(a, wid)
  if a.window == wid then return math.max(a.amount - a.drawn, 0) end
  return a.amount
end

-- Whether scope `who` is `owner` or under it.
local function owns(owner, who)
  return who == owner or string.sub(who, 1, #owner + 1) == owner .. "/"
end

-- Whether a caller at `rank` may draw on another agent's allocation in `phase`.
local function may_draw(rank, phase)
  if phase == 0 then return rank == 0 end
  if phase == 1 then return rank ~= 2 end
  return true
end

-- Live holds of a counter / concurrency hash. Expired ones are deleted; what an
-- expired hold carved from a live parent hold returns to that parent. Also
-- the hash's allocations (a pool's), parsed, the dead ones deleted.
local function live_holds(key, now)
  local flat = redis.call("HGETALL", key)
  local holds, held, dead, byid, allots = {}, 0, {}, {}, {}
  for j = 1, #flat, 2 do
    local f = flat[j]
    if string.sub(f, 1, 2) == "a:" then
      local a = allot_parse(f, flat[j + 1])
      a.phase = allot_phase(a, now)
      if a.phase == 2 then redis.call("HDEL", key, f) else allots[#allots + 1] = a end
    elseif string.sub(f, 1, 2) == "h:" then
      local a, e, p = split_hold(flat[j + 1])
      if e <= now then
        dead[#dead + 1] = { f, a, p }
      else
        holds[#holds + 1] = { e, a }
        byid[string.sub(f, 3)] = a
        held = held + a
      end
    end
  end
  for _, d in ipairs(dead) do
    redis.call("HDEL", key, d[1])
    if d[3] ~= "" and byid[d[3]] then
      adjust_hold(key, d[3], d[2], now)
      byid[d[3]] = byid[d[3]] + d[2]
      held = held + d[2]
    end
  end
  return holds, held, byid, allots
end

local function time_to_free(needed, now, holds)
  if needed <= 0 then return 0 end
  table.sort(holds, function(x, y) return x[1] < y[1] end)
  local freed = 0
  for _, h in ipairs(holds) do
    freed = freed + h[2]
    if freed >= needed then return math.max(h[1] - now, 0) end
  end
  return NEVER
end

-- The request's time: ARGV[1] in µs, or the server clock when it is negative.
local function request_now(arg)
  local now = tonumber(arg)
  if now < 0 then
    local t = redis.call("TIME")
    now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  end
  return now
end

-- GCRA debt at `now`, given the debt `d` recorded at `t` (eval.rs rate_debt_now).
local function rate_debt_now(d, t, now, l)
  if d > 0 and now > t then
    local elapsed = now - t
    if elapsed >= ceil_div(d, l) then return 0 end
    return d - elapsed * l
  end
  return math.max(d, 0)
end

-- Largest stored amount (2^53 - 1): counters and debts saturate here, so every
-- stored number stays exact in a double (eval.rs MAX_AMOUNT, RATE_DEBT_MAX).
local MAX_AMOUNT = 9007199254740991

-- The debt of the rate limit hash `key` at `now`, in the terms of the rate
-- whose p and l are given (eval.rs rate_debt_restated): a debt written under
-- another rate (a reloaded policy; its p and l are stored beside it) drains at
-- its own pace until now, then the units it holds carry over (a part of a
-- unit as a whole one), times p, saturated at MAX_AMOUNT: exact, as in Rust.
local function rate_debt(key, now, p, l)
  local st = redis.call("HMGET", key, "d", "t", "p", "l")
  if not st[1] then return 0 end
  local d, t = tonumber(st[1]), tonumber(st[2])
  local kp, kl = tonumber(st[3]), tonumber(st[4])
  if not kp or not kl or (kp == p and kl == l) or kp <= 0 or kl <= 0 then
    return rate_debt_now(d, t, now, l)
  end
  local units = ceil_div(rate_debt_now(d, t, now, kl), kp)
  return math.min(units * p, MAX_AMOUNT)
end

-- One rate limit's decision (eval.rs rate_eval): allowed, remaining, reset,
-- retry (NEVER when it can never pass) and the debt after admitting. The
-- admission test compares the debt with the room the request leaves, so no
-- intermediate exceeds 2^53.
local function rate_step(debt, amount, usable, burst, p, l)
  local allowed, retry = true, NEVER
  if amount ~= 0 then
    if amount > usable then
      allowed = false
    else
      local room = (usable - amount) * p
      if debt > room then
        allowed = false
        retry = ceil_div(debt - room, l)
      end
    end
  end
  local after = debt
  if allowed then after = debt + amount * p end
  return allowed, math.floor(math.max(burst * p - after, 0) / p), ceil_div(after, l), retry, after
end

-- Key lifetimes: Redis drops a key a second after the state it holds stops
-- mattering, so memory stays bounded without a sweeper.
local function ttl_ms(us)
  return math.max(math.floor(us / 1000) + 1000, 1000)
end

local function expire_in(key, us)
  redis.call("PEXPIRE", key, ttl_ms(us))
end

-- Sets `key` to live until `at` (µs since the epoch); NEVER keeps it for good.
local function expire_at(key, at, now)
  if at == NEVER then
    redis.call("PERSIST", key)
  else
    expire_in(key, at - now)
  end
end

-- Extends `key` to live at least until `at`, never shortening it.
local function keep_until(key, at, now)
  if at == NEVER then
    redis.call("PERSIST", key)
    return
  end
  local ttl = redis.call("PTTL", key)
  local want = ttl_ms(at - now)
  if ttl >= 0 and ttl < want then redis.call("PEXPIRE", key, want) end
end


-- Starvation tracking for a background caller: an admission forgets the
-- streak; a denial starts it (or continues it if the last denial was recent).
local function starvation(key, admitted, now, promote_after)
  if admitted then
    redis.call("DEL", key)
    return
  end
  local s = redis.call("HMGET", key, "s", "l")
  local since = now
  if s[1] and now - tonumber(s[2]) <= promote_after then since = tonumber(s[1]) end
  redis.call("HSET", key, "s", since, "l", now)
  expire_in(key, promote_after)
end

-- Operation memory: the answer of a state-changing decision is kept under its
-- operation id (a string key on the decision's slot), so the same request sent
-- again after a lost reply gets the first answer and changes nothing.

-- The remembered answer under `key`, as numbers, or nil. The answer is kept
-- with the fingerprint of the request it answered (`fp`, hex): the same id
-- sent with another request answers { -7 } (refused, nothing changes).
-- Stored as MessagePack (integers exact, no string formatting).
local function replayed(key, fp)
  local v = redis.call("GET", key)
  if not v then return nil end
  local stored, results = cmsgpack.unpack(v)
  if stored ~= fp then return { -7 } end
  return results
end

-- Remembers `results` (integers) of the request `fp` under `key` for `ms`
-- milliseconds.
local function remember(key, fp, results, ms)
  redis.call("SET", key, cmsgpack.pack(fp, results), "PX", ms)
end
