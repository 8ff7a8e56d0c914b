"""The small web side: noVNC's files from web_root, the serial terminal's from the package,
/healthz and /metrics.

A file is served only from inside web_root: the decoded path may not climb or
hide ('.', '..', empty segments, backslashes, NULs), and the file it names, links
resolved, must be a regular file that is still inside web_root. Every reply has
one deadline. Errors are raised as Refused, which the server answers and audits
like any other refusal. /metrics is served only to the networks in metrics_allow.
"""

from __future__ import annotations

import email.utils
import ipaddress
import logging
import mimetypes
import os
import socket
import stat
import struct
import time
import urllib.parse
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, BinaryIO

from vncgate import store as store_module
from vncgate.config import Config
from vncgate.console import streams
from vncgate.net import http
from vncgate.refusals import Refused

if TYPE_CHECKING:
    from vncgate.front.server import Gateway

log = logging.getLogger("vncgate.front.web")

# The built-in table only, so every host answers alike; plus the types noVNC needs that it lacks.
_TYPES = mimetypes.MimeTypes()
for _extension, _type in ((".js", "text/javascript"), (".oga", "audio/ogg"), (".woff", "font/woff"),
                          (".ttf", "font/ttf")):
    _TYPES.add_type(_type, _extension)
_UTF8_TYPES = ("text/", "application/json", "image/svg+xml")
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SEND_CHUNK = 64 * 1024
MAX_TRANSFORMED = 1 << 20  # vnc.html is 20 KiB: a page changed on the way out is read whole, up to this
# The gateway's own pages (the serial terminal and its vendored xterm.js), whatever web_root is.
STATIC_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
STATIC_PATHS = ("/serial.html", "/serial.js", "/serial.css", "/xterm/", "/vncgate-token.js")
# noVNC's page, served with one script of ours ahead of noVNC's modules: it hands the token from
# the fragment to the WebSocket as a Sec-WebSocket-Protocol item (wsframes.token_protocol).
NOVNC_PAGE = "/vnc.html"
TOKEN_SCRIPT = b'<script src="vncgate-token.js"></script>\n'
ALLOWED_METHODS = "GET, HEAD"


def serve(gateway: Gateway, conn: socket.socket, request: http.Request, client: str) -> None:
    """Answer one request; raises Refused (audited and answered by the server) when it cannot."""
    if request.method not in ("GET", "HEAD"):
        raise Refused("method-not-allowed", f"method {request.method[:16]} on the web side",
                      reply_headers=[("Allow", ALLOWED_METHODS)])
    # Every reply has one overall deadline, not only a timeout per send: a reader this slow
    # for files this small is holding a thread, not reading.
    deadline = time.monotonic() + gateway.config.handshake_timeout
    page = {"/healthz": health, "/metrics": metrics}.get(request.path)
    if page:
        status, content_type, body = page(gateway, client)
        reply(conn, request, deadline, status, [("Content-Type", content_type),
                                                ("Content-Length", str(len(body))),
                                                ("Cache-Control", "no-store")], body)
    else:
        root = STATIC_ROOT if request.path.startswith(STATIC_PATHS) else gateway.config.web_root
        name = file_path(root, request.path)
        headers = page_headers(gateway.config) if name.endswith((".html", ".htm")) else []
        send_file(conn, request, deadline, name, headers,
                  transform=_with_token_script if request.path == NOVNC_PAGE else None)


def page_headers(config: Config) -> list[tuple[str, str]]:
    """What every page of the web side is served with: framed only by its own origin and the
    operator's panels (frame_ancestors), and its scripts may connect to its own origin only, so
    noVNC on the gateway's origin cannot be pointed at another VNC server by a link's fragment."""
    ancestors = " ".join(("'self'", *config.frame_ancestors))
    headers = [("Content-Security-Policy", f"frame-ancestors {ancestors}; connect-src 'self'")]
    # X-Frame-Options knows one origin at most; where CSP lists panels, browsers follow CSP.
    if not config.frame_ancestors:
        headers.append(("X-Frame-Options", "SAMEORIGIN"))
    return headers


def _with_token_script(page: bytes) -> bytes:
    """noVNC's vnc.html with our script at the end of its head, else of the page: a classic
    script runs where it stands, so before noVNC's modules, which run once the page is parsed."""
    end = page.lower().find(b"</head>")
    return page[:end] + TOKEN_SCRIPT + page[end:] if end >= 0 else page + TOKEN_SCRIPT


def reply(conn: socket.socket, request: http.Request, deadline: float, status: int, headers: Iterable[tuple[str, str]],
          body: bytes = b"", file: BinaryIO | None = None) -> None:
    """One whole reply; HEAD gets the same head and no body. One request per connection."""
    _send_by(conn, deadline, http.response(status, [*headers, ("Connection", "close")],
                                           b"" if request.method == "HEAD" else body))
    if file is not None and request.method == "GET":
        while chunk := file.read(SEND_CHUNK):
            _send_by(conn, deadline, chunk)


def _send_by(conn: socket.socket, deadline: float, data: bytes) -> None:
    try:
        streams.DeadlineSocket(conn, deadline - time.monotonic()).sendall(data)
    except socket.timeout:
        # Cut, not closed: a graceful close would let the kernel go on delivering what
        # its buffers hold to this slow reader. Linger 0 makes the close a reset.
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raise


# -- files ------------------------------------------------------------------------------

def file_path(web_root: str, path: str) -> str:
    """The real path under web_root that a request path names.
    Refused bad-request for a path that climbs or hides, not-found when it can name nothing there."""
    if not web_root:
        raise Refused("not-found", "no web_root configured")
    if not path.startswith("/"):
        raise Refused("bad-request", "not a path")
    parts = urllib.parse.unquote(path)[1:].split("/")
    if ("" in parts[:-1] or any(part in (".", "..") or "\\" in part or "\0" in part for part in parts)):
        raise Refused("bad-request", "path climbs or hides")
    root = os.path.realpath(web_root)
    found = os.path.realpath(os.path.join(root, *parts))
    if os.path.commonpath([root, found]) != root:
        raise Refused("not-found", "link out of web_root")
    return found


def open_regular(name: str) -> tuple[BinaryIO, os.stat_result]:
    """(file, stat) of a regular file, or Refused not-found. Nothing else is opened for
    long: a directory, FIFO or device is closed before it is refused."""
    try:
        # O_NONBLOCK: opening a FIFO that sits in web_root must not hang the thread.
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        raise Refused("not-found") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise Refused("not-found", "not a regular file")
        return os.fdopen(fd, "rb"), info
    except BaseException:
        os.close(fd)
        raise


def send_file(conn: socket.socket, request: http.Request, deadline: float, name: str,
              extra_headers: Iterable[tuple[str, str]] = (), transform: Callable[[bytes], bytes] | None = None) -> None:
    """A file, or (transform) what transform makes of its bytes (a small page)."""
    file, info = open_regular(name)
    with file:
        etag = f'"{info.st_mtime_ns:x}-{info.st_size:x}{"-t" if transform else ""}"'
        # no-cache: browsers keep the files but ask each time, so a noVNC upgrade shows at once.
        validators = [("Last-Modified", email.utils.formatdate(info.st_mtime, usegmt=True)), ("ETag", etag),
                      ("Cache-Control", "no-cache"), *extra_headers]
        if _unchanged(request, etag, info.st_mtime):
            reply(conn, request, deadline, 304, validators)
            return
        body = transform(file.read(MAX_TRANSFORMED)) if transform else b""
        reply(conn, request, deadline, 200, [("Content-Type", content_type(name)),
                                             ("Content-Length", str(len(body) if transform else info.st_size)),
                                             ("X-Content-Type-Options", "nosniff"), *validators],
              body=body, file=None if transform else file)


def _unchanged(request: http.Request, etag: str, mtime: float) -> bool:
    """If-None-Match decides when it is sent, else If-Modified-Since (RFC 9110, 13.2.2)."""
    tags = request.header("if-none-match")
    if tags:
        return tags.strip() == "*" or etag in (tag.strip().removeprefix("W/") for tag in tags.split(","))
    since = request.header("if-modified-since")
    try:
        return bool(since) and int(mtime) <= email.utils.parsedate_to_datetime(since).timestamp()
    except (TypeError, ValueError, OverflowError, IndexError):
        return False  # a date we cannot read (or cannot represent) asks for nothing


def content_type(name: str) -> str:
    kind = _TYPES.guess_type(name)[0] or "application/octet-stream"
    return f"{kind}; charset=utf-8" if kind.startswith(_UTF8_TYPES) else kind


# -- health and metrics ---------------------------------------------------------------

HEALTH_WAIT = 0.8  # seconds /healthz waits for the store's answer (its reply is due within 1 s)


def health(gateway: Gateway, client: str) -> tuple[int, str, bytes]:
    """ok, draining or unavailable, and nothing else: the reason is for the operator's log, not the world.
    Unavailable: the store does not answer within HEALTH_WAIT (or its breaker is open), or a
    long-lived thread is down. Draining: stopping (a load balancer takes the gateway out of rotation)."""
    if gateway.draining:
        return 503, "text/plain; charset=utf-8", b"draining\n"
    down = [name for name, up in gateway.threads().items() if not up]
    if down or gateway.sessions.breaker.open or not gateway.prober.alive(HEALTH_WAIT):
        log.debug("%s: /healthz: unavailable (threads down: %s)", client, ", ".join(down) or "none")
        return 503, "text/plain; charset=utf-8", b"unavailable\n"
    return 200, "text/plain; charset=utf-8", b"ok"


def metrics(gateway: Gateway, client: str) -> tuple[int, str, bytes]:
    if not address_in(client.rsplit(":", 1)[0], gateway.config.metrics_allow):
        raise Refused("not-allowed-here", "metrics_allow does not include this address")
    return 200, PROMETHEUS_TYPE, exposition(_families(gateway))


def address_in(address: str, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    """Whether an address (IPv4-mapped IPv6 read as IPv4) is in one of the networks."""
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return False
    ip = getattr(ip, "ipv4_mapped", None) or ip
    return any(ip in network for network in networks)


def _families(gateway: Gateway) -> list[tuple[str, str, str, list[tuple[dict[str, Any], float]]]]:
    """(name, type, help, [(labels, value)]) for each metric, read now."""
    audit, live = gateway.audit, gateway.sessions.live()
    live_counts = [session.byte_counts() for session in live]
    handshakes = dict(audit.handshakes)  # one C-level copy: the Counter may grow meanwhile
    families = [
        ("vncgate_sessions_live", "gauge", "Console sessions relaying now.", [({}, len(live))]),
        ("vncgate_session_bytes_total", "counter",
         "RFB bytes relayed by sessions that have ended (up: client to backend).",
         [({"direction": "up"}, audit.bytes_up), ({"direction": "down"}, audit.bytes_down)]),
        ("vncgate_live_session_bytes", "gauge", "RFB bytes relayed so far by the live sessions.",
         [({"direction": "up"}, sum(up for up, _ in live_counts)),
          ({"direction": "down"}, sum(down for _, down in live_counts))]),
        ("vncgate_handshakes_total", "counter", "Console attempts by client path and result.",
         [({"path": path, "result": result}, count) for (path, result), count in sorted(handshakes.items())]),
        *gateway.screenshots.families(),
        ("vncgate_audit_dropped_total", "counter", "Audit lines the disk refused (full, failing).",
         [({}, audit.dropped)]),
        ("vncgate_audit_suppressed_total", "counter",
         "Audit lines left out of a sampled source (an address out of failures).", [({}, audit.suppressed)]),
        ("vncgate_thread_up", "gauge", "1 while a long-lived thread runs and its last round worked.",
         [({"thread": name}, int(up)) for name, up in sorted(gateway.threads().items())]),
    ]
    tokens = None
    if not gateway.sessions.breaker.open and gateway.prober.alive(HEALTH_WAIT):  # a hung store: no wait
        try:
            tokens = gateway.store.count_by_state()
        except store_module.StoreError:
            pass
    if tokens is not None:
        families.append(("vncgate_tokens", "gauge", "Tokens in the store by state.",
                         [({"state": state}, count) for state, count in sorted(tokens.items())]))
    families.append(("vncgate_store_up", "gauge", "1 when the token store answers, else 0.",
                     [({}, int(tokens is not None))]))
    return families


def exposition(families: Iterable[tuple[str, str, str, Iterable[tuple[dict[str, Any], float]]]]) -> bytes:
    """The Prometheus text format, version 0.0.4."""
    lines = []
    for name, kind, help_text, samples in families:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        lines += [f"{name}{_labels(labels)} {value}" for labels, value in samples]
    return ("\n".join(lines) + "\n").encode()


def _labels(labels: dict[str, Any]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items()) + "}"


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
