"""The control-plane API's sessions, recordings and store resources (/api/v1/sessions,
/api/v1/recordings, /api/v1/store): listing the live sessions of every gateway, killing one,
listing every gateway's recordings, the store's state; and ending this
gateway's own sessions at once when their token is revoked or they are killed. A mixin of
ControlPlane (api.py), which brings the gateway.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vncgate import store as store_module
from vncgate.control.api_fields import _Query
from vncgate.control.minting import recording_json, session_json
from vncgate.refusals import Refused

if TYPE_CHECKING:
    from vncgate.console.sessions import Session
    from vncgate.control.api import _Call

log = logging.getLogger("vncgate.control.api")

_SESSION_ID = re.compile(r"[0-9a-f]{1,64}")


class SessionEndpoints:
    """ControlPlane's /sessions and /store endpoints."""

    gateway: Any  # ControlPlane's

    def list_sessions(self, call: _Call, _body: None) -> tuple[int, list[dict[str, Any]]]:
        query = _Query(call.request, ("instance",))
        call.audit["instance"] = query.get("instance") or "-"
        store = call.store
        now = store.clock()
        here = self.gateway.sessions.byte_counts()
        return 200, [session_json(row, now, here.get(row.session_id))
                     for row in store.list_sessions(instance_id=query.get("instance"))]

    def kill_session(self, call: _Call, _body: None, session_id: str) -> tuple[int, dict[str, int]]:
        if not _SESSION_ID.fullmatch(session_id):
            raise Refused("not-found", "not a session id")
        call.audit["session_id"] = session_id
        store = call.store
        found = [row for row in store.list_sessions() if row.session_id == session_id]
        if found:
            call.audit["instance"] = found[0].instance_id
        if not found or not store.request_kill(session_ids=[session_id]):
            raise Refused("not-found", f"no live session {session_id}")
        # A session of this gateway ends now; one of another gateway within its touch_interval.
        self._end_local_sessions(lambda session: session.id == session_id, "killed")
        return 202, {"kill_requested": 1}

    def list_recordings(self, call: _Call, _body: None) -> tuple[int, list]:
        """Every gateway's recordings (the store's index), oldest first."""
        query = _Query(call.request, ("instance",))
        call.audit["instance"] = query.get("instance") or "-"
        rows = self.gateway.sessions.recordings.list(query.get("instance"), store=call.store)
        return 200, [recording_json(row) for row in rows]

    def store_state(self, call: _Call, _body: None) -> tuple[int, dict[str, Any]]:
        store = call.store
        try:
            tokens = store.count_by_state()
        except store_module.StoreError as error:
            log.debug("/api/v1/store: %s", error)
            tokens = None
        return 200, {"up": tokens is not None, "tokens": tokens, "gateway_id": self.gateway.sessions.gateway_id,
                     "sessions_here": len(self.gateway.sessions.live())}

    def _end_local_sessions(self, chosen: Callable[[Session], bool], reason: str) -> None:
        for session in self.gateway.sessions.live():
            if chosen(session):
                session.stop(reason)
