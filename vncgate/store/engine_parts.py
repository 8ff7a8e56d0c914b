"""What each engine's class brings to the mixins that keep its tokens, sessions and followed
consoles (sqlite_tokens, sqlite_sessions, sqlite_follows; redis_tokens, redis_sessions,
redis_follows), declared once for the type checker: SqliteStore (sqlite.py), RedisStore
(redis.py) and Store (common.py) define them. Nothing here runs.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Callable

from vncgate.store.targets import RedisTarget


class SqliteParts:
    """SqliteStore's pooled connections (_db reads; _write is a write transaction, _write_chunks
    a batch of them) and Store's clock and idle timeout."""

    _db: Callable[[], AbstractContextManager[sqlite3.Connection]]
    _write: Callable[[], AbstractContextManager[sqlite3.Connection]]
    _write_chunks: Callable[[Sequence[Any], Callable[[sqlite3.Connection, Sequence[Any]], object]], None]
    clock: Callable[[], float]
    idle_timeout: float


class RedisParts:
    """RedisStore's client and plumbing (_run, _key, _script, _pipelined) and Store's clock."""

    _client: Any
    _run: Callable[..., Any]
    _key: Callable[..., str]
    _script: Callable[..., Any]
    _pipelined: Callable[[list[tuple[str, tuple[Any, ...]]]], list[Any]]
    _publish: Callable[[str, Any], None]  # a message on the events channel (redis_consoles)
    clock: Callable[[], float]
    idle_timeout: float
    busy_timeout: float
    target: RedisTarget
