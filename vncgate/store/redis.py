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
This module keeps the client, the plumbing and the pushed events; what is kept is split by
concern: redis_tokens, redis_sessions, redis_follows (mixins of RedisStore) and redis_scripts
(the Lua scripts).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import redis
import redis.backoff
import redis.client
import redis.exceptions
import redis.retry
import redis.sentinel

from vncgate.store.common import Store, StoreError
from vncgate.store.redis_consoles import RedisConsoles
from vncgate.store.redis_follows import RedisFollows
from vncgate.store.redis_scripts import _BATCH, _PRELUDE, _SCRIPTS
from vncgate.store.redis_sessions import RedisSessions
from vncgate.store.redis_shares import RedisShares
from vncgate.store.redis_tokens import RedisTokens
from vncgate.store.targets import DEFAULT_PREFIX, RedisTarget

log = logging.getLogger("vncgate.store")


class _Subscription(redis.client.PubSub):
    """Counts its connections: a reconnect means messages may have been missed."""

    connects = 0

    def on_connect(self, connection: redis.connection.Connection) -> None:
        super().on_connect(connection)
        self.connects += 1


class RedisStore(RedisShares, RedisConsoles, RedisTokens, RedisSessions, RedisFollows, Store):
    """Thread-safe (a connection pool); any number of processes on any number of hosts."""

    pushes_events = True

    def __init__(self, target: RedisTarget, token_ttl: float = 300.0, idle_timeout: float = 600.0,
                 clock: Callable[[], float] = time.time, busy_timeout: float = 5.0,
                 key_prefix: str = DEFAULT_PREFIX) -> None:
        super().__init__(token_ttl, idle_timeout, clock)
        self.target = target
        self.busy_timeout = busy_timeout
        self.prefix = key_prefix
        self._client = _client(target, busy_timeout)
        self._scripts = {name: self._client.register_script(_PRELUDE + body) for name, body in _SCRIPTS.items()}

    def __repr__(self) -> str:
        return f"RedisStore({self.target.redacted}, prefix={self.prefix!r})"

    # -- plumbing ------------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return self.prefix + "".join(parts)

    def _run(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """call(...), with Redis's failures turned into one StoreError line."""
        try:
            return call(*args, **kwargs)
        except redis.exceptions.RedisError as error:
            text = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise StoreError(f"redis {self.target.redacted}: {text}") from None

    def _script(self, name: str, args: list[Any], client: Any = None) -> Any:
        return self._run(self._scripts[name], args=[self.prefix, *args], client=client)

    def _pipelined(self, commands: list[tuple[str, tuple[Any, ...]]]) -> list[Any]:
        """Run (method name, args) commands in pipelines of _BATCH; returns the replies."""
        replies = []
        for start in range(0, len(commands), _BATCH):
            pipe = self._client.pipeline(transaction=False)
            for name, args in commands[start:start + _BATCH]:
                getattr(pipe, name)(*args)
            replies.extend(self._run(pipe.execute))
        return replies

    def close(self) -> None:
        self._client.close()
        self._client.connection_pool.disconnect()

    def ping(self) -> None:
        self._run(self._client.ping)

    # -- pushed revocations and kills --------------------------------------------------

    def listen(self, on_event: Callable[[str, set[str]], None], on_reconnect: Callable[[], None],
               stopping: threading.Event, poll: float = 0.5) -> None:
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


def _client(target: RedisTarget, busy_timeout: float) -> redis.Redis:
    options: dict[str, Any] = {"socket_timeout": busy_timeout, "socket_connect_timeout": min(1.0, busy_timeout),
               "retry": redis.retry.Retry(redis.backoff.ExponentialBackoff(cap=0.5, base=0.05), retries=2),
               "health_check_interval": 5, "client_name": "vncgate"}
    if not target.sentinel:
        return redis.Redis.from_url(target.url, **options)
    tls: dict[str, Any] = {"ssl": True, **({"ssl_ca_certs": target.option("ssl_ca_certs")} if target.option("ssl_ca_certs") else {})} \
        if target.tls else {}
    to_sentinels = {key: options[key] for key in ("socket_timeout", "socket_connect_timeout")}
    if target.option("sentinel_password"):
        to_sentinels["password"] = target.option("sentinel_password")
    sentinels = redis.sentinel.Sentinel(list(target.hosts), sentinel_kwargs={**to_sentinels, **tls},
                                        **options, **tls)
    return sentinels.master_for(target.service, db=target.db, username=target.username or None,
                                password=target.password or None)
