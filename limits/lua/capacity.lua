--[[
capacity.lua: a model class's global capacity on a Redis Cluster, where its keys ({g:<class>})
live in another slot than the tenant's keys and cannot be part of check.lua's call. The
engine takes the capacity here first, then runs check.lua on the tenant's slot with the
outcome as an "x" limit, and gives the capacity back when that call denies or fails. On a
single Redis none of this runs: check.lua decides the capacity in the same call.

ARGV[1]  time override in microseconds, or "" to use Redis TIME (tests only)
ARGV[2]  operation: "take", "give" or "settle"
ARGV[3]  member: the request id qualified by its tenant, as check.lua writes it

take: decide the capacity limits as check.lua would, and take them all when none of them
(shadow rules aside) denies and the mode is "check".
  KEYS     each limit's keys: requests 1, tokens 2 (log and running sum), concurrency 1
  ARGV[4]  mode: "check", "dry" or "peek"
  ARGV[5]  estimated tokens
  ARGV[6]  number of limits N, then per limit 5 values: kind ("r", "t", "c"), limit, span
           (window or lease in µs), key TTL in ms, shadow ("1" never denies)
  Returns {now, taken (1 or 0), then per limit: wait ("" when it fits, else µs or -2 for
  never), "<used> <reset> <used> <reset>" (where the limit stands if this check is not
  counted, then if it is), added (1 when this call added the member, 0 when it was there
  or nothing was taken), the line check.lua records for commit ("" for requests)}

give: undo what a take added (its added flags); nothing else changes.
  KEYS     as for take
  ARGV[4]  estimated tokens, as given to take
  ARGV[5]  number of limits N, then per limit 2 values: kind, added

settle: what commit.lua does for the lines of the request record that name capacity keys.
  KEYS     the keys of those lines, in their order (a token line gives its log and its sum)
  ARGV[4]  actual tokens
  ARGV[5…] the lines. Settling twice changes nothing more: a token entry is replaced only
           while it still carries the estimate, and a lease is removed once. A line written
           before the upgrade names its window's old name; its keys come as the new names
           (the window carried over here when still empty, see carry_over).
]]

local call = redis.call
local op, member = ARGV[2], ARGV[3]

local now
if ARGV[1] ~= "" then
  now = tonumber(ARGV[1])
else
  local t = call("TIME")
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function text(value)
  return string.format("%.0f", value)
end

local function weight_of(entry)
  return tonumber(string.match(entry, "^(%d+):"))
end

--[[
Upgrade (docs/engine.md, "Upgrading from sorted-set windows"): a window's name has ":l:" where
it had ":w:" (right after the {g:<class>} tag: the same slot), its layout here is unchanged.
A window found empty asks for its old name (one EXISTS; a window holding entries never does)
and takes it over whole with its sum: the trim that follows removes what has left and takes
its weight off the sum, as for any window. Both get the window's TTL from now, never shorter
than what they had (set at or before now with the same TTL), as the expiry rule needs.
Returns whether anything was carried.
]]
local function carry_over(key, sum_key, ttl)
  local head, tail = string.match(key, "^(.-{[^}]*}):l:(.*)$")
  if not head then return false end
  local old = head .. ":w:" .. tail
  if call("EXISTS", old) == 0 then return false end
  call("RENAME", old, key)
  call("PEXPIRE", key, ttl)
  if sum_key then
    if call("EXISTS", old .. ":sum") == 1 then
      call("RENAME", old .. ":sum", sum_key)
      call("PEXPIRE", sum_key, ttl)
    else
      call("DEL", sum_key)
    end
  end
  return true
end

-- check.lua's trim: removes what has left the window; the oldest score left, the weight
-- that left, whether anything left. Given a TTL (a request or token window, not leases), an
-- empty window first carries its old one over.
local function trim(key, cutoff, weighted, sum_key, ttl)
  local head = call("ZRANGE", key, "0", "1", "WITHSCORES")
  if head[1] == nil and ttl and carry_over(key, sum_key, ttl) then
    head = call("ZRANGE", key, "0", "1", "WITHSCORES")
  end
  local first = tonumber(head[2])
  if first == nil or first > cutoff then
    return first, 0, false
  end
  local second = tonumber(head[4])
  if second == nil or second > cutoff then
    call("ZREM", key, head[1])
    return second, weighted and weight_of(head[1]) or 0, true
  end
  local gone = 0
  if weighted then
    for _, entry in ipairs(call("ZRANGEBYSCORE", key, "-inf", cutoff)) do
      gone = gone + weight_of(entry)
    end
  end
  call("ZREMRANGEBYSCORE", key, "-inf", cutoff)
  local rest = call("ZRANGE", key, "0", "0", "WITHSCORES")
  return tonumber(rest[2]), gone, true
end

local function reset_of(item, used, oldest)
  if item.kind == "c" then
    return oldest and oldest - now or 0
  end
  if oldest then
    return oldest + item.span - now
  end
  return used > 0 and item.span or 0
end

if op == "take" then
  local mode, tokens = ARGV[4], tonumber(ARGV[5])
  local peek = mode == "peek"
  local count = tonumber(ARGV[6])
  local limits = {}
  local key_index = 1
  local fits = true
  for i = 1, count do
    local base = 6 + (i - 1) * 5
    local item = {
      kind = ARGV[base + 1],
      limit = tonumber(ARGV[base + 2]),
      span = tonumber(ARGV[base + 3]),
      ttl = ARGV[base + 4],
      shadow = ARGV[base + 5] == "1",
      key = KEYS[key_index],
      wait = "",
    }
    key_index = key_index + 1
    local kind = item.kind
    item.needed = (peek and 0) or (kind == "t" and tokens or 1)
    if kind == "r" then
      local oldest, _, left = trim(item.key, now - item.span, false, nil, item.ttl)
      item.oldest = oldest
      item.used = oldest and call("ZCARD", item.key) or 0
      if left and item.used > 0 then call("PEXPIRE", item.key, item.ttl) end
      item.fresh = item.used == 0
    elseif kind == "t" then
      item.sum_key = KEYS[key_index]
      key_index = key_index + 1
      local gone, left
      item.oldest, gone, left = trim(item.key, now - item.span, true, item.sum_key, item.ttl)
      if gone > 0 then
        item.used = call("DECRBY", item.sum_key, gone)
        if item.used <= 0 then
          call("DEL", item.sum_key)
          item.used = 0
        end
      else
        item.used = tonumber(call("GET", item.sum_key) or "0")
      end
      if left and item.oldest then
        call("PEXPIRE", item.key, item.ttl)
        call("PEXPIRE", item.sum_key, item.ttl)
      end
      item.fresh = item.oldest == nil
    else
      item.oldest = trim(item.key, now, false)
      item.used = item.oldest and call("ZCARD", item.key) or 0
    end

    local room = math.max(item.needed, 1)
    if item.used + room > item.limit and not peek then
      local wait = -2
      if kind == "r" then
        local entry = call("ZRANGE", item.key, item.used - item.limit, item.used - item.limit,
          "WITHSCORES")
        if entry[2] then wait = tonumber(entry[2]) + item.span - now end
      elseif kind == "t" then
        if room <= item.limit then
          local entries = call("ZRANGE", item.key, 0, -1, "WITHSCORES")
          local remaining_sum = item.used
          for j = 1, #entries, 2 do
            remaining_sum = remaining_sum - weight_of(entries[j])
            if remaining_sum + room <= item.limit then
              wait = tonumber(entries[j + 1]) + item.span - now
              break
            end
          end
        end
      elseif item.oldest then
        wait = item.oldest - now
      end
      -- check.lua reports the wait (and counts a shadow rule's would-be denial).
      item.wait = text(wait)
      if not item.shadow then fits = false end
    end
    limits[i] = item
  end

  local take = fits and mode == "check"
  local result = {text(now), take and 1 or 0}
  for i = 1, count do
    local item = limits[i]
    local kind = item.kind
    local kept = text(item.used) .. " " .. text(reset_of(item, item.used, item.oldest))
    local used, oldest, added, line = item.used, item.oldest, 0, ""
    if take then
      if kind == "r" then
        added = call("ZADD", item.key, "NX", now, member)
        if added == 1 and (oldest == nil or now < oldest) then oldest = now end
        if item.fresh then call("PEXPIRE", item.key, item.ttl) end
      elseif kind == "t" then
        if tokens > 0 then
          added = call("ZADD", item.key, "NX", now, ARGV[5] .. ":" .. member)
          if added == 1 then
            if oldest == nil or now < oldest then oldest = now end
            if call("INCRBY", item.sum_key, ARGV[5]) == tokens or item.fresh then
              call("PEXPIRE", item.sum_key, item.ttl)
            end
          end
          if item.fresh then call("PEXPIRE", item.key, item.ttl) end
        end
        line = table.concat({"t", item.key, item.sum_key, ARGV[5], text(now), text(item.span)},
          "\t")
      else
        local expires = now + item.span
        added = call("ZADD", item.key, "NX", expires, member)
        if added == 1 and (oldest == nil or expires < oldest) then oldest = expires end
        call("PEXPIRE", item.key, item.ttl)
        line = "c\t" .. item.key
      end
      used = used + item.needed
    elseif mode == "dry" and fits then
      used = used + item.needed
    end
    local counted = text(used) .. " " .. text(reset_of(item, used, oldest))
    result[#result + 1] = item.wait
    result[#result + 1] = kept .. " " .. counted
    result[#result + 1] = added
    result[#result + 1] = line
  end
  return result
end

if op == "give" then
  local tokens = ARGV[4]
  local count = tonumber(ARGV[5])
  local key_index = 1
  for i = 1, count do
    local kind, added = ARGV[4 + 2 * i], ARGV[5 + 2 * i]
    local key = KEYS[key_index]
    key_index = key_index + 1
    if kind == "t" then
      local sum_key = KEYS[key_index]
      key_index = key_index + 1
      if added == "1" and call("ZREM", key, tokens .. ":" .. member) == 1 then
        if call("DECRBY", sum_key, tokens) <= 0 then call("DEL", sum_key) end
      end
    elseif added == "1" then
      call("ZREM", key, member)
    end
  end
  return 1
end

-- settle: commit.lua's handling of token and lease lines.
local actual = tonumber(ARGV[4])
local key_index = 1
for i = 5, #ARGV do
  local fields = {}
  for field in string.gmatch(ARGV[i], "[^\t]+") do
    fields[#fields + 1] = field
  end
  if fields[1] == "t" then
    local key, sum_key = KEYS[key_index], KEYS[key_index + 1]
    key_index = key_index + 2
    local weight, at, window = tonumber(fields[4]), tonumber(fields[5]), tonumber(fields[6])
    if at > now - window then
      -- With an estimate the entry is replaced while it still carries it; without one the
      -- actual is added once.
      local present = 1
      local ttl = math.floor(2 * window / 1000)
      if weight > 0 then
        present = call("ZREM", key, text(weight) .. ":" .. member)
        -- A line written before the upgrade: its entry is in the old window until a take
        -- carries it over. Asked only when the entry was not found in an empty window.
        if present == 0 and call("EXISTS", key) == 0 and carry_over(key, sum_key, ttl) then
          present = call("ZREM", key, text(weight) .. ":" .. member)
        end
      elseif actual > 0 then
        -- Adding into an empty window would leave its old one unread by every take (they
        -- carry over only into an empty window): carried over first.
        if call("EXISTS", key) == 0 then carry_over(key, sum_key, ttl) end
        present = call("ZADD", key, "NX", at, text(actual) .. ":" .. member)
      end
      if present == 1 then
        if actual > 0 then
          call("ZADD", key, at, text(actual) .. ":" .. member)
        end
        call("PEXPIRE", key, ttl)
        local delta = actual - weight
        if delta ~= 0 then
          local total = call("INCRBY", sum_key, delta)
          if total <= 0 then
            call("DEL", sum_key)
          else
            call("PEXPIRE", sum_key, ttl)
          end
        end
      end
    end
  else
    call("ZREM", KEYS[key_index], member)
    key_index = key_index + 1
  end
end
return 1
