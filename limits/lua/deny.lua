--[[
deny.lua: answer a check from the process's over-limit cache (limits/overlimit.py).

The process saw, in an answer of check.lua, that one request window of this check is full
until a known moment (Redis time): no check touching that window can pass before then, so
check.lua need not run. This script only does what such a denial must still do in Redis:
keep its request id's first decision (idempotency: a repeat of a request id allowed before
must get that allowed decision back, never this denial) and count the denial for billing.

KEYS[1]  request record (string), as check.lua writes it (one kept as a hash, the layout
         before, is read too)
KEYS[2]  denied counter (hash) of the tenant, as check.lua counts into it
KEYS[3]  the tenant's reset mark: set by a reset of one of its users, for as long as a
         cached denial can live; while it exists no denial is answered from a cache

ARGV[1]  time override in microseconds, or "" to use Redis TIME (tests only)
ARGV[2]  until: the Redis time (µs) at which the full window lets one request in again
ARGV[3…5] the decision as check.lua lays it out, around the two numbers only Redis's clock
         gives (the retry, which is also the denying window's reset):
         "0;<now>;" ARGV[3] <retry> ARGV[4] <retry> ARGV[5], where ARGV[3] is
         "<denied index>;", ARGV[4] ";" then the other limits before it as "-;-;" (not read)
         and "<used>;", ARGV[5] the limits after it as ";-;-" and ";" (no shadow mask)
ARGV[6]  record TTL in milliseconds
ARGV[7]  what the record keeps for a commit (prices and event), as check.lua keeps it
ARGV[8]  denied counter label

Returns {3} when the cache must not answer (the window has moved on by Redis's clock, or a
reset happened): the caller runs check.lua. {2, stored, settled} for a request id decided
before, as check.lua returns it. {0, decision} when denied now: the decision as check.lua
would have stored it, with "-" for the limits not read.
]]

local record_key, denied_key, reset_key = KEYS[1], KEYS[2], KEYS[3]
local call = redis.call

local now_text
if ARGV[1] ~= "" then
  now_text = ARGV[1]
else
  local t = call("TIME")
  now_text = t[1] .. string.sub("00000" .. t[2], -6)
end
local now = tonumber(now_text)
local retry = tonumber(ARGV[2]) - now
if retry <= 0 or call("EXISTS", reset_key) == 1 then
  return {3}
end

-- pcall: a record kept as a hash (the layout before this one) is a type error for GET.
local stored = redis.pcall("GET", record_key)
if type(stored) == "table" then
  stored = call("HMGET", record_key, "d", "s")
  if stored[1] then return {2, stored[1], stored[2] and 1 or 0} end
elseif stored then
  local decision, settled = string.match(stored, "^([^\n]*)\n([^\n]*)")
  return {2, decision, settled ~= "" and 1 or 0}
end

-- Lua writes whole numbers below 10^14 exactly (see check.lua); a retry is far below.
local decision = "0;" .. now_text .. ";" .. ARGV[3] .. retry .. ARGV[4] .. retry .. ARGV[5]
call("SET", record_key, decision .. "\n\n" .. ARGV[7] .. "\n", "PX", ARGV[6])
call("HINCRBY", denied_key, math.floor(now / 3600000000) .. "|" .. ARGV[8], 1)
call("PEXPIRE", denied_key, 2 * 86400000)  -- two days, as check.lua
return {0, decision}
