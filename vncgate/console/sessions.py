"""Live sessions: opening a console for a token, the registry, and housekeeping.

The client paths (xvp, websocket) only speak their protocol; this module turns a
token into a backend connection, runs the relay as a registered session, and
writes the audit lines. The housekeeper thread keeps live tokens from going idle,
ends sessions whose token was revoked and deletes garbage.

A handshake never writes the shared session list itself: a session's start and end
are queued and the housekeeper writes them moments later, so a slow store write
(or a checkpoint it triggers) never delays a client, and a session that ends
before it was written costs no write at all.

The housekeeper thread (and the Listener it owns) is in housekeeping.py, the RFB security
handshakes of a session in security.py (mixed in), single use and its resume cookie in resume.py.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import socket
import ssl
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, TypeVar, Union

from vncgate import store as store_module
from vncgate.console import allow, backends, recording, rfb
from vncgate.console import policy as policy_module
from vncgate.console import resume as resume_module
from vncgate.console import shares as shares_module
from vncgate.console.recordings import Recordings
from vncgate.console.security import SessionSecurity
from vncgate.net import fds, tls
from vncgate.refusals import Refused
from vncgate.store import watch

if TYPE_CHECKING:
    from vncgate.audit import Audit
    from vncgate.config import Config
    from vncgate.console import replay
    from vncgate.console.relay import Relay
    from vncgate.console.streams import Sink
    from vncgate.store.redis import RedisStore
    from vncgate.store.sqlite import SqliteStore

    AnyStore = Union[SqliteStore, RedisStore]

# The housekeeper moved to housekeeping.py; it stays importable from here (front.server uses it).

log = logging.getLogger("vncgate.console.sessions")

T = TypeVar("T")

CHECKPOINT_INTERVAL = 1.0  # seconds between the housekeeper's checkpoints, at most


class Session:
    def __init__(self, details: store_module.ConnectionDetails, client: str, path: str,
                 backend: socket.socket | tls.TlsStream, backend_leftover: bytes, client_conn: object = None,
                 session_id: str | None = None) -> None:
        self.id = session_id or secrets.token_hex(6)
        self.details = details
        self.client = client
        self.path = path
        self.backend = backend
        self.backend_leftover = backend_leftover
        self.client_conn = client_conn
        self.started = time.time()
        self.relay: Relay | None = None
        self.recorder: recording.Recorder | None = None  # when the session is recorded
        self.stopped: str | None = None  # the reason, once stop() was called
        self._lock = threading.Lock()
        # The RFB security the gateway did with the backend: None (the client does its own),
        # the version line agreed (the client gets security type None), or the RfbError to tell it.
        self.security: bytes | rfb.RfbError | None = None
        self.policy = policy_module.Policy()
        self.enforcement: policy_module.Enforcement | None = None  # when the policy reads the client's stream
        self.use: str | None = None  # a single-use token's use: "consumed" or "resumed"
        self.resume_cookie: str | None = None  # the cookie its client may come back with (the websocket path)

    @property
    def extra_fds(self) -> int:
        """The fds this session holds besides its two sockets."""
        return ((fds.RECORDED_EXTRA if self.recorder else 0)
                + (fds.SERIAL_EXTRA if self.details.console_type == store_module.SERIAL else 0))

    @property
    def needs_greeting(self) -> bool:
        return self.security is not None

    def audit_fields(self) -> dict[str, Any]:
        return {"client": self.client, "path": self.path, "console_type": self.details.console_type,
                "instance_id": self.details.instance_id, "token_id": self.details.token_id,
                "session_id": self.id, **({"policy": self.policy.describe()} if self.policy.describe() else {}),
                **({"replay": self.details.replay} if self.details.replay else {})}

    def byte_counts(self) -> tuple[int, int]:
        return (self.relay.bytes_up, self.relay.bytes_down) if self.relay else (0, 0)

    @property
    def client_filter(self) -> Callable[[Sink], Sink] | None:
        """None, or the function that puts the policy's Filter in front of the backend's Sink."""
        return self.enforcement.filter if self.enforcement else None

    def stop(self, reason: str) -> None:
        """End the session from any thread, in its handshake with the client or relaying."""
        with self._lock:
            self.stopped = self.stopped or reason
            relay = self.relay
        if relay is not None:
            relay.stop(reason)
            return
        for conn in (self.client_conn, self.backend):  # a greeting in progress ends at once
            if conn is not None:
                tls.wake(conn)

    def start(self, relay: Relay) -> None:
        """Hand the session to its relay; a stop() that came first stops the relay too."""
        with self._lock:
            self.relay = relay
            stopped = self.stopped
        if stopped:
            relay.stop(stopped)


def new_gateway_id() -> str:
    """A gateway's name in the store: its host, its pid (what an operator can act on) and a
    random part, so a restarted gateway with the same pid is another gateway."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"


class SessionManager(SessionSecurity):
    def __init__(self, store: AnyStore, audit: Audit, backend_timeout: float, heartbeat: float, settings: Config,
                 backend_tls: ssl.SSLContext | None = None,
                 recordings: Recordings | None = None,
                 backend_allow: allow.BackendAllow | None = None, gateway_id: str | None = None) -> None:
        """settings: the policy keys of the config (resume_grace, paste_max_chars, input_idle_timeout)
        and max_sessions_per_token; backend_tls: the ssl context for consoles that speak VeNCrypt
        (tls.backend_context); recordings: the Recordings of record_dir; backend_allow: the allow.BackendAllow
        every backend connection is checked against (default: the one settings make)."""
        self.store = store
        self.settings = settings
        self.recordings = recordings or Recordings("")
        self.backend_allow = backend_allow or allow.BackendAllow.from_config(settings)
        self.audit = audit
        self.backend_timeout = backend_timeout
        self.heartbeat_interval = heartbeat
        # Per-token shares in the store; max_sessions_per_token read at each take (it may be lowered).
        self.shares = shares_module.TokenShares(store, heartbeat, lambda: self.settings.max_sessions_per_token)
        self.backend_tls = backend_tls
        self.gateway_id = gateway_id or new_gateway_id()
        self._live: dict[str, Session] = {}
        # session id -> (token hash, ended): shares to give back by the housekeeper (at a stop, in
        # one write; or again after the store refused it)
        self._to_release: dict[str, tuple[str, bool]] = {}
        self.extra_fds = 0  # fds the live sessions hold beyond their two sockets (fds.RECORDED_EXTRA...)
        self._to_record: dict[str, Session] = {}  # session id -> Session, not in the shared list yet
        self._to_remove: set[str] = set()  # session ids to take out of it
        self.store_work = threading.Event()  # set when there is something to write
        self._lock = threading.Lock()
        self._store_down = False
        # Handshakes answered 503 at once while the store hangs; a Redis call bounded as a whole
        # (its client's retries and reconnects each have a timeout of their own). SQLite's calls
        # stay in the handshake's thread: a hop to a worker costs more at the tail than it saves
        # (docs/performance.md, "The per-token share at scale").
        self.breaker = watch.Breaker(deadline=0.8 * backend_timeout if store.pushes_events else None)
        self._stopping_all = False
        self._next_checkpoint = 0.0
        # console type -> open_backend(details, timeout) for types not reached by backends.open_backend
        self.backend_openers: dict[str, Callable[[store_module.ConnectionDetails, float],
                                                 tuple[socket.socket, bytes]]] = {}
        self.single_use = resume_module.SingleUse(store, settings)
        self.event_handlers: dict[str, Callable[[set[str]], object]] = {}  # kind -> handler of other pushed events

    def _open_backend(self, details: store_module.ConnectionDetails, timeout: float) -> tuple[socket.socket, bytes]:
        return backends.open_backend(details, timeout, allow=self.backend_allow)

    def open(self, token: str, console_type: str, path: str, client: str, conn: object = None,
             resume_cookie: str | None = None) -> Session:
        """Validate the token and reach its backend; returns a Session or raises Refused.
        resume_cookie: the cookie the client presented, which lets a single-use token's client
        back in from another address when it is the one a gateway issued last for this token.
        Whatever fails on the way (Refused or not), the token's share, the backend, the single
        use and the recorder taken so far are given back before it is raised. Failed attempts
        are counted against the client's address by the caller (the throttle is the front's)."""
        fields = {"client": client, "path": path, "console_type": console_type}
        address = client.rsplit(":", 1)[0]
        if not token:
            raise Refused("no-token", **fields)
        fields["token_id"] = store_module.hash_token(token)[:8]
        session_id = secrets.token_hex(6)
        details = self._admit(token, console_type, session_id, fields)
        try:
            session = self._reach(details, client, path, conn, address, (token, resume_cookie), fields,
                                  session_id)
        except BaseException:
            if not self.shares.give_back({session_id: details.token_hash}, ended=False):
                self._release_later(session_id, details.token_hash, False)
            raise
        with self._lock:
            self._live[session.id] = session
            self._to_record[session.id] = session
            self.extra_fds += session.extra_fds
        self.store_work.set()
        if not isinstance(session.security, rfb.RfbError):
            self.audit.record("attempt", **session.audit_fields(), result="accepted", status=200,
                              **({"single_use": session.use} if session.use else {}),
                              **({"recording": session.id} if session.recorder else {}))
        return session

    def _reach(self, details: store_module.ConnectionDetails, client: str, path: str, conn: object, address: str,
               resume: tuple[str, str | None], fields: dict[str, Any], session_id: str) -> Session:
        """The session with its backend connected (and secured, and a single use taken), or Refused."""
        if details.replay:  # the "backend" is a player of the recording, speaking RFB itself
            player = self.recordings.player(details.replay, details.replay_speed)
            backend, leftover = player.socket, b""
        else:
            try:
                opener = self.backend_openers.get(details.console_type, self._open_backend)
                backend, leftover = opener(details, self.backend_timeout)
            except Refused as error:
                log.info("backend %s:%s for %s: %s", details.host, details.port, details.instance_id, error)
                raise Refused(error.reason, error.detail, **fields) from None
        session = Session(details, client, path, backend, leftover, conn, session_id)
        try:
            self._prepare(session, player if details.replay else None, address, resume, fields)
        except BaseException:
            self._abandon(session)
            raise
        return session

    def _prepare(self, session: Session, player: replay.Player | None, address: str,
                 resume: tuple[str, str | None], fields: dict[str, Any]) -> None:
        """The session's policy, backend security, single use and recorder."""
        details = session.details
        session.policy = policy_module.Policy.from_json(details.policy)
        # A replay has no input. A serial console's bytes are not RFB: they are enforced as a stream.
        serial = details.console_type == store_module.SERIAL
        if not details.replay and session.policy.reads_stream(self.settings):
            session.enforcement = policy_module.Enforcement(session.policy, self.settings, session.stop,
                                                            stream=serial)
        if player is not None:
            session.security = player.error  # None: the player greets the viewer itself
        elif details.backend_tls or details.backend_password is not None or (session.enforcement and not serial):
            # The gateway reads a policy's stream from ClientInit on: it does the handshake itself.
            session.security = self._authenticate_backend(session, fields)
        if session.policy.single_use and not isinstance(session.security, rfb.RfbError):
            session.use = self.single_use.consume(session, address, resume, fields)
        if self.recordings.wanted(details) and not isinstance(session.security, rfb.RfbError):
            session.recorder = self.recordings.recorder(session, lambda reason, detail: self.audit.record(
                "recording-stopped", **session.audit_fields(), recording=session.id, reason=reason, detail=detail))

    def _abandon(self, session: Session) -> None:
        """Give back what a session that never registered took: its backend, recorder (its
        share, and with it a single use, is given back by open())."""
        session.backend.close()
        if session.recorder:
            session.recorder.finish()

    def _admit(self, token: str, console_type: str, session_id: str,
               fields: dict[str, Any]) -> store_module.ConnectionDetails:
        """The token's details with a share taken for session_id, or Refused: validation and the
        share are one call to the breaker (with a deadline, one hop to its workers: Redis)."""
        try:
            details, live = self.breaker.call(self._validate_and_take, token, console_type, session_id)
        except store_module.TokenRejected as rejected:
            raise Refused(rejected.reason, **fields) from None
        except store_module.StoreError as error:
            if fds.exhausted():  # the store could not open a file: not its outage
                raise Refused("no-free-fds", str(error), **fields) from None
            if not self._store_down:  # one line per outage, not one per handshake
                log.error("token store unavailable, answering 503: %s", error)
                self._store_down = True
            raise Refused("store-unavailable", str(error), **fields) from None
        if self._store_down:
            log.warning("token store available again")
            self._store_down = False
        fields["instance_id"] = details.instance_id
        if live is not None:
            raise Refused("too-many-sessions", f"{live} sessions open", **fields)
        return details

    def _validate_and_take(self, token: str, console_type: str,
                           session_id: str) -> tuple[store_module.ConnectionDetails, int | None]:
        details = self.store.validate(token, console_type)
        return details, self.shares.take(details.token_hash, session_id, self.recordings.wanted(details))

    def begin(self, session: Session, relay: Relay) -> Callable[[], None]:
        """The session relays from now on, the backend's bytes at once (in a thread of the relay's
        own). Returns the rest, for the caller to run in a thread (the gateway: a fresh one, so the
        handshake's ends): the client's bytes to the session's end, then its unregistering and
        audit. Raises when the relay could not start (the caller discards the session then)."""
        session.start(relay)
        try:
            if session.enforcement:
                session.enforcement.start()
            relay.start()
        except BaseException:
            if session.enforcement:
                session.enforcement.cancel()
            raise
        return functools.partial(self._finish, session, relay)

    def _finish(self, session: Session, relay: Relay) -> None:
        """Relay the session to its end, then unregister and audit it (whatever ended it)."""
        reason: str | None = "internal-error"
        try:
            reason = relay.run()
        except BaseException:
            relay.stop("internal-error")  # the backend's way ends too
            raise
        finally:
            if session.enforcement:
                session.enforcement.cancel()
            self._forget(session)
            session.backend.close()  # closed by the relay already, unless it failed
            violation = session.enforcement.violation if session.enforcement else None
            self.audit.record("session-end", **session.audit_fields(), reason=reason,
                              bytes_up=relay.bytes_up, bytes_down=relay.bytes_down,
                              duration=round(time.time() - session.started, 3),
                              **({"detail": violation} if violation else {}),
                              **(session.recorder.finish() if session.recorder else {}))

    def discard(self, session: Session) -> None:
        """A session whose client went away before the relay started (or whose path failed
        before it): given back once, however often this is called."""
        if self._forget(session):
            self._abandon(session)

    def _forget(self, session: Session) -> bool:
        """Unregister a session; False when it was not registered (any more)."""
        with self._lock:
            if self._live.pop(session.id, None) is None:
                return False
            if self._to_record.pop(session.id, None) is None:  # written already: remove its row
                self._to_remove.add(session.id)
            self.extra_fds -= session.extra_fds
            if self._stopping_all:  # at a stop, the housekeeper's last round writes them all
                self._to_release[session.id] = (session.details.token_hash, True)
        if not self._stopping_all:
            if not self.shares.give_back({session.id: session.details.token_hash}):
                self._release_later(session.id, session.details.token_hash, True)
            self.store_work.set()
        return True

    def _release_later(self, session_id: str, token_hash: str, ended: bool) -> None:
        with self._lock:
            self._to_release[session_id] = (token_hash, ended)
        self.store_work.set()

    def write_session_list(self) -> None:
        """Write the sessions that started and ended since the last call to the shared list, then
        let the store fold its log (at most once a CHECKPOINT_INTERVAL), off the handshakes' path."""
        with self._lock:
            self.store_work.clear()
            records, self._to_record = list(self._to_record.values()), {}
            removals, self._to_remove = sorted(self._to_remove), set()
            releases, self._to_release = self._to_release, {}
        recorded = 0
        try:
            for session in records:
                details = session.details
                self.store.record_session(session.id, self.gateway_id, details.token_hash, details.instance_id,
                                          details.console_type, session.client, self.heartbeat_interval)
                recorded += 1
            if removals:  # one transaction: at SIGTERM thousands end at once
                self.store.remove_sessions(removals)
                removals = []
            for ended in (True, False):
                chosen = {sid: token_hash for sid, (token_hash, was) in releases.items() if was is ended}
                if chosen:
                    self.store.release_shares(chosen, ended)
                    releases = {sid: item for sid, item in releases.items() if sid not in chosen}
            if time.monotonic() >= self._next_checkpoint:
                self._next_checkpoint = time.monotonic() + CHECKPOINT_INTERVAL
                self.store.checkpoint()
        except store_module.StoreError:
            with self._lock:  # written on the next round; one that ended meanwhile has no row to write
                self._to_record.update((session.id, session) for session in records[recorded:]
                                       if session.id in self._live)
                self._to_remove.update(removals)
                self._to_release.update(releases)
            raise

    def live(self) -> list[Session]:
        with self._lock:
            return list(self._live.values())

    def byte_counts(self) -> dict[str, tuple[int, int]]:
        """{session id: (bytes up, bytes down)} of this gateway's sessions, counted now (the shared
        list has them as of the last heartbeat, up to touch_interval ago)."""
        return {session.id: session.byte_counts() for session in self.live()}

    def stop_all(self, reason: str) -> None:
        """End every session (the gateway is stopping)."""
        self._stopping_all = True
        for session in self.live():
            session.stop(reason)

    def heartbeat(self) -> None:
        """Touch the tokens in use and report the sessions' bytes; end the sessions whose
        token is gone (revoked) or that someone asked to kill."""
        self.write_session_list()
        sessions = self.live()
        existing = self.store.touch_hashes(sorted({session.details.token_hash for session in sessions}))
        to_kill = self.store.update_sessions({session.id: session.byte_counts() for session in sessions})
        self.shares.renew({session.id: session.details.token_hash for session in sessions})
        for session in sessions:
            if session.details.token_hash not in existing:
                self._end(session, "revoked")
            elif session.id in to_kill:
                self._end(session, "killed")

    def pushed(self, kind: str, ids: set[str]) -> None:
        """A revocation ("revoke", token hashes) or kill ("kill", session ids) pushed by the store:
        the affected sessions here end at once. Other kinds go to event_handlers[kind](ids)."""
        if kind not in ("revoke", "kill"):
            handler = self.event_handlers.get(kind)
            if handler is not None:
                handler(ids)
            return
        for session in self.live():
            if (session.details.token_hash if kind == "revoke" else session.id) in ids:
                self._end(session, "revoked" if kind == "revoke" else "killed")

    @staticmethod
    def _end(session: Session, reason: str) -> None:
        log.info("session %s: %s, closing", session.id,
                 f"token {session.details.token_id} revoked" if reason == "revoked" else "killed on request")
        session.stop(reason)
