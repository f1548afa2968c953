-- ratewarden: check or acquire a request whose limits (on this slot) are all
-- rates, for a caller with no starvation tracker (any priority but background).
-- The common case, without the general script's holds, grants, records and
-- windows: decide.lua's rate branch formula for formula (core/src/eval.rs), the
-- same answer shape, a third of the arguments.
--
-- KEYS[1..n]  one hash per rate limit instance (d = debt, t = time of d,
--             p and l = the rate d is in)
-- KEYS[n+1]   with an operation id: where the answer is remembered
--
-- ARGV[1]  now in µs, or "-1" to read the server clock (TIME) — production always does
-- ARGV[2]  mode: "check" | "acquire"
-- ARGV[3]  the priority rank it is decided at (0 critical, 1 standard)
-- ARGV[4]  the operation id an admitted acquire is remembered under, or "":
--          one already admitted under it is answered as it was, unchanged
-- ARGV[5]  how long the answer is remembered (ms)
-- ARGV[6]  the request's fingerprint (hex); { -7 } if the id answered another
-- ARGV[7 + 5*(i-1) ...] per limit i: amount, burst, usable at that rank
--          (burst minus the rank's floor), p, l
--
-- Returns { rank, 0, 0, then per limit: allowed (0|1), remaining, reset (µs),
--           retry (µs, -1 = never), held (always 0: rates hold nothing) }

-- (helpers: common.lua, prepended at load time)

local now = request_now(ARGV[1])
local n = #KEYS
local op_key = nil
if ARGV[4] ~= "" then
  op_key = KEYS[n]
  n = n - 1
  local prev = replayed(op_key, ARGV[6])
  if prev then return prev end
end
local results, debts, all = { tonumber(ARGV[3]), 0, 0 }, {}, true
for i = 1, n do
  local b = 7 + 5 * (i - 1)
  local amount, cap, usable = tonumber(ARGV[b]), tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  local p, l = tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
  local allowed, remaining, reset, retry, after =
    rate_step(rate_debt(KEYS[i], now, p, l), amount, usable, cap, p, l)
  if not allowed then all = false end
  debts[i] = after
  results[#results + 1] = allowed and 1 or 0
  results[#results + 1] = remaining
  results[#results + 1] = reset
  results[#results + 1] = retry
  results[#results + 1] = 0
end

if all and ARGV[2] == "acquire" then
  for i = 1, n do
    local p, l = ARGV[7 + 5 * (i - 1) + 3], tonumber(ARGV[7 + 5 * (i - 1) + 4])
    redis.call("HSET", KEYS[i], "d", debts[i], "t", now, "p", p, "l", l)
    expire_at(KEYS[i], now + ceil_div(debts[i], l), now)
  end
end
if op_key and all and ARGV[2] == "acquire" then remember(op_key, ARGV[6], results, tonumber(ARGV[5])) end
return results
