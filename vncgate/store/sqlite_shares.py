"""The SQLite engine's per-token shares: the live sessions of each token, counted by every
gateway on the file, and the single-use state read from that count (see redis_shares for
the rule: a share lapses three missed heartbeats after its gateway last renewed it; a token's
released_at is set when its count reaches zero, unset while one is live)."""

import sqlite3
from collections.abc import Mapping, Sequence
from typing import Optional

from vncgate.store.common import TokenRejected, consumption
from vncgate.store.engine_parts import SqliteParts


class SqliteShares(SqliteParts):
    """Mixed into SqliteStore: take_share, renew_shares, release_shares, token_usage, consume."""

    @staticmethod
    def _live(db: sqlite3.Connection, token_hash: str, now: float) -> int:
        """Drop the token's lapsed shares (a token left with none: its grace starts at the last lapse)."""
        lapsed = db.execute("SELECT MAX(lapses_at) FROM token_shares WHERE token_hash = ? AND lapses_at < ?",
                            (token_hash, now)).fetchone()[0]
        if lapsed is not None:
            db.execute("DELETE FROM token_shares WHERE token_hash = ? AND lapses_at < ?", (token_hash, now))
        count = db.execute("SELECT COUNT(*) FROM token_shares WHERE token_hash = ?", (token_hash,)).fetchone()[0]
        if lapsed is not None and not count:
            db.execute("UPDATE console_tokens SET released_at = ? WHERE token_hash = ?", (lapsed, token_hash))
        return count

    def take_share(self, token_hash: str, session_id: str, limit: int, ttl: float,
                   recorded: bool = False) -> tuple[bool, int]:
        """See RedisShares.take_share."""
        now = self.clock()
        with self._write() as db:
            count = self._live(db, token_hash, now)
            if count >= limit:
                return False, count
            db.execute("INSERT OR REPLACE INTO token_shares (session_id, token_hash, lapses_at, recorded) "
                       "VALUES (?, ?, ?, ?)", (session_id, token_hash, now + ttl, int(recorded)))
        return True, count

    def renew_shares(self, shares: Mapping[str, str], ttl: float) -> None:
        lapses_at = self.clock() + ttl
        self._write_chunks([(lapses_at, sid) for sid in shares], lambda db, rows: db.executemany(
            "UPDATE token_shares SET lapses_at = ? WHERE session_id = ?", rows))

    def release_shares(self, shares: Mapping[str, str], ended: bool = True) -> None:
        now = self.clock()

        def release(db: sqlite3.Connection, chunk: Sequence[tuple[str, str]]) -> None:
            released = {token_hash for sid, token_hash in chunk
                        if db.execute("DELETE FROM token_shares WHERE session_id = ?", (sid,)).rowcount}
            for token_hash in released:  # a token's count, once per chunk (ten sessions of it end at a stop)
                if not self._live(db, token_hash, now) and ended:
                    db.execute("UPDATE console_tokens SET released_at = ? WHERE token_hash = ?", (now, token_hash))
        self._write_chunks(list(shares.items()), release)

    def purge_lapsed_shares(self) -> int:
        """Forget the shares of gateways that died, for tokens nobody uses again (a token in use
        drops its own at each take); each such token's grace starts at its last lapse."""
        now = self.clock()
        with self._db() as db:
            hashes = [row[0] for row in db.execute(
                "SELECT DISTINCT token_hash FROM token_shares WHERE lapses_at < ?", (now,))]
        for token_hash in hashes:
            with self._write() as db:
                self._live(db, token_hash, now)
        return len(hashes)

    def token_usage(self, token_hash: str) -> tuple[int, int]:
        now = self.clock()
        with self._db() as db:
            row = db.execute("SELECT COUNT(*), COALESCE(SUM(recorded), 0) FROM token_shares "
                             "WHERE token_hash = ? AND lapses_at >= ?", (token_hash, now)).fetchone()
        return int(row[0]), int(row[1])

    def consume(self, token_hash: str, address: str, cookie_hash: Optional[str], grace: float,
                issued_hash: Optional[str] = None, session_id: str = "") -> str:
        """See RedisShares.consume; one write transaction, so two clients at once cannot both consume."""
        now = self.clock()
        with self._write() as db:
            self._live(db, token_hash, now)
            row = db.execute("SELECT consumed_address, consumed_cookie, released_at FROM console_tokens "
                             "WHERE token_hash = ?", (token_hash,)).fetchone()
            if row is None:
                raise TokenRejected("unknown-token")
            others = db.execute("SELECT COUNT(*) FROM token_shares WHERE token_hash = ? AND session_id != ?",
                                (token_hash, session_id)).fetchone()[0]
            outcome = consumption((row[0], row[1], None if others else row[2]), address, cookie_hash, grace, now)
            if outcome == "consumed":
                db.execute("UPDATE console_tokens SET consumed_address = ? WHERE token_hash = ?",
                           (address, token_hash))
            if issued_hash is not None:  # the cookie the gateway issues now replaces any before it
                db.execute("UPDATE console_tokens SET consumed_cookie = ? WHERE token_hash = ?",
                           (issued_hash, token_hash))
            db.execute("UPDATE console_tokens SET released_at = NULL WHERE token_hash = ?", (token_hash,))
        return outcome
