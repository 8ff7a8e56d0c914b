"""What the SQLite engine keeps about tokens: the console_tokens table's rows (insert, find,
validate, list, touch, delete, purge, count); a single-use token's consumption is read from
its shares (sqlite_shares). A mixin of SqliteStore (sqlite.py), which brings the pooled connections
(_db) and the clock.
"""

from __future__ import annotations

import dataclasses
import secrets

from vncgate.store.common import TOUCH_GRAIN, ConnectionDetails
from vncgate.store.engine_parts import SqliteParts

_COLUMNS = ("token_hash, instance_id, console_type, host, port, access_url, internal_access_path, "
            "created_at, updated_at, expires_at, backend_secret IS NOT NULL, policy, backend_tls, record, replay, "
            "replay_speed")
_SECRET = 16  # the index of backend_secret when it is selected after _COLUMNS


def _details(row):
    return ConnectionDetails(*row[:10], has_password=bool(row[10]), policy=row[11], backend_tls=bool(row[12]),
                             record=bool(row[13]), replay=row[14], replay_speed=row[15])


class SqliteTokens(SqliteParts):
    """SqliteStore's token rows and single-use consumption (see Store for each call)."""

    # -- what the shared calls are made of ---------------------------------------------

    def _insert(self, rows: list[tuple[ConnectionDetails, bytes | None]]) -> None:
        """rows: (ConnectionDetails, sealed secret or None); a hash already present is replaced."""
        with self._write() as db:
            db.executemany("INSERT OR REPLACE INTO console_tokens (token_hash, instance_id, console_type, host, "
                           "port, access_url, internal_access_path, created_at, updated_at, expires_at, "
                           "backend_secret, policy, backend_tls, record, replay, replay_speed) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           [(*dataclasses.astuple(details)[:10], sealed, details.policy, int(details.backend_tls),
                             int(details.record), details.replay, details.replay_speed) for details, sealed in rows])

    def _find(self, token_hash: str) -> list[ConnectionDetails]:
        return self._select("token_hash = ?", (token_hash,), include_expired=True)

    def _validate_row(self, token_hash: str, console_type: str,
                      now: float) -> tuple[ConnectionDetails, bytes | None] | None:
        """(details, sealed secret) or None; touched only when it may open console_type now."""
        with self._db() as db:
            row = db.execute(f"SELECT {_COLUMNS}, backend_secret FROM console_tokens WHERE token_hash = ?",
                             (token_hash,)).fetchone()
        if row is None:
            return None
        details = _details(row)
        if not details.is_expired(now) and details.console_type == console_type \
                and not now - TOUCH_GRAIN < details.updated_at <= now:
            with self._write() as db:
                db.execute("UPDATE console_tokens SET updated_at = ? WHERE token_hash = ?", (now, token_hash))
        return details, row[_SECRET]

    def sealed_secret(self, token_hash: str) -> bytes | None:
        """The token's sealed password, None when it holds none (or is gone): a screenshot's."""
        with self._db() as db:
            row = db.execute("SELECT backend_secret FROM console_tokens WHERE token_hash = ?", (token_hash,)).fetchone()
        return bytes(row[0]) if row and row[0] is not None else None

    def _dump(self) -> list[tuple[ConnectionDetails, bytes | None]]:
        with self._db() as db:
            rows = db.execute(f"SELECT {_COLUMNS}, backend_secret FROM console_tokens").fetchall()
        return [(_details(row), row[_SECRET]) for row in rows]

    # -- beyond the blueprint: what the gateway and the CLI need --------------------

    def list_details(self, instance_id: str | None = None, host: str | None = None, include_expired: bool = False,
                     only_idle: bool = False, include_idle: bool = True) -> list[ConnectionDetails]:
        where, args = [], []
        for column, value in (("instance_id", instance_id), ("host", host)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        return self._select(" AND ".join(where) or "1", tuple(args), include_idle=include_idle,
                            include_expired=include_expired, only_idle=only_idle)

    def touch_hashes(self, token_hashes: list[str]) -> set[str]:
        """Touch by hash (sessions hold hashes, not tokens); returns the set that still exists."""
        if not token_hashes:
            return set()
        marks = ",".join("?" * len(token_hashes))
        with self._write() as db:
            db.execute(f"UPDATE console_tokens SET updated_at = ? WHERE token_hash IN ({marks})",
                       (self.clock(), *token_hashes))
            return {row[0] for row in db.execute(
                f"SELECT token_hash FROM console_tokens WHERE token_hash IN ({marks})", tuple(token_hashes))}

    def delete_hashes(self, token_hashes: list[str]) -> int:
        return self._delete_where_in("token_hash", token_hashes)

    def delete_by_instance(self, instance_id: str) -> int:
        return self._delete_where_in("instance_id", [instance_id])

    def delete_by_host(self, host: str) -> int:
        return self._delete_where_in("host", [host])

    def purge(self) -> int:
        """Delete garbage (expired AND idle); returns how many rows went."""
        now = self.clock()
        with self._write() as db:
            return db.execute("DELETE FROM console_tokens WHERE expires_at < ? AND updated_at < ?",
                              (now, now - self.idle_timeout)).rowcount

    def count_by_state(self) -> dict[str, int]:
        counts = dict.fromkeys(("live", "idle", "expired", "garbage"), 0)
        now = self.clock()
        with self._db() as db:
            rows = db.execute("SELECT expires_at < ?, updated_at < ?, COUNT(*) FROM console_tokens "
                              "GROUP BY 1, 2", (now, now - self.idle_timeout)).fetchall()
        for expired, idle, count in rows:
            counts["garbage" if expired and idle else "expired" if expired else "idle" if idle
                   else "live"] += count
        return counts

    def shared_secret(self, name: str) -> str:
        """See Store.shared_secret: made by the first gateway that asks, kept in the file."""
        with self._write() as db:
            db.execute("INSERT OR IGNORE INTO shared_secrets (name, value) VALUES (?, ?)",
                       (name, secrets.token_hex(32)))
            return db.execute("SELECT value FROM shared_secrets WHERE name = ?", (name,)).fetchone()[0]

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

    def _delete_where_in(self, column: str, values: list[str]) -> int:
        if not values:
            return 0
        marks = ",".join("?" * len(values))
        with self._write() as db:
            return db.execute(f"DELETE FROM console_tokens WHERE {column} IN ({marks})",
                              tuple(values)).rowcount
