-- ratewarden: end or renew a reservation atomically (commit | release | extend).
--
-- KEYS[1]  the reservation record hash written by decide.lua:
--            st = "a" active | "c" committed | "r" released, exp = lease end (µs),
--            n, scope, i<k> = "key\tkind\tamount\tp\tl\twk\twlen\twoff\tunit\toverage",
--            c<k> = charged by the commit (committed records)
--          links = ids of the same request's reservations on other cluster
--          slots (comma-separated; the caller settles them next).
--          The limit hashes it names are touched too; they share the record's
--          slot.
-- KEYS[2]  the caller's starvation tracker, or any unused key
-- ARGV[1]  now in µs, or "-1" to read the server clock (TIME)
-- ARGV[2]  mode: "commit" | "release" | "extend"
-- ARGV[3]  extend: new lease (µs); otherwise unused
-- ARGV[4]  how long an ended record is kept (µs)
-- ARGV[5]  starvation step left by a multi-slot decision: "clear" (admitted),
--          "deny" (refused on another slot) or ""
-- ARGV[6]  promote_after (µs), for ARGV[5]
-- ARGV[7 ...] commit: unit, actual amount pairs (units not listed are charged
--             at their reserved amount)
--
-- Every answer is { status, links, ... } with links as stored ("" if none):
--   "nf"                       no such reservation (never existed or forgotten)
--   "expired"                  its lease ran out before this call
--   "closed", "committed"|"released"
--   "ok", n, then per limit: key, reserved, charged, actual, debt, before   (commit)
--   "dup", n, then per limit: key, reserved, charged, actual, 0, -1  (repeated commit)
--   "released", 1|0            (release: 1 = this call released it)
--   "extended", new expiry     (extend)
--   "delegation"               commit of a delegation (release it instead)
--   "rejected", unit, reserved, actual
--                              commit over the reservation on a `reject`
--                              limit: nothing changed

-- (helpers: common.lua, prepended at load time)

local now = request_now(ARGV[1])
local mode = ARGV[2]
local tombstone = tonumber(ARGV[4])
local rec = KEYS[1]

if ARGV[5] ~= "" then starvation(KEYS[2], ARGV[5] == "clear", now, tonumber(ARGV[6])) end

local st = redis.call("HMGET", rec, "st", "exp", "n", "links")
if not st[1] then return { "nf", "" } end
local state, exp, n, links = st[1], tonumber(st[2]), tonumber(st[3]), st[4] or ""

local function items()
  local out = {}
  for k = 1, n do
    local v = redis.call("HGET", rec, "i" .. k)
    local f = {}
    for part in string.gmatch(v, "[^\t]+") do f[#f + 1] = part end
    out[k] = {
      key = f[1], kind = f[2], amount = tonumber(f[3]), p = tonumber(f[4]), l = tonumber(f[5]),
      wk = f[6], wlen = tonumber(f[7]), woff = tonumber(f[8]), unit = f[9], overage = f[10],
    }
  end
  return out
end

local function actual_of(unit, est)
  for j = 7, #ARGV, 2 do
    if ARGV[j] == unit then return tonumber(ARGV[j + 1]) end
  end
  return est
end

if mode == "commit" and state == "c" then
  local out = { "dup", links, n }
  for k, it in ipairs(items()) do
    local charged = tonumber(redis.call("HGET", rec, "c" .. k))
    local actual = tonumber(redis.call("HGET", rec, "x" .. k))
    out[#out + 1] = it.key; out[#out + 1] = it.amount; out[#out + 1] = charged; out[#out + 1] = actual
    out[#out + 1] = 0; out[#out + 1] = -1
  end
  return out
end
if state == "c" then return { "closed", links, "committed" } end
if state == "r" then
  if mode == "release" then return { "released", links, 0 } end
  return { "closed", links, "released" }
end
if exp <= now then
  if mode == "release" then return { "released", links, 0 } end
  return { "expired", links }
end

local rid = string.match(rec, ":res:(%x+)$")
local list = items()
local grant = redis.call("HGET", rec, "grant")
if grant and mode == "commit" then return { "delegation", links } end

-- An item's overage rule as args.rs writes it: `charge`, `cap`, `reject`,
-- `avail:<capacity>` or `od:<capacity>:<overdraft>`, then `|` and the
-- reservation's reject list (`unit=reserved,…`, the same in every record).
local function overage_of(s)
  local rule, rejects = s, ""
  local bar = string.find(s, "|", 1, true)
  if bar then rule, rejects = string.sub(s, 1, bar - 1), string.sub(s, bar + 1) end
  local name, cap, od = string.match(rule, "^(%a+):(%d+):?(%d*)$")
  if not name then return rule, 0, 0, rejects end
  return name, tonumber(cap), tonumber(od) or 0, rejects
end

-- `reject`: a commit over the reservation in a listed unit changes nothing.
if mode == "commit" and n > 0 then
  local _, _, _, rejects = overage_of(list[1].overage)
  for unit, amt in string.gmatch(rejects, "([%w_]+)=(%d+)") do
    local a = actual_of(unit, nil)
    if a and a > tonumber(amt) then return { "rejected", links, unit, tonumber(amt), a } end
  end
end

-- Drops this reservation's hold on `key`; what it held beyond `charged` returns
-- to the hold it was carved from (a delegation), and a charge beyond it is
-- taken from there as far as it goes.
local function drop_hold(key, charged)
  local v = redis.call("HGET", key, "h:" .. rid)
  if not v then return end
  redis.call("HDEL", key, "h:" .. rid)
  local a, _, p = split_hold(v)
  if p ~= "" then adjust_hold(key, p, a - charged, now) end
end

if mode == "extend" then
  local new_exp = now + tonumber(ARGV[3])
  redis.call("HSET", rec, "exp", new_exp)
  expire_in(rec, new_exp - now + tombstone)
  for _, it in ipairs(list) do
    if it.kind ~= "r" and it.amount > 0 then
      local v = redis.call("HGET", it.key, "h:" .. rid)
      if v then
        local a, _, p = split_hold(v)
        redis.call("HSET", it.key, "h:" .. rid, hold_value(a, new_exp, p))
        keep_until(it.key, new_exp, now)
      end
    end
  end
  if grant then
    redis.call("HSET", grant, "e", num(new_exp))
    expire_in(grant, new_exp - now)
  end
  return { "extended", links, new_exp }
end

local out = { "ok", links, n }
local fields = { "st", mode == "commit" and "c" or "r" }
for k, it in ipairs(list) do
  -- before: spent and held on the limit with this hold at its reserved
  -- amount, when a commit past the reservation measured it (else -1).
  local actual, charged, debt, before = 0, 0, 0, -1
  if mode == "commit" then
    actual = actual_of(it.unit, it.amount)
    charged = actual
    local rule, cap, od = overage_of(it.overage)
    if rule == "cap" and charged > it.amount then charged = it.amount end
    if (rule == "avail" or rule == "od" or (rule == "charge" and cap > 0)) and it.kind == "c"
        and actual > it.amount then
      -- memory.rs room(): capacity − spent this window − the other live holds.
      local wid = window_at(it.wk, it.wlen, it.woff, now)
      local s = redis.call("HMGET", it.key, "w", "u")
      local used = 0
      if s[1] and tonumber(s[1]) == wid then used = tonumber(s[2]) end
      local _, held, byid = live_holds(it.key, now)
      local room = cap - used - (held - (byid[rid] or 0))
      if rule ~= "charge" then charged = math.max(math.min(actual, room + od), it.amount) end
      debt = math.max(charged - math.max(room, 0), 0)
      before = cap - room + it.amount
    end
  end
  if it.kind == "r" then
    -- eval.rs rate_settle: refunds never below zero, overage saturates.
    local d = rate_debt(it.key, now, it.p, it.l) + (charged - it.amount) * it.p
    d = math.min(math.max(d, 0), MAX_AMOUNT)
    redis.call("HSET", it.key, "d", d, "t", now, "p", it.p, "l", it.l)
    expire_in(it.key, ceil_div(d, it.l))
  else
    drop_hold(it.key, it.kind == "c" and charged or 0)
    if it.kind == "c" and charged ~= 0 then
      local wid, wend = window_at(it.wk, it.wlen, it.woff, now)
      local s = redis.call("HMGET", it.key, "w", "u")
      local used = 0
      if s[1] and tonumber(s[1]) == wid then used = tonumber(s[2]) end
      redis.call("HSET", it.key, "w", wid, "u", math.min(used + charged, MAX_AMOUNT))
      keep_until(it.key, wend, now)
    end
  end
  fields[#fields + 1] = "c" .. k; fields[#fields + 1] = charged
  fields[#fields + 1] = "x" .. k; fields[#fields + 1] = actual
  out[#out + 1] = it.key; out[#out + 1] = it.amount; out[#out + 1] = charged; out[#out + 1] = actual
  out[#out + 1] = debt; out[#out + 1] = before
end
if grant and redis.call("HGET", grant, "d") == rid then redis.call("DEL", grant) end
redis.call("HSET", rec, unpack(fields))
expire_in(rec, tombstone)
if mode == "release" then return { "released", links, 1 } end
return out
