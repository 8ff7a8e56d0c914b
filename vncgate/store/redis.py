"""The Redis engine: one store shared by gateways on many hosts, with revocations pushed.

Layout under key_prefix P (default "vncgate:"); H is a token's SHA-256, never the token:
  P token:H            hash: the token's details and, when it has one, its sealed password.
                       Redis expires it at the moment it becomes garbage (expired AND idle);
                       every touch pushes that moment forward, so garbage deletes itself.
  P tokens             sorted set: H scored by that moment (listing, counting, purge).
  P instance:ID        set of H for one instance; P host:HOST the same for one host. Never
                       trusted alone: a member whose token vanished is skipped. Each expires
                       no earlier than its last member.
  P session:SID        hash: one live session, expiring three missed heartbeats after its
                       gateway last reported it, so a dead gateway's sessions age out.
  P sessions           sorted set: SID scored by its start.
  P follows            hash: instance id -> "host port" of each followed serial console.
  P events             channel: "revoke H H..." and "kill SID SID..." for every gateway.
Every write that must see the state it changes is one Lua script, so it is atomic.
Not for Redis Cluster (the scripts name keys they build).
"""

import dataclasses
import logging
import secrets
import time
from typing import Optional

import redis
import redis.backoff
import redis.client
import redis.exceptions
import redis.retry
import redis.sentinel

from vncgate.store.common import (
    ConnectionDetails,
    Follow,
    LiveSession,
    Store,
    StoreError,
    TokenRejected,
    consumption,
    stale_after,
)
from vncgate.store.targets import DEFAULT_PREFIX

log = logging.getLogger("vncgate.store")

_BATCH = 1000  # commands per pipeline, tokens per purge step
_TOKEN_FIELDS = ("instance_id", "console_type", "host", "port", "access_url", "internal_access_path",
                 "created_at", "updated_at", "expires_at")
# Fields added after the first release: a token written before them reads as their default.
_LATER_FIELDS = {"record": "0", "replay": "", "replay_speed": "1.0"}
_SESSION_FIELDS = tuple(field.name for field in dataclasses.fields(LiveSession))



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
    # ARGV: p, hash, now. A single-use token's session ended: its resume grace starts now.
    "release": """
local key = p .. 'token:' .. ARGV[2]
if redis.call('exists', key) == 1 then redis.call('hset', key, 'released_at', ARGV[3]) end
return 1
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


class _Subscription(redis.client.PubSub):
    """Counts its connections: a reconnect means messages may have been missed."""

    connects = 0

    def on_connect(self, connection):
        super().on_connect(connection)
        self.connects += 1


class RedisStore(Store):
    """Thread-safe (a connection pool); any number of processes on any number of hosts."""

    pushes_events = True

    def __init__(self, target, token_ttl=300.0, idle_timeout=600.0, clock=time.time, busy_timeout=5.0,
                 key_prefix=DEFAULT_PREFIX):
        super().__init__(token_ttl, idle_timeout, clock)
        self.target = target
        self.busy_timeout = busy_timeout
        self.prefix = key_prefix
        self._client = _client(target, busy_timeout)
        self._scripts = {name: self._client.register_script(_PRELUDE + body) for name, body in _SCRIPTS.items()}

    def __repr__(self):
        return f"RedisStore({self.target.redacted}, prefix={self.prefix!r})"

    # -- plumbing ------------------------------------------------------------------------

    def _key(self, *parts):
        return self.prefix + "".join(parts)

    def _run(self, call, *args, **kwargs):
        """call(...), with Redis's failures turned into one StoreError line."""
        try:
            return call(*args, **kwargs)
        except redis.exceptions.RedisError as error:
            text = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise StoreError(f"redis {self.target.redacted}: {text}") from None

    def _script(self, name, args, client=None):
        return self._run(self._scripts[name], args=[self.prefix, *args], client=client)

    def _pipelined(self, commands):
        """Run (method name, args) commands in pipelines of _BATCH; returns the replies."""
        replies = []
        for start in range(0, len(commands), _BATCH):
            pipe = self._client.pipeline(transaction=False)
            for name, args in commands[start:start + _BATCH]:
                getattr(pipe, name)(*args)
            replies.extend(self._run(pipe.execute))
        return replies

    def close(self):
        self._client.close()
        self._client.connection_pool.disconnect()

    def ping(self):
        self._run(self._client.ping)

    # -- what the shared calls are made of -----------------------------------------------

    def _insert(self, rows):
        """rows: (ConnectionDetails, sealed secret or None). With replicas present, returns only
        once one of them has the tokens (WAIT), so they survive a failover."""
        replicas = self._run(self._client.info, "replication").get("connected_slaves", 0)
        pipe = self._client.pipeline(transaction=False)  # one connection: WAIT counts its writes
        for start in range(0, len(rows), _BATCH):
            args = [repr(self.clock()), repr(float(self.idle_timeout))]
            for details, sealed in rows[start:start + _BATCH]:
                fields = [item for name in _TOKEN_FIELDS for item in (name, str(getattr(details, name)))]
                fields += ["record", str(int(details.record)), "replay", details.replay,
                           "replay_speed", repr(float(details.replay_speed))]
                if sealed is not None:
                    fields += ["secret", sealed]
                if details.policy:
                    fields += ["policy", details.policy]
                if details.backend_tls:  # absent means plain: tokens minted before it read so
                    fields += ["backend_tls", "1"]
                args += [details.token_hash, len(fields), *fields]
            self._script("insert", args, client=pipe)
        wait = self.busy_timeout / 2  # the other half is the writes' own, within the socket timeout
        if replicas:
            pipe.wait(1, max(1, int(wait * 1000)))
        replies = self._run(pipe.execute)
        if replicas and replies[-1] < 1:
            raise StoreError(f"redis {self.target.redacted}: no replica confirmed the new token within "
                             f"{wait:g}s; it was not handed out")

    def _find(self, token_hash):
        fields = self._run(self._client.hgetall, self._key("token:", token_hash))
        return [_details(token_hash, fields)[0]] if fields else []

    def _validate_row(self, token_hash, console_type, now):
        flat = self._script("validate", [repr(now), repr(float(self.idle_timeout)), token_hash, console_type])
        return _details(token_hash, dict(zip(flat[::2], flat[1::2]))) if flat else None

    def _dump(self):
        return [found for found in self._fetch(self._all_hashes()) if found]

    def _all_hashes(self):
        return [item.decode() for item in self._run(self._client.zrange, self._key("tokens"), 0, -1)]

    def _fetch(self, token_hashes):
        """(details, sealed) or None for each hash, in order."""
        replies = self._pipelined([("hgetall", (self._key("token:", token_hash),)) for token_hash in token_hashes])
        return [_details(token_hash, fields) if fields else None
                for token_hash, fields in zip(token_hashes, replies)]

    # -- single-use tokens (console policies) -----------------------------------------------

    def consume(self, token_hash: str, address: str, cookie_hash: Optional[str], grace: float,
                issued_hash: Optional[str] = None) -> str:
        """See common.consumption; an optimistic transaction (WATCH), retried when another
        gateway changed the token meanwhile, so two clients at once cannot both consume."""
        key = self._key("token:", token_hash)

        def attempt(pipe):
            state = pipe.hmget(key, "consumed_address", "consumed_cookie", "released_at")
            if not pipe.exists(key):
                raise TokenRejected("unknown-token")
            address_then, cookie_then, released = (value.decode() if value is not None else None for value in state)
            outcome = consumption((address_then, cookie_then, None if released is None else float(released)),
                                  address, cookie_hash, grace, self.clock())
            pipe.multi()
            fields = {"consumed_address": address} if outcome == "consumed" else {}
            if issued_hash is not None:  # the cookie the gateway issues now replaces any before it
                fields["consumed_cookie"] = issued_hash
            if fields:
                pipe.hset(key, mapping=fields)
            pipe.hdel(key, "released_at")
            return outcome
        return self._run(self._client.transaction, attempt, key, value_from_callable=True)

    def shared_secret(self, name: str) -> str:
        """See Store.shared_secret: made by the first gateway that asks (SET NX), one key."""
        key = self._key("secret:", name)
        self._run(self._client.set, key, secrets.token_hex(32), nx=True)
        return self._run(self._client.get, key).decode()

    def release(self, token_hash):
        self._script("release", [token_hash, repr(self.clock())])

    # -- beyond the blueprint: what the gateway and the CLI need --------------------------

    def list_details(self, instance_id=None, host=None, include_expired=False, only_idle=False, include_idle=True):
        indexes = [self._key(kind, value) for kind, value in (("instance:", instance_id), ("host:", host))
                   if value is not None]
        if indexes:
            hashes = sorted(item.decode() for item in self._run(self._client.sinter, indexes))
        else:
            hashes = self._all_hashes()
            indexes = [self._key("tokens")]
        fetched = self._fetch(hashes)
        vanished = [token_hash for token_hash, found in zip(hashes, fetched) if found is None]
        if vanished:  # expired by Redis since it was indexed: tidy the indexes read
            self._pipelined([("zrem" if index == self._key("tokens") else "srem", (index, *vanished))
                             for index in indexes])
        now = self.clock()
        rows = [found[0] for found in fetched if found]
        return sorted((row for row in rows if row.selected(now, self.idle_timeout, include_idle=include_idle,
                                                             include_expired=include_expired,
                                                             only_idle=only_idle)),
                      key=lambda row: (row.created_at, row.token_hash))

    def touch_hashes(self, token_hashes):
        """Touch by hash (sessions hold hashes, not tokens); returns the set that still exists."""
        if not token_hashes:
            return set()
        found = self._script("touch", [repr(self.clock()), repr(float(self.idle_timeout)), *token_hashes])
        return {item.decode() for item in found}

    def delete_hashes(self, token_hashes):
        return self._script("delete", ["", *token_hashes]) if token_hashes else 0

    def delete_by_instance(self, instance_id):
        return self._script("delete", [f"instance:{instance_id}"])

    def delete_by_host(self, host):
        return self._script("delete", [f"host:{host}"])

    def purge(self):
        """Delete garbage Redis has not expired yet (the clock may run ahead of it)."""
        deleted, now = 0, repr(self.clock())
        while True:
            went, seen = self._script("purge", [now, _BATCH])
            deleted += went
            if seen < _BATCH:
                return deleted

    def count_by_state(self):
        counts = dict.fromkeys(("live", "idle", "expired", "garbage"), 0)
        now = self.clock()
        for found in self._fetch(self._all_hashes()):
            if found:
                counts[found[0].state(now, self.idle_timeout)] += 1
        return counts

    # -- live sessions, shared by every gateway on the store -------------------------------

    def record_session(self, session_id, gateway_id, token_hash, instance_id, console_type, client, heartbeat):
        now = self.clock()
        key = self._key("session:", session_id)
        stale_ms = int(stale_after(heartbeat) * 1000)
        pipe = self._client.pipeline(transaction=True)
        pipe.hset(key, mapping={"session_id": session_id, "gateway_id": gateway_id, "token_hash": token_hash,
                                "instance_id": instance_id, "console_type": console_type, "client": client,
                                "started_at": repr(now), "updated_at": repr(now), "heartbeat": repr(heartbeat),
                                "bytes_up": 0, "bytes_down": 0, "kill_requested": 0, "stale_ms": stale_ms})
        pipe.pexpire(key, stale_ms)
        pipe.zadd(self._key("sessions"), {session_id: now})
        self._run(pipe.execute)

    def update_sessions(self, counts):
        """counts: {session_id: (bytes_up, bytes_down)}; returns the ids someone asked to kill."""
        if not counts:
            return set()
        args = [repr(self.clock())]
        for session_id, (up, down) in counts.items():
            args += [session_id, up, down]
        return {item.decode() for item in self._script("heartbeat", args)}

    def remove_sessions(self, session_ids):
        """Take sessions out of the shared list, in pipelines of _BATCH commands."""
        self._pipelined([command for session_id in session_ids
                         for command in (("delete", (self._key("session:", session_id),)),
                                         ("zrem", (self._key("sessions"), session_id)))])

    def _sessions(self):
        """(session id, LiveSession or None when its key has expired), oldest first."""
        ids = [item.decode() for item in self._run(self._client.zrange, self._key("sessions"), 0, -1)]
        replies = self._pipelined([("hgetall", (self._key("session:", session_id),)) for session_id in ids])
        return [(session_id, _session(fields) if fields else None) for session_id, fields in zip(ids, replies)]

    def list_sessions(self, instance_id=None):
        """Sessions of live gateways (those left by dead ones are not shown)."""
        now = self.clock()
        return [session for _, session in self._sessions() if session is not None and not session.is_stale(now)
                and instance_id in (None, session.instance_id)]

    def request_kill(self, session_ids=None, instance_id=None):
        """Ask the gateways to end sessions (pushed to all of them); returns how many were marked."""
        if instance_id is not None:
            session_ids = [session_id for session_id, session in self._sessions()
                           if session is not None and session.instance_id == instance_id]
        return self._script("kill", list(session_ids)) if session_ids else 0

    def purge_stale_sessions(self):
        """Forget the sessions of gateways that died; returns how many."""
        now = self.clock()
        gone = [session_id for session_id, session in self._sessions() if session is None or session.is_stale(now)]
        if gone:
            pipe = self._client.pipeline(transaction=True)
            pipe.delete(*(self._key("session:", session_id) for session_id in gone))
            pipe.zrem(self._key("sessions"), *gone)
            self._run(pipe.execute)
        return len(gone)

    # -- followed serial consoles ------------------------------------------------------

    def add_follow(self, instance_id, host, port):
        """Follow (or re-point) one instance's serial console."""
        self._run(self._client.hset, self._key("follows"), instance_id, f"{host} {int(port)}")

    def remove_follow(self, instance_id):
        """Stop following; False when it was not followed."""
        return bool(self._run(self._client.hdel, self._key("follows"), instance_id))

    def list_follows(self):
        found = self._run(self._client.hgetall, self._key("follows"))
        follows = []
        for instance_id, value in found.items():
            host, port = value.decode().rsplit(" ", 1)
            follows.append(Follow(instance_id.decode(), host, int(port)))
        return sorted(follows, key=lambda follow: follow.instance_id)

    # -- pushed revocations and kills --------------------------------------------------

    def listen(self, on_event, on_reconnect, stopping, poll=0.5):
        """Call on_event("revoke", token hashes) / on_event("kill", session ids) for every message
        until stopping is set; on_reconnect() whenever the channel comes back after a loss
        (messages may have been missed meanwhile). Redis being away is retried quietly: the
        handshakes' 503s already say so, once."""
        subscription, connects, missed, delay = None, 0, False, 0.1
        while not stopping.is_set():
            try:
                if subscription is None:
                    subscription = _Subscription(self._client.connection_pool, ignore_subscribe_messages=True)
                    subscription.subscribe(self._key("events"))
                    connects = subscription.connects
                if missed or subscription.connects != connects:  # redis-py may reconnect by itself
                    log.info("revocation channel connected again: re-checking live sessions")
                    on_reconnect()
                    missed, connects = False, subscription.connects
                message = subscription.get_message(timeout=poll)
                delay = 0.1
                if message is not None and message["type"] == "message":
                    kind, _, ids = message["data"].decode().partition(" ")
                    on_event(kind, set(ids.split()))
            except (redis.exceptions.RedisError, StoreError) as error:
                log.debug("revocation channel: %s", error)
                missed = True
                if subscription is not None:
                    subscription.close()
                    subscription = None
                stopping.wait(delay)
                delay = min(1.0, delay * 2)
        if subscription is not None:
            subscription.close()


def _client(target, busy_timeout):
    options = {"socket_timeout": busy_timeout, "socket_connect_timeout": min(1.0, busy_timeout),
               "retry": redis.retry.Retry(redis.backoff.ExponentialBackoff(cap=0.5, base=0.05), retries=2),
               "health_check_interval": 5, "client_name": "vncgate"}
    if target.scheme != "redis+sentinel":
        return redis.Redis.from_url(target.url, **options)
    sentinels = redis.sentinel.Sentinel(
        list(target.hosts), sentinel_kwargs={key: options[key] for key in ("socket_timeout", "socket_connect_timeout")},
        **options)
    return sentinels.master_for(target.service, db=target.db, username=target.username or None,
                                password=target.password or None)


def _details(token_hash, fields):
    """(ConnectionDetails, sealed secret or None) from a token's hash fields (bytes)."""
    text = {key.decode(): value for key, value in fields.items()}
    sealed = text.pop("secret", None)
    values = {name: text[name].decode() for name in _TOKEN_FIELDS}
    values.update({name: text[name].decode() if name in text else default for name, default in _LATER_FIELDS.items()})
    return ConnectionDetails(
        token_hash, values["instance_id"], values["console_type"], values["host"], int(values["port"]),
        values["access_url"], values["internal_access_path"], float(values["created_at"]),
        float(values["updated_at"]), float(values["expires_at"]), has_password=sealed is not None,
        policy=text.get("policy", b"").decode(), backend_tls=text.get("backend_tls") == b"1",
        record=values["record"] == "1", replay=values["replay"], replay_speed=float(values["replay_speed"])), sealed


def _session(fields):
    text = {key.decode(): value.decode() for key, value in fields.items()}
    return LiveSession(text["session_id"], text["gateway_id"], text["token_hash"], text["instance_id"],
                       text["console_type"], text["client"], float(text["started_at"]), float(text["updated_at"]),
                       float(text["heartbeat"]), int(text["bytes_up"]), int(text["bytes_down"]),
                       text["kill_requested"] == "1")
