"""Lua scripts of the Redis store: each one is a single atomic step of a session's life (or of a counter's).

Every per-session script touches keys of ONE session, all sharing the session's hash tag, so a Redis
Cluster runs it on one node. Two scripts also queue a job on the global stream (APPEND_TURNS and
ENQUEUE_JOB): storing a turn and queuing its update is then one step that a Redis fault cannot split.
That step needs the stream on the session's node, i.e. a single Redis (or one shard); see sessions.py.
Numbers arrive as strings in ARGV; Lua's `tonumber` reads them. A missing hash field reads as `false`
in Lua, hence the `or '0'` defaults. A few keys (old checkpoints, evicted idempotency records) are
derived from a declared key of the same session: same hash tag, same slot.
"""

# Shared by the two queuing scripts. meta and stream are keys; opts = {now, stale_after_s, force, reason,
# tenant, sid, maxlen}. Returns 'queued', 'coalesced' or 'full'; 'full' writes nothing.
# The stream holds only jobs not yet done (ack deletes them), so an XADD MAXLEN trim would silently drop
# real work: the cap is enforced by refusing new jobs instead, and MAXLEN ~ stays a backstop that this
# check keeps from ever trimming.
_QUEUE_JOB = """
local function needs_job(meta, opts)
  local since = tonumber(redis.call('HGET', meta, 'job_pending_since'))
  -- A flag older than stale_after_s means its job was lost (dead-lettered, or a pre-atomic XADD): queue anew.
  return not since or opts.force == '1' or tonumber(opts.now) - since >= tonumber(opts.stale_after_s)
end
local function queue_full(stream, opts)
  return redis.call('XLEN', stream) >= tonumber(opts.maxlen)
end
local function queue_job(meta, stream, opts)
  redis.call('HSET', meta, 'job_pending_since', opts.now)
  local m = redis.call('HMGET', meta, 'turns', 'teach_total', 'incarnation')
  local turns, teach = m[1] or '0', m[2] or '0'
  redis.call('XADD', stream, 'MAXLEN', '~', opts.maxlen, '*',
             'job_id', opts.tenant .. ':' .. opts.sid .. ':' .. turns .. ':' .. teach,
             'tenant', opts.tenant, 'sid', opts.sid, 'reason', opts.reason, 'force', opts.force,
             'enqueued_at', opts.now, 'incarnation', m[3] or '')
end
"""

# KEYS: meta, turns, key-set, idem-index, stream[, idem]
# ARGV: 1 now, 2 idem_ttl_s, 3 request sha256, 4 max messages, 5 max bytes, 6 max idempotency keys,
#       7 enqueue (0/1), 8 stale_after_s, 9 force (unused: always 0), 10 reason, 11 tenant, 12 sid,
#       13 stream maxlen, 14.. message JSON
# Returns {0, "turns_total:appended", queued (0/1)} when stored, {1, "turns_total:appended"} for a repeated
# idempotency key with the same request, and writes nothing for {-1} (no session: deleted sessions stay
# deleted), {-2, "turns"|"bytes"} (session full), {-3} (job queue full), {-4} (key reused, other request).
APPEND_TURNS = _QUEUE_JOB + """
local meta, turns, keyset, index, stream, idem = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
if redis.call('EXISTS', meta) == 0 then return {-1} end
if idem then
  local seen = redis.call('GET', idem)
  if seen then
    local sha, result = string.match(seen, '^([^|]*)|(.*)$')
    if not sha then return {1, seen} end  -- a record written before requests were fingerprinted
    if sha ~= ARGV[3] then return {-4} end
    return {1, result}
  end
end
local count, size = #ARGV - 13, 0
for i = 14, #ARGV do size = size + #ARGV[i] end
if redis.call('LLEN', turns) + count > tonumber(ARGV[4]) then return {-2, 'turns'} end
if (tonumber(redis.call('HGET', meta, 'bytes')) or 0) + size > tonumber(ARGV[5]) then return {-2, 'bytes'} end
local opts = {now = ARGV[1], stale_after_s = ARGV[8], force = '0', reason = ARGV[10], tenant = ARGV[11],
              sid = ARGV[12], maxlen = ARGV[13]}
local queue = ARGV[7] == '1' and needs_job(meta, opts)
if queue and queue_full(stream, opts) then return {-3} end
for i = 14, #ARGV do redis.call('RPUSH', turns, ARGV[i]) end
local total = redis.call('LLEN', turns)
redis.call('HSET', meta, 'turns', total, 'updated_at', ARGV[1])
redis.call('HINCRBY', meta, 'bytes', size)
local result = total .. ':' .. count
if idem then
  redis.call('SET', idem, ARGV[3] .. '|' .. result, 'EX', ARGV[2])
  -- tracked so that delete_session finds it without a SCAN; the index bounds how many are kept
  redis.call('SADD', keyset, idem)
  redis.call('ZADD', index, ARGV[1], idem)
  local expired = redis.call('ZRANGEBYSCORE', index, '-inf', tonumber(ARGV[1]) - tonumber(ARGV[2]))
  local excess = redis.call('ZCARD', index) - #expired - tonumber(ARGV[6])
  if excess > 0 then
    for _, old in ipairs(redis.call('ZRANGE', index, #expired, #expired + excess - 1)) do
      table.insert(expired, old)
    end
  end
  for _, old in ipairs(expired) do
    redis.call('DEL', old)
    redis.call('SREM', keyset, old)
    redis.call('ZREM', index, old)
  end
end
if queue then queue_job(meta, stream, opts) end
return {0, result, queue and 1 or 0}
"""

# KEYS: meta, stream   ARGV: now, stale_after_s, force (0/1), reason, tenant, sid, stream maxlen
# Returns {-1} when the session does not exist, {0} when coalesced, {1} when queued, {-3} when the queue is full.
ENQUEUE_JOB = _QUEUE_JOB + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
local opts = {now = ARGV[1], stale_after_s = ARGV[2], force = ARGV[3], reason = ARGV[4], tenant = ARGV[5],
              sid = ARGV[6], maxlen = ARGV[7]}
if not needs_job(KEYS[1], opts) then return {0} end
if queue_full(KEYS[2], opts) then return {-3} end
queue_job(KEYS[1], KEYS[2], opts)
return {1}
"""

# KEYS: meta, teach   ARGV: now, pair JSON...   Returns the pairs pending, or -1 when the session does not exist.
ADD_TEACH_PAIRS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
for i = 2, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
-- never decreases: it makes job ids unique even after commits trim the list
redis.call('HINCRBY', KEYS[1], 'teach_total', #ARGV - 1)
redis.call('HSET', KEYS[1], 'updated_at', ARGV[1])
return redis.call('LLEN', KEYS[2])
"""

# KEYS: meta, turns, teach
# Returns nil when the session does not exist, else
# {version, generation, absorbed_turns, turns_total, summary, {new turn JSON...}, {teach pair JSON...}, incarnation}.
SNAPSHOT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local m = redis.call('HMGET', KEYS[1], 'version', 'generation', 'absorbed_turns', 'summary', 'incarnation')
local total = redis.call('LLEN', KEYS[2])
local absorbed = tonumber(m[3]) or 0
local new = {}
if total > absorbed then new = redis.call('LRANGE', KEYS[2], absorbed, total - 1) end
local teach = redis.call('LRANGE', KEYS[3], 0, -1)
return {m[1] or '0', m[2] or '0', tostring(absorbed), tostring(total), m[4] or '', new, teach, m[5] or ''}
"""

# KEYS: meta, teach, ckpt:{version+1}, key-set, memories
# ARGV: 1 expected version, 2 expected generation, 3 turns_total, 4 teach_count, 5 has checkpoint (0/1),
#       6 checkpoint bytes, 7 sha256, 8 has summary (0/1), 9 summary, 10 job_id, 11 now,
#       12 max memories kept, 13 last-update report JSON, 14 expected incarnation, 15 checkpoints kept,
#       16.. memory JSON objects
# The checkpoint hash's fields (data, sha256, created_at) are the ones StoredCheckpoint reads.
# Returns {-1} when the session is gone (or was deleted and recreated since the snapshot: another
# incarnation), {0, version} on a stale snapshot, {1, version, bumped} on success.
COMMIT_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
local m = redis.call('HMGET', KEYS[1], 'version', 'generation', 'absorbed_turns', 'incarnation')
-- A session recreated under the same id starts again at version 0, generation 0: only its incarnation
-- tells it from the deleted one, whose turns, summary and checkpoint must not land in it.
if (m[4] or '') ~= ARGV[14] then return {-1} end
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
  -- Keep the newest N checkpoints: versions below are deleted oldest-last, stopping at the first gap
  -- (everything older went in earlier commits), so a lowered N also catches up.
  local base = string.sub(KEYS[3], 1, #KEYS[3] - #tostring(version))
  local old = version - tonumber(ARGV[15])
  while old >= 1 and redis.call('DEL', base .. old) == 1 do
    redis.call('SREM', KEYS[4], base .. old)
    old = old - 1
  end
end
-- The memories this update learned from, stamped with the version they went into (bounded list).
for i = 16, #ARGV do
  local memory = cjson.decode(ARGV[i])
  memory['version'] = version
  redis.call('RPUSH', KEYS[5], cjson.encode(memory))
end
if #ARGV >= 16 then redis.call('LTRIM', KEYS[5], -tonumber(ARGV[12]), -1) end
local absorbed = math.max(tonumber(m[3]) or 0, tonumber(ARGV[3]))
local teach_count = tonumber(ARGV[4])
if teach_count > 0 then redis.call('LTRIM', KEYS[2], teach_count, -1) end
if ARGV[8] == '1' then redis.call('HSET', KEYS[1], 'summary', ARGV[9]) end
redis.call('HSET', KEYS[1], 'absorbed_turns', absorbed, 'last_job', ARGV[10], 'updated_at', ARGV[11],
           'last_update', ARGV[13])
redis.call('HINCRBY', KEYS[1], 'generation', 1)
redis.call('HDEL', KEYS[1], 'last_error')
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

# KEYS: budget counter of one tenant and minute   ARGV: limit
# Returns 1 and counts one update when the tenant is under its budget, else 0 (and counts nothing).
TAKE_UPDATE_BUDGET = """
local used = redis.call('INCR', KEYS[1])
if used == 1 then redis.call('EXPIRE', KEYS[1], 120) end
if used > tonumber(ARGV[1]) then
  redis.call('DECR', KEYS[1])
  return 0
end
return 1
"""

# Rate-limit windows: one round trip each, so a connection lost half-way never leaves a counter without
# its expiry (which would lock its API key out for good).
# KEYS: counter   ARGV: keep_s   Returns the count including this request.
COUNT_REQUEST = """
local n = redis.call('INCR', KEYS[1])
if redis.call('TTL', KEYS[1]) < 0 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return n
"""

# KEYS: counter   ARGV: tokens wanted, limit, keep_s   Returns 1 and counts them when they fit, else 0.
RESERVE_TOKENS = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local want, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
if used + want > limit then return 0 end
redis.call('INCRBY', KEYS[1], want)
if redis.call('TTL', KEYS[1]) < 0 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
return 1
"""

# KEYS: counter   ARGV: delta. The difference goes to the window it was reserved in; a window already
# expired is not charged again.
SETTLE_TOKENS = """
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('INCRBY', KEYS[1], ARGV[1]) end
return 0
"""
