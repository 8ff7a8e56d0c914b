"""What the SQLite engine keeps about followed serial consoles: the console_follows table
(vncgate-token follow / unfollow). A mixin of SqliteStore (sqlite.py), which brings the pooled
connections (_db).
"""

from __future__ import annotations

from vncgate.store.common import Follow
from vncgate.store.engine_parts import SqliteParts


class SqliteFollows(SqliteParts):
    """SqliteStore's followed serial consoles."""

    # -- followed serial consoles ------------------------------------------------------

    def add_follow(self, instance_id: str, host: str, port: int | str) -> None:
        """Follow (or re-point) one instance's serial console."""
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO console_follows (instance_id, host, port) VALUES (?, ?, ?)",
                       (instance_id, host, int(port)))

    def remove_follow(self, instance_id: str) -> bool:
        """Stop following; False when it was not followed."""
        with self._write() as db:
            return db.execute("DELETE FROM console_follows WHERE instance_id = ?", (instance_id,)).rowcount > 0

    def list_follows(self) -> list[Follow]:
        with self._db() as db:
            rows = db.execute("SELECT instance_id, host, port FROM console_follows ORDER BY instance_id").fetchall()
        return [Follow(*row) for row in rows]
