"""The control-plane HTTP API (/api/v1/) and the operator's page (/admin/), on the one port.

On when api_keys_file is set. Each request carries `Authorization: Bearer KEY`; the
file keeps NAME:SHA256-HEX of each key, never the key, and is read again on SIGHUP.
JSON in and out, errors as {"error": sentence} from the refusal table, one request
per connection, bodies up to 64 KiB, a token bucket per key. Every API call is one
audit line (event "api": key name, action, instance, result), never with a token.
The operator's page is three static files served with a strict Content-Security-Policy;
its script talks to this same API with a key the operator types.

Minting is shared with the CLI (mint, console_json), so both hand out the same URLs
and the same JSON.
"""

import dataclasses
import datetime
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import socket
import time

from vncgate import store as store_module
from vncgate.console import policy as policy_module
from vncgate.console import serial as consoles
from vncgate.control import libvirt
from vncgate.control.api_screenshots import ScreenshotEndpoints
from vncgate.front import throttle, web, websocket
from vncgate.refusals import Refused

log = logging.getLogger("vncgate.control.api")

PREFIX = "/api/v1"
MAX_BODY = 64 * 1024
HERE = os.path.dirname(os.path.abspath(__file__))
OPENAPI_FILE = os.path.join(HERE, "openapi.json")
ADMIN_DIR = os.path.join(HERE, "admin")
ADMIN_FILES = {"/admin/": "index.html", "/admin/admin.js": "admin.js", "/admin/admin.css": "admin.css"}
ADMIN_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' blob:; "
                "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
KEY_PREFIX = "vgk_"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TOKEN_ID = re.compile(r"[0-9a-f]{8,64}")
_SESSION_ID = re.compile(r"[0-9a-f]{1,64}")
# The path a console type arrives on (live session rows keep the type).
_PATH_OF_TYPE = {store_module.XVP: "xvp", store_module.WEBSOCKET: "websocket", store_module.SERIAL: "serial"}


def iso(timestamp):
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- API keys ---------------------------------------------------------------------------------

class KeyFileError(Exception):
    """The key file cannot be read or has a bad line; str() is one line."""


def hash_key(key):
    return hashlib.sha256(key.encode()).hexdigest()


def read_keys(path):
    """{name: sha256 hex} from the key file; blank lines and # comments are skipped."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as error:
        raise KeyFileError(f"cannot read api_keys_file {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise KeyFileError(f"api_keys_file {path} is not UTF-8 text") from None
    keys = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, digest = line.partition(":")
        if not _NAME.fullmatch(name) or not _HEX64.fullmatch(digest.lower()):
            raise KeyFileError(f"{path}:{number}: not NAME:SHA256-HEX")
        if name in keys:
            raise KeyFileError(f"{path}:{number}: key name {name!r} appears twice")
        keys[name] = digest.lower()
    return keys


def add_key(path, name):
    """A new key named name, its hash appended to the file (made 0600); returns the key."""
    if not _NAME.fullmatch(name):
        raise KeyFileError(f"key name {name!r}: letters, digits, '.', '_', '-' (at most 64), "
                           "starting with a letter or digit")
    keys = read_keys(path) if os.path.exists(path) else {}
    if name in keys:
        raise KeyFileError(f"{path} already has a key named {name!r}")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as handle:
            handle.write(f"{name}:{hash_key(key)}\n")
    except OSError as error:
        raise KeyFileError(f"cannot write api_keys_file {path}: {error.strerror}") from None
    return key


def remove_key(path, name):
    """Delete the named key's line (rewritten atomically); the gateway drops it on SIGHUP."""
    if name not in read_keys(path):
        raise KeyFileError(f"{path} has no key named {name!r}")
    with open(path, encoding="utf-8") as handle:
        kept = [line for line in handle if line.strip().partition(":")[0] != name]
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.writelines(kept)
        os.replace(temporary, path)
    except OSError as error:
        raise KeyFileError(f"cannot write api_keys_file {path}: {error.strerror}") from None


# -- minting, shared with the CLI -------------------------------------------------------------

def mint(config, store, console_type, host, port, instance=None, internal_path="", ttl=None, password=None,
         policy="", backend_tls=False, record=False, replay="", replay_speed=1.0):
    """A new token for one console; returns (token, details, access URL). policy: Policy.to_json();
    record, replay, replay_speed: see Store.add_connection_details."""
    base = {store_module.XVP: f"{config.base_url}/console",
            store_module.SERIAL: f"{config.base_url}/serial.html"}.get(console_type, f"{config.base_url}/vnc.html")
    token = store.add_connection_details(instance or f"{host}:{port}", console_type, host, port,
                                         internal_access_path=internal_path, access_url=base, ttl=ttl,
                                         backend_password=password, policy=policy, backend_tls=backend_tls,
                                         record=record, replay=replay, replay_speed=replay_speed)
    return token, store.get_connection_details(token), store_module.access_url(config.base_url, console_type, token)


def console_json(token, details, url):
    return {"token": token, "token_id": details.token_id, "access_url": url, "console_type": details.console_type,
            "instance_id": details.instance_id, "host": details.host, "port": details.port,
            "internal_access_path": details.internal_access_path, "expires_at": iso(details.expires_at),
            "has_password": details.has_password, "policy": policy_fields(details),
            "backend_tls": details.backend_tls}


def policy_fields(details):
    """The policy as JSON shows it: every field, with its value."""
    return dataclasses.asdict(policy_module.Policy.from_json(details.policy))


def token_json(row, now, idle_timeout):
    return {"token_id": row.token_id, "instance_id": row.instance_id, "console_type": row.console_type,
            "host": row.host, "port": row.port, "internal_access_path": row.internal_access_path,
            "created_at": iso(row.created_at), "updated_at": iso(row.updated_at),
            "expires_at": iso(row.expires_at), "state": row.state(now, idle_timeout),
            "has_password": row.has_password, "policy": policy_fields(row), "backend_tls": row.backend_tls}


def session_json(row, now, counts=None):
    """counts: (bytes up, bytes down) counted now, when the session is this gateway's."""
    return {"session_id": row.session_id, "gateway_id": row.gateway_id, "token_id": row.token_hash[:8],
            "instance_id": row.instance_id, "console_type": row.console_type,
            "path": _PATH_OF_TYPE.get(row.console_type, row.console_type), "client": row.client,
            "started_at": iso(row.started_at), "updated_at": iso(row.updated_at),
            "duration": round(max(0.0, now - row.started_at), 1),
            **dict(zip(("bytes_up", "bytes_down"), counts or (row.bytes_up, row.bytes_down))),
            "kill_requested": bool(row.kill_requested)}


# -- the HTTP side ----------------------------------------------------------------------------

class _Call:
    """One API request as it is handled: what the audit line will say of it."""

    def __init__(self, request, client):
        self.request = request
        self.audit = {"client": client, "method": request.method, "path": request.path, "key": "-",
                      "action": "-"}
        self.body_unread = False
        self.content_type = "application/json"  # an endpoint answering otherwise says so here


class ControlPlane(ScreenshotEndpoints):
    """The API and the admin page of one gateway."""

    def __init__(self, gateway):
        self.gateway = gateway
        self.config = gateway.config
        self._keys = read_keys(self.config.api_keys_file)  # KeyFileError: the gateway does not start
        self._rate = throttle.FailureThrottle(self.config.api_burst, self.config.api_rate)
        self._routes = [
            (re.compile(re.escape(PREFIX) + r"/consoles"), {"POST": self.create_console, "GET": self.list_consoles,
                                                          "DELETE": self.revoke_by_instance}),
            (re.compile(re.escape(PREFIX) + r"/consoles/log"), {"GET": self.console_log}),
            (re.compile(re.escape(PREFIX) + r"/consoles/([^/]+)"), {"DELETE": self.revoke_token}),
            (re.compile(re.escape(PREFIX) + r"/consoles/([^/]+)/screenshot"), {"GET": self.console_screenshot}),
            (re.compile(re.escape(PREFIX) + r"/sessions"), {"GET": self.list_sessions}),
            (re.compile(re.escape(PREFIX) + r"/sessions/([^/]+)"), {"DELETE": self.kill_session}),
            (re.compile(re.escape(PREFIX) + r"/store"), {"GET": self.store_state}),
        ]

    def reload_keys(self):
        """SIGHUP: read the key file again; a bad file keeps the keys in use."""
        try:
            self._keys = read_keys(self.config.api_keys_file)
            log.info("reloaded %d API keys from %s", len(self._keys), self.config.api_keys_file)
        except KeyFileError as error:
            log.error("%s; keeping the previous API keys", error)

    @staticmethod
    def claims(request):
        return any(request.path == prefix or request.path.startswith(prefix + "/") for prefix in ("/api", "/admin"))

    def serve(self, conn, request, leftover, client):
        """Answer one request on /api/ or /admin/; every outcome is answered here, never raised."""
        deadline = time.monotonic() + self.config.handshake_timeout
        if request.path == "/admin" or request.path.startswith("/admin/"):
            self._serve_admin(conn, request, deadline)
            return
        call = _Call(request, client)
        try:
            status, payload = self._handle(call, conn, leftover, deadline)
            call.audit.update(result="ok", status=status)
        except Refused as refusal:
            status, payload = refusal.status, {"error": _sentence(refusal)}
            call.audit.update(result="rejected", **refusal.audit_fields())
        except store_module.StoreError as error:
            outage = Refused("store-unavailable", str(error))
            status, payload = outage.status, {"error": outage.sentence}
            call.audit.update(result="rejected", **outage.audit_fields())
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

    def _serve_admin(self, conn, request, deadline):
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

    def _methods(self, path):
        return sorted({method for pattern, handlers in self._routes if pattern.fullmatch(path)
                       for method in handlers})

    def _handle(self, call, conn, leftover, deadline):
        request = call.request
        call.body_unread = bool(request.header("content-length").strip("0 ")) or bool(
            request.header("transfer-encoding"))
        if request.path == f"{PREFIX}/openapi.json":
            call.audit["action"] = "openapi"
            if request.method not in ("GET", "HEAD"):
                raise Refused("method-not-allowed")
            with open(OPENAPI_FILE, "rb") as handle:
                return 200, handle.read()
        handler, arguments = self._route(call)
        origin = request.header("origin")
        if origin and not websocket.origin_allowed(origin, self.config):
            raise Refused("origin-not-allowed", "API call from a foreign page")
        self._authenticate(call)
        body = self._read_body(call, conn, leftover, deadline) if request.method == "POST" else None
        return handler(call, body, *arguments)

    def _route(self, call):
        path, method = call.request.path, call.request.method
        for pattern, handlers in self._routes:
            match = pattern.fullmatch(path)
            if match:
                handler = handlers.get(method)
                call.audit["action"] = (handler or next(iter(handlers.values()))).__name__.replace("_", "-")
                if handler is None:
                    raise Refused("method-not-allowed", f"{method} on {path}")
                return handler, match.groups()
        raise Refused("not-found", "no such API endpoint")

    def _authenticate(self, call):
        """The key's name, or Refused: one answer for a missing, wrong or removed key, after the
        same work (a hash and a comparison with every key)."""
        address = call.audit["client"].rsplit(":", 1)[0]
        failures = self.gateway.sessions.throttle
        if not failures.allowed(address):
            raise Refused("throttled", "too many bad API keys from this address")
        scheme, _, presented = call.request.header("authorization").partition(" ")
        digest = hash_key(presented.strip() if scheme.lower() == "bearer" else "")
        name = None
        for candidate, expected in self._keys.items():
            if hmac.compare_digest(digest, expected):
                name = candidate
        if name is None:
            failures.failed(address)
            raise Refused("bad-api-key", "missing, unknown or removed API key")
        call.audit["key"] = name
        if not self._rate.take(name):
            raise Refused("api-rate-limited", f"key {name} over api_burst/api_rate")

    def _read_body(self, call, conn, leftover, deadline):
        request = call.request
        if request.header("transfer-encoding"):
            raise Refused("invalid-request", "send the body with Content-Length, not Transfer-Encoding")
        length_text = request.header("content-length").strip() or "0"
        if not length_text.isdigit():
            raise Refused("invalid-request", "Content-Length is not a number")
        length = int(length_text)
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

    # -- endpoints: each returns (status, JSON value) ------------------------------------------

    def create_console(self, call, body):
        fields = _Fields(body)
        console_type = fields.choice("type", store_module.CONSOLE_TYPES, store_module.WEBSOCKET)
        ttl = fields.number("ttl")
        policy = policy_module.Policy(view_only=fields.flag("view_only"), single_use=fields.flag("single_use"),
                                      paste_as_keys=fields.flag("paste_as_keys"),
                                      input_idle=fields.number("input_idle") or 0.0)
        backend_tls = fields.flag("backend_tls")
        if "domain" in body:
            domain, uri = fields.text("domain"), fields.text("libvirt", "")
            call.audit["instance"] = instance = fields.text("instance", domain)
            fields.done()
            try:
                console = libvirt.console_of(domain, uri or None)
            except libvirt.DomainError as error:
                raise Refused(error.reason, str(error)) from None
            host, port, internal_path, password = console.host, console.port, "", console.password
        else:
            host, port = fields.text("host"), fields.port("port")
            call.audit["instance"] = instance = fields.text("instance", f"{host}:{port}")
            internal_path = fields.text("internal_path", "")
            password = fields.text("password", "")
            fields.done()
            password = password.encode() if password else None
        token, details, url = mint(self.config, self.gateway.store, console_type, host, port, instance,
                                   internal_path, ttl, password, policy.to_json(), backend_tls)
        call.audit["token_id"] = details.token_id
        return 201, console_json(token, details, url)

    def list_consoles(self, call, _body):
        query = _Query(call.request, ("instance", "host"))
        call.audit["instance"] = query.get("instance") or "-"
        store = self.gateway.store
        now = store.clock()
        rows = store.list_details(instance_id=query.get("instance"), host=query.get("host"), include_expired=True)
        return 200, [token_json(row, now, self.config.idle_timeout) for row in rows]

    def console_log(self, call, _body):
        """What a followed serial console printed (Nova's get_console_output): all that is
        kept, or its last `tail` lines."""
        query = _Query(call.request, ("instance", "tail"))
        instance, tail = query.get("instance"), query.get("tail")
        if not instance:
            raise Refused("invalid-request", "name the console: ?instance=ID")
        call.audit["instance"] = instance
        if tail is not None and not (tail.isdigit() and int(tail) > 0):
            raise Refused("invalid-request", "tail must be a whole number above 0")
        output = consoles.read_log(self.config.console_log_dir, instance, int(tail) if tail else None)
        if output is None:
            raise Refused("not-found", f"no console log for {instance}: it was never followed")
        return 200, {"instance_id": instance, "output": output.decode("utf-8", "replace")}

    def revoke_by_instance(self, call, _body):
        query = _Query(call.request, ("instance",))
        instance = query.get("instance")
        if not instance:
            raise Refused("invalid-request", "name the tokens to revoke: ?instance=ID")
        call.audit["instance"] = instance
        hashes = {row.token_hash for row in self.gateway.store.list_details(instance_id=instance,
                                                                            include_expired=True)}
        revoked = self.gateway.store.delete_by_instance(instance)
        self._end_local_sessions(lambda session: session.details.token_hash in hashes, "revoked")
        return 200, {"revoked": revoked}

    def revoke_token(self, call, _body, token_id):
        if not _TOKEN_ID.fullmatch(token_id):
            raise Refused("not-found", "not a token id")
        store = self.gateway.store
        rows = [row for row in store.list_details(include_expired=True) if row.token_hash.startswith(token_id)]
        if not rows:
            raise Refused("not-found", f"no token {token_id}")
        if len(rows) > 1:
            raise Refused("ambiguous-token-id", f"{len(rows)} tokens start with {token_id}")
        call.audit.update(instance=rows[0].instance_id, token_id=rows[0].token_id)
        revoked = store.delete_hashes([rows[0].token_hash])
        if not revoked:
            raise Refused("not-found", f"token {token_id} went meanwhile")
        self._end_local_sessions(lambda session: session.details.token_hash == rows[0].token_hash, "revoked")
        return 200, {"revoked": revoked}

    def list_sessions(self, call, _body):
        query = _Query(call.request, ("instance",))
        call.audit["instance"] = query.get("instance") or "-"
        store = self.gateway.store
        now = store.clock()
        here = self.gateway.sessions.byte_counts()
        return 200, [session_json(row, now, here.get(row.session_id))
                     for row in store.list_sessions(instance_id=query.get("instance"))]

    def kill_session(self, call, _body, session_id):
        if not _SESSION_ID.fullmatch(session_id):
            raise Refused("not-found", "not a session id")
        call.audit["session_id"] = session_id
        store = self.gateway.store
        found = [row for row in store.list_sessions() if row.session_id == session_id]
        if found:
            call.audit["instance"] = found[0].instance_id
        if not found or not store.request_kill(session_ids=[session_id]):
            raise Refused("not-found", f"no live session {session_id}")
        # A session of this gateway ends now; one of another gateway within its touch_interval.
        self._end_local_sessions(lambda session: session.id == session_id, "killed")
        return 202, {"kill_requested": 1}

    def store_state(self, call, _body):
        store = self.gateway.store
        try:
            tokens = store.count_by_state()
        except store_module.StoreError as error:
            log.debug("/api/v1/store: %s", error)
            tokens = None
        return 200, {"up": tokens is not None, "tokens": tokens, "gateway_id": self.gateway.sessions.gateway_id,
                     "sessions_here": len(self.gateway.sessions.live())}

    def _end_local_sessions(self, chosen, reason):
        for session in self.gateway.sessions.live():
            if chosen(session):
                session.stop(reason)


def _sentence(refusal):
    if refusal.reason == "invalid-request" and refusal.detail:
        return f"{refusal.sentence[:-1]}: {refusal.detail}."
    return refusal.sentence


def _no_constants(name):
    raise ValueError(f"{name} is not JSON")


def _drain(conn, deadline):
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


class _Fields:
    """Validation of a JSON body's fields, with the CLI's rules; unknown fields are refused."""

    def __init__(self, body):
        self.body = body
        self.seen = set()

    def _take(self, name, default):
        self.seen.add(name)
        if name not in self.body:
            if default is _REQUIRED:
                raise Refused("invalid-request", f"{name} is required")
            return default, False
        return self.body[name], True

    def text(self, name, default=None):
        default = _REQUIRED if default is None else default
        value, given = self._take(name, default)
        if given and (not isinstance(value, str) or not value or len(value) > 1024
                      or any(ord(char) < 32 for char in value)):
            raise Refused("invalid-request", f"{name} must be a non-empty string without control characters")
        return value

    def port(self, name):
        value, _ = self._take(name, _REQUIRED)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise Refused("invalid-request", f"{name} must be a whole number from 1 to 65535")
        return value

    def number(self, name):
        value, given = self._take(name, None)
        if given and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
                      or value > 10 * 365 * 86400):
            raise Refused("invalid-request", f"{name} must be a number of seconds above 0")
        return value

    def flag(self, name):
        value, _ = self._take(name, False)
        if not isinstance(value, bool):
            raise Refused("invalid-request", f"{name} must be true or false")
        return value

    def choice(self, name, choices, default):
        value, _ = self._take(name, default)
        if value not in choices:
            raise Refused("invalid-request", f"{name} must be one of {', '.join(choices)}")
        return value

    def done(self):
        unknown = sorted(set(self.body) - self.seen)
        if unknown:
            raise Refused("invalid-request", f"unknown field {unknown[0]}")


_REQUIRED = object()


class _Query:
    """A request's query parameters: only the named ones, each at most once."""

    def __init__(self, request, names):
        unknown = sorted(set(request.query) - set(names))
        if unknown:
            raise Refused("invalid-request", f"unknown query parameter {unknown[0]}")
        self.values = {name: request.query_value(name) or None for name in names}

    def get(self, name):
        return self.values[name]
