"""What the Redis engine keeps about live sessions: one expiring hash per session and the
sorted set listing them, shared by the gateways on every host (record, heartbeat, list, kill
requests, forgetting dead gateways' sessions). A mixin of RedisStore (redis.py), which brings
the client, the scripts and the clock.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from vncgate.store.common import LiveSession, stale_after
from vncgate.store.engine_parts import RedisParts

_SESSION_FIELDS = tuple(field.name for field in dataclasses.fields(LiveSession))


class RedisSessions(RedisParts):
    """RedisStore's live sessions, shared by every gateway on the store."""

    # -- live sessions, shared by every gateway on the store -------------------------------

    def record_session(self, session_id: str, gateway_id: str, token_hash: str, instance_id: str, console_type: str,
                       client: str, heartbeat: float) -> None:
        now = self.clock()
        key = self._key("session:", session_id)
        stale_ms = int(stale_after(heartbeat) * 1000)
        pipe = self._client.pipeline(transaction=True)
        pipe.hset(key, mapping={"session_id": session_id, "gateway_id": gateway_id, "token_hash": token_hash,
                                "instance_id": instance_id, "console_type": console_type, "client": client,
                                "started_at": repr(now), "updated_at": repr(now), "heartbeat": repr(heartbeat),
                                "bytes_up": 0, "bytes_down": 0, "kill_requested": 0, "stale_ms": stale_ms})
        pipe.pexpire(key, stale_ms)
        pipe.zadd(self._key("sessions"), {session_id: now})
        self._run(pipe.execute)

    def update_sessions(self, counts: dict[str, tuple[int, int]]) -> set[str]:
        """counts: {session_id: (bytes_up, bytes_down)}; returns the ids someone asked to kill."""
        if not counts:
            return set()
        args: list[str | int] = [repr(self.clock())]
        for session_id, (up, down) in counts.items():
            args += [session_id, up, down]
        return {item.decode() for item in self._script("heartbeat", args)}

    def remove_sessions(self, session_ids: Iterable[str]) -> None:
        """Take sessions out of the shared list, in pipelines of _BATCH commands."""
        self._pipelined([command for session_id in session_ids
                         for command in (("delete", (self._key("session:", session_id),)),
                                         ("zrem", (self._key("sessions"), session_id)))])

    def _sessions(self) -> list[tuple[str, LiveSession | None]]:
        """(session id, LiveSession or None when its key has expired), oldest first."""
        ids = [item.decode() for item in self._run(self._client.zrange, self._key("sessions"), 0, -1)]
        replies = self._pipelined([("hgetall", (self._key("session:", session_id),)) for session_id in ids])
        return [(session_id, _session(fields) if fields else None) for session_id, fields in zip(ids, replies)]

    def list_sessions(self, instance_id: str | None = None) -> list[LiveSession]:
        """Sessions of live gateways (those left by dead ones are not shown)."""
        now = self.clock()
        return [session for _, session in self._sessions() if session is not None and not session.is_stale(now)
                and instance_id in (None, session.instance_id)]

    def request_kill(self, session_ids: list[str] | None = None, instance_id: str | None = None) -> int:
        """Ask the gateways to end sessions (pushed to all of them); returns how many were marked."""
        if instance_id is not None:
            session_ids = [session_id for session_id, session in self._sessions()
                           if session is not None and session.instance_id == instance_id]
        return self._script("kill", list(session_ids)) if session_ids else 0

    def purge_stale_sessions(self) -> int:
        """Forget the sessions of gateways that died; returns how many."""
        now = self.clock()
        gone = [session_id for session_id, session in self._sessions() if session is None or session.is_stale(now)]
        if gone:
            pipe = self._client.pipeline(transaction=True)
            pipe.delete(*(self._key("session:", session_id) for session_id in gone))
            pipe.zrem(self._key("sessions"), *gone)
            self._run(pipe.execute)
        return len(gone)


def _session(fields: dict[bytes, bytes]) -> LiveSession:
    text = {key.decode(): value.decode() for key, value in fields.items()}
    return LiveSession(text["session_id"], text["gateway_id"], text["token_hash"], text["instance_id"],
                       text["console_type"], text["client"], float(text["started_at"]), float(text["updated_at"]),
                       float(text["heartbeat"]), int(text["bytes_up"]), int(text["bytes_down"]),
                       text["kill_requested"] == "1")
