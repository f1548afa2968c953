-- ratewarden: an agent's soft allocation of a pool limit (core/src/pool.rs
-- `apply`, which the embedded engine runs; the decisions that honour it are
-- in decide.lua).
--
-- KEYS[1]  the pool limit's hash; an allocation is its field "a:<owner>"
--          = "amount|drawn|window|active_until|lease" (common.lua)
-- ARGV[1]  now in µs, or "-1" for the server clock
-- ARGV[2]  "set" | "beat" | "drop"
-- ARGV[3]  the owner (the agent's scope)
-- ARGV[4]  set: the amount per window (1..the limit)
-- ARGV[5]  set: the lease (µs)
-- ARGV[6]  set: the limit
--
-- Returns set: { 1, active_until } or { 0, what is left to allocate };
-- beat: { 1, active_until } or { 0 } (none, or dead); drop: { 1 } or { 0 }.
-- Dead allocations are deleted on the way.

-- (helpers: common.lua, prepended at load time)

local now = request_now(ARGV[1])
local key, op = KEYS[1], ARGV[2]
local field = "a:" .. ARGV[3]
local flat = redis.call("HGETALL", key)
local others, mine = 0, nil
for j = 1, #flat, 2 do
  if string.sub(flat[j], 1, 2) == "a:" then
    local a = allot_parse(flat[j], flat[j + 1])
    if allot_phase(a, now) == 2 then
      redis.call("HDEL", key, flat[j])
    elseif flat[j] == field then
      mine = a
    else
      others = others + a.amount
    end
  end
end

-- Keeps the hash at least until the allocation `a` is dead.
local function keep(a, fresh)
  local dead = a.active_until + a.lease
  if fresh then expire_at(key, dead, now) else keep_until(key, dead, now) end
end

if op == "set" then
  local amount, lease, cap = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
  if amount > cap - others then return { 0, math.max(cap - others, 0) } end
  local a = mine or { field = field, drawn = 0, window = nil }
  a.amount, a.active_until, a.lease = amount, now + lease, lease
  local fresh = redis.call("EXISTS", key) == 0
  redis.call("HSET", key, field, allot_value(a))
  keep(a, fresh)
  return { 1, a.active_until }
elseif op == "beat" then
  if not mine then return { 0 } end
  mine.active_until = now + mine.lease
  redis.call("HSET", key, field, allot_value(mine))
  keep(mine, false)
  return { 1, mine.active_until }
end
if not mine then return { 0 } end
redis.call("HDEL", key, field)
return { 1 }
