-- ratewarden: a coordinated resource's upstream state and traffic light.
--
-- Mirrors core/src/upstream/light.rs rule for rule (observe, gate, ungate);
-- the conformance tests run the same cases on both. Every number stays below
-- 2^53: readings are at most 2^40 (so left × 1000 is exact), times are µs
-- since the epoch plus at most a year, amber delays at most an hour.
--
-- KEYS[1]  the resource's state hash:
--            b = blocked until, p = next paced turn,
--            per dimension i (0 requests, 1 tokens, 2 input, 3 output tokens):
--            l<i> limit, r<i> remaining, s<i> spent since, z<i> reset at,
--            t<i> seen at (0: never)
--
-- ARGV[1]  now in µs, or "-1" to read the server clock (TIME)
-- ARGV[2]  "observe" | "gate" | "ungate"
-- ARGV[3..8] ttl, green ‰, red ‰, standard delay, background delay, pace
-- observe: ARGV[9] block µs (-1: none), then per dimension 4 values:
--          present (0|1), limit (-1: not given), remaining, reset µs (-1)
--          → { now, zone before, b, p, then per dimension l, r, s, z, t }
-- gate:    ARGV[9] priority rank, ARGV[10] mutate (0|1), ARGV[11..14] amounts
--          → { verdict (0 pass, 1 delay, 2 deny), delay or retry µs,
--              why (-1, 0 blocked, 1 exhausted, 2 red, 3 paced, 4 deferred), its dimension
--              (-1), zone, left ‰ (-1), tightest dimension (-1), counted (0|1),
--              pace before (-1: no turn taken), pace after,
--              4 amounts counted, 4 seen-at counted on }
-- ungate:  ARGV[9..12] amounts, ARGV[13..16] seen-at, ARGV[17] pace before
--          (-1: none), ARGV[18] pace after → { 1 }

-- (helpers: common.lua, prepended at load time)

local now = request_now(ARGV[1])
local op = ARGV[2]
local ttl, green, red = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local delay_standard, delay_background, pace = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local SLACK = 1000000
local key = KEYS[1]

local FIELDS = { "b", "p" }
for i = 0, 3 do
  for _, c in ipairs({ "l", "r", "s", "z", "t" }) do FIELDS[#FIELDS + 1] = c .. i end
end

local function load()
  local v = redis.call("HMGET", key, unpack(FIELDS))
  local st = { b = tonumber(v[1]) or 0, p = tonumber(v[2]) or 0, d = {} }
  for i = 0, 3 do
    local o = 2 + i * 5
    local r = {
      l = tonumber(v[o + 1]) or 0, r = tonumber(v[o + 2]) or 0, s = tonumber(v[o + 3]) or 0,
      z = tonumber(v[o + 4]) or 0, t = tonumber(v[o + 5]) or 0,
    }
    -- Past its reset a reading rolls over: the whole limit, next reset unknown.
    if r.t > 0 and r.z > 0 and now >= r.z then
      r = { l = r.l, r = r.l, s = 0, z = 0, t = r.z }
    end
    st.d[i] = r
  end
  return st
end

local function expires(r)
  if r.z > 0 then return r.z end
  return r.t + ttl
end
local function fresh(r) return r.t > 0 and now < expires(r) end
-- How long a caller it refuses waits: its reset when known, else at most pace.
local function wait_for(r)
  if r.z > 0 then return r.z - now end
  return math.min(expires(r) - now, pace)
end
local function left(r)
  local x = r.r - r.s
  if x < 0 then return 0 end
  return x
end
local function permille(r)
  if r.l <= 0 then return 0 end
  local p = math.floor(left(r) * 1000 / r.l)
  if p > 1000 then p = 1000 end
  return p
end

-- zone (0 unknown, 1 green, 2 amber, 3 red), left ‰ (-1), tightest dimension (-1)
local function light(st)
  local tp, td = nil, -1
  for i = 0, 3 do
    local r = st.d[i]
    if fresh(r) then
      local p = permille(r)
      if tp == nil or p < tp then tp, td = p, i end
    end
  end
  local zone
  if st.b > now then zone = 3
  elseif tp == nil then zone = 0
  elseif tp > green then zone = 1
  elseif tp >= red then zone = 2
  else zone = 3 end
  return zone, tp or -1, td
end

local function save(st)
  local args, until_ = { "b", num(st.b), "p", num(st.p) }, math.max(st.b, st.p)
  for i = 0, 3 do
    local r = st.d[i]
    for _, kv in ipairs({ { "l", r.l }, { "r", r.r }, { "s", r.s }, { "z", r.z }, { "t", r.t } }) do
      args[#args + 1] = kv[1] .. i
      args[#args + 1] = num(kv[2])
    end
    if r.t > 0 then until_ = math.max(until_, expires(r)) end
  end
  redis.call("HSET", key, unpack(args))
  -- Relative, so a test clock in the past expires it as the server would.
  redis.call("PEXPIRE", key, num(math.floor(math.max(until_ - now, 0) / 1000) + 1000))
end

local function dump(st, out)
  out[#out + 1] = num(st.b)
  out[#out + 1] = num(st.p)
  for i = 0, 3 do
    local r = st.d[i]
    out[#out + 1] = num(r.l)
    out[#out + 1] = num(r.r)
    out[#out + 1] = num(r.s)
    out[#out + 1] = num(r.z)
    out[#out + 1] = num(r.t)
  end
  return out
end

local st = load()

if op == "observe" then
  local before = light(st)
  local block = tonumber(ARGV[9])
  local changed = block >= 0
  for i = 0, 3 do
    local o = 10 + i * 4
    if ARGV[o] == "1" then
      changed = true
      local lim, rem, rst = tonumber(ARGV[o + 1]), tonumber(ARGV[o + 2]), tonumber(ARGV[o + 3])
      local prev = st.d[i]
      local fr = fresh(prev)
      local reset_at = 0
      if rst >= 0 then reset_at = now + rst end
      local same = fr and (lim < 0 or lim == prev.l)
        and (reset_at == 0 or prev.z == 0 or reset_at <= prev.z + SLACK)
      local remaining = rem
      if same then remaining = math.min(rem, left(prev)) end
      local limit = lim
      if lim < 0 then
        if fr then limit = math.max(prev.l, rem) else limit = rem end
      end
      local z = reset_at
      if reset_at == 0 and same then z = prev.z end
      st.d[i] = { l = limit, r = remaining, s = 0, z = z, t = now }
    end
  end
  if block >= 0 then st.b = math.max(st.b, now + block) end
  if changed then save(st) end
  return dump(st, { num(now), before })
end

if op == "gate" then
  local rank, mutate = tonumber(ARGV[9]), ARGV[10] == "1"
  local amounts = { [0] = tonumber(ARGV[11]), tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14]) }
  local zone, lp, ld = light(st)
  local function deny(retry, why, dim)
    if retry < 1 then retry = 1 end
    return { 2, num(retry), why, dim, zone, lp, ld, 0, -1, 0, 0, 0, 0, 0, 0, 0, 0, 0 }
  end
  if st.b > now then return deny(st.b - now, 0, -1) end
  for i = 0, 3 do
    local r = st.d[i]
    if amounts[i] > 0 and fresh(r) and left(r) < amounts[i] then
      return deny(wait_for(r), 1, i)
    end
  end
  local verdict, value, pace_before, pace_after = 0, 0, -1, 0
  if zone == 0 or zone == 1 or rank == 0 then
    verdict = 0
  elseif zone == 2 then
    local top = delay_standard
    if rank == 2 then top = delay_background end
    local depth = green - lp
    local span = math.max(green - red, 1)
    if depth < 0 then depth = 0 end
    if depth > span then depth = span end
    verdict, value = 1, math.floor(top * depth / span)
    local reset = 0
    if ld >= 0 then reset = st.d[ld].z end
    if value > 0 and reset == 0 then return deny(value, 4, -1) end
    if value > 0 and now + value >= reset then return deny(reset - now, 4, -1) end
  elseif rank == 2 then
    local w = pace
    if ld >= 0 then w = wait_for(st.d[ld]) end
    return deny(w, 2, -1)
  else
    if st.p > now then return deny(st.p - now, 3, -1) end
    pace_before, pace_after = st.p, now + pace
  end
  local out = { verdict, num(value), -1, -1, zone, lp, ld, 0, num(pace_before), num(pace_after) }
  local counted = { [0] = 0, 0, 0, 0 }
  local seen = { [0] = 0, 0, 0, 0 }
  if mutate then
    out[8] = 1
    if pace_before >= 0 then st.p = pace_after end
    for i = 0, 3 do
      local r = st.d[i]
      if amounts[i] > 0 and fresh(r) then
        r.s = r.s + amounts[i]
        counted[i], seen[i] = amounts[i], r.t
      end
    end
    save(st)
  end
  for i = 0, 3 do out[#out + 1] = num(counted[i]) end
  for i = 0, 3 do out[#out + 1] = num(seen[i]) end
  return out
end

if op == "ungate" then
  local changed = false
  for i = 0, 3 do
    local amount, seen = tonumber(ARGV[9 + i]), tonumber(ARGV[13 + i])
    local r = st.d[i]
    if seen > 0 and r.t == seen then
      r.s = math.max(r.s - amount, 0)
      changed = true
    end
  end
  local before, after = tonumber(ARGV[17]), tonumber(ARGV[18])
  if before >= 0 and st.p == after then
    st.p = before
    changed = true
  end
  if changed then save(st) end
  return { 1 }
end

return redis.error_reply("upstream.lua: unknown operation " .. tostring(op))
