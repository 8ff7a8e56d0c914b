"""A gateway's side of the per-token shares kept in the store (store/redis_shares.py,
store/sqlite_shares.py): each session takes one as it opens (max_sessions_per_token across
every gateway of the store), renews it with its heartbeat, and gives it back as it ends; a
share its gateway stops renewing (killed -9) lapses three missed heartbeats later."""

import logging
from collections.abc import Callable
from typing import Any

from vncgate import store as store_module

log = logging.getLogger("vncgate.console.sessions")


class TokenShares:
    def __init__(self, store: Any, heartbeat: float, limit: Callable[[], int]) -> None:
        """limit: max_sessions_per_token, read at each take (lowered with the fd limit at start)."""
        self.store = store
        self.ttl = store_module.stale_after(heartbeat)  # three missed heartbeats, as the session list's
        self.limit = limit

    def take(self, token_hash: str, session_id: str, recorded: bool) -> int | None:
        """Count the session among its token's live sessions: None, or how many are live when
        the token has no share left. StoreError as the store raises it (the caller's to answer)."""
        taken, live = self.store.take_share(token_hash, session_id, self.limit(), self.ttl, recorded)
        return None if taken else live

    def give_back(self, shares: dict, ended: bool = True) -> bool:
        """{session id: token hash}; ended=False for an attempt refused before it was a session
        (a single-use token's grace does not start). An outage is logged, not raised (False):
        the caller tries again later, and the shares lapse by themselves meanwhile."""
        try:
            self.store.release_shares(shares, ended)
            return True
        except store_module.StoreError as error:
            log.warning("shares not given back to the store yet (they lapse in %gs): %s", self.ttl, error)
            return False

    def renew(self, shares: dict) -> None:
        """{session id: token hash} of the live sessions, at each heartbeat."""
        self.store.renew_shares(shares, self.ttl)
