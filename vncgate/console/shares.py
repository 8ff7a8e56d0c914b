"""A gateway's side of the per-token shares kept in the store (store/redis_shares.py,
store/sqlite_shares.py): each session takes one as it opens (max_sessions_per_token across
every gateway of the store), renews it with its heartbeat, and gives it back as it ends; a
share its gateway stops renewing (killed -9) lapses three missed heartbeats later."""

import logging
from collections.abc import Callable
from typing import Any

from vncgate import store as store_module
from vncgate.net import fds
from vncgate.refusals import Refused

log = logging.getLogger("vncgate.console.sessions")


class TokenShares:
    def __init__(self, store: Any, heartbeat: float, limit: Callable[[], int],
                 call: Callable[..., Any] = lambda function, *args: function(*args)) -> None:
        """limit: max_sessions_per_token, read at each take (lowered with the fd limit at start);
        call(function, *args): how a handshake's store call is made (the breaker's, bounded)."""
        self.store = store
        self.call = call
        self.ttl = store_module.stale_after(heartbeat)  # three missed heartbeats, as the session list's
        self.limit = limit

    def take(self, token_hash: str, session_id: str, recorded: bool, fields: dict) -> None:
        """Count the session among its token's live sessions, or refuse it (Refused)."""
        try:
            taken, live = self.call(self.store.take_share, token_hash, session_id, self.limit(), self.ttl, recorded)
        except store_module.StoreError as error:
            reason = "no-free-fds" if fds.exhausted() else "store-unavailable"  # as validate's are told apart
            raise Refused(reason, str(error), **fields) from None
        if not taken:
            raise Refused("too-many-sessions", f"{live} sessions open", **fields)

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
