"""The SQLite engine: one file shared by the gateways of one host.

This module keeps the connections (pool, errors, a replaced file) and the schema upgrade;
what is kept is split by concern: sqlite_tokens, sqlite_sessions, sqlite_follows (mixins
of SqliteStore) and sqlite_schema (the migrations). These are the only modules that speak SQL.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Callable, TypeVar

from vncgate.store.common import Store, StoreBusy, StoreError, stale_after
from vncgate.store.sqlite_consoles import SqliteConsoles
from vncgate.store.sqlite_follows import SqliteFollows
from vncgate.store.sqlite_schema import MIGRATIONS, SCHEMA_VERSION
from vncgate.store.sqlite_sessions import SqliteSessions
from vncgate.store.sqlite_shares import SqliteShares
from vncgate.store.sqlite_tokens import SqliteTokens

_POOL_SIZE = 16
WRITE_CHUNK = 256  # rows a batched write (a heartbeat's, a stop's) writes before it looks for a waiting writer

T = TypeVar("T")


class WriteTurns:
    """This process's writers, one at a time and in the order they came: on release the turn is
    handed to the longest waiter. (A threading.Lock is not fair: a batch that released it
    between chunks took it straight back, and a handshake waited the whole batch, 40-50 ms for
    a heartbeat's 9,500 renewals.) waiting() tells a batch to give way."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._held = False
        self._waiters: collections.deque[threading.Lock] = collections.deque()

    def __enter__(self) -> None:
        with self._mutex:
            if not self._held:
                self._held = True
                return
            baton = threading.Lock()
            baton.acquire()
            self._waiters.append(baton)
        baton.acquire()  # released by the holder as it hands the turn over

    def __exit__(self, *_exc: object) -> None:
        with self._mutex:
            if self._waiters:
                self._waiters.popleft().release()  # still held: by the waiter now
            else:
                self._held = False

    def waiting(self) -> bool:
        return bool(self._waiters)


class SqliteStore(SqliteShares, SqliteConsoles, SqliteTokens, SqliteSessions, SqliteFollows, Store):
    """Thread-safe; several processes may share the file (WAL, busy timeout)."""

    def __init__(self, path: str, token_ttl: float = 300.0, idle_timeout: float = 600.0,
                 clock: Callable[[], float] = time.time, busy_timeout: float = 5.0,
                 checkpoint_on_commit: bool = True) -> None:
        """checkpoint_on_commit=False: commits never fold the WAL into the file (SQLite's
        autocheckpoint, up to tens of ms at random commits); the owner calls checkpoint()."""
        super().__init__(token_ttl, idle_timeout, clock)
        self.path = path
        self.checkpoint_on_commit = checkpoint_on_commit
        self.busy_timeout = busy_timeout
        self._pool: queue.LifoQueue[sqlite3.Connection] = queue.LifoQueue(maxsize=_POOL_SIZE)
        self._generation = 0  # bumped when the file is replaced; older connections are dropped
        self._identity: tuple[int, int] | None = None
        self._reopen_lock = threading.Lock()
        self._turns = WriteTurns()  # this process's writers, one at a time (_write)
        self._open_file()

    def _open_file(self) -> None:
        try:  # a new database is the owner's only (its WAL and SHM files take its mode)
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError:
            pass  # it exists, or connecting will say in its own words why it cannot
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            self._upgrade(db)
        self._identity = self._file_identity()

    # -- connections and errors -------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        db = None
        try:
            db = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                                 check_same_thread=False)
            db.execute("PRAGMA synchronous=NORMAL")
            db.create_function("stale_after", 1, stale_after, deterministic=True)
            if not self.checkpoint_on_commit:
                db.execute("PRAGMA wal_autocheckpoint=0")
            return db
        except sqlite3.Error as error:
            if db is not None:
                db.close()
            raise self._explain(error) from None

    def _file_identity(self) -> tuple[int, int] | None:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return None
        return stat.st_dev, stat.st_ino

    def _check_file(self) -> None:
        """A vanished file is an outage (connecting would create an empty one); a replaced
        file (restored from a backup, say) gets fresh connections."""
        identity = self._file_identity()
        if identity == self._identity:
            return
        if identity is None:
            raise StoreError(f"database {self.path} has vanished")
        with self._reopen_lock:
            if self._identity is None or self._file_identity() == self._identity:
                return  # another thread reopened it meanwhile
            self._identity = None  # while reopening, _db() must not check again
            self._generation += 1
            self.close()
            self._open_file()

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """A pooled connection; a failed one is dropped, a good one reused."""
        if self._identity is not None:
            self._check_file()
        generation = self._generation
        try:
            db = self._pool.get_nowait()
        except queue.Empty:
            db = self._connect()
        try:
            yield db
        except sqlite3.Error as error:
            db.close()
            raise self._explain(error) from None
        except BaseException:
            db.close()
            raise
        if generation != self._generation:
            db.close()
            return
        try:
            self._pool.put_nowait(db)
        except queue.Full:
            db.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction. This process's writers take turns first: they wait for each
        other without meeting SQLite's busy handler, which sleeps in steps of 1 to 100 ms
        (writers in other processes on the file still meet it, up to busy_timeout)."""
        with self._turns, self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def _write_chunks(self, items: Sequence[T], write: Callable[[sqlite3.Connection, Sequence[T]], object]) -> None:
        """write(db, chunk) for each WRITE_CHUNK items, in as few transactions as can be: one while
        no other writer of this process waits, a new one once it has had its turn. A handshake
        waits one chunk of a heartbeat at most; a stop's thousands are one transaction."""
        start = 0
        while start < len(items):
            with self._write() as db:
                while start < len(items):
                    write(db, items[start:start + WRITE_CHUNK])
                    start += WRITE_CHUNK
                    if self._turns.waiting():
                        break

    def _explain(self, error: sqlite3.Error) -> StoreError:
        text = str(error)
        if "locked" in text or "busy" in text:
            return StoreBusy(f"database {self.path} is locked by another writer")
        if "not a database" in text or "malformed" in text:
            return StoreError(f"database {self.path} is not a vncgate SQLite database ({text})")
        if "unable to open" in text or "readonly" in text or "read-only" in text:
            folder = os.path.dirname(os.path.abspath(self.path))
            if os.path.exists(folder) and not os.path.isdir(folder):
                why = f"{folder} is not a folder"
            elif not os.path.isdir(folder):
                why = f"folder {folder} does not exist"
            elif not os.access(folder, os.W_OK):
                why = f"folder {folder} is not writable"
            else:
                why = text
            return StoreError(f"cannot open database {self.path}: {why}")
        return StoreError(f"database {self.path}: {text}")

    def _upgrade(self, db: sqlite3.Connection) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise StoreError(f"database {self.path} has schema version {version}, newer than this "
                             f"vncgate knows ({SCHEMA_VERSION}); upgrade vncgate")
        db.execute("BEGIN IMMEDIATE")
        try:
            # Re-read under the write lock: another process may have migrated meanwhile.
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for migrate in MIGRATIONS[version:]:
                migrate(db)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        while True:
            try:
                self._pool.get_nowait().close()
            except queue.Empty:
                return

    def checkpoint(self) -> None:
        """Fold the write-ahead log into the database file, without waiting for readers or writers."""
        with self._db() as db:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def ping(self) -> None:
        with self._db() as db:
            db.execute("SELECT 1 FROM console_tokens LIMIT 1").fetchall()
