"""The SQLite engine's schema: the migrations that take a database file from one schema
version to the next, in order, and the version this vncgate writes. SqliteStore applies them
when it opens a file (sqlite.py); nothing else speaks DDL.
"""

import sqlite3


def _migrate_1(db: sqlite3.Connection) -> None:
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


def _migrate_2(db: sqlite3.Connection) -> None:
    db.execute("ALTER TABLE console_tokens ADD COLUMN backend_secret BLOB")


def _migrate_3(db: sqlite3.Connection) -> None:
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


def _migrate_4(db: sqlite3.Connection) -> None:
    """Console policies: the token's policy, and who consumed a single-use token, and when its
    last session ended (NULL while one is live)."""
    db.execute("ALTER TABLE console_tokens ADD COLUMN policy TEXT NOT NULL DEFAULT ''")
    db.execute("ALTER TABLE console_tokens ADD COLUMN consumed_address TEXT")
    db.execute("ALTER TABLE console_tokens ADD COLUMN consumed_cookie TEXT")
    db.execute("ALTER TABLE console_tokens ADD COLUMN released_at REAL")


def _migrate_5(db: sqlite3.Connection) -> None:
    db.execute("ALTER TABLE console_tokens ADD COLUMN backend_tls INTEGER NOT NULL DEFAULT 0")


def _migrate_6(db: sqlite3.Connection) -> None:
    """Followed serial consoles (vncgate-token follow)."""
    db.execute("""CREATE TABLE console_follows (
        instance_id TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        port INTEGER NOT NULL)""")


def _migrate_7(db: sqlite3.Connection) -> None:
    """Recording: the token's sessions are recorded; a replay token names its recording."""
    db.execute("ALTER TABLE console_tokens ADD COLUMN record INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE console_tokens ADD COLUMN replay TEXT NOT NULL DEFAULT ''")
    db.execute("ALTER TABLE console_tokens ADD COLUMN replay_speed REAL NOT NULL DEFAULT 1.0")


def _migrate_8(db: sqlite3.Connection) -> None:
    """Secrets every gateway on the file shares (the key of the resume cookies' HMAC)."""
    db.execute("CREATE TABLE shared_secrets (name TEXT PRIMARY KEY, value TEXT NOT NULL)")


def _migrate_9(db):
    """Per-token shares: one row per live session of a token, on every gateway."""
    db.execute("""CREATE TABLE token_shares (
        session_id TEXT PRIMARY KEY,
        token_hash TEXT NOT NULL,
        lapses_at REAL NOT NULL,
        recorded INTEGER NOT NULL DEFAULT 0)""")
    db.execute("CREATE INDEX token_shares_token ON token_shares (token_hash)")


def _migrate_10(db):
    """Who follows each console (a lease), and every gateway's recordings."""
    db.execute("""CREATE TABLE follow_leases (
        instance_id TEXT PRIMARY KEY,
        gateway_id TEXT NOT NULL,
        lapses_at REAL NOT NULL)""")
    db.execute("""CREATE TABLE recordings (
        session_id TEXT PRIMARY KEY,
        instance_id TEXT,
        started_at REAL NOT NULL,
        meta TEXT NOT NULL)""")


# MIGRATIONS[n] takes a database from user_version n to n + 1. Append, never edit.
MIGRATIONS = (_migrate_1, _migrate_2, _migrate_3, _migrate_4, _migrate_5, _migrate_6, _migrate_7, _migrate_8,
              _migrate_9, _migrate_10)
SCHEMA_VERSION = len(MIGRATIONS)
