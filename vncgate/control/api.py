"""The control-plane HTTP API (/api/v1/) and the operator's page (/admin/), on the one port.

On when api_keys_file is set. Each request carries `Authorization: Bearer KEY`; the
file keeps NAME:SHA256-HEX of each key, never the key, and is read again on SIGHUP.
JSON in and out, errors as {"error": sentence} from the refusal table, one request
per connection, bodies up to 64 KiB, a token bucket per key. Every API call is one
audit line (event "api": key name, action, instance, result), never with a token.
The operator's page is three static files served with a strict Content-Security-Policy;
its script talks to this same API with a key the operator types.

Minting is shared with the CLI (mint, console_json), so both hand out the same URLs
and the same JSON. This module keeps the request dispatch (ControlPlane: routing, keys
checked, body read, the admin page and openapi.json); the resources are split out:
api_consoles and api_sessions (the endpoints), api_keys (the key file), api_fields (body
and query validation), minting (tokens and their JSON, shared with the CLI).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from vncgate import store as store_module
from vncgate.control.api_consoles import _TOKEN_ID, ConsoleEndpoints
from vncgate.control.api_fields import _whole_number
from vncgate.control.api_keys import KeyFileError, hash_key, read_keys
from vncgate.control.api_screenshots import ScreenshotEndpoints
from vncgate.control.api_sessions import _SESSION_ID, SessionEndpoints
from vncgate.control.scope import KeyScope
from vncgate.front import throttle, web, websocket
from vncgate.refusals import Refused
from vncgate.store import watch

if TYPE_CHECKING:
    from vncgate.front.server import Gateway
    from vncgate.net import http

# Moved to api_keys and minting; still importable from here (the CLI uses api.mint, api.add_key...).

log = logging.getLogger("vncgate.control.api")

PREFIX = "/api/v1"
MAX_BODY = 64 * 1024
STORE_SHARE = 0.8  # of handshake_timeout: what a request's store calls may take together
HERE = os.path.dirname(os.path.abspath(__file__))
OPENAPI_FILE = os.path.join(HERE, "openapi.json")
ADMIN_DIR = os.path.join(HERE, "admin")
ADMIN_FILES = {"/admin/": "index.html", "/admin/admin.js": "admin.js", "/admin/admin.css": "admin.css"}
ADMIN_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' blob:; "
                "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


# -- the HTTP side ----------------------------------------------------------------------------

class _Route:
    """One API path: its template (/consoles/{token_id}), the handlers by method, and the shape
    of its id. The audit line names the template, with the id only when it has that shape
    (a token sent where a token id goes is not written down)."""

    def __init__(self, template: str, handlers: dict[str, Callable[..., tuple[int, Any]]],
                 id_shape: re.Pattern[str] | None = None) -> None:
        self.template = PREFIX + template
        self.handlers = handlers
        self.id_shape = id_shape
        self.pattern = re.compile(re.sub(r"\\\{[a-z_]+\\\}", "([^/]+)", re.escape(self.template)))

    def audit_path(self, groups: tuple[str, ...]) -> str:
        if groups and self.id_shape is not None and self.id_shape.fullmatch(groups[0]):
            return re.sub(r"\{[a-z_]+\}", lambda _placeholder: groups[0], self.template, count=1)
        return self.template


class _Call:
    """One API request as it is handled: what the audit line will say of it, and the store as
    the request sees it (every call through the gateway's breaker, within the request's deadline)."""

    def __init__(self, request: http.Request, client: str, store: watch.Bounded) -> None:
        self.request = request
        self.store: Any = store
        self.audit: dict[str, Any] = {"client": client, "method": request.method, "path": request.path, "key": "-",
                      "action": "-"}
        self.body_unread = False
        self.content_type = "application/json"  # an endpoint answering otherwise says so here
        self.key = "-"  # the client's address network (what bad keys are counted by)
        self.scope = KeyScope()  # the key's, once it is known


class ControlPlane(ConsoleEndpoints, SessionEndpoints, ScreenshotEndpoints):
    """The API and the admin page of one gateway."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.config = gateway.config
        self._keys = read_keys(self.config.api_keys_file)  # KeyFileError: the gateway does not start
        self._rate = throttle.FailureThrottle(self.config.api_burst, self.config.api_rate)
        # Bad API keys per address network: a bucket of their own, apart from console failures.
        self._bad_keys = throttle.FailureThrottle(self.config.failed_token_burst, self.config.failed_token_rate)
        self._routes = [
            _Route("/consoles", {"POST": self.create_console, "GET": self.list_consoles,
                                 "DELETE": self.revoke_by_instance}),
            _Route("/consoles/log", {"GET": self.console_log}),
            _Route("/consoles/follows", {"GET": self.list_follows}),
            _Route("/consoles/{token_id}", {"DELETE": self.revoke_token}, _TOKEN_ID),
            _Route("/consoles/{token_id}/screenshot", {"GET": self.console_screenshot}, _TOKEN_ID),
            _Route("/sessions", {"GET": self.list_sessions}),
            _Route("/sessions/{session_id}", {"DELETE": self.kill_session}, _SESSION_ID),
            _Route("/store", {"GET": self.store_state}),
            _Route("/recordings", {"GET": self.list_recordings}),
        ]

    def reload_keys(self) -> None:
        """SIGHUP: read the key file again; a bad file keeps the keys in use."""
        try:
            self._keys = read_keys(self.config.api_keys_file)
            log.info("reloaded %d API keys from %s", len(self._keys), self.config.api_keys_file)
        except KeyFileError as error:
            log.error("%s; keeping the previous API keys", error)

    @staticmethod
    def claims(request: http.Request) -> bool:
        return any(request.path == prefix or request.path.startswith(prefix + "/") for prefix in ("/api", "/admin"))

    def serve(self, conn: socket.socket, request: http.Request, leftover: bytes, client: str) -> None:
        """Answer one request on /api/ or /admin/; every outcome is answered here, never raised."""
        deadline = time.monotonic() + self.config.handshake_timeout
        if request.path == "/admin" or request.path.startswith("/admin/"):
            self._serve_admin(conn, request, deadline)
            return
        # The store's calls share one deadline, the reply keeps a fifth of the request's (as a handshake's).
        store_until = self.gateway.sessions.breaker.clock() + STORE_SHARE * self.config.handshake_timeout
        call = _Call(request, client, watch.Bounded(self.gateway.store, self.gateway.sessions.breaker, store_until))
        call.key = self.gateway.address_key(client.rsplit(":", 1)[0])
        try:
            status, payload = self._handle(call, conn, leftover, deadline)
            call.audit.update(result="ok", status=status)
        except Refused as refusal:
            status, payload = refusal.status, {"error": _sentence(refusal)}
            call.audit.update(result="rejected", **refusal.audit_fields())
        except store_module.StoreError as error:
            # A write that may have reached a store that then failed (or hung) may still be applied: say so.
            outage = Refused("store-outcome-unknown" if call.store.maybe_written else "store-unavailable", str(error))
            status, payload = outage.status, {"error": outage.sentence}
            call.audit.update(result="rejected", **outage.audit_fields())
        except Exception as error:  # the gateway's own fault: still a JSON answer and an audit line
            log.exception("%s %s: unexpected error in the API", request.method, call.audit["path"])
            fault = Refused("internal-error", type(error).__name__)
            status, payload = fault.status, {"error": fault.sentence}
            call.audit.update(result="rejected", **fault.audit_fields())
        if call.audit["key"] == "-" and status >= 400:
            call.audit["path"] = "-"  # unauthenticated: nothing of what the caller chose is written
        if call.audit.get("reason") == "throttled":  # an address out of bad keys: its lines sampled
            self.gateway.audit.sampled(call.key, "api", **call.audit)
        else:
            self.gateway.audit.record("api", **call.audit)
        headers = [("Content-Type", call.content_type if status < 400 else "application/json"),
                   ("Cache-Control", "no-store"),
                   ("X-Content-Type-Options", "nosniff")]
        if status == 405:
            headers.append(("Allow", ", ".join(self._methods(request.path))))
        body = json.dumps(payload).encode() if not isinstance(payload, bytes) else payload
        web.reply(conn, request, deadline, status, [*headers, ("Content-Length", str(len(body)))], body)
        if call.body_unread:
            _drain(conn, deadline)

    def _serve_admin(self, conn: socket.socket, request: http.Request, deadline: float) -> None:
        if request.path == "/admin":
            web.reply(conn, request, deadline, 308, [("Location", "/admin/"), ("Content-Length", "0")])
            return
        name = ADMIN_FILES.get(request.path)
        if name is None:
            raise Refused("not-found", "no such admin file")
        if request.method not in ("GET", "HEAD"):
            raise Refused("method-not-allowed", "the admin page is static")
        web.send_file(conn, request, deadline, os.path.join(ADMIN_DIR, name),
                      [("Content-Security-Policy", ADMIN_POLICY), ("X-Frame-Options", "DENY"),
                       ("Referrer-Policy", "no-referrer")])

    def _methods(self, path: str) -> list[str]:
        return sorted({method for route in self._routes if route.pattern.fullmatch(path)
                       for method in route.handlers})

    def _handle(self, call: _Call, conn: socket.socket, leftover: bytes, deadline: float) -> tuple[int, Any]:
        request = call.request
        call.body_unread = bool(request.header("content-length").strip("0 ")) or bool(
            request.header("transfer-encoding"))
        if request.path == f"{PREFIX}/openapi.json":
            call.audit["action"] = "openapi"
            if request.method not in ("GET", "HEAD"):
                raise Refused("method-not-allowed")
            with open(OPENAPI_FILE, "rb") as handle:
                return 200, handle.read()
        # The key first, before routing and the Origin: whatever a stranger sends costs its address
        # a bad key (and, once out of them, a sampled audit line); it learns nothing of the routes.
        self._authenticate(call)
        origin = request.header("origin")
        if origin and not websocket.origin_allowed(origin, self.config):
            raise Refused("origin-not-allowed", "API call from a foreign page")
        handler, arguments = self._route(call)
        body = self._read_body(call, conn, leftover, deadline) if request.method == "POST" else None
        return handler(call, body, *arguments)

    def _route(self, call: _Call) -> tuple[Callable[..., tuple[int, Any]], tuple[str, ...]]:
        path, method = call.request.path, call.request.method
        for route in self._routes:
            match = route.pattern.fullmatch(path)
            if match:
                call.audit["path"] = route.audit_path(match.groups())
                handlers = route.handlers
                handler = handlers.get(method)
                call.audit["action"] = (handler or next(iter(handlers.values()))).__name__.replace("_", "-")
                if handler is None:
                    raise Refused("method-not-allowed", f"{method} on {path}")
                return handler, match.groups()
        raise Refused("not-found", "no such API endpoint")

    def _authenticate(self, call: _Call) -> None:
        """The key's name, or Refused: one answer for a missing, wrong or removed key, after the
        same work (a hash and a comparison with every key). A valid key is admitted whatever
        its address's failures; bad ones are counted per address network, apart from consoles'."""
        scheme, _, presented = call.request.header("authorization").partition(" ")
        digest = hash_key(presented.strip() if scheme.lower() == "bearer" else "")
        name = None
        for candidate, expected in self._keys.items():
            if hmac.compare_digest(digest, expected.digest):
                name = candidate
                call.scope = expected.scope
        if name is None:
            if not self._bad_keys.allowed(call.key):
                raise Refused("throttled", "too many bad API keys from this address")
            self._bad_keys.failed(call.key)
            raise Refused("bad-api-key", "missing, unknown or removed API key")
        call.audit["key"] = name
        if not self._rate.take(name):
            raise Refused("api-rate-limited", f"key {name} over api_burst/api_rate")

    def _read_body(self, call: _Call, conn: socket.socket, leftover: bytes, deadline: float) -> dict[str, Any]:
        request = call.request
        if request.header("transfer-encoding"):
            raise Refused("invalid-request", "send the body with Content-Length, not Transfer-Encoding")
        length = _whole_number(request.header("content-length").strip() or "0", "Content-Length")
        if length > MAX_BODY:
            raise Refused("body-too-large", f"Content-Length {length}")
        if request.header("content-type").split(";")[0].strip().lower() != "application/json":
            raise Refused("not-json", f"Content-Type {request.header('content-type')!r}")
        if request.header("expect").lower() == "100-continue" and len(leftover) < length:
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = bytearray(leftover[:length])
        while len(body) < length:
            conn.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                chunk = conn.recv(min(65536, length - len(body)))
            except socket.timeout:
                raise Refused("handshake-timeout", "body not complete in time") from None
            if not chunk:
                raise Refused("invalid-request", "the body is shorter than Content-Length")
            body += chunk
        call.body_unread = False
        try:
            value = json.loads(body.decode("utf-8"), parse_constant=_no_constants)
        except (ValueError, RecursionError):
            raise Refused("invalid-request", "the body is not JSON") from None
        if not isinstance(value, dict):
            raise Refused("invalid-request", "the body must be a JSON object")
        return value

def _sentence(refusal: Refused) -> str:
    if refusal.reason == "invalid-request" and refusal.detail:
        return f"{refusal.sentence[:-1]}: {refusal.detail}."
    return refusal.sentence


def _no_constants(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _drain(conn: socket.socket, deadline: float) -> None:
    """After answering a request whose body was not read: read what the client still sends
    (bounded), so that closing does not reset the connection before it reads the answer."""
    try:
        conn.shutdown(socket.SHUT_WR)
        left = 4 * MAX_BODY
        while left > 0:
            conn.settimeout(max(0.001, min(1.0, deadline - time.monotonic())))
            chunk = conn.recv(min(65536, left))
            if not chunk:
                return
            left -= len(chunk)
    except OSError:
        pass
