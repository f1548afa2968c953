-- ratewarden: a top-up of a quota's or budget's counter — gives back up to
-- ARGV[2] of what it spent in its current window, its debt first, never
-- below zero (memory.rs `credit` does the same on the embedded engine).
--
-- KEYS[1]  the limit's hash (fields "w" window id, "u" spent)
-- ARGV[1]  now in µs, or "-1" for the server clock
-- ARGV[2]  the amount, base units (> 0)
-- ARGV[3]  window kind, ARGV[4] its length (µs), ARGV[5] its offset (µs)
--
-- Returns { credited, spent after }.

-- (helpers: common.lua, prepended at load time)

local now = request_now(ARGV[1])
local key, amount = KEYS[1], tonumber(ARGV[2])
local wid, wend = window_at(ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), now)
local s = redis.call("HMGET", key, "w", "u")
local used = 0
if s[1] and tonumber(s[1]) == wid then used = tonumber(s[2]) end
local credited = math.min(amount, math.max(used, 0))
if credited > 0 then
  redis.call("HSET", key, "w", wid, "u", used - credited)
  keep_until(key, wend, now)
end
return { credited, used - credited }
