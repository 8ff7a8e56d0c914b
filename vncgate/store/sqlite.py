"""The SQLite engine: one file shared by the gateways of one host.

This is the only module that speaks SQL.
"""

import contextlib
import dataclasses
import os
import queue
import secrets
import sqlite3
import threading
import time
from typing import Optional

from vncgate.store.common import (
    ConnectionDetails,
    Follow,
    LiveSession,
    Store,
    StoreBusy,
    StoreError,
    TokenRejected,
    consumption,
    stale_after,
)

_POOL_SIZE = 16


_COLUMNS = ("token_hash, instance_id, console_type, host, port, access_url, internal_access_path, "
            "created_at, updated_at, expires_at, backend_secret IS NOT NULL, policy, backend_tls, record, replay, "
            "replay_speed")
_SECRET = 16  # the index of backend_secret when it is selected after _COLUMNS


def _details(row):
    return ConnectionDetails(*row[:10], has_password=bool(row[10]), policy=row[11], backend_tls=bool(row[12]),
                             record=bool(row[13]), replay=row[14], replay_speed=row[15])


def _migrate_1(db):
    db.execute("""CREATE TABLE console_tokens (
        token_hash TEXT PRIMARY KEY,
        instance_id TEXT NOT NULL,
        console_type TEXT NOT NULL,
        host TEXT NOT NULL,
        port INTEGER NOT NULL,
        access_url TEXT NOT NULL,
        internal_access_path TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        expires_at REAL NOT NULL)""")
    db.execute("CREATE INDEX console_tokens_instance ON console_tokens (instance_id)")
    db.execute("CREATE INDEX console_tokens_host ON console_tokens (host)")


def _migrate_2(db):
    db.execute("ALTER TABLE console_tokens ADD COLUMN backend_secret BLOB")


def _migrate_3(db):
    db.execute("""CREATE TABLE live_sessions (
        session_id TEXT PRIMARY KEY,
        gateway_id TEXT NOT NULL,
        token_hash TEXT NOT NULL,
        instance_id TEXT NOT NULL,
        console_type TEXT NOT NULL,
        client TEXT NOT NULL,
        started_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        heartbeat REAL NOT NULL,
        bytes_up INTEGER NOT NULL DEFAULT 0,
        bytes_down INTEGER NOT NULL DEFAULT 0,
        kill_requested INTEGER NOT NULL DEFAULT 0)""")
    db.execute("CREATE INDEX live_sessions_instance ON live_sessions (instance_id)")


def _migrate_4(db):
    """Console policies: the token's policy, and who consumed a single-use token, and when its
    last session ended (NULL while one is live)."""
    db.execute("ALTER TABLE console_tokens ADD COLUMN policy TEXT NOT NULL DEFAULT ''")
    db.execute("ALTER TABLE console_tokens ADD COLUMN consumed_address TEXT")
    db.execute("ALTER TABLE console_tokens ADD COLUMN consumed_cookie TEXT")
    db.execute("ALTER TABLE console_tokens ADD COLUMN released_at REAL")


def _migrate_5(db):
    db.execute("ALTER TABLE console_tokens ADD COLUMN backend_tls INTEGER NOT NULL DEFAULT 0")


def _migrate_6(db):
    """Followed serial consoles (vncgate-token follow)."""
    db.execute("""CREATE TABLE console_follows (
        instance_id TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        port INTEGER NOT NULL)""")


def _migrate_7(db):
    """Recording: the token's sessions are recorded; a replay token names its recording."""
    db.execute("ALTER TABLE console_tokens ADD COLUMN record INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE console_tokens ADD COLUMN replay TEXT NOT NULL DEFAULT ''")
    db.execute("ALTER TABLE console_tokens ADD COLUMN replay_speed REAL NOT NULL DEFAULT 1.0")


def _migrate_8(db: sqlite3.Connection) -> None:
    """Secrets every gateway on the file shares (the key of the resume cookies' HMAC)."""
    db.execute("CREATE TABLE shared_secrets (name TEXT PRIMARY KEY, value TEXT NOT NULL)")


# MIGRATIONS[n] takes a database from user_version n to n + 1. Append, never edit.
MIGRATIONS = (_migrate_1, _migrate_2, _migrate_3, _migrate_4, _migrate_5, _migrate_6, _migrate_7, _migrate_8)
SCHEMA_VERSION = len(MIGRATIONS)


_SESSION_COLUMNS = ", ".join(field.name for field in dataclasses.fields(LiveSession))


class SqliteStore(Store):
    """Thread-safe; several processes may share the file (WAL, busy timeout)."""

    def __init__(self, path, token_ttl=300.0, idle_timeout=600.0, clock=time.time, busy_timeout=5.0,
                 checkpoint_on_commit=True):
        """checkpoint_on_commit=False: commits never fold the WAL into the file (SQLite's
        autocheckpoint, up to tens of ms at random commits); the owner calls checkpoint()."""
        super().__init__(token_ttl, idle_timeout, clock)
        self.path = path
        self.checkpoint_on_commit = checkpoint_on_commit
        self.busy_timeout = busy_timeout
        self._pool = queue.LifoQueue(maxsize=_POOL_SIZE)
        self._generation = 0  # bumped when the file is replaced; older connections are dropped
        self._identity = None
        self._reopen_lock = threading.Lock()
        self._open_file()

    def _open_file(self):
        try:  # a new database is the owner's only (its WAL and SHM files take its mode)
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError:
            pass  # it exists, or connecting will say in its own words why it cannot
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            self._upgrade(db)
        self._identity = self._file_identity()

    # -- connections and errors -------------------------------------------------

    def _connect(self):
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

    def _file_identity(self):
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return None
        return stat.st_dev, stat.st_ino

    def _check_file(self):
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
    def _db(self):
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

    def _explain(self, error):
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

    def _upgrade(self, db):
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

    def close(self):
        while True:
            try:
                self._pool.get_nowait().close()
            except queue.Empty:
                return

    # -- what the shared calls are made of ---------------------------------------------

    def _insert(self, rows):
        """rows: (ConnectionDetails, sealed secret or None); a hash already present is replaced."""
        with self._db() as db:
            db.executemany("INSERT OR REPLACE INTO console_tokens (token_hash, instance_id, console_type, host, "
                           "port, access_url, internal_access_path, created_at, updated_at, expires_at, "
                           "backend_secret, policy, backend_tls, record, replay, replay_speed) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           [(*dataclasses.astuple(details)[:10], sealed, details.policy, int(details.backend_tls),
                             int(details.record), details.replay, details.replay_speed) for details, sealed in rows])

    def _find(self, token_hash):
        return self._select("token_hash = ?", (token_hash,), include_expired=True)

    def _validate_row(self, token_hash, console_type, now):
        """(details, sealed secret) or None; touched only when it may open console_type now."""
        with self._db() as db:
            row = db.execute(f"SELECT {_COLUMNS}, backend_secret FROM console_tokens WHERE token_hash = ?",
                             (token_hash,)).fetchone()
            if row is None:
                return None
            details = _details(row)
            if not details.is_expired(now) and details.console_type == console_type:
                db.execute("UPDATE console_tokens SET updated_at = ? WHERE token_hash = ?", (now, token_hash))
        return details, row[_SECRET]

    def _dump(self):
        with self._db() as db:
            rows = db.execute(f"SELECT {_COLUMNS}, backend_secret FROM console_tokens").fetchall()
        return [(_details(row), row[_SECRET]) for row in rows]

    # -- beyond the blueprint: what the gateway and the CLI need --------------------

    def list_details(self, instance_id=None, host=None, include_expired=False, only_idle=False, include_idle=True):
        where, args = [], []
        for column, value in (("instance_id", instance_id), ("host", host)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        return self._select(" AND ".join(where) or "1", tuple(args), include_idle=include_idle,
                            include_expired=include_expired, only_idle=only_idle)

    def touch_hashes(self, token_hashes):
        """Touch by hash (sessions hold hashes, not tokens); returns the set that still exists."""
        if not token_hashes:
            return set()
        marks = ",".join("?" * len(token_hashes))
        with self._db() as db:
            db.execute(f"UPDATE console_tokens SET updated_at = ? WHERE token_hash IN ({marks})",
                       (self.clock(), *token_hashes))
            return {row[0] for row in db.execute(
                f"SELECT token_hash FROM console_tokens WHERE token_hash IN ({marks})", tuple(token_hashes))}

    def delete_hashes(self, token_hashes):
        return self._delete_where_in("token_hash", token_hashes)

    def delete_by_instance(self, instance_id):
        return self._delete_where_in("instance_id", [instance_id])

    def delete_by_host(self, host):
        return self._delete_where_in("host", [host])

    def purge(self):
        """Delete garbage (expired AND idle); returns how many rows went."""
        now = self.clock()
        with self._db() as db:
            return db.execute("DELETE FROM console_tokens WHERE expires_at < ? AND updated_at < ?",
                              (now, now - self.idle_timeout)).rowcount

    def count_by_state(self):
        counts = dict.fromkeys(("live", "idle", "expired", "garbage"), 0)
        now = self.clock()
        with self._db() as db:
            rows = db.execute("SELECT expires_at < ?, updated_at < ?, COUNT(*) FROM console_tokens "
                              "GROUP BY 1, 2", (now, now - self.idle_timeout)).fetchall()
        for expired, idle, count in rows:
            counts["garbage" if expired and idle else "expired" if expired else "idle" if idle
                   else "live"] += count
        return counts

    # -- single-use tokens (console policies) -----------------------------------------

    def consume(self, token_hash: str, address: str, cookie_hash: Optional[str], grace: float,
                issued_hash: Optional[str] = None) -> str:
        """See common.consumption; one write transaction, so two clients at once cannot both consume."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT consumed_address, consumed_cookie, released_at FROM console_tokens "
                                 "WHERE token_hash = ?", (token_hash,)).fetchone()
                if row is None:
                    raise TokenRejected("unknown-token")
                outcome = consumption(row, address, cookie_hash, grace, self.clock())
                if outcome == "consumed":
                    db.execute("UPDATE console_tokens SET consumed_address = ? WHERE token_hash = ?",
                               (address, token_hash))
                if issued_hash is not None:  # the cookie the gateway issues now replaces any before it
                    db.execute("UPDATE console_tokens SET consumed_cookie = ? WHERE token_hash = ?",
                               (issued_hash, token_hash))
                db.execute("UPDATE console_tokens SET released_at = NULL WHERE token_hash = ?", (token_hash,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return outcome

    def shared_secret(self, name: str) -> str:
        """See Store.shared_secret: made by the first gateway that asks, kept in the file."""
        with self._db() as db:
            db.execute("INSERT OR IGNORE INTO shared_secrets (name, value) VALUES (?, ?)",
                       (name, secrets.token_hex(32)))
            return db.execute("SELECT value FROM shared_secrets WHERE name = ?", (name,)).fetchone()[0]

    def release(self, token_hash):
        with self._db() as db:
            db.execute("UPDATE console_tokens SET released_at = ? WHERE token_hash = ?", (self.clock(), token_hash))

    # -- live sessions, shared by every gateway on the file ----------------------------

    def record_session(self, session_id, gateway_id, token_hash, instance_id, console_type, client, heartbeat):
        now = self.clock()
        with self._db() as db:
            db.execute(f"INSERT INTO live_sessions ({_SESSION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 0, 0)",
                       (session_id, gateway_id, token_hash, instance_id, console_type, client, now, now, heartbeat))

    def update_sessions(self, counts):
        """counts: {session_id: (bytes_up, bytes_down)}; returns the ids someone asked to kill."""
        if not counts:
            return set()
        now = self.clock()
        with self._db() as db:
            db.executemany("UPDATE live_sessions SET updated_at = ?, bytes_up = ?, bytes_down = ? "
                           "WHERE session_id = ?", [(now, up, down, sid) for sid, (up, down) in counts.items()])
            marks = ",".join("?" * len(counts))
            return {row[0] for row in db.execute(
                f"SELECT session_id FROM live_sessions WHERE kill_requested AND session_id IN ({marks})",
                tuple(counts))}

    def remove_sessions(self, session_ids):
        """Take sessions out of the shared list, in one transaction."""
        with self._db() as db:
            db.executemany("DELETE FROM live_sessions WHERE session_id = ?", [(item,) for item in session_ids])

    def list_sessions(self, instance_id=None):
        """Sessions of live gateways (rows left by dead ones are not shown)."""
        now = self.clock()
        where, args = ("WHERE instance_id = ?", (instance_id,)) if instance_id is not None else ("", ())
        with self._db() as db:
            rows = db.execute(f"SELECT {_SESSION_COLUMNS} FROM live_sessions {where} ORDER BY started_at",
                              args).fetchall()
        return [session for session in (LiveSession(*row) for row in rows) if not session.is_stale(now)]

    def request_kill(self, session_ids=None, instance_id=None):
        """Ask the gateways to end sessions; returns how many were marked."""
        with self._db() as db:
            if instance_id is not None:
                return db.execute("UPDATE live_sessions SET kill_requested = 1 WHERE instance_id = ?",
                                  (instance_id,)).rowcount
            marks = ",".join("?" * len(session_ids))
            return db.execute(f"UPDATE live_sessions SET kill_requested = 1 WHERE session_id IN ({marks})",
                              tuple(session_ids)).rowcount

    def purge_stale_sessions(self):
        """Delete the rows of gateways that died; returns how many."""
        now = self.clock()
        with self._db() as db:
            return db.execute("DELETE FROM live_sessions WHERE ? - updated_at > stale_after(heartbeat)",
                              (now,)).rowcount

    def checkpoint(self):
        """Fold the write-ahead log into the database file, without waiting for readers or writers."""
        with self._db() as db:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    # -- followed serial consoles ------------------------------------------------------

    def add_follow(self, instance_id, host, port):
        """Follow (or re-point) one instance's serial console."""
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO console_follows (instance_id, host, port) VALUES (?, ?, ?)",
                       (instance_id, host, int(port)))

    def remove_follow(self, instance_id):
        """Stop following; False when it was not followed."""
        with self._db() as db:
            return db.execute("DELETE FROM console_follows WHERE instance_id = ?", (instance_id,)).rowcount > 0

    def list_follows(self):
        with self._db() as db:
            rows = db.execute("SELECT instance_id, host, port FROM console_follows ORDER BY instance_id").fetchall()
        return [Follow(*row) for row in rows]

    def ping(self):
        with self._db() as db:
            db.execute("SELECT 1 FROM console_tokens LIMIT 1").fetchall()

    # -- helpers ---------------------------------------------------------------

    def _select(self, where, args, include_idle=True, include_expired=False, only_idle=False):
        now = self.clock()
        conditions, args = [f"({where})"], list(args)
        if not include_expired:
            conditions.append("expires_at >= ?")
            args.append(now)
        if only_idle:
            conditions.append("updated_at < ?")
            args.append(now - self.idle_timeout)
        elif not include_idle:
            conditions.append("updated_at >= ?")
            args.append(now - self.idle_timeout)
        with self._db() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM console_tokens WHERE {' AND '.join(conditions)} "
                              "ORDER BY created_at", args).fetchall()
        return [_details(row) for row in rows]

    def _delete_where_in(self, column, values):
        if not values:
            return 0
        marks = ",".join("?" * len(values))
        with self._db() as db:
            return db.execute(f"DELETE FROM console_tokens WHERE {column} IN ({marks})",
                              tuple(values)).rowcount
