"""What both store engines share: names, errors, tokens, the records they return, and
the calls of the blueprint written in terms of each engine's own few.

Tokens are handed to callers once, at mint time; a store keeps only their SHA-256
hash. Every time decision reads one injectable clock, so expiry and idleness are
tested without sleeping.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
import threading
import urllib.parse
from typing import Callable

from vncgate.store import sealing

XVP = "xvp-vnc"
WEBSOCKET = "ws-vnc"
SERIAL = "serial"
CONSOLE_TYPES = (XVP, WEBSOCKET, SERIAL)

TOKEN_BYTES = 32  # 256 bits; the blueprint asks for at least 128
STATES = ("live", "idle", "expired", "garbage")
# A token's last use may be kept this many seconds stale: a token touched less than this ago is
# not written again (a reconnect storm reads the token, it does not rewrite it each time); idle
# is measured in minutes (idle_timeout), so nothing tells the difference.
TOUCH_GRAIN = 1.0


class StoreError(Exception):
    """The store cannot be used; str() is one line for an operator."""


class StoreBusy(StoreError):
    """Another writer held the database past the busy timeout."""


class TokenRejected(Exception):
    """validate() refused a token; .reason is a short word for audit lines."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def new_token() -> str:
    """256 random bits, URL-safe; never starting with '-', which command lines read as an option."""
    while True:
        token = secrets.token_urlsafe(TOKEN_BYTES)
        if not token.startswith("-"):
            return token


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def access_url(base_url: str, console_type: str, token: str) -> str:
    """The URL a user opens: XVP's CONNECT target, or noVNC's (or the serial terminal's) page
    with the token in the fragment, which browsers never send; the page hands it to the
    WebSocket in Sec-WebSocket-Protocol (vncgate-token.js, serial.js), not in its URL."""
    base_url = base_url.rstrip("/")
    if console_type == XVP:
        return f"{base_url}/console?token={token}"
    if console_type == SERIAL:
        return f"{base_url}/serial.html#token={token}"
    prefix = urllib.parse.urlsplit(base_url).path.strip("/")
    ws_path = urllib.parse.quote(f"{prefix}/websockify".lstrip("/"), safe="")
    return f"{base_url}/vnc.html#autoconnect=1&path={ws_path}&token={token}"


@dataclasses.dataclass(frozen=True)
class ConnectionDetails:
    token_hash: str
    instance_id: str
    console_type: str
    host: str
    port: int
    access_url: str  # the base; the token is appended only when it is handed out
    internal_access_path: str
    created_at: float
    updated_at: float
    expires_at: float
    has_password: bool
    backend_tls: bool = False  # the console speaks VeNCrypt: the gateway does TLS to it
    record: bool = False  # its sessions are recorded (recording.py)
    replay: str = ""  # a replay token: the session id of the recording it plays, at replay_speed
    replay_speed: float = 1.0
    backend_password: bytes | None = None  # opened only by validate(), which holds the token
    policy: str = ""  # the console policy, JSON text that vncgate.console.policy reads; "" for none

    @property
    def token_id(self) -> str:
        """The short, safe name of a token in logs and listings."""
        return self.token_hash[:8]

    def is_expired(self, now: float) -> bool:
        return now > self.expires_at

    def is_idle(self, now: float, idle_timeout: float) -> bool:
        return now - self.updated_at > idle_timeout

    def state(self, now: float, idle_timeout: float) -> str:
        expired, idle = self.is_expired(now), self.is_idle(now, idle_timeout)
        if expired and idle:
            return "garbage"
        return "expired" if expired else "idle" if idle else "live"

    def garbage_at(self, idle_timeout: float) -> float:
        """When the token becomes garbage (expired AND idle), unless touched again."""
        return max(self.expires_at, self.updated_at + idle_timeout)

    def selected(self, now: float, idle_timeout: float, include_idle: bool = True, include_expired: bool = False,
                 only_idle: bool = False) -> bool:
        """The flags of the by-instance and by-host calls, as one rule."""
        if not include_expired and self.is_expired(now):
            return False
        if only_idle:
            return self.is_idle(now, idle_timeout)
        return include_idle or not self.is_idle(now, idle_timeout)


@dataclasses.dataclass(frozen=True)
class Follow:
    """A serial console the gateways keep attached to, logging it with nobody watching."""
    instance_id: str
    host: str
    port: int


@dataclasses.dataclass(frozen=True)
class LiveSession:
    session_id: str
    gateway_id: str
    token_hash: str
    instance_id: str
    console_type: str
    client: str
    started_at: float
    updated_at: float
    heartbeat: float
    bytes_up: int
    bytes_down: int
    kill_requested: bool

    def is_stale(self, now: float) -> bool:
        """Its gateway missed three heartbeats: it died without removing the row."""
        return now - self.updated_at > stale_after(self.heartbeat)


def stale_after(heartbeat: float) -> float:
    return 3 * heartbeat + 1


def consumption(state: tuple[str | None, str | None, float | None], address: str,
                cookie_hash: str | None, grace: float, now: float) -> str:
    """The single-use rule, for every engine's consume(token_hash, address, cookie_hash, grace):
    the first caller consumes the token; after that only the same client (the same address, or
    the same resume cookie's hash) may use it again, while a session of it is live or within
    grace seconds of the last one's end. state: (consumed_address, consumed_cookie, released_at),
    None for what is not set. Returns "consumed" or "resumed"; raises TokenRejected("refused-consumed").
    The engine then records the consumer's address (if new) and, as consumed_cookie, the hash of
    the cookie the gateway issues with this use (issued_hash; a presented cookie is never
    recorded), and marks a session live (released_at unset). released_at is read from the
    token's shares (redis_shares, sqlite_shares): None while another of its sessions is live on
    any gateway; release_shares sets it when the last one ends (the grace starts then)."""
    consumed_address, consumed_cookie, released_at = state
    if consumed_address is None:
        return "consumed"
    same_client = address == consumed_address or (cookie_hash is not None and cookie_hash == consumed_cookie)
    if same_client and (released_at is None or now - released_at <= grace):
        return "resumed"
    raise TokenRejected("refused-consumed")


class Store:
    """The blueprint's six calls and validate(), over what each engine provides:
    _insert, _find, _validate_row, _dump, list_details, touch_hashes, delete_hashes."""

    pushes_events = False  # True when revocations and kills reach every gateway at once (listen())
    shares_consoles = False  # True when console logs and serial I/O travel through the store (Redis)

    # What each engine provides (declared for the type checker only).
    _insert: Callable[[list[tuple[ConnectionDetails, bytes | None]]], None]
    _find: Callable[[str], list[ConnectionDetails]]
    _validate_row: Callable[[str, str, float], tuple[ConnectionDetails, bytes | None] | None]
    _dump: Callable[[], list[tuple[ConnectionDetails, bytes | None]]]
    list_details: Callable[..., list[ConnectionDetails]]
    touch_hashes: Callable[[list[str]], set[str]]
    delete_hashes: Callable[[list[str]], int]

    def __init__(self, token_ttl: float, idle_timeout: float, clock: Callable[[], float]) -> None:
        self.token_ttl = token_ttl
        self.idle_timeout = idle_timeout
        self.clock = clock

    def add_connection_details(self, instance_id: str, console_type: str, host: str, port: int | str,
                               internal_access_path: str = "", access_url: str = "", ttl: float | None = None,
                               backend_password: bytes | None = None, policy: str = "", backend_tls: bool = False,
                               record: bool = False, replay: str = "", replay_speed: float = 1.0,
                               held_key: bytes | None = None) -> str:
        """Mint a token for one console and return it; only its hash is kept. policy: the
        console policy's JSON text (vncgate.console.policy.Policy.to_json). record: its sessions are
        recorded; replay: a session id, whose recording the token plays instead of a console.
        held_key: the gateways' own key (screenshot_key_file), under which the password is
        sealed too."""
        if console_type not in CONSOLE_TYPES:
            raise ValueError(f"unknown console type {console_type!r}")
        token = new_token()
        now = self.clock()
        sealed = sealing.seal(token, backend_password, held_key) if backend_password is not None else None
        self._insert([(ConnectionDetails(
            hash_token(token), instance_id, console_type, host, int(port), access_url, internal_access_path or "",
            now, now, now + (self.token_ttl if ttl is None else ttl), sealed is not None, policy=policy,
            backend_tls=bool(backend_tls), record=bool(record), replay=replay, replay_speed=float(replay_speed)),
            sealed)])
        return token

    def get_connection_details(self, token: str) -> ConnectionDetails | None:
        """The token's details, or None when it is unknown or expired."""
        found = self._find(hash_token(token))
        return found[0] if found and not found[0].is_expired(self.clock()) else None

    def get_connection_details_by_instance(self, instance_id: str, include_idle: bool = True,
                                           include_expired: bool = False) -> list[ConnectionDetails]:
        return self.list_details(instance_id=instance_id, include_idle=include_idle,
                                 include_expired=include_expired)

    def get_connection_details_by_host(self, host: str, only_idle: bool = True) -> list[ConnectionDetails]:
        """Every token for consoles on host, expired ones too: this is a clean-up query."""
        return self.list_details(host=host, include_expired=True, only_idle=only_idle)

    def touch_connection_details(self, tokens: list[str]) -> int:
        """Mark tokens as in use now; returns how many exist."""
        return len(self.touch_hashes([hash_token(token) for token in tokens]))

    def delete_connection_details(self, tokens: list[str]) -> int:
        """Revoke tokens; returns how many were deleted."""
        return self.delete_hashes([hash_token(token) for token in tokens])

    def validate(self, token: str, console_type: str) -> ConnectionDetails:
        """The details for a new connection, touched; raises TokenRejected."""
        now = self.clock()
        found = self._validate_row(hash_token(token), console_type, now)
        if found is None:
            raise TokenRejected("unknown-token")
        details, sealed = found
        if details.is_expired(now):
            raise TokenRejected("expired-token")
        if details.console_type != console_type:
            raise TokenRejected("wrong-console-type")
        password = None
        if sealed is not None:
            try:
                password = sealing.unseal(token, sealed)
            except sealing.SealError:
                raise TokenRejected("sealed-password-unreadable") from None
        return dataclasses.replace(details, updated_at=now, backend_password=password)

    def shared_secret(self, name: str) -> str:
        """A random secret (hex) under name, the same for every gateway on this store: made by
        the first that asks, kept by the store. Raises StoreError."""
        raise StoreError(f"{type(self).__name__} keeps no shared secrets")

    def listen(self, on_event: Callable[[str, set[str]], None], on_reconnect: Callable[[], None],
               stopping: threading.Event, poll: float = 0.5) -> None:
        """Pushed revocations and kills, for an engine whose pushes_events is True (RedisStore.listen)."""
        raise StoreError(f"{type(self).__name__} pushes no events")

    def checkpoint(self) -> None:
        """Fold a write-ahead log into the store, off the handshakes' path (the housekeeper calls
        it); nothing to do for an engine without one."""

    def copy_tokens_to(self, other: Store) -> tuple[int, int]:
        """Copy every token that is not garbage, hashes and sealed secrets as they are, into
        another store (migrate); returns (copied, garbage skipped)."""
        now = self.clock()
        rows = self._dump()
        kept = [(details, sealed) for details, sealed in rows
                if details.state(now, self.idle_timeout) != "garbage"]
        if kept:
            other._insert(kept)
        return len(kept), len(rows) - len(kept)

