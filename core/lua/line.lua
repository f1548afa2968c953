-- ratewarden: the ordered lock of a coordinated resource (sequential mode).
--
-- Mirrors core/src/upstream/sequence.rs: first come, first served; every
-- place is leased (a waiter renews its place each time it looks, the holder
-- holds for its own lease), and places whose lease ran out are dropped.
--
-- KEYS[1]  the resource's line: "id:lease end,id:lease end,..." first in line
--          first (a string; gone when the line is empty)
-- ARGV[1]  now in µs, or "-1" to read the server clock (TIME)
-- ARGV[2]  "enter" | "leave"
-- ARGV[3]  the holder's id
-- ARGV[4]  enter: the holder's lease (µs), ARGV[5] a waiter's lease (µs)
-- → enter: the position (0: it holds the lock); leave: 1 if it was in the line

-- (helpers: common.lua, prepended at load time)

local now = request_now(ARGV[1])
local id = ARGV[3]
local places = {}
local raw = redis.call("GET", KEYS[1])
if raw then
  for p, u in string.gmatch(raw, "([^:,]+):([^,]+)") do places[#places + 1] = { p, tonumber(u) } end
end

local result
if ARGV[2] == "enter" then
  local kept = {}
  for _, p in ipairs(places) do
    if p[2] > now then kept[#kept + 1] = p end
  end
  places = kept
  local at = nil
  for i, p in ipairs(places) do
    if p[1] == id then at = i end
  end
  if not at then
    places[#places + 1] = { id, 0 }
    at = #places
  end
  if at == 1 then places[at][2] = now + tonumber(ARGV[4]) else places[at][2] = now + tonumber(ARGV[5]) end
  result = at - 1
else
  local kept, was = {}, 0
  for _, p in ipairs(places) do
    if p[1] ~= id then kept[#kept + 1] = p else was = 1 end
  end
  places = kept
  result = was
end

if #places == 0 then
  redis.call("DEL", KEYS[1])
else
  local parts, until_ = {}, 0
  for i, p in ipairs(places) do
    parts[i] = p[1] .. ":" .. num(p[2])
    until_ = math.max(until_, p[2])
  end
  redis.call("SET", KEYS[1], table.concat(parts, ","), "PX", num(math.floor(math.max(until_ - now, 0) / 1000) + 1000))
end
return result
