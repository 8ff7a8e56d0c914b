"""The Redis engine's Lua scripts: every write that must see the state it changes (insert,
validate, touch, delete, purge, heartbeat, release, kill), each run atomically by Redis, with
the prelude they share; and _BATCH, the commands per pipeline. The key layout they build is
described in redis.py.
"""


_BATCH = 1000  # commands per pipeline, tokens per purge step


# -- the scripts ----------------------------------------------------------------------------
# ARGV[1] is always the key prefix. Numbers travel as Python's repr of a float.

_PRELUDE = """
local p = ARGV[1]
-- The token becomes garbage at max(expires_at, updated_at + idle_timeout): Redis deletes it
-- then, and its indexes no earlier.
local function push(hash, now, idle)
  local key = p .. 'token:' .. hash
  local v = redis.call('hmget', key, 'expires_at', 'updated_at', 'instance_id', 'host')
  local garbage_at = math.max(tonumber(v[1]), tonumber(v[2]) + idle)
  local ms = math.max(1, math.ceil((garbage_at - now) * 1000))
  redis.call('pexpire', key, ms)
  redis.call('zadd', p .. 'tokens', garbage_at, hash)
  redis.call('zadd', p .. 'expiry', tonumber(v[1]), hash)
  redis.call('zadd', p .. 'touched', tonumber(v[2]), hash)
  for _, index in ipairs({p .. 'instance:' .. v[3], p .. 'host:' .. v[4]}) do
    redis.call('sadd', index, hash)
    if redis.call('pttl', index) < ms then redis.call('pexpire', index, ms) end
  end
end
-- Delete one token and its index entries; true when it existed.
local function drop(hash)
  local key = p .. 'token:' .. hash
  local v = redis.call('hmget', key, 'instance_id', 'host')
  redis.call('zrem', p .. 'tokens', hash)
  redis.call('zrem', p .. 'expiry', hash)
  redis.call('zrem', p .. 'touched', hash)
  if redis.call('del', key) == 0 then return false end
  redis.call('srem', p .. 'instance:' .. v[1], hash)
  redis.call('srem', p .. 'host:' .. v[2], hash)
  return true
end
local function revoked(hashes)
  if #hashes > 0 then redis.call('publish', p .. 'events', 'revoke ' .. table.concat(hashes, ' ')) end
  return #hashes
end
"""

_SCRIPTS = {
    # ARGV: p, now, idle, then per token: hash, then the fields and values to set.
    "insert": """
local now, idle, i = tonumber(ARGV[2]), tonumber(ARGV[3]), 4
while i <= #ARGV do
  local hash, count = ARGV[i], tonumber(ARGV[i + 1])
  local key = p .. 'token:' .. hash
  redis.call('del', key)
  redis.call('hset', key, unpack(ARGV, i + 2, i + 1 + count))
  push(hash, now, idle)
  i = i + 2 + count
end
return 1
""",
    # ARGV: p, now, idle, hash, console_type. The token's fields; touched only when it may open.
    "validate": """
local now, idle = tonumber(ARGV[2]), tonumber(ARGV[3])
local key = p .. 'token:' .. ARGV[4]
local v = redis.call('hmget', key, 'expires_at', 'console_type')
if v[1] and now <= tonumber(v[1]) and v[2] == ARGV[5] then
  redis.call('hset', key, 'updated_at', ARGV[2])
  push(ARGV[4], now, idle)
end
return redis.call('hgetall', key)
""",
    # ARGV: p, now, idle, hashes... Touches those that exist and returns them.
    "touch": """
local now, idle, found = tonumber(ARGV[2]), tonumber(ARGV[3]), {}
for i = 4, #ARGV do
  local key = p .. 'token:' .. ARGV[i]
  if redis.call('exists', key) == 1 then
    redis.call('hset', key, 'updated_at', ARGV[2])
    push(ARGV[i], now, idle)
    found[#found + 1] = ARGV[i]
  end
end
return found
""",
    # ARGV: p, index ('' or 'instance:ID' / 'host:HOST'), hashes... Returns how many went.
    "delete": """
local hashes, deleted = {}, {}
if ARGV[2] ~= '' then
  hashes = redis.call('smembers', p .. ARGV[2])
  redis.call('del', p .. ARGV[2])
else
  for i = 3, #ARGV do hashes[#hashes + 1] = ARGV[i] end
end
for _, hash in ipairs(hashes) do
  if drop(hash) then deleted[#deleted + 1] = hash end
end
return revoked(deleted)
""",
    # ARGV: p, now, limit. Deletes up to limit garbage tokens; returns {deleted, seen}.
    "purge": """
local hashes = redis.call('zrangebyscore', p .. 'tokens', '-inf', '(' .. ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
local deleted = {}
for _, hash in ipairs(hashes) do
  if drop(hash) then deleted[#deleted + 1] = hash end
end
return {revoked(deleted), #hashes}
""",
    # ARGV: p, now, then per session: id, bytes up, bytes down. Returns the ids asked to end.
    "heartbeat": """
local killed = {}
for i = 3, #ARGV, 3 do
  local key = p .. 'session:' .. ARGV[i]
  local v = redis.call('hmget', key, 'stale_ms', 'kill_requested')
  if v[1] then
    redis.call('hset', key, 'updated_at', ARGV[2], 'bytes_up', ARGV[i + 1], 'bytes_down', ARGV[i + 2])
    redis.call('pexpire', key, v[1])
    if v[2] == '1' then killed[#killed + 1] = ARGV[i] end
  end
end
return killed
""",
    # ARGV: p, session ids... Marks those that exist, tells every gateway; returns how many.
    "kill": """
local marked = {}
for i = 2, #ARGV do
  local key = p .. 'session:' .. ARGV[i]
  if redis.call('exists', key) == 1 then
    redis.call('hset', key, 'kill_requested', '1')
    marked[#marked + 1] = ARGV[i]
  end
end
if #marked > 0 then redis.call('publish', p .. 'events', 'kill ' .. table.concat(marked, ' ')) end
return #marked
""",
}
