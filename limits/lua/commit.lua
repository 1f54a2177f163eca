--[[
commit.lua: settle an allowed check with what the inference really used.

KEYS[1]  request record (string) written by check.lua: "<decision>\n<settlement>\n<what commit
         needs>\n<consumed lines>"; one kept as a hash (the layout before) is read too
KEYS[2]  usage event stream of the tenant
KEYS[3…] the keys named by the record's consumed entries, in their order (a token window
         gives its log and its running sum; for a line written before the upgrade, the
         names they have now). On a Redis Cluster the entries of a
         class's global capacity (another slot) are left out; an entry whose key is not the
         next one given is passed over.

ARGV[1]  time override in microseconds, or "" to use Redis TIME (tests only)
ARGV[2]  member: the request id qualified by its tenant, as check.lua stored it
ARGV[3]  actual tokens (input + output)
ARGV[4]  actual cost in nano-units of the currency
ARGV[5]  settlement summary to remember ("<input>;<output>;<status>")
ARGV[6]  usage event payload (JSON)

Each consumed entry is replaced by the actual: a token log entry still inside its window
gets the actual weight in its place (or leaves, for none) and its log twice its window to
live (see check.lua, "Expiry"; one that already slid out changes nothing), a budget period
gets actual − estimate, a concurrency slot is freed. A token line of a record kept as a hash
names a window of the layout before (":w:"); it is settled in the log of the same name with
":l:" (given in its place), where check.lua carried the old window's entries over, or in the
old window while none has yet (see settle_before_upgrade). Nothing is ever credited below
zero, so a report can return at most what this request reserved.

Returns {-1} for an unknown request, {0, summary} when it was settled before (nothing
changes), {1, summary} when settled now.
]]

local record_key, stream_key = KEYS[1], KEYS[2]
local member = ARGV[2]
local actual_tokens, actual_cost = tonumber(ARGV[3]), tonumber(ARGV[4])

-- pcall: a record kept as a hash (the layout before this one) is a type error for GET.
local stored = redis.pcall("GET", record_key)
local record, hashed
if type(stored) == "table" then
  record, hashed = redis.call("HMGET", record_key, "c", "s", "d"), true
elseif stored then
  local decision, settled, extra, consumed =
    string.match(stored, "^([^\n]*)\n([^\n]*)\n([^\n]*)\n(.*)$")
  record = {consumed, settled ~= "" and settled or nil, decision, extra}
else
  return {-1}
end
if not record[3] then
  return {-1}
end
if record[2] then
  return {0, record[2]}
end
if string.sub(record[3], 1, 2) ~= "1;" then
  return {-1}  -- a denied check reserved nothing and has nothing to settle
end

local now
if ARGV[1] ~= "" then
  now = tonumber(ARGV[1])
else
  local t = redis.call("TIME")
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end

--[[
A token line of a record written before the upgrade whose entry is not in the log given.
While the log is empty its old window (":w:", a sorted set of "<tokens>:<member>" by time,
and its sum) may still wait for a check to carry it over (check.lua, carry_over): the entry
is settled there, as the code before did, and is carried with the actual. Once the log has
entries, an entry not in it has left or was reset, unless the check estimated no tokens (the
old layout kept no entry then): its actual goes into the log in front, out of time order,
which a log counts until the entries behind it have left (longer, never less).
]]
local function settle_before_upgrade(key, sum_key, at, weight_text, window)
  local weight = tonumber(weight_text)
  local ttl = math.floor(2 * window / 1000)
  local delta = actual_tokens - weight
  if redis.call("EXISTS", key) == 0 then
    local old = string.gsub(key, "^(.-{[^}]*}):l:", "%1:w:", 1)
    if redis.call("EXISTS", old) == 0 then
      if weight > 0 then return end  -- left or reset: nothing to correct
    else
      if weight > 0 and redis.call("ZREM", old, weight_text .. ":" .. member) == 0 then return end
      if actual_tokens > 0 then redis.call("ZADD", old, at, ARGV[3] .. ":" .. member) end
      redis.call("PEXPIRE", old, ttl)
      if delta ~= 0 then
        local total = redis.call("INCRBY", old .. ":sum", delta)
        if total <= 0 then
          redis.call("DEL", old .. ":sum")
        else
          redis.call("PEXPIRE", old .. ":sum", ttl)
        end
      end
      return
    end
  elseif weight > 0 then
    return
  end
  if actual_tokens > 0 then
    redis.call("LPUSH", key, at .. ":" .. ARGV[3] .. ":" .. member)
    redis.call("PEXPIRE", key, ttl)
    redis.call("INCRBY", sum_key, actual_tokens)
    redis.call("PEXPIRE", sum_key, ttl)
  end
end

-- One line per consumed limit, tab-separated fields (see check.lua).
local key_index = 3
for line in string.gmatch(record[1] or "", "[^\n]+") do
  local fields = {}
  for field in string.gmatch(line, "[^\t]+") do
    fields[#fields + 1] = field
  end
  local kind = fields[1]
  if hashed and kind == "t" then
    -- Written before the upgrade: its window's old name. The engine gives the log it has now
    -- (where a check carried the old window over, with this request's entry in it).
    fields[2] = string.gsub(fields[2], "^(.-{[^}]*}):w:", "%1:l:", 1)
  end
  if fields[2] ~= KEYS[key_index] then
    -- Not given: a global capacity key in another cluster slot, settled by capacity.lua.
    kind = nil
  end
  if kind == nil then
    -- nothing here
  elseif kind == "t" then
    local key, sum_key = KEYS[key_index], KEYS[key_index + 1]
    key_index = key_index + 2
    local weight, at, window = tonumber(fields[4]), tonumber(fields[5]), tonumber(fields[6])
    if at > now - window then
      local entry = fields[5] .. ":" .. fields[4] .. ":" .. member
      -- nil when absent (the user's windows were reset: nothing to correct); an error
      -- (a table) for a window of the layout before.
      local index = redis.pcall("LPOS", key, entry)
      if hashed and not index then
        settle_before_upgrade(key, sum_key, fields[5], fields[4], window)
      elseif index and type(index) ~= "table" then
        if actual_tokens > 0 then
          redis.call("LSET", key, index, fields[5] .. ":" .. ARGV[3] .. ":" .. member)
        else
          redis.call("LREM", key, 1, entry)
        end
        -- Twice the window from now, as check.lua's expiry rule needs (never shorter than
        -- what a check set before).
        local ttl = math.floor(2 * window / 1000)
        redis.call("PEXPIRE", key, ttl)
        local delta = actual_tokens - weight
        if delta ~= 0 then
          local total = redis.call("INCRBY", sum_key, delta)
          if total <= 0 then
            redis.call("DEL", sum_key)
          else
            redis.call("PEXPIRE", sum_key, ttl)
          end
        end
      end
    end
  elseif kind == "c" then
    redis.call("ZREM", KEYS[key_index], member)
    key_index = key_index + 1
  else
    local key, field, weight = KEYS[key_index], fields[3], tonumber(fields[4])
    key_index = key_index + 1
    local actual = kind == "k" and actual_tokens or actual_cost
    local current = redis.call("HGET", key, field)
    if current and actual ~= weight then
      local total = redis.call("HINCRBY", key, field, actual - weight)
      if total < 0 then redis.call("HSET", key, field, 0) end
    end
  end
end

if hashed then
  redis.call("HSET", record_key, "s", ARGV[5])
else
  redis.call("SET", record_key, record[3] .. "\n" .. ARGV[5] .. "\n" .. record[4] .. "\n"
    .. record[1], "KEEPTTL")
end
redis.call("XADD", stream_key, "*", "k", "commit", "e", ARGV[6],
  "t", string.format("%.0f", now))
return {1, ARGV[5]}
