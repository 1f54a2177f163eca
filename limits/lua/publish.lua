--[[
publish.lua: make a policy version current, unless a newer one already is.

KEYS[1]  current version number (string)
KEYS[2]  current policy document (JSON, carrying its own version)
ARGV[1]  version
ARGV[2]  document
ARGV[3]  "force" to replace whatever is current (reconcile: Postgres is the source of truth,
         e.g. after a database restore left Redis ahead)

Both keys change in one step, so a reader never pairs one version's number with another's
document. Returns 1 when this version became current, 0 when an equal or newer one was.
]]

local current = tonumber(redis.call("GET", KEYS[1]) or "0")
if ARGV[3] ~= "force" and tonumber(ARGV[1]) <= current then
  return 0
end
redis.call("SET", KEYS[1], ARGV[1])
redis.call("SET", KEYS[2], ARGV[2])
return 1
