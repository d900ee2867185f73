"""Every Redis key fleet mode writes, and the Lua scripts that change the rollout state atomically.

All keys start with `canary-proxy:{namespace}:` (see the README's "Fleet mode" section for TTLs):

- `leader`: "replica token", PX lease: the leader lease;
- `fence`: counter, no TTL: the fencing token source (INCR on every new lease);
- `rollout:{name}:state`: JSON `{"v": version, "state": {...}, "by": replica, "at": t, "events": [...]}`,
  no TTL: the versioned rollout state, latch included;
- `rollout:{name}:verdict`: JSON, EX 30 s: the leader's latest verdict and its fleet-wide figures;
- `rollout:{name}:ev:{canary version}:{second}`: hash, EX window + 120 s: pooled evidence;
- `replicas`: hash replica -> JSON report, EX 1 day (refreshed): who is there, what they apply;
- channel `events`: "rollout version" after every state write (pub/sub wake-up; polling backs it).
"""

from __future__ import annotations

PREFIX = "canary-proxy"
VERDICT_TTL = 30
REPLICAS_TTL = 86400
EVIDENCE_EXTRA_TTL = 120


class Keys:
    """Key names of one namespace."""

    def __init__(self, namespace: str) -> None:
        self.base = f"{PREFIX}:{namespace}"
        self.leader = f"{self.base}:leader"
        self.fence = f"{self.base}:fence"
        self.replicas = f"{self.base}:replicas"
        self.channel = f"{self.base}:events"

    def state(self, rollout: str) -> str:
        """The versioned state of one rollout."""
        return f"{self.base}:rollout:{rollout}:state"

    def verdict(self, rollout: str) -> str:
        """The leader's latest verdict for one rollout."""
        return f"{self.base}:rollout:{rollout}:verdict"

    def evidence(self, rollout: str, canary_version: str | None, second: int) -> str:
        """Pooled slices of one second, for one canary version."""
        return f"{self.base}:rollout:{rollout}:ev:{canary_version or '-'}:{second}"


# The lease: renew ours, or report the holder, or take it with a new fencing token.
# KEYS: leader, fence. ARGV: replica, lease ms, our current value ("" when we hold none).
LEASE = """
local t = redis.call('TYPE', KEYS[1]).ok
local cur = false
if t == 'string' and redis.call('PTTL', KEYS[1]) >= 0 then cur = redis.call('GET', KEYS[1]) end
if cur and ARGV[3] ~= '' and cur == ARGV[3] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return cur
end
if cur then return cur end
-- Free, or something that is no lease (another type, no TTL): ours to take.
local token = redis.pcall('INCR', KEYS[2])
if type(token) == 'table' then
  redis.call('DEL', KEYS[2])
  token = redis.call('INCR', KEYS[2])
end
local val = ARGV[1] .. ' ' .. token
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[1], val, 'PX', ARGV[2])
return val
"""

# Compare-and-set of the state. With a lease value (the leader's decisions) it must still be the
# holder: the fencing check that keeps a deposed leader from writing. Without one (operator commands)
# only the version is compared. Garbage under the key is replaced only by the leader.
# KEYS: state, leader. ARGV: expected version, lease value or "", payload JSON object, channel, rollout.
WRITE = """
if ARGV[2] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[2] then return {-1, 'lease lost'} end
local t = redis.call('TYPE', KEYS[1]).ok
local v = 0
if t == 'string' then
  local ok, doc = pcall(cjson.decode, redis.call('GET', KEYS[1]))
  if ok and type(doc) == 'table' and type(doc.v) == 'number' then v = doc.v else v = -1 end
elseif t ~= 'none' then
  v = -1
end
if v == -1 then
  if ARGV[2] == '' then return {-2, 'unreadable state'} end
  redis.call('DEL', KEYS[1])
  v = tonumber(ARGV[1])
elseif v ~= tonumber(ARGV[1]) then
  return {-3, tostring(v)}
end
local nv = v + 1
redis.call('SET', KEYS[1], '{"v":' .. nv .. ',' .. string.sub(ARGV[3], 2))
redis.call('PUBLISH', ARGV[4], ARGV[5] .. ' ' .. nv)
return {nv, 'ok'}
"""

# The latch: only ever turns a running rollout of this canary version into rolled_back, on top of
# whatever version is current (no compare needed, nothing else changes), and never un-latches.
# KEYS: state. ARGV: canary, canary version ("" = none), reason, changed_at, events JSON,
# replica, full payload JSON (used when no state exists yet), channel, rollout, now.
LATCH = """
local t = redis.call('TYPE', KEYS[1]).ok
local nv = 1
local out
if t == 'string' then
  local ok, doc = pcall(cjson.decode, redis.call('GET', KEYS[1]))
  if not ok or type(doc) ~= 'table' or type(doc.v) ~= 'number' or type(doc.state) ~= 'table' then
    return {-2, 'unreadable state'}
  end
  local st = doc.state
  local ver = st.canary_version
  if type(ver) ~= 'string' then ver = '' end
  if st.canary ~= ARGV[1] or ver ~= ARGV[2] then return {-3, 'another canary version'} end
  if st.phase == 'rolled_back' or st.phase == 'promoted' then return {doc.v, 'already'} end
  nv = doc.v + 1
  st.phase = 'rolled_back'
  st.reason = ARGV[3]
  st.changed_at = tonumber(ARGV[4])
  doc.v = nv
  doc.by = ARGV[6]
  doc.at = tonumber(ARGV[10])
  doc.events = cjson.decode(ARGV[5])
  out = cjson.encode(doc)
elseif t == 'none' then
  out = '{"v":1,' .. string.sub(ARGV[7], 2)
else
  return {-2, 'unreadable state'}
end
redis.call('SET', KEYS[1], out)
redis.call('PUBLISH', ARGV[8], ARGV[9] .. ' ' .. nv)
return {nv, 'ok'}
"""
