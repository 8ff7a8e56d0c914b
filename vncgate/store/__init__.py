"""The console-auth token store: one API, two engines chosen by the `database` setting.

A file path is an SQLite database (the gateways of one host); a redis://, rediss:// or
redis+sentinel:// URL is a Redis server shared by gateways on many hosts. Both engines
answer the same calls (common.Store) and return the same records.

The only place that speaks SQL or Redis. May import the root modules only. The Redis engine
is imported when a redis:// database is opened, never by `import vncgate`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Union

from vncgate.store.common import (
    CONSOLE_TYPES,
    SERIAL,
    STATES,
    TOKEN_BYTES,
    WEBSOCKET,
    XVP,
    ConnectionDetails,
    Follow,
    LiveSession,
    Store,
    StoreBusy,
    StoreError,
    TokenRejected,
    access_url,
    hash_token,
    stale_after,
)
from vncgate.store.sqlite import MIGRATIONS, SCHEMA_VERSION, SqliteStore
from vncgate.store.targets import DEFAULT_PREFIX, URL_FORMS, RedisTarget, is_redis_url

if TYPE_CHECKING:
    from vncgate.store.redis import RedisStore

    AnyStore = Union[SqliteStore, RedisStore]  # what TokenStore opens (for annotations only)

__all__ = ["CONSOLE_TYPES", "SERIAL", "Follow",
           "STATES", "TOKEN_BYTES", "WEBSOCKET", "XVP", "ConnectionDetails", "LiveSession",
           "Store", "StoreBusy", "StoreError", "TokenRejected", "access_url", "hash_token", "stale_after", "DEFAULT_PREFIX",
           "URL_FORMS", "RedisTarget", "RedisMissing", "is_redis_url", "MIGRATIONS", "SCHEMA_VERSION", "SqliteStore",
           "TokenStore"]


REDIS_EXTRA = "pip install 'vncgate[redis]'"


class RedisMissing(StoreError):
    """A redis:// database on an install without the Redis client (the [redis] extra)."""


def redis_engine() -> type[RedisStore]:
    """The Redis engine's class, imported only when a redis:// database is used, so that
    `import vncgate` and an SQLite-only install never need the `redis` package."""
    try:
        from vncgate.store.redis import RedisStore
    except ImportError as error:
        if error.name is None or not error.name.startswith("redis"):
            raise
        raise RedisMissing(f"a redis:// database needs the Redis client, which is not installed: "
                           f"{REDIS_EXTRA}") from None
    return RedisStore


def TokenStore(database: str, token_ttl: float = 300.0, idle_timeout: float = 600.0,  # noqa: N802
               clock: Callable[[], float] = time.time, busy_timeout: float = 5.0,
               key_prefix: str = DEFAULT_PREFIX, checkpoint_on_commit: bool = True) -> AnyStore:
    """Open the store `database` names: a Redis URL, else an SQLite file path.
    busy_timeout bounds how long one call waits for the store; checkpoint_on_commit=False
    leaves SQLite's checkpoints to whoever calls checkpoint()."""
    if is_redis_url(database):
        RedisStore = redis_engine()  # noqa: N806
        return RedisStore(RedisTarget.parse(database), token_ttl=token_ttl, idle_timeout=idle_timeout,
                          clock=clock, busy_timeout=busy_timeout, key_prefix=key_prefix)
    return SqliteStore(database, token_ttl=token_ttl, idle_timeout=idle_timeout, clock=clock,
                       busy_timeout=busy_timeout, checkpoint_on_commit=checkpoint_on_commit)
