//! The Lua scripts that make shared updates atomic in Redis. Each runs on the server as one
//! step, reads the server's clock (so replicas' clocks need not agree for limits and budgets)
//! and refreshes the expiry of what it touches, so abandoned keys leave Redis by themselves.

/// Requests and tokens per minute over a sliding window of 60 one-second buckets: the same
/// rule as the in-memory `RateLimiter`, so a limit means the same with and without Redis.
///
/// KEYS[1]: the key's bucket hash (field = unix second, value = "requests:tokens").
/// ARGV: rpm (-1 = none), tpm (-1 = none), the request's tokens.
/// Returns {1, 0} when admitted (and counted), {0, wait_ms} when refused.
pub(super) const RATE_CHECK: &str = r#"
local t = redis.call('TIME')
local now_s = tonumber(t[1])
local now_ms = now_s * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local tokens = tonumber(ARGV[3])
local raw = redis.call('HGETALL', KEYS[1])
local live = {}
local used_r, used_t = 0, 0
local cur_r, cur_t = 0, 0
for i = 1, #raw, 2 do
  local sec = tonumber(raw[i])
  local r, tk = string.match(raw[i + 1], '^(%d+):(%d+)$')
  r = tonumber(r) or 0
  tk = tonumber(tk) or 0
  if sec == nil or sec + 60 <= now_s or sec > now_s then
    redis.call('HDEL', KEYS[1], raw[i])
  elseif r > 0 or tk > 0 then
    live[#live + 1] = {sec, r, tk}
    used_r = used_r + r
    used_t = used_t + tk
    if sec == now_s then cur_r, cur_t = r, tk end
  end
end
table.sort(live, function(a, b) return a[1] < b[1] end)
local function expiry(amount, idx)
  local freed = 0
  for _, b in ipairs(live) do
    freed = freed + b[idx]
    if freed >= amount then return b[1] + 60 end
  end
  if #live > 0 then return live[#live][1] + 60 end
  return now_s + 60
end
local admit_at = nil
if rpm >= 0 then
  if rpm == 0 then return {0, 60000} end
  if used_r + 1 > rpm then
    local at = expiry(used_r + 1 - rpm, 2)
    if admit_at == nil or at > admit_at then admit_at = at end
  end
end
if tpm >= 0 and used_t > 0 and used_t + tokens > tpm then
  local must = used_t + tokens - tpm
  if tokens > tpm then must = used_t end
  local at = expiry(must, 3)
  if admit_at == nil or at > admit_at then admit_at = at end
end
if admit_at ~= nil then
  local wait = admit_at * 1000 - now_ms
  if wait < 1 then wait = 1 end
  return {0, wait}
end
redis.call('HSET', KEYS[1], tostring(now_s), (cur_r + 1) .. ':' .. (cur_t + tokens))
redis.call('PEXPIRE', KEYS[1], 61000)
return {1, 0}
"#;

/// Corrects a key's token count once real usage is known: a positive delta lands in the
/// current second, a negative one is taken from the newest buckets back, never below zero.
///
/// KEYS[1]: the bucket hash. ARGV[1]: the delta.
pub(super) const RATE_ADJUST: &str = r#"
local now_s = tonumber(redis.call('TIME')[1])
local delta = tonumber(ARGV[1])
local function get(sec)
  local v = redis.call('HGET', KEYS[1], tostring(sec))
  if not v then return nil end
  local r, tk = string.match(v, '^(%d+):(%d+)$')
  return tonumber(r) or 0, tonumber(tk) or 0
end
if delta >= 0 then
  local r, tk = get(now_s)
  r = r or 0
  tk = tk or 0
  redis.call('HSET', KEYS[1], tostring(now_s), r .. ':' .. (tk + delta))
  redis.call('PEXPIRE', KEYS[1], 61000)
  return 1
end
local left = -delta
for back = 0, 59 do
  local sec = now_s - back
  local r, tk = get(sec)
  if r ~= nil then
    local take = math.min(left, tk)
    redis.call('HSET', KEYS[1], tostring(sec), r .. ':' .. (tk - take))
    left = left - take
    if left <= 0 then break end
  end
end
return 1
"#;

/// Reserves an amount under a budget, first returning what abandoned reservations (their
/// replica died before settling) held.
///
/// KEYS[1]: the account hash {spent, reserved}; KEYS[2]: reservation id -> expiry (ms, a
/// sorted set); KEYS[3]: reservation id -> amount.
/// ARGV: budget, amount, reservation id, ttl_ms, expiry of the account (ms).
/// Returns {1|0, spent, reserved} (the figures before this reservation, as strings).
pub(super) const BUDGET_RESERVE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, id in ipairs(dead) do
  local a = redis.call('HGET', KEYS[3], id)
  if a then redis.call('HINCRBYFLOAT', KEYS[1], 'reserved', '-' .. a) end
  redis.call('HDEL', KEYS[3], id)
end
if #dead > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now) end
if redis.call('ZCARD', KEYS[2]) == 0 then redis.call('HSET', KEYS[1], 'reserved', '0') end
local spent_s = redis.call('HGET', KEYS[1], 'spent') or '0'
local reserved_s = redis.call('HGET', KEYS[1], 'reserved') or '0'
local spent = tonumber(spent_s)
local reserved = tonumber(reserved_s)
if reserved < 0 then reserved = 0 end
if not (spent + reserved + tonumber(ARGV[2]) <= tonumber(ARGV[1])) then
  return {0, spent_s, reserved_s}
end
redis.call('HINCRBYFLOAT', KEYS[1], 'reserved', ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[3])
redis.call('HSET', KEYS[3], ARGV[3], ARGV[2])
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[5]) end
return {1, spent_s, reserved_s}
"#;

/// Ends a reservation: releases what it held (if it had not expired) and adds the actual
/// cost to the spend.
///
/// KEYS as for [`BUDGET_RESERVE`]. ARGV: reservation id, actual cost ("" = unknown).
pub(super) const BUDGET_SETTLE: &str = r#"
if redis.call('ZREM', KEYS[2], ARGV[1]) == 1 then
  local a = redis.call('HGET', KEYS[3], ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1])
  if redis.call('ZCARD', KEYS[2]) == 0 then
    redis.call('HSET', KEYS[1], 'reserved', '0')
  elseif a then
    redis.call('HINCRBYFLOAT', KEYS[1], 'reserved', '-' .. a)
  end
end
if ARGV[2] ~= '' then redis.call('HINCRBYFLOAT', KEYS[1], 'spent', ARGV[2]) end
return 1
"#;

/// Raises the account's spend to the database's figure (never lowers it: spend settled in
/// Redis may not have reached the database yet).
///
/// KEYS[1]: the account hash. ARGV: spent, expiry of the account (ms).
pub(super) const BUDGET_OBSERVE: &str = r#"
local cur = tonumber(redis.call('HGET', KEYS[1], 'spent') or '0')
if tonumber(ARGV[1]) > cur then redis.call('HSET', KEYS[1], 'spent', ARGV[1]) end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"#;

/// Stores a node's report unless a newer one is there, lists the node, and tells every
/// replica, in one step.
///
/// KEYS[1]: the node's hash {seen, report}; KEYS[2]: the set of node ids.
/// ARGV: node id, seen (unix ms), report JSON, ttl_ms, channel, event JSON.
pub(super) const NODE_PUT: &str = r#"
local seen = tonumber(redis.call('HGET', KEYS[1], 'seen') or '0')
if tonumber(ARGV[2]) < seen then return 0 end
redis.call('HSET', KEYS[1], 'seen', ARGV[2], 'report', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('PUBLISH', ARGV[5], ARGV[6])
return 1
"#;
