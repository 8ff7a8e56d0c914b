"""The SQLite engine's follow leases and recordings index, for the gateways of one host (the
console log stays in files: console/serial.py's ConsoleLog)."""

import json
from collections.abc import Iterable
from typing import Optional

from vncgate.store.engine_parts import SqliteParts


class SqliteConsoles(SqliteParts):
    """Mixed into SqliteStore: claim_follows, release_follows, follow_holder, the recordings index."""

    shares_consoles = False  # one host: the log is a file, every viewer's gateway opens the console

    def claim_follows(self, gateway_id: str, instance_ids: Iterable[str], ttl: float) -> set:
        ids = list(instance_ids)
        if not ids:
            return set()
        now = self.clock()
        with self._write() as db:
            db.executemany("INSERT INTO follow_leases (instance_id, gateway_id, lapses_at) VALUES (?, ?, ?) "
                           "ON CONFLICT (instance_id) DO UPDATE SET gateway_id = excluded.gateway_id, "
                           "lapses_at = excluded.lapses_at WHERE gateway_id = excluded.gateway_id OR lapses_at < ?",
                           [(instance_id, gateway_id, now + ttl, now) for instance_id in ids])
            marks = ",".join("?" * len(ids))
            return {row[0] for row in db.execute(
                f"SELECT instance_id FROM follow_leases WHERE gateway_id = ? AND instance_id IN ({marks})",
                (gateway_id, *ids))}

    def release_follows(self, gateway_id: str, instance_ids: Iterable[str]) -> None:
        with self._write() as db:
            db.executemany("DELETE FROM follow_leases WHERE instance_id = ? AND gateway_id = ?",
                           [(instance_id, gateway_id) for instance_id in instance_ids])

    def follow_holder(self, instance_id: str) -> Optional[str]:
        with self._db() as db:
            row = db.execute("SELECT gateway_id FROM follow_leases WHERE instance_id = ? AND lapses_at >= ?",
                             (instance_id, self.clock())).fetchone()
        return row[0] if row else None

    def index_recording(self, meta: dict) -> None:
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO recordings (session_id, instance_id, started_at, meta) "
                       "VALUES (?, ?, ?, ?)",
                       (meta["session_id"], meta.get("instance_id"), float(meta["started_at"]), json.dumps(meta)))

    def list_recordings(self, instance_id: Optional[str] = None) -> list:
        where, args = ("WHERE instance_id = ?", (instance_id,)) if instance_id is not None else ("", ())
        with self._db() as db:
            rows = db.execute(f"SELECT meta FROM recordings {where} ORDER BY started_at, session_id", args).fetchall()
        return [json.loads(row[0]) for row in rows]

    def remove_recordings(self, session_ids: Iterable[str]) -> None:
        with self._write() as db:
            db.executemany("DELETE FROM recordings WHERE session_id = ?", [(item,) for item in session_ids])
