--[[
check.lua: decide one check against every applicable limit, all or nothing.

KEYS[1]  request record (string): the first decision for this request id, and what it
         consumed: "<decision>\n<settlement>\n<prices><event>\n<consumed lines>", the
         settlement empty until commit.lua writes it
KEYS[2]  usage event stream of the tenant
KEYS[3]  denied counter (hash) of the tenant: field "<hour>|<label>" -> denied checks
KEYS[4]  shadow counter (hash) of the tenant: field "<rule label>" -> would-have-denied checks
KEYS[5…] the keys of each limit, in ARGV order: requests 1 (log: a list, newest first, of
         "<time>:<member>"), tokens 2 (log of "<time>:<tokens>:<member>", and the running
         sum), concurrency 1 (sorted set of members by lease expiry), budgets 1 (hash of
         period fields)

ARGV[1]  time override in microseconds, or "" to use Redis TIME (tests only)
ARGV[2]  member: the request id qualified by its tenant ("<tenant>:<request id>"), what the
         logs and lease sets hold; unique across tenants, whose request ids may repeat each
         other's in the global capacity they share
ARGV[3]  mode: "check", "new" (a check whose request id the engine has just made, so that
         no record of it can exist: none is read), "dry" (decide, consume nothing, remember
         nothing) or "peek" (quota)
ARGV[4]  record TTL in milliseconds
ARGV[5]  usage event payload (JSON, written as is on an allowed check)
ARGV[6]  denied counter label
ARGV[7]  the prices the commit needs ("<input>\t<output>\t"), remembered with the event
ARGV[8]  estimated tokens: what a token window or token budget adds
ARGV[9]  estimated cost in nano-units: what a money budget adds
ARGV[10] number of limits N
ARGV[11…] per limit 4 values: kind ("r" requests, "t" tokens, "c" concurrency, "k" token
         budget, "m" money budget), limit, span (window in µs; lease in µs for "c"; "d" or
         "m" period for budgets), and for a shadow rule (never denies) its label, else "".
         A key's TTL follows from its span: a window's twice the window, a lease set's the
         lease + 1 ms.
         On a Redis Cluster a class's global capacity lives in another slot: capacity.lua has
         decided it first, and it comes here as kind "x" with no key, its span
         "<wait> <used> <reset> <used> <reset>" (the wait "-" when it fits; where it stands if
         this check is not counted, then if it is), a line break and the line to record for
         commit (may be empty). Its result goes into the answer and the record in its place,
         so a repeated request id answers it as on one Redis.

Returns the answer {status, now, denied index, retry µs (-1 none, -2 never), used_1,
reset_1, …, shadow denied mask "i,j,"} where status is 1 allowed, 0 denied: in mode "check"
as the text it is stored as, those values joined by ";" (one string to answer, where an
array is an element each to carry out of Lua), else as that array; or {2, stored, settled}
for a repeated request id, stored being its first answer as that text and settled 1 when
its usage was reported, else 0.

Cost notes (this runs once per check: its Redis calls, the size and kind of their answers,
its arguments and its own bytecodes are the check's cost). A window is a list, not a sorted
set: a list's commands are cheap where a sorted set's are not (ZRANGE goes through a generic
range parser, its WITHSCORES writes each score with printf "%.17g", and a ZADD into a small
set walks it comparing scores), and its entries carry their time as text. Entries are pushed
in time order, so the oldest is the last: one LINDEX tells whether anything has left the
window and gives its reset; nothing is removed or re-read when nothing has left. A request
log takes its entry before the decision, as LPUSH answers the count, and gives it back
(LPOP) when the check is denied; Redis runs nothing else meanwhile. A token log's running
sum likewise takes the check's tokens before the decision (INCRBY answers the sum: no GET)
and gives them back when the check is denied. A token log keeps an entry for every check (no
tokens too), so commit.lua finds it where it is and rewrites it in place. A key's expiry is
set only when its oldest entry changes (see "Expiry" below), and follows from the window, so
a limit is 4 arguments. A log found empty asks once (EXISTS)
for a window of the layout before to carry over (carry_over); one holding entries never does.
The record is one string, written with its expiry in one SET; a check whose request id the
engine has just made (mode "new") reads none. Inside Lua (Redis's interpreter costs tens of
instructions a bytecode, and every string, table or closure a run makes is an allocation the
collector frees again, every number written a sprintf and every numeral read a strtod):
numerals are parsed once ("+ 0"), and only those the check needs; the stored answer is
written by one string.format, from a constant format when the check is allowed; a limit's
state is one array made in one go, and the arrays of limits and of the answer are made with
room for the usual number of limits; what a check adds to a log is made once; the functions
of the less usual paths are made only when one is taken. Measured with callgrind on a Redis
of its own, instructions per check: bench/README.md.

Time order: Redis TIME and the test clock only move forward in practice; should the clock
step back, an entry pushed then sits before older ones, and the log counts it until the
entries behind it have left: it may deny for longer, never admit more.
]]

local KEYS, ARGV = KEYS, ARGV
local record_key, stream_key, denied_key, shadow_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local member, mode = ARGV[2], ARGV[3]
local call = redis.call
local match = string.match

if mode == "check" then
  -- pcall: a record kept as a hash (the layout before this one) is a type error for GET.
  local stored = redis.pcall("GET", record_key)
  if type(stored) == "table" then
    stored = call("HMGET", record_key, "d", "s")
    if stored[1] then return {2, stored[1], stored[2] and 1 or 0} end
  elseif stored then
    local decision, settled = match(stored, "^([^\n]*)\n([^\n]*)")
    -- Whether its usage was reported too: a settled request holds no global capacity any
    -- more (the cluster path gives back what a repeat's take added).
    return {2, decision, settled ~= "" and 1 or 0}
  end
elseif mode == "new" then
  mode = "check"
end

-- Numerals (ARGV, replies) are read with "+ 0": tonumber() parses a numeral twice (is it
-- one? then its value), arithmetic once.
local now_text
if ARGV[1] ~= "" then
  now_text = ARGV[1]
else
  local t = call("TIME")
  -- Seconds and zero-padded microseconds joined as text: no number formatting needed, and
  -- nine times in ten no padding either.
  local seconds, micros = t[1], t[2]
  if #micros == 6 then
    now_text = seconds .. micros
  else
    now_text = seconds .. string.sub("00000" .. micros, -6)
  end
end
local now = now_text + 0

local floor = math.floor
local DAY = 86400000000
local tokens = ARGV[8] + 0
local peek = mode == "peek"

-- The helpers of the less usual paths (a trim, a fresh log, a token denial, a budget, a
-- lease) are made on the first call that needs them: every function a script defines is a
-- closure made anew on each run, which the usual check would pay for without using it.
local rare
local function helpers()
  if rare then return rare end
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

  -- A log entry: "<time>:<member>" (requests) or "<time>:<tokens>:<member>" (tokens).
  local function weight_of(entry)
    return match(entry, "^%d+:(%d+):") + 0
  end

  --[[
  Removes the entries of a log (a list, newest first) at or before cutoff, given its last
  (oldest) entry, which is one of them. Returns the time of the oldest entry left (nil when
  none) and the weight that left (token logs: the sum of their "<tokens>:" fields).

  The caller has read the last entry: that one read covers the usual cases, nothing has left
  or only it has (a steady flow moves a window by about one entry a check). When more have
  left, the log's oldest end is read in chunks growing eightfold until an entry still in the
  window shows, so the work follows what left, not the log's length.
  ]]
  local function trim_log(key, cutoff, weighted, last)
    local gone = 0
    for _ = 1, 2 do
      call("RPOP", key)
      if weighted then gone = gone + weight_of(last) end
      last = call("LINDEX", key, "-1")
      if not last then
        return nil, gone
      end
      local oldest = match(last, "^%d+") + 0
      if oldest > cutoff then
        return oldest, gone
      end
    end
    local size = 16
    while true do
      local tail = call("LRANGE", key, -size, -1)
      local count = #tail
      local keep, left = count, 0
      while keep > 0 and match(tail[keep], "^%d+") + 0 <= cutoff do
        if weighted then left = left + weight_of(tail[keep]) end
        keep = keep - 1
      end
      if keep > 0 then
        call("LTRIM", key, 0, keep - count - 1)
        return match(tail[keep], "^%d+") + 0, gone + left
      elseif count < size then
        call("DEL", key)
        return nil, gone + left
      end
      size = size * 8
    end
  end

  --[[
  Upgrade from the sorted-set layout (docs/engine.md, "Upgrading from sorted-set windows").
  Windows used to be sorted sets under the same name with ":w:" where a log has ":l:" (right
  after the hash tag, so both share a cluster slot): members "<member>" or "<tokens>:<member>"
  scored by their time, and a token window's running sum beside it. Only a log found empty asks
  for its old window (one EXISTS): a log holding entries never does, and the old window is
  deleted once carried, so the EXISTS finds nothing afterwards. Its entries still in the window
  move into the log oldest last, its sum is what those entries weigh (what a trim would have
  left), and both get twice the window to live from now (see "Expiry": at least their oldest
  entry's time + 2 x window). Returns the log's last (oldest) entry, or nil when nothing was
  carried.
  ]]
  local function carry_over(key, sum_key, cutoff, window)
    local head, tail = match(key, "^(.-{[^}]*}):l:(.*)$")
    if not head then return nil end
    local old = head .. ":w:" .. tail
    if call("EXISTS", old) == 0 then return nil end
    local found = call("ZRANGEBYSCORE", old, string.format("(%d", cutoff), "+inf", "WITHSCORES")
    if sum_key then call("DEL", old, old .. ":sum") else call("DEL", old) end
    local count = #found
    if count == 0 then return nil end
    local entries, total = {}, 0
    for j = 1, count, 2 do
      -- "%d": the score comes back as a double's text, maybe with an exponent.
      local at = string.format("%d", found[j + 1] + 0)
      entries[#entries + 1] = at .. ":" .. found[j]
      if sum_key then total = total + match(found[j], "^(%d+):") end
    end
    -- In ascending time: each push goes in front, so the oldest ends up last. In chunks, as
    -- unpack is bounded by Lua's stack and a window may hold as many entries as its limit.
    local size = #entries
    for from = 1, size, 1000 do
      call("LPUSH", key, unpack(entries, from, math.min(from + 999, size)))
    end
    local ttl = floor(window / 500)
    call("PEXPIRE", key, ttl)
    if sum_key then
      if total > 0 then
        call("SET", sum_key, string.format("%d", total), "PX", ttl)
      else
        call("DEL", sum_key)
      end
    end
    return entries[1]
  end

  -- How long until a token log, holding used, has let enough leave for room more within
  -- limit: its oldest entries are read in chunks growing eightfold until they do. Nil when
  -- they never do (the log alone does not hold enough).
  local function token_wait(key, used, room, limit, window)
    local size, seen = 16, 0
    while true do
      local tail = call("LRANGE", key, -size, -seen - 1)
      for j = #tail, 1, -1 do
        used = used - weight_of(tail[j])
        if used + room <= limit then
          return match(tail[j], "^%d+") + window - now
        end
      end
      if #tail < size - seen then
        return nil
      end
      seen = size
      size = size * 8
    end
  end

  -- Concurrency leases (a sorted set by expiry): removes those expired at cutoff; the earliest
  -- expiry left, or nil. Read as the two earliest, as a log's trim above.
  local function trim_leases(key, cutoff)
    local head = call("ZRANGE", key, "0", "1", "WITHSCORES")
    local first = head[2] and head[2] + 0
    if first == nil or first > cutoff then
      return first
    end
    local second = head[4] and head[4] + 0
    if second == nil or second > cutoff then
      call("ZREM", key, head[1])
      return second
    end
    call("ZREMRANGEBYSCORE", key, "-inf", cutoff)
    local rest = call("ZRANGE", key, "0", "0", "WITHSCORES")[2]
    return rest and rest + 0
  end

  rare = {
    period_of = period_of, trim_log = trim_log, carry_over = carry_over,
    token_wait = token_wait, trim_leases = trim_leases,
  }
  return rare
end

--[[
Expiry. A log lives twice its window past the last time its expiry was set, and that is set
only when its oldest entry may have changed: when entries left (in any mode: what is left
must outlive itself) or when the first entry goes into an empty log. Between those times
the oldest entry o stays, and the expiry, set at or after o was added, is at least
o + 2 x window; every entry added meanwhile arrives while o is still in the window
(now < o + window), so it leaves the window (at now + window) before the log expires.
commit.lua keeps the same rule when it changes an entry.
]]

local count = ARGV[10] + 0
-- Per limit, what the second pass needs, as an array made in one go (a table with named
-- fields costs a hash part and a store each):
-- {kind, key, used, oldest, needed, window, fresh, sum key, ARGV base, a, b, c, d}, where
-- a… are a budget's field, period end and stale field, or an "x" limit's where it stands
-- and its line; a is true for a token log whose sum holds this check's tokens already.
-- Made with room for the usual number of limits (nils in a constructor size its array):
-- a table grown one element at a time is rehashed at every power of two.
local limits = {nil, nil, nil, nil, nil, nil}
local key_index = 5
local allowed = true
local denied_index, retry = 0, -1
local shadow_mask = ""
local base = 10
local check = mode == "check"
-- What a check adds to each request log, and to each token log: made once.
local request_entry, token_entry
-- Two rules with the same key (say a shadow rule beside an enforced one) share one log: the
-- second reads what the first found, and a check is one entry in it.
local first_of = {}

for i = 1, count do
  local kind, limit, span = ARGV[base + 1], ARGV[base + 2] + 0, ARGV[base + 3]
  local key, sum_key, oldest, window, a, b, c, d
  local used, fresh, needed = 0, false, 1
  if kind == "r" then
    key = KEYS[key_index]
    key_index = key_index + 1
    window = span + 0
    local first = first_of[key]
    if first then
      used, oldest = first[3], first[4]
    else
      local last = call("LINDEX", key, "-1")
        or helpers().carry_over(key, nil, now - window, window)
      if last then
        oldest = match(last, "^%d+") + 0
        local cutoff = now - window
        if oldest <= cutoff then
          oldest = helpers().trim_log(key, cutoff, false, last)
          -- What is left must outlive itself: see "Expiry".
          if oldest then call("PEXPIRE", key, floor(window / 500)) end
        end
      end
      if check then
        -- Added before the decision, as LPUSH answers the count; taken back (LPOP) below
        -- when the check is denied. Nothing runs in between.
        request_entry = request_entry or now_text .. ":" .. member
        used = call("LPUSH", key, request_entry) - 1
      elseif oldest then
        used = call("LLEN", key)
      end
    end
    fresh = used == 0
    if peek then needed = 0 end
  elseif kind == "t" then
    key, sum_key = KEYS[key_index], KEYS[key_index + 1]
    key_index = key_index + 2
    window = span + 0
    if not peek then needed = tokens else needed = 0 end
    local gone = 0
    local first = first_of[key]
    local last = not first
      and (call("LINDEX", key, "-1") or helpers().carry_over(key, sum_key, now - window, window))
    if first then
      used, oldest = first[3], first[4]
    elseif last then
      oldest = match(last, "^%d+") + 0
      local cutoff = now - window
      if oldest <= cutoff then
        oldest, gone = helpers().trim_log(key, cutoff, true, last)
        if oldest then
          call("PEXPIRE", key, floor(window / 500))
          call("PEXPIRE", sum_key, floor(window / 500))
        end
      end
    end
    if first then
      -- read above
    elseif gone > 0 then
      used = call("DECRBY", sum_key, gone)
      if used <= 0 then
        call("DEL", sum_key)
        used = 0
      end
    elseif check and tokens > 0 then
      -- Added before the decision, as INCRBY answers the sum (no GET); taken back below
      -- when the check is denied. Nothing runs in between.
      used = call("INCRBY", sum_key, ARGV[8]) - tokens
      a = true
    else
      used = (call("GET", sum_key) or 0) + 0
    end
    fresh = oldest == nil
  elseif kind == "c" then
    oldest = helpers().trim_leases(KEYS[key_index], now)
    key = KEYS[key_index]
    key_index = key_index + 1
    if oldest then used = call("ZCARD", key) end
    if peek then needed = 0 end
  elseif kind == "x" then
    local wait, kept_used, kept_reset, counted_used, counted_reset, line =
      match(span, "^(%S+) (%S+) (%S+) (%S+) (%S+)\n?(.*)$")
    span = wait ~= "-" and wait or nil
    used, a, b, c, d = kept_used + 0, kept_reset + 0, counted_used + 0, counted_reset + 0, line
    needed = 0
  else
    key = KEYS[key_index]
    key_index = key_index + 1
    a, b, c = helpers().period_of(span)
    used = (call("HGET", key, a) or 0) + 0
    if peek then
      needed = 0
    elseif kind == "k" then
      needed = tokens
    else
      needed = ARGV[9] + 0  -- the estimated cost: read for a money budget only
    end
  end

  -- A check needs room for at least one unit even when it estimates no tokens: a spent
  -- token limit or budget denies every check, not only those that announce tokens.
  local room = needed > 1 and needed or 1
  local wait
  if kind == "x" then
    if span then wait = span + 0 end
  elseif used + room > limit and not peek then
    wait = -2
    if kind == "r" then
      -- The entry that must leave for one more to fit: the limit-th newest, past the one
      -- this check added.
      if limit > 0 then
        local entry = call("LINDEX", key, check and limit or limit - 1)
        if entry then wait = match(entry, "^%d+") + window - now end
      end
    elseif kind == "t" then
      if room <= limit then
        wait = helpers().token_wait(key, used, room, limit, window) or -2
      end
    elseif kind == "c" then
      if oldest then wait = oldest - now end
    else
      if room <= limit then wait = b - now end
    end
  end
  if wait then
    if ARGV[base + 4] ~= "" then
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
  local item = {kind, key, used, oldest, needed, window, fresh, sum_key, base, a, b, c, d}
  limits[i] = item
  if key and not first_of[key] then first_of[key] = item end
  base = base + 4
end

local consume = allowed and check
-- A dry run that would pass answers as if it had counted.
local grow = consume or (mode == "dry" and allowed)
local consumed, lines = {}, 0
local result = {allowed and 1 or 0, now_text, denied_index, retry,
  nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil}  -- room as for limits
local n = 4

for i = 1, count do
  local item = limits[i]
  local kind, key, used, oldest = item[1], item[2], item[3], item[4]
  local reset = 0
  if kind == "r" or kind == "t" then
    local first = first_of[key] == item
    if consume then
      local fresh = item[7]
      if fresh then oldest = now end
      -- Twice the window, in ms (see "Expiry"); worked out only when an expiry is set, as
      -- math.floor is a call of a C function.
      if kind == "r" then
        if first and fresh then call("PEXPIRE", key, floor(item[6] / 500)) end
      else
        local sum_key = item[8]
        if first then
          -- Every check has its entry, with no tokens too: commit finds it in its place.
          token_entry = token_entry or now_text .. ":" .. ARGV[8] .. ":" .. member
          call("LPUSH", key, token_entry)
          if fresh then call("PEXPIRE", key, floor(item[6] / 500)) end
          -- A sum that did not exist (or was spent) has no expiry yet.
          if item[10] then
            if used == 0 or fresh then call("PEXPIRE", sum_key, floor(item[6] / 500)) end
          elseif tokens > 0 and (call("INCRBY", sum_key, ARGV[8]) == tokens or fresh) then
            call("PEXPIRE", sum_key, floor(item[6] / 500))
          end
        end
        lines = lines + 1
        consumed[lines] = "t\t" .. key .. "\t" .. sum_key .. "\t" .. ARGV[8] .. "\t" .. now_text
          .. "\t" .. ARGV[item[9] + 3]
      end
    end
    if check and not allowed and first then
      if kind == "r" then
        call("LPOP", key)
      elseif item[10] then
        -- A sum that held nothing is gone again, as it was (no expiry to keep).
        if used == 0 then call("DEL", item[8]) else call("DECRBY", item[8], ARGV[8]) end
      end
    end
    if grow then used = used + item[5] end
    if oldest then
      reset = oldest + item[6] - now
    elseif used > 0 then
      reset = item[6]
    end
  elseif kind == "x" then
    if grow then
      used, reset = item[11], item[12]
      if consume and item[13] ~= "" then
        lines = lines + 1
        consumed[lines] = item[13]
      end
    else
      reset = item[10]
    end
  elseif kind == "c" then
    if consume then
      local expires = now + ARGV[item[9] + 3]
      if call("ZADD", key, expires, member) == 0 then
        -- The member was there already (a request id seen before its record): its score
        -- moved, so read the earliest again.
        oldest = call("ZRANGE", key, "0", "0", "WITHSCORES")[2] + 0
      elseif oldest == nil or expires < oldest then
        oldest = expires
      end
      -- Every lease added pushes the expiry past the lease that expires last.
      call("PEXPIRE", key, floor(ARGV[item[9] + 3] / 1000) + 1)
      lines = lines + 1
      consumed[lines] = "c\t" .. key
    end
    if grow then used = used + item[5] end
    if oldest then reset = oldest - now end
  else
    local period_end = item[11]
    if consume then
      local amount = kind == "k" and ARGV[8] or ARGV[9]
      call("HINCRBY", key, item[10], amount)
      call("HDEL", key, item[12])
      -- Kept one period past its end so late usage reports still correct it; relative to
      -- this script's clock, which tests may move.
      local keep = ARGV[item[9] + 3] == "d" and DAY or 31 * DAY
      call("PEXPIRE", key, floor((period_end + keep - now) / 1000))
      lines = lines + 1
      consumed[lines] = kind .. "\t" .. key .. "\t" .. item[10] .. "\t" .. amount
    end
    if grow then used = used + item[5] end
    reset = period_end - now
  end
  result[n + 1] = used
  result[n + 2] = reset
  n = n + 2
end
result[n + 1] = shadow_mask

if mode == "check" then
  -- The answer as text in one go: "%d" writes every whole number exactly (Lua's own
  -- number formatting rounds past 14 digits, and goes through the slower "%.14g").
  -- Each number written costs a sprintf: an allowed check's status, denied index and retry
  -- are known ("1;<now>;0;-1"), and its format is a constant for the usual numbers of
  -- limits (a constant is made when the script is loaded, a format put together per run is
  -- two more strings).
  local stored
  if allowed then
    local layout
    if count == 5 then
      layout = "1;%s;0;-1;%d;%d;%d;%d;%d;%d;%d;%d;%d;%d;%s"
    elseif count == 1 then
      layout = "1;%s;0;-1;%d;%d;%s"
    elseif count == 2 then
      layout = "1;%s;0;-1;%d;%d;%d;%d;%s"
    elseif count == 3 then
      layout = "1;%s;0;-1;%d;%d;%d;%d;%d;%d;%s"
    elseif count == 4 then
      layout = "1;%s;0;-1;%d;%d;%d;%d;%d;%d;%d;%d;%s"
    else
      layout = "1;%s;0;-1" .. string.rep(";%d", 2 * count) .. ";%s"
    end
    stored = string.format(layout, now_text, unpack(result, 5))
  else
    stored = string.format("%d;%s;%d;%d" .. string.rep(";%d", 2 * count) .. ";%s",
      unpack(result))
  end
  -- The record: decision, settlement (empty until commit.lua), what commit needs, and the
  -- consumed lines, one string with its expiry in one command.
  call("SET", record_key, stored .. "\n\n" .. ARGV[7] .. ARGV[5] .. "\n"
    .. table.concat(consumed, "\n"), "PX", ARGV[4])
  if shadow_mask ~= "" then
    for index in string.gmatch(shadow_mask, "(%d+),") do
      call("HINCRBY", shadow_key, ARGV[limits[index + 0][9] + 4], 1)
    end
    call("PEXPIRE", shadow_key, 7 * DAY / 1000)
  end
  if allowed then
    call("XADD", stream_key, "*", "k", "check", "e", ARGV[5], "t", now_text)
  else
    call("HINCRBY", denied_key, floor(now / 3600000000) .. "|" .. ARGV[6], 1)
    call("PEXPIRE", denied_key, 2 * DAY / 1000)
  end
  return stored
end

return result
