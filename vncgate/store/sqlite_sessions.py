"""What the SQLite engine keeps about live sessions: the live_sessions table every gateway on
the file shares (record, heartbeat, list, kill requests, purge of dead gateways' rows). A mixin
of SqliteStore (sqlite.py), which brings the pooled connections (_db) and the clock.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from vncgate.store.common import LiveSession
from vncgate.store.engine_parts import SqliteParts

_SESSION_COLUMNS = ", ".join(field.name for field in dataclasses.fields(LiveSession))


class SqliteSessions(SqliteParts):
    """SqliteStore's live sessions, shared by every gateway on the file."""

    # -- live sessions, shared by every gateway on the file ----------------------------

    def record_session(self, session_id: str, gateway_id: str, token_hash: str, instance_id: str, console_type: str,
                       client: str, heartbeat: float) -> None:
        now = self.clock()
        with self._write() as db:
            db.execute(f"INSERT INTO live_sessions ({_SESSION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 0, 0)",
                       (session_id, gateway_id, token_hash, instance_id, console_type, client, now, now, heartbeat))

    def update_sessions(self, counts: dict[str, tuple[int, int]]) -> set[str]:
        """counts: {session_id: (bytes_up, bytes_down)}; returns the ids someone asked to kill."""
        if not counts:
            return set()
        now = self.clock()
        self._write_chunks([(now, up, down, sid) for sid, (up, down) in counts.items()], lambda db, rows: db.executemany(
            "UPDATE live_sessions SET updated_at = ?, bytes_up = ?, bytes_down = ? WHERE session_id = ?", rows))
        with self._db() as db:
            marks = ",".join("?" * len(counts))
            return {row[0] for row in db.execute(
                f"SELECT session_id FROM live_sessions WHERE kill_requested AND session_id IN ({marks})",
                tuple(counts))}

    def remove_sessions(self, session_ids: Iterable[str]) -> None:
        """Take sessions out of the shared list (thousands at a stop: in chunks)."""
        self._write_chunks([(item,) for item in session_ids],
                           lambda db, rows: db.executemany("DELETE FROM live_sessions WHERE session_id = ?", rows))

    def list_sessions(self, instance_id: str | None = None) -> list[LiveSession]:
        """Sessions of live gateways (rows left by dead ones are not shown)."""
        now = self.clock()
        where, args = ("WHERE instance_id = ?", (instance_id,)) if instance_id is not None else ("", ())
        with self._db() as db:
            rows = db.execute(f"SELECT {_SESSION_COLUMNS} FROM live_sessions {where} ORDER BY started_at",
                              args).fetchall()
        return [session for session in (LiveSession(*row) for row in rows) if not session.is_stale(now)]

    def request_kill(self, session_ids: list[str] | None = None, instance_id: str | None = None) -> int:
        """Ask the gateways to end sessions; returns how many were marked."""
        with self._write() as db:
            if instance_id is not None:
                return db.execute("UPDATE live_sessions SET kill_requested = 1 WHERE instance_id = ?",
                                  (instance_id,)).rowcount
            marks = ",".join("?" * len(session_ids or ()))  # none: 0 marked, as in the Redis engine
            return db.execute(f"UPDATE live_sessions SET kill_requested = 1 WHERE session_id IN ({marks})",
                              tuple(session_ids or ())).rowcount

    def purge_stale_sessions(self) -> int:
        """Delete the rows of gateways that died; returns how many."""
        now = self.clock()
        with self._write() as db:
            return db.execute("DELETE FROM live_sessions WHERE ? - updated_at > stale_after(heartbeat)",
                              (now,)).rowcount
