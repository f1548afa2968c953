-- ratewarden: a coordinated resource's upstream state, traffic light and
-- circuit breaker.
--
-- Mirrors core/src/upstream/light.rs and breaker.rs rule for rule (observe,
-- gate, ungate); the conformance tests run the same cases on both. Every
-- number stays below 2^53: readings are at most 2^40 (so left × 1000 is
-- exact), burn rates at most 2^29 per second and horizons at most an hour (so
-- burn × horizon in ms is exact), times are µs since the epoch plus at most a
-- few years, amber delays at most an hour.
--
-- KEYS[1]  the resource's state hash:
--            b = blocked until, p = next paced turn,
--            bs = breaker state (0 closed, 1 pre-emptive, 2 open, 3 half-open),
--            bu = open until, bp = probe lease end, bn = pre-emptive since,
--            bo = consecutive opens,
--            cu = sequential mode until, co = sequential mode on (0|1),
--            ce = the last denials' times (comma-separated, oldest first),
--            per dimension i (0 requests, 1 tokens, 2 input, 3 output tokens):
--            l<i> limit, r<i> remaining, s<i> spent since, z<i> reset at,
--            t<i> seen at (0: never), o<i> observed remaining, u<i> burn rate
--
-- ARGV[1]  now in µs, or "-1" to read the server clock (TIME)
-- ARGV[2]  "observe" | "gate" | "ungate"
-- ARGV[3..8]  ttl, green ‰, red ‰, standard delay, background delay, pace
-- ARGV[9..14] breaker: horizon, max_tokens (0: none), number of fallback
--             models, step, open_for, probe_lease
-- ARGV[15] the channel transitions are published on ("" : none), ARGV[16]
--          the resource's name (in those messages)
-- ARGV[17..19] cascade: denials (0: off), within, cooldown
-- observe: ARGV[20] block µs (-1: none), ARGV[21] outcome (0 unknown,
--          1 success, 2 failure, 3 neither), then per dimension 4 values:
--          present (0|1), limit (-1: not given), remaining, reset µs (-1)
--          → { now, zone before, breaker before, sequential before (0|1),
--              then the state (see dump) }
-- gate:    ARGV[20] priority rank, ARGV[21] mutate (0|1), ARGV[22..25] amounts
--          → { verdict (0 pass, 1 delay, 2 deny), delay or retry µs,
--              why (-1, 0 blocked, 1 exhausted, 2 red, 3 paced, 4 deferred,
--              5 open, 6 probing), its dimension (-1), zone, left ‰ (-1),
--              tightest dimension (-1), breaker state, counted (0|1),
--              pace before (-1: no turn taken), pace after, probe lease (-1),
--              probe (0|1), max_tokens (-1), fallback index (-1), sequential
--              (0|1), sequential mode switched (-1 no, 0 off, 1 on),
--              4 amounts counted, 4 seen-at counted on }
-- ungate:  ARGV[20..23] amounts, ARGV[24..27] seen-at, ARGV[28] pace before
--          (-1: none), ARGV[29] pace after, ARGV[30] probe lease (-1),
--          ARGV[31] 1 if the limits denied → { 1 if sequential mode went on }

-- (helpers: common.lua, prepended at load time)

local now = request_now(ARGV[1])
local op = ARGV[2]
local ttl, green, red = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local delay_standard, delay_background, pace = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local horizon, max_tokens, fallbacks = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local step, open_for, probe_lease = tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14])
local channel, resource = ARGV[15], ARGV[16]
local cascade_denials, cascade_within, cascade_cooldown = tonumber(ARGV[17]), tonumber(ARGV[18]), tonumber(ARGV[19])
local SLACK = 1000000
local MAX_BURN = 536870912 -- 2^29
local key = KEYS[1]

local FIELDS = { "b", "p", "bs", "bu", "bp", "bn", "bo", "cu", "co", "ce" }
local DIM = { "l", "r", "s", "z", "t", "o", "u" }
for i = 0, 3 do
  for _, c in ipairs(DIM) do FIELDS[#FIELDS + 1] = c .. i end
end

local function load()
  local v = redis.call("HMGET", key, unpack(FIELDS))
  local st = {
    b = tonumber(v[1]) or 0, p = tonumber(v[2]) or 0, bs = tonumber(v[3]) or 0,
    bu = tonumber(v[4]) or 0, bp = tonumber(v[5]) or 0, bn = tonumber(v[6]) or 0,
    bo = tonumber(v[7]) or 0, cu = tonumber(v[8]) or 0, co = tonumber(v[9]) or 0, ce = {}, d = {},
  }
  for t in string.gmatch(v[10] or "", "[^,]+") do st.ce[#st.ce + 1] = tonumber(t) end
  for i = 0, 3 do
    local o = 10 + i * 7
    local r = {
      l = tonumber(v[o + 1]) or 0, r = tonumber(v[o + 2]) or 0, s = tonumber(v[o + 3]) or 0,
      z = tonumber(v[o + 4]) or 0, t = tonumber(v[o + 5]) or 0, o = tonumber(v[o + 6]) or 0,
      u = tonumber(v[o + 7]) or 0,
    }
    -- Past its reset a reading rolls over: the whole limit, next reset unknown.
    if r.t > 0 and r.z > 0 and now >= r.z then
      r = { l = r.l, r = r.l, s = 0, z = 0, t = r.z, o = r.l, u = r.u }
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

-- The breaker's state at now: open turns half-open when its time is up.
local function breaker_at(st)
  if st.bs == 2 and now >= st.bu then return 3 end
  return st.bs
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
  if st.b > now or breaker_at(st) == 2 then zone = 3
  elseif tp == nil then zone = 0
  elseif tp > green then zone = 1
  elseif tp >= red then zone = 2
  else zone = 3 end
  return zone, tp or -1, td
end

-- Sequential mode (the cascade detector).
local function sequential(st) return st.co == 1 and now < st.cu end

-- Records a denial; true when it switched sequential mode on.
local function note(st)
  local n = cascade_denials
  if n == 0 then return false end
  local l = st.ce
  l[#l + 1] = now
  while #l > n do table.remove(l, 1) end
  if #l == n and now - l[1] <= cascade_within then
    st.cu = now + cascade_cooldown
    if st.co ~= 1 then
      st.co = 1
      return true
    end
  end
  return false
end

-- Turns sequential mode off once its cooldown is over; true when it did.
local function settle(st)
  if st.co == 1 and now >= st.cu then
    st.co = 0
    return true
  end
  return false
end

-- Opens pre-emptively when a runway is short; closes when every one is long.
local function pre_empt(st)
  local horizon_ms = math.floor(horizon / 1000)
  if horizon_ms <= 0 then return end
  local short, long = false, true
  for i = 0, 3 do
    local r = st.d[i]
    if r.u > 0 and fresh(r) then
      local l = left(r) * 1000
      if l < r.u * horizon_ms then short = true end
      if l < 2 * r.u * horizon_ms then long = false end
    end
  end
  if st.bs == 0 and short then
    st.bs, st.bn = 1, now
  elseif st.bs == 1 and long then
    st.bs, st.bn = 0, 0
  end
end

local function save(st)
  local ce = {}
  for i, t in ipairs(st.ce) do ce[i] = num(t) end
  local args = {
    "b", num(st.b), "p", num(st.p), "bs", num(st.bs), "bu", num(st.bu), "bp", num(st.bp),
    "bn", num(st.bn), "bo", num(st.bo), "cu", num(st.cu), "co", num(st.co),
    "ce", table.concat(ce, ","),
  }
  local until_ = math.max(st.b, st.p, st.bu, st.bp, st.cu)
  for i = 0, 3 do
    local r = st.d[i]
    for _, c in ipairs(DIM) do
      args[#args + 1] = c .. i
      args[#args + 1] = num(r[c])
    end
    if r.t > 0 then until_ = math.max(until_, expires(r)) end
  end
  redis.call("HSET", key, unpack(args))
  -- Relative, so a test clock in the past expires it as the server would.
  redis.call("PEXPIRE", key, num(math.floor(math.max(until_ - now, 0) / 1000) + 1000))
end

local function publish(from, to)
  if channel ~= "" and from ~= to then
    redis.call("PUBLISH", channel, "breaker " .. resource .. " " .. from .. " " .. to .. " " .. num(now))
  end
end

local function dump(st, out)
  for _, f in ipairs({ "b", "p", "bs", "bu", "bp", "bn", "bo" }) do out[#out + 1] = num(st[f]) end
  for i = 0, 3 do
    local r = st.d[i]
    for _, c in ipairs(DIM) do out[#out + 1] = num(r[c]) end
  end
  out[#out + 1] = num(st.cu)
  out[#out + 1] = num(st.co)
  out[#out + 1] = #st.ce
  for _, t in ipairs(st.ce) do out[#out + 1] = num(t) end
  return out
end

local st = load()

if op == "observe" then
  local before = light(st)
  local breaker_before = breaker_at(st)
  local cascade_before = 0
  if sequential(st) then cascade_before = 1 end
  settle(st)
  local block, outcome = tonumber(ARGV[20]), tonumber(ARGV[21])
  local changed = block >= 0 or outcome ~= 0
  for i = 0, 3 do
    local o = 22 + i * 4
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
      -- The burn rate: how fast the upstream's own remaining fell (¼ new).
      local burn = prev.u
      local dt_ms = math.floor((now - prev.t) / 1000)
      if same and dt_ms >= 1 then
        local rate = math.min(math.floor(math.max(prev.o - rem, 0) * 1000 / dt_ms), MAX_BURN)
        if prev.u == 0 then burn = rate else burn = math.floor((3 * prev.u + rate) / 4) end
      end
      st.d[i] = { l = limit, r = remaining, s = 0, z = z, t = now, o = rem, u = burn }
    end
  end
  if block >= 0 then st.b = math.max(st.b, now + block) end
  if outcome == 2 then note(st) end
  -- The breaker.
  if outcome == 2 then
    local state = breaker_at(st)
    if state ~= 2 then st.bo = st.bo + 1 end
    local time = block
    if time < 0 then time = open_for * 2 ^ math.min(math.max(st.bo - 1, 0), 4) end
    if state == 2 then st.bu = math.max(st.bu, now + time) else st.bu = now + time end
    st.bs, st.bp, st.bn = 2, 0, 0
  else
    if outcome == 1 and breaker_at(st) == 3 then
      st.bs, st.bu, st.bp, st.bn, st.bo = 0, 0, 0, 0, 0
    end
    pre_empt(st)
  end
  if changed then save(st) end
  publish(breaker_before, breaker_at(st))
  return dump(st, { num(now), before, breaker_before, cascade_before })
end

if op == "gate" then
  local rank, mutate = tonumber(ARGV[20]), ARGV[21] == "1"
  local amounts = { [0] = tonumber(ARGV[22]), tonumber(ARGV[23]), tonumber(ARGV[24]), tonumber(ARGV[25]) }
  local bs_before = st.bs
  local switched = -1
  if mutate and settle(st) then switched = 0 end
  pre_empt(st)
  local zone, lp, ld = light(st)
  local breaker = breaker_at(st)
  local function deny(retry, why, dim)
    if retry < 1 then retry = 1 end
    if mutate then
      if note(st) then switched = 1 end
      save(st)
      publish(bs_before, st.bs)
    end
    local seq = 0
    if sequential(st) then seq = 1 end
    return {
      2, num(retry), why, dim, zone, lp, ld, breaker, 0, -1, 0, -1, 0, -1, -1, seq, switched,
      0, 0, 0, 0, 0, 0, 0, 0,
    }
  end
  if breaker == 2 then return deny(st.bu - now, 5, -1) end
  if st.b > now then return deny(st.b - now, 0, -1) end
  for i = 0, 3 do
    local r = st.d[i]
    if amounts[i] > 0 and fresh(r) and left(r) < amounts[i] then
      return deny(wait_for(r), 1, i)
    end
  end
  local verdict, value, pace_before, pace_after, probe_lease_taken, probe = 0, 0, -1, 0, -1, 0
  if breaker == 3 then
    -- Exactly one request goes as the probe; the rest look again soon.
    if st.bp > now then return deny(math.min(st.bp - now, pace), 6, -1) end
    probe = 1
    probe_lease_taken = now + probe_lease
    st.bs, st.bp = 3, probe_lease_taken
  elseif zone == 0 or zone == 1 or rank == 0 then
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
    st.p = pace_after
  end
  local counted = { [0] = 0, 0, 0, 0 }
  local seen = { [0] = 0, 0, 0, 0 }
  for i = 0, 3 do
    local r = st.d[i]
    if amounts[i] > 0 and fresh(r) then
      r.s = r.s + amounts[i]
      counted[i], seen[i] = amounts[i], r.t
    end
  end
  local mt, model = -1, -1
  if st.bs == 1 then
    if max_tokens > 0 then mt = max_tokens end
    local stage = math.floor(math.max(now - st.bn, 0) / math.max(step, 1))
    local walk = stage
    if max_tokens > 0 then walk = stage - 1 end
    if walk >= 0 and fallbacks > 0 then model = math.min(walk, fallbacks - 1) end
  end
  local seq = 0
  if sequential(st) then seq = 1 end
  local out = {
    verdict, num(value), -1, -1, zone, lp, ld, breaker, 0, num(pace_before), num(pace_after),
    num(probe_lease_taken), probe, num(mt), model, seq, switched,
  }
  if mutate then
    out[9] = 1
    save(st)
    publish(bs_before, st.bs)
    for i = 0, 3 do out[#out + 1] = num(counted[i]) end
    for i = 0, 3 do out[#out + 1] = num(seen[i]) end
  else
    for _ = 1, 8 do out[#out + 1] = 0 end
  end
  return out
end

if op == "ungate" then
  local changed = false
  for i = 0, 3 do
    local amount, seen = tonumber(ARGV[20 + i]), tonumber(ARGV[24 + i])
    local r = st.d[i]
    if seen > 0 and r.t == seen then
      r.s = math.max(r.s - amount, 0)
      changed = true
    end
  end
  local before, after, lease = tonumber(ARGV[28]), tonumber(ARGV[29]), tonumber(ARGV[30])
  if before >= 0 and st.p == after then
    st.p = before
    changed = true
  end
  if lease >= 0 and st.bs == 3 and st.bp == lease then
    st.bp = 0
    changed = true
  end
  local on = 0
  if ARGV[31] == "1" then
    changed = true
    if note(st) then on = 1 end
  end
  if changed then save(st) end
  return { on }
end

return redis.error_reply("upstream.lua: unknown operation " .. tostring(op))
