--[[
check.lua: decide one check against every applicable limit, all or nothing.

KEYS[1]  request record (hash): the first decision for this request id, and what it consumed
KEYS[2]  usage event stream of the tenant
KEYS[3]  denied counter (hash) of the tenant: field "<hour>|<label>" -> denied checks
KEYS[4]  shadow counter (hash) of the tenant: field "<rule label>" -> would-have-denied checks
KEYS[5…] the keys of each limit, in ARGV order: requests 1 (sorted set of members by
         time), tokens 2 (sorted set of "<weight>:<member>" by time, and the running sum),
         concurrency 1 (sorted set of members by lease expiry), budgets 1 (hash of period
         fields)

ARGV[1]  time override in microseconds, or "" to use Redis TIME (tests only)
ARGV[2]  member: the request id qualified by its tenant ("<tenant>:<request id>"), what the
         sorted sets hold; unique across tenants, whose request ids may repeat each other's
         in the global capacity sets they share
ARGV[3]  mode: "check", "dry" (decide, consume nothing, remember nothing) or "peek" (quota)
ARGV[4]  record TTL in milliseconds
ARGV[5]  usage event payload (JSON, written as is on an allowed check)
ARGV[6]  denied counter label
ARGV[7]  what the commit needs to know, remembered with the decision
ARGV[8]  number of limits N
ARGV[9…] per limit 6 values: kind ("r" requests, "t" tokens, "c" concurrency, "k" token
         budget, "m" money budget), limit, span (window in µs; lease in µs for "c"; "d" or
         "m" period for budgets),
         weight (what this check adds), shadow ("1" never denies), label

Returns {status, now, denied index, retry µs (-1 none, -2 never), used_1, reset_1, …, shadow
denied mask "i,j,"} where status is 1 allowed, 0 denied; or {2, stored} for a repeated request
id, stored being the first answer as those values joined by ";". Numbers travel as decimal
strings inside the record because Lua's own number formatting would round microseconds.
]]

local record_key, stream_key, denied_key, shadow_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local member, mode = ARGV[2], ARGV[3]

if mode == "check" then
  local stored = redis.call("HGET", record_key, "d")
  if stored then
    return {2, stored}
  end
end

local now
if ARGV[1] ~= "" then
  now = tonumber(ARGV[1])
else
  local t = redis.call("TIME")
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local floor = math.floor
local DAY = 86400000000

local function encode(values, separator)
  local parts = {}
  for i, value in ipairs(values) do
    parts[i] = type(value) == "number" and string.format("%.0f", value) or value
  end
  return table.concat(parts, separator)
end

local function civil_from_days(days)
  local z = days + 719468
  local era = floor(z / 146097)
  local doe = z - era * 146097
  local yoe = floor((doe - floor(doe / 1460) + floor(doe / 36524) - floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + floor(yoe / 4) - floor(yoe / 100))
  local mp = floor((5 * doy + 2) / 153)
  local month = mp < 10 and mp + 3 or mp - 9
  local year = yoe + era * 400
  if month <= 2 then year = year + 1 end
  return year, month
end

local function days_from_civil(year, month)
  if month <= 2 then year = year - 1 end
  local era = floor(year / 400)
  local yoe = year - era * 400
  local mp = month > 2 and month - 3 or month + 9
  local doy = floor((153 * mp + 2) / 5)
  return era * 146097 + yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy - 719468
end

-- The current budget period: its field name, its end, and the field two periods back.
local function period_of(code)
  local days = floor(now / DAY)
  if code == "d" then
    return "d:" .. days, (days + 1) * DAY, "d:" .. (days - 2)
  end
  local year, month = civil_from_days(days)
  local index = year * 12 + month - 1
  local next_year, next_month = floor((index + 1) / 12), (index + 1) % 12 + 1
  return "m:" .. index, days_from_civil(next_year, next_month) * DAY, "m:" .. (index - 2)
end

local count = tonumber(ARGV[8])
local limits = {}
local key_index = 5
local allowed = true
local denied_index, retry = 0, -1
local shadow_mask = ""

for i = 1, count do
  local base = 8 + (i - 1) * 6
  local item = {
    kind = ARGV[base + 1],
    limit = tonumber(ARGV[base + 2]),
    span = ARGV[base + 3],
    weight = tonumber(ARGV[base + 4]),
    shadow = ARGV[base + 5] == "1",
    label = ARGV[base + 6],
    key = KEYS[key_index],
  }
  key_index = key_index + 1
  local kind = item.kind
  if mode == "peek" then item.weight = 0 end
  local needed = item.weight
  if kind == "r" or kind == "c" then needed = mode == "peek" and 0 or 1 end

  if kind == "r" then
    local window = tonumber(item.span)
    redis.call("ZREMRANGEBYSCORE", item.key, "-inf", now - window)
    item.used = redis.call("ZCARD", item.key)
  elseif kind == "t" then
    local window = tonumber(item.span)
    item.sum_key = KEYS[key_index]
    key_index = key_index + 1
    local expired = redis.call("ZRANGEBYSCORE", item.key, "-inf", now - window)
    if #expired > 0 then
      local gone = 0
      for _, member in ipairs(expired) do
        gone = gone + tonumber(string.match(member, "^(%d+):"))
      end
      redis.call("ZREMRANGEBYSCORE", item.key, "-inf", now - window)
      item.used = redis.call("DECRBY", item.sum_key, gone)
      if item.used <= 0 then
        redis.call("DEL", item.sum_key)
        item.used = 0
      end
    else
      item.used = tonumber(redis.call("GET", item.sum_key) or "0")
    end
  elseif kind == "c" then
    redis.call("ZREMRANGEBYSCORE", item.key, "-inf", now)
    item.used = redis.call("ZCARD", item.key)
  else
    item.field, item.period_end, item.stale_field = period_of(item.span)
    item.used = tonumber(redis.call("HGET", item.key, item.field) or "0")
  end

  -- A check needs room for at least one unit even when it estimates no tokens: a spent
  -- token limit or budget denies every check, not only those that announce tokens.
  local room = math.max(needed, 1)
  item.fits = item.used + room <= item.limit
  if not item.fits and mode ~= "peek" then
    local wait = -2
    if kind == "r" then
      local entry = redis.call("ZRANGE", item.key, item.used - item.limit, item.used - item.limit,
        "WITHSCORES")
      if entry[2] then wait = tonumber(entry[2]) + tonumber(item.span) - now end
    elseif kind == "t" then
      if room <= item.limit then
        local entries = redis.call("ZRANGE", item.key, 0, -1, "WITHSCORES")
        local remaining_sum = item.used
        for j = 1, #entries, 2 do
          remaining_sum = remaining_sum - tonumber(string.match(entries[j], "^(%d+):"))
          if remaining_sum + room <= item.limit then
            wait = tonumber(entries[j + 1]) + tonumber(item.span) - now
            break
          end
        end
      end
    elseif kind == "c" then
      local entry = redis.call("ZRANGE", item.key, 0, 0, "WITHSCORES")
      if entry[2] then wait = tonumber(entry[2]) - now end
    else
      if room <= item.limit then wait = item.period_end - now end
    end
    if item.shadow then
      shadow_mask = shadow_mask .. i .. ","
    else
      allowed = false
      -- The request passes only once every denying limit lets it: report the slowest.
      if retry ~= -2 and (wait == -2 or wait > retry) then
        retry = wait
        denied_index = i
      end
    end
  end
  item.needed = needed
  limits[i] = item
end

local consume = allowed and mode == "check"
local consumed = {}
local result = {allowed and 1 or 0, now, denied_index, retry}

for i = 1, count do
  local item = limits[i]
  local kind = item.kind
  local used = item.used
  local reset = 0
  if consume then
    if kind == "r" then
      local window = tonumber(item.span)
      redis.call("ZADD", item.key, now, member)
      redis.call("PEXPIRE", item.key, floor(window / 1000) + 1)
    elseif kind == "t" then
      local window = tonumber(item.span)
      if item.weight > 0 then
        redis.call("ZADD", item.key, now, string.format("%d", item.weight) .. ":" .. member)
        redis.call("INCRBY", item.sum_key, item.weight)
        redis.call("PEXPIRE", item.key, floor(window / 1000) + 1)
        redis.call("PEXPIRE", item.sum_key, floor(window / 1000) + 1)
      end
      consumed[#consumed + 1] = encode({"t", item.key, item.sum_key, item.weight, now, window}, "\t")
    elseif kind == "c" then
      local lease = tonumber(item.span)
      redis.call("ZADD", item.key, now + lease, member)
      redis.call("PEXPIRE", item.key, floor(lease / 1000) + 1)
      consumed[#consumed + 1] = encode({"c", item.key}, "\t")
    else
      redis.call("HINCRBY", item.key, item.field, item.weight)
      redis.call("HDEL", item.key, item.stale_field)
      -- Kept one period past its end so late usage reports still correct it; relative to
      -- this script's clock, which tests may move.
      local keep = item.span == "d" and DAY or 31 * DAY
      redis.call("PEXPIRE", item.key, floor((item.period_end + keep - now) / 1000))
      consumed[#consumed + 1] = encode({kind, item.key, item.field, item.weight}, "\t")
    end
    used = used + item.needed
  elseif mode == "dry" and allowed then
    used = used + item.needed
  end
  if kind == "r" or kind == "t" then
    local oldest = redis.call("ZRANGE", item.key, 0, 0, "WITHSCORES")
    if oldest[2] then
      reset = tonumber(oldest[2]) + tonumber(item.span) - now
    elseif used > 0 then
      reset = tonumber(item.span)
    end
  elseif kind == "c" then
    local soonest = redis.call("ZRANGE", item.key, 0, 0, "WITHSCORES")
    if soonest[2] then reset = tonumber(soonest[2]) - now end
  else
    reset = item.period_end - now
  end
  result[#result + 1] = used
  result[#result + 1] = reset
end
result[#result + 1] = shadow_mask

if mode == "check" then
  local ttl = tonumber(ARGV[4])
  redis.call("HSET", record_key, "d", encode(result, ";"), "c", table.concat(consumed, "\n"),
    "x", ARGV[7])
  redis.call("PEXPIRE", record_key, ttl)
  if shadow_mask ~= "" then
    for index in string.gmatch(shadow_mask, "(%d+),") do
      redis.call("HINCRBY", shadow_key, limits[tonumber(index)].label, 1)
    end
    redis.call("PEXPIRE", shadow_key, 7 * DAY / 1000)
  end
  if allowed then
    redis.call("XADD", stream_key, "*", "k", "check", "e", ARGV[5], "t", encode({now}, ""))
  else
    redis.call("HINCRBY", denied_key, encode({floor(now / 3600000000)}, "") .. "|" .. ARGV[6], 1)
    redis.call("PEXPIRE", denied_key, 2 * DAY / 1000)
  end
end

return result
