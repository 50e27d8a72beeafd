"""Lua scripts of the Redis store: each one is a single atomic step of a session's life.

Every script touches only keys of ONE session, all passed in KEYS and all sharing the session's hash
tag, so a Redis Cluster runs it on one node. Numbers arrive as strings in ARGV; Lua's `tonumber` reads
them. A missing hash field reads as `false` in Lua, hence the `or '0'` defaults.
"""

# KEYS: meta, turns, key-set[, idem]   ARGV: now, idem_ttl_s, message JSON...
# Returns {duplicate (0/1), "turns_total:appended"}.
APPEND_TURNS = """
local idem = KEYS[4]
if idem then
  local seen = redis.call('GET', idem)
  if seen then return {1, seen} end
end
for i = 3, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
local total = redis.call('LLEN', KEYS[2])
redis.call('HSETNX', KEYS[1], 'created_at', ARGV[1])
redis.call('HSET', KEYS[1], 'turns', total, 'updated_at', ARGV[1])
local result = total .. ':' .. (#ARGV - 2)
if idem then
  redis.call('SET', idem, result, 'EX', ARGV[2])
  -- tracked so that delete_session finds it without a SCAN
  redis.call('SADD', KEYS[3], idem)
end
return {0, result}
"""

# KEYS: meta   ARGV: now, stale_after_s, force (0/1)
# Returns nil when the session does not exist, {0} when coalesced, {1, turns, teach_total} when queued.
MARK_JOB_PENDING = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local since = tonumber(redis.call('HGET', KEYS[1], 'job_pending_since'))
-- A flag older than stale_after_s means the XADD that should have followed it was lost: queue anew.
if since and ARGV[3] ~= '1' and tonumber(ARGV[1]) - since < tonumber(ARGV[2]) then return {0} end
redis.call('HSET', KEYS[1], 'job_pending_since', ARGV[1])
return {1, redis.call('HGET', KEYS[1], 'turns') or '0', redis.call('HGET', KEYS[1], 'teach_total') or '0'}
"""

# KEYS: meta, turns, teach
# Returns nil when the session does not exist, else
# {version, generation, absorbed_turns, turns_total, summary, {new turn JSON...}, {teach pair JSON...}}.
SNAPSHOT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local m = redis.call('HMGET', KEYS[1], 'version', 'generation', 'absorbed_turns', 'summary')
local total = redis.call('LLEN', KEYS[2])
local absorbed = tonumber(m[3]) or 0
local new = {}
if total > absorbed then new = redis.call('LRANGE', KEYS[2], absorbed, total - 1) end
local teach = redis.call('LRANGE', KEYS[3], 0, -1)
return {m[1] or '0', m[2] or '0', tostring(absorbed), tostring(total), m[4] or '', new, teach}
"""

# KEYS: meta, teach, ckpt:{version+1}, key-set, memories
# ARGV: 1 expected version, 2 expected generation, 3 turns_total, 4 teach_count, 5 has checkpoint (0/1),
#       6 checkpoint bytes, 7 sha256, 8 has summary (0/1), 9 summary, 10 job_id, 11 now, 12 channel,
#       13 tenant, 14 sid, 15 max memories kept, 16 last-update report JSON, 17.. memory JSON objects
# Returns {-1} when the session is gone, {0, version} on a stale snapshot, {1, version, bumped} on success.
COMMIT_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
local m = redis.call('HMGET', KEYS[1], 'version', 'generation', 'absorbed_turns')
local version = tonumber(m[1]) or 0
-- The generation counts every commit, so two commits from one snapshot conflict even when neither
-- carries a checkpoint (the second would otherwise trim teach pairs it never saw).
if version ~= tonumber(ARGV[1]) or (tonumber(m[2]) or 0) ~= tonumber(ARGV[2]) then return {0, version} end
local bumped = 0
if ARGV[5] == '1' then
  version = version + 1
  -- checkpoint first, version second, in one script: no reader can see a version without its bytes
  redis.call('HSET', KEYS[3], 'data', ARGV[6], 'sha256', ARGV[7], 'created_at', ARGV[11])
  redis.call('SADD', KEYS[4], KEYS[3])
  redis.call('HSET', KEYS[1], 'version', version, 'adapter_sha256', ARGV[7])
  bumped = 1
end
-- The memories this update learned from, stamped with the version they went into (bounded list).
for i = 17, #ARGV do
  local memory = cjson.decode(ARGV[i])
  memory['version'] = version
  redis.call('RPUSH', KEYS[5], cjson.encode(memory))
end
if #ARGV >= 17 then redis.call('LTRIM', KEYS[5], -tonumber(ARGV[15]), -1) end
local absorbed = math.max(tonumber(m[3]) or 0, tonumber(ARGV[3]))
local teach_count = tonumber(ARGV[4])
if teach_count > 0 then redis.call('LTRIM', KEYS[2], teach_count, -1) end
if ARGV[8] == '1' then redis.call('HSET', KEYS[1], 'summary', ARGV[9]) end
redis.call('HSET', KEYS[1], 'absorbed_turns', absorbed, 'last_job', ARGV[10], 'updated_at', ARGV[11],
           'last_update', ARGV[16])
redis.call('HINCRBY', KEYS[1], 'generation', 1)
redis.call('HDEL', KEYS[1], 'last_error')
redis.call('PUBLISH', ARGV[12], cjson.encode({tenant = ARGV[13], sid = ARGV[14], version = version}))
return {1, version, bumped}
"""

# KEYS: meta   ARGV: field, value, now — never creates a half-made session.
HSET_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2], 'updated_at', ARGV[3])
return 1
"""

# KEYS: lock   ARGV: owner, ttl_ms
REFRESH_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# KEYS: lock   ARGV: owner — compare-and-delete, so an expired owner cannot free a successor's lock.
RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
