-- ratewarden: decide one request atomically (check | acquire | reserve | delegate).
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
-- KEYS[n+2]   the reservation record hash (reserve, delegate)
-- KEYS[n+3 .. n+2+g]  delegation grants of the scope's levels, shallowest first
--               (d = delegation id, e = expiry µs, c = tab-separated keys it covers)
-- KEYS[n+3+g] delegate: the child's grant hash to create
-- KEYS[n+4+g] delegate from a reservation: the parent's record
-- KEYS[n+5+g] where the answer is remembered under ARGV[15] (see common.lua)
--
-- ARGV[1]  now in µs, or "-1" to read the server clock (TIME) — production always does
-- ARGV[2]  mode: "check" | "acquire" | "reserve" | "delegate"
-- ARGV[3]  n, the number of limits
-- ARGV[4]  requested priority rank: 0 critical, 1 standard, 2 background
-- ARGV[5]  promote_after (µs)
-- ARGV[6]  1 if KEYS[n+1] is a starvation tracker, else 0
-- ARGV[7]  reservation id (reserve), else ""
-- ARGV[8]  lease (µs)
-- ARGV[9]  how long an ended reservation record is kept (µs)
-- ARGV[10] the scope stored in the record (delegate: the child's)
-- ARGV[11] g, the number of grant keys
-- ARGV[12] delegate: the parent reservation's id, or ""
-- ARGV[13] "1" when this is the first step of a request spanning several
--          cluster slots: an allowed request leaves the starvation tracker for
--          the last step to settle (see settle.lua), a denied one updates it
-- ARGV[14] reserve: ids of the same request's reservations on other slots
--          (comma-separated), stored in the record as `links`; else ""
-- ARGV[15] the operation id an admitted decision is remembered under, or "":
--          one already admitted under it is answered as it was, unchanged (a
--          denial changed nothing and is not remembered)
-- ARGV[16] how long the answer is remembered (ms)
-- ARGV[17] the request's fingerprint (hex): the id sent again with another
--          request is refused with { -7 }
-- ARGV[18 + 13*(i-1) ...] per limit i, 13 fields:
--   kind ("r" rate, "c" quota/budget, "s" concurrency), amount, capacity
--   (rate: burst), usable for rank 0, 1, 2 (capacity minus the floor),
--   p, l (rate), window kind ("n" none, "l" lifetime, "f" fixed, "w" week,
--   "m" month, "y" year), window length (µs, fixed), window offset (µs),
--   unit, overage ("charge" | "cap")
--
-- ARGV[18 + 13*n ...] the caller's place in line (plan.rs `Waiter`), 4 fields:
--   id (hex; "" when the caller does not wait in line), how long until it
--   gives up (µs), the grace a place is kept past its next retry (µs), and
--   "1" to leave the line (sent with a check)
--   A place is the field "q:<id>" = "rank|joined|expires|amount" of each
--   limit's hash. A waiter's decision counts what the live places ahead of it
--   (a better rank, or the same rank and joined earlier) still need as taken;
--   a denied waiter keeps (or takes) its place until its retry plus the grace,
--   an admitted one leaves it.
--
-- Returns { served rank, expires_at (reserve) or 0, 1 if a starvation tracker
--           was left to the last step (ARGV[13]) else 0, then per limit:
--           allowed (0|1), remaining, reset (µs), retry (µs, -1 = never),
--           held (by live holds) }
-- or { -code } on a refused delegation: 1 the child already has an open
-- delegation, 2 no such parent reservation, 3 it expired, 4 it was committed,
-- 5 it was released, 6 the child is not under its scope; or { -7 } when the
-- operation id answered another request before.

-- (helpers: common.lua, prepended at load time)

local now = request_now(ARGV[1])
local mode = ARGV[2]
local n = tonumber(ARGV[3])
local rank = tonumber(ARGV[4])
local promote_after = tonumber(ARGV[5])
local has_caller = ARGV[6] == "1"
local rid = ARGV[7]
local lease = tonumber(ARGV[8])
local tombstone = tonumber(ARGV[9])
local g = tonumber(ARGV[11])
local parent_id = ARGV[12]
local first_step = ARGV[13] == "1"
local links = ARGV[14]
local who = ARGV[10]
local op_key = ARGV[15] ~= "" and KEYS[n + 5 + g] or nil
if op_key then
  local prev = replayed(op_key, ARGV[17])
  if prev then return prev end
end

-- Limits a delegation covers spend from its hold instead (deepest grant wins;
-- a parent reservation being carved overrides them all).
local shadow = {}
for j = 1, g do
  local gr = redis.call("HMGET", KEYS[n + 2 + j], "d", "c", "e")
  if gr[1] and tonumber(gr[3]) > now then
    for k in string.gmatch(gr[2], "[^\t]+") do shadow[k] = gr[1] end
  end
end
if mode == "delegate" then
  local open = redis.call("HGET", KEYS[n + 3 + g], "e")
  if open and tonumber(open) > now then return { -1 } end
  if parent_id ~= "" then
    local prec = KEYS[n + 4 + g]
    local ps = redis.call("HMGET", prec, "st", "exp", "n", "scope")
    if not ps[1] then return { -2 } end
    if ps[1] == "c" then return { -4 } end
    if ps[1] == "r" then return { -5 } end
    if tonumber(ps[2]) <= now then return { -3 } end
    if string.sub(ARGV[10], 1, #ps[4] + 1) ~= ps[4] .. "/" then return { -6 } end
    for k = 1, tonumber(ps[3]) do
      local f = redis.call("HGET", prec, "i" .. k)
      local key, kind = string.match(f, "^([^\t]+)\t([^\t]+)")
      if kind ~= "r" then shadow[key] = parent_id end
    end
  end
end

-- The caller's place in line, if it waits in one.
local wb = 18 + 13 * n
local me = ARGV[wb] or ""
local in_line = me ~= ""
local w_left, w_grace = tonumber(ARGV[wb + 1] or "0"), tonumber(ARGV[wb + 2] or "0")
local my_place = "q:" .. me
if in_line and ARGV[wb + 3] == "1" then
  for i = 1, n do redis.call("HDEL", KEYS[i], my_place) end
  in_line = false
end

-- Starvation promotion (background only).
local starve = KEYS[n + 1]
if has_caller and rank == 2 then
  local s = redis.call("HMGET", starve, "s", "l")
  if s[1] then
    local since, last = tonumber(s[1]), tonumber(s[2])
    if now - last <= promote_after and now - since >= promote_after then rank = 1 end
  end
end

-- What the live places ahead of the caller in `key`'s line still need (at
-- most MAX_AMOUNT), when the caller joined it (now, if it has no place yet)
-- and the latest expiry of the others' places; lapsed places are removed.
local function line_ahead(key)
  local flat = redis.call("HGETALL", key)
  local others, joined, dead, last = {}, now, {}, 0
  for j = 1, #flat, 2 do
    local f = flat[j]
    if string.sub(f, 1, 2) == "q:" then
      local r, t, e, a = string.match(flat[j + 1], "^(%d+)|(%d+)|(%d+)|(%d+)$")
      e = tonumber(e)
      if not e or e <= now then
        dead[#dead + 1] = f
      elseif f == my_place then
        joined = tonumber(t)
      else
        others[#others + 1] = { tonumber(r), tonumber(t), string.sub(f, 3), tonumber(a) }
        last = math.max(last, e)
      end
    end
  end
  if #dead > 0 then redis.call("HDEL", key, unpack(dead)) end
  local ahead = 0
  for _, q in ipairs(others) do
    if q[1] < rank or (q[1] == rank and (q[2] < joined or (q[2] == joined and q[3] < me))) then
      ahead = math.min(ahead + q[4], MAX_AMOUNT)
    end
  end
  return ahead, joined, last
end

-- The amount a waiter is tested with: its own plus what is ahead of it; and
-- whether both cannot fit at all (it is then refused until the waiters ahead
-- are served, its retry reckoned for the whole of what is usable).
local function with_ahead(amount, ahead, usable)
  if amount == 0 or ahead == 0 or amount > usable then return amount, false end
  if ahead > usable - amount then return usable, true end
  return amount + ahead, false
end

-- How soon a waiter refused only for the waiters ahead of it looks again when
-- nothing else says when (they are due now; a dead one's place lapses).
local LINE_POLL = 20000

local items, results, all = {}, {}, true
for i = 1, n do
  local b = 18 + 13 * (i - 1)
  local it = {
    key = KEYS[i], kind = ARGV[b], amount = tonumber(ARGV[b + 1]), cap = tonumber(ARGV[b + 2]),
    usable = tonumber(ARGV[b + 3 + rank]), p = tonumber(ARGV[b + 6]), l = tonumber(ARGV[b + 7]),
    wk = ARGV[b + 8], wlen = tonumber(ARGV[b + 9]), woff = tonumber(ARGV[b + 10]),
    unit = ARGV[b + 11], overage = ARGV[b + 12],
  }
  local allowed, remaining, reset, retry
  local held_now = 0
  local need, behind = it.amount, false
  if in_line and it.amount > 0 and not shadow[it.key] then
    local ahead
    ahead, it.joined, it.qlast = line_ahead(it.key)
    need, behind = with_ahead(it.amount, ahead, it.usable)
  end
  if it.kind == "r" then
    local debt, after = rate_debt(it.key, now, it.p, it.l), nil
    allowed, remaining, reset, retry, after =
      rate_step(debt, it.amount, it.usable, it.cap, it.p, it.l)
    if need ~= it.amount then
      -- Tested with what the waiters ahead need too; charged its own amount.
      local ok, _, _, wait_for = rate_step(debt, need, it.usable, it.cap, it.p, it.l)
      if not ok or behind then
        allowed, retry, after = false, wait_for, debt
        remaining = math.floor(math.max(it.cap * it.p - debt, 0) / it.p)
        reset = ceil_div(debt, it.l)
      end
    end
    it.debt_after = after
  else
    local wid, wend = window_at(it.wk, it.wlen, it.woff, now)
    local used = 0
    if it.kind == "c" then
      local st = redis.call("HMGET", it.key, "w", "u")
      if st[1] and tonumber(st[1]) == wid then used = tonumber(st[2]) end
    end
    local holds, held, byid, allots = live_holds(it.key, now)
    held_now = held
    it.via = shadow[it.key]
    -- What the caller may not draw on of others' allocations counts as
    -- held (pool.rs `barred`); the answer reports the true holds.
    local barred = 0
    if #allots > 0 and not it.via then
      for _, a in ipairs(allots) do
        if not owns(a.owner, who) and not may_draw(rank, a.phase) then
          barred = barred + allot_unused(a, wid)
        end
      end
      it.allots = allots
    end
    local held_t = held + barred
    reset = wend == NEVER and 0 or math.max(wend - now, 0)
    retry = NEVER
    if it.via then
      -- Spending a delegated grant: only what its hold still has.
      local avail = byid[it.via] or 0
      allowed = it.amount == 0 or it.amount <= avail
      remaining = avail - (allowed and it.amount or 0)
    else
      allowed = it.amount == 0 or (used + held_t + need <= it.usable and not behind)
      remaining = math.max(it.cap - used - held_t - (allowed and it.amount or 0), 0)
    end
    if not allowed and not it.via and need <= it.usable then
      local by_holds, by_window = NEVER, NEVER
      if used + need <= it.usable then
        -- Grouped so every partial sum stays within 2^53 (held <= usable).
        by_holds = time_to_free((used + need - it.usable) + held_t, now, holds)
      end
      if wend ~= NEVER then
        local after = time_to_free((need - it.usable) + held_t, now, holds)
        if after ~= NEVER then by_window = math.max(after, wend - now) end
      end
      if by_holds == NEVER then retry = by_window
      elseif by_window == NEVER then retry = by_holds
      else retry = math.min(by_holds, by_window) end
    end
    it.wid, it.wend, it.used, it.holds, it.held = wid, wend, used, holds, held
  end
  if behind and (retry == NEVER or retry < LINE_POLL) then retry = LINE_POLL end
  if not allowed then all = false end
  items[i] = it
  results[#results + 1] = allowed and 1 or 0
  results[#results + 1] = remaining
  results[#results + 1] = reset
  results[#results + 1] = retry
  results[#results + 1] = held_now
end


local expires_at = 0
if all and mode ~= "check" then
  local reserving = mode == "reserve" or mode == "delegate"
  if reserving then expires_at = now + lease end
  local record = {}
  for i = 1, n do
    local it = items[i]
    if it.kind == "r" then
      redis.call("HSET", it.key, "d", it.debt_after, "t", now, "p", it.p, "l", it.l)
      expire_at(it.key, now + ceil_div(it.debt_after, it.l), now)
    else
      local last = it.wend
      if it.via and it.amount > 0 then adjust_hold(it.key, it.via, -it.amount, now) end
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
        redis.call("HSET", it.key, "h:" .. rid, hold_value(it.amount, expires_at, it.via))
        if last ~= NEVER then last = math.max(last, expires_at) end
      end
      for _, h in ipairs(it.holds) do
        if last ~= NEVER then last = math.max(last, h[1]) end
      end
      if it.kind == "s" and not reserving and #it.holds == 0 then
        -- concurrency acquire holds nothing; leave the key as it was
      else
        expire_at(it.key, last, now)
      end
    end
    if it.allots and mode ~= "delegate" and it.amount > 0 then
      -- Drawn from the allocations as pool.rs `draw` says, knowing the room before.
      local aside, last_dead = 0, 0
      for _, a in ipairs(it.allots) do
        aside = aside + allot_unused(a, it.wid)
        last_dead = math.max(last_dead, a.active_until + a.lease)
      end
      local left = it.amount
      local function take(a)
        if a.window ~= it.wid then a.window, a.drawn = it.wid, 0 end
        local t = math.min(left, allot_unused(a, it.wid))
        a.drawn = a.drawn + t
        left = left - t
        redis.call("HSET", it.key, a.field, allot_value(a))
      end
      for _, a in ipairs(it.allots) do
        if owns(a.owner, who) then take(a) break end
      end
      left = left - math.min(left, math.max(it.usable - it.used - it.held - aside, 0))
      for phase = 1, 0, -1 do
        for _, a in ipairs(it.allots) do
          if left > 0 and a.phase == phase and not owns(a.owner, who) and may_draw(rank, phase) then take(a) end
        end
      end
      keep_until(it.key, last_dead, now)
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
    if links ~= "" then redis.call("HSET", rec, "links", links) end
    if mode == "delegate" then
      local grant = KEYS[n + 3 + g]
      local covers = {}
      for i = 1, n do
        if items[i].kind ~= "r" and items[i].amount > 0 then covers[#covers + 1] = items[i].key end
      end
      redis.call("DEL", grant)
      redis.call("HSET", grant, "d", rid, "e", num(expires_at), "c", table.concat(covers, "\t"))
      expire_in(grant, lease)
      redis.call("HSET", rec, "grant", grant)
    end
    expire_in(rec, lease + tombstone)
  end
end

-- The caller's place in line: left once admitted (or when it can never be),
-- else kept until its retry time plus the grace (never past its giving up).
if in_line and mode ~= "check" then
  local worst = 0
  for i = 1, n do
    local r = results[5 * (i - 1) + 4]
    if results[5 * (i - 1) + 1] == 0 then
      if r == NEVER or worst == NEVER then worst = NEVER else worst = math.max(worst, r) end
    end
  end
  for i = 1, n do
    local it = items[i]
    if it.joined then
      if all or worst == NEVER then
        redis.call("HDEL", it.key, my_place)
      else
        local fresh = redis.call("EXISTS", it.key) == 0
        local until_ = now + math.min(worst, math.max(w_left, 0)) + w_grace
        redis.call("HSET", it.key, my_place, num(rank) .. "|" .. num(it.joined) .. "|" .. num(until_) .. "|" .. num(it.amount))
        if fresh then expire_at(it.key, until_, now) else keep_until(it.key, until_, now) end
      end
    end
    -- Others' places outlive whatever lifetime the admission set above.
    if all and it.qlast and it.qlast > 0 then keep_until(it.key, it.qlast, now) end
  end
end

local pending = 0
if has_caller and mode ~= "check" and tonumber(ARGV[4]) == 2 then
  if all and first_step then
    if redis.call("EXISTS", starve) == 1 then pending = 1 end
  else
    starvation(starve, all, now, promote_after)
  end
end

table.insert(results, 1, pending)
table.insert(results, 1, expires_at)
table.insert(results, 1, rank)
if op_key and all and mode ~= "check" then remember(op_key, ARGV[17], results, tonumber(ARGV[16])) end
return results
