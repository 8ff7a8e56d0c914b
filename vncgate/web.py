"""The small web side: noVNC's files from web_root, /healthz and /metrics.

A file is served only from inside web_root: the decoded path may not climb or
hide ('.', '..', empty segments, backslashes, NULs), and the file it names, links
resolved, must be a regular file that is still inside web_root. These requests
are not console attempts, so they are not audited: errors are answered here
instead of being raised to the server.
"""

import email.utils
import logging
import mimetypes
import os
import stat
import urllib.parse

from vncgate import http, store as store_module

log = logging.getLogger("vncgate.web")

# The built-in table only, so every host answers alike; plus the types noVNC needs that it lacks.
_TYPES = mimetypes.MimeTypes()
for _extension, _type in ((".js", "text/javascript"), (".oga", "audio/ogg"), (".woff", "font/woff"),
                          (".ttf", "font/ttf")):
    _TYPES.add_type(_type, _extension)
_UTF8_TYPES = ("text/", "application/json", "image/svg+xml")
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def serve(gateway, conn, request, client):
    conn.settimeout(gateway.config.handshake_timeout)  # a reader this slow for small files is dropped
    path = request.target.partition("?")[0]  # as sent: Request.path would read "//x" as a host
    page = {"/healthz": health, "/metrics": metrics}.get(path)
    try:
        if page:
            status, content_type, body = page(gateway)
            _reply(conn, request, status, [("Content-Type", content_type), ("Content-Length", str(len(body))),
                                           ("Cache-Control", "no-store")], body)
        else:
            _send_file(conn, request, file_path(gateway.config.web_root, path))
    except http.HttpError as error:
        log.debug("%s: %s %s: %s", client, request.method, request.target, error.detail)
        body = f"{error.status} {error.detail}\n".encode()
        _reply(conn, request, error.status, [("Content-Type", "text/plain; charset=utf-8"),
                                             ("Content-Length", str(len(body)))], body)


def _reply(conn, request, status, headers, body=b""):
    """One whole reply; HEAD gets the same head and no body. One request per connection."""
    conn.sendall(http.response(status, [*headers, ("Connection", "close")],
                               b"" if request.method == "HEAD" else body))


# -- files ------------------------------------------------------------------------------

def file_path(web_root, path):
    """The real path under web_root that a request path names.
    HttpError 400 for a path that climbs or hides, 404 when it can name nothing there."""
    if not web_root:
        raise http.HttpError(404, "no web_root configured")
    if not path.startswith("/"):
        raise http.HttpError(400, "not a path")
    parts = urllib.parse.unquote(path)[1:].split("/")
    if ("" in parts[:-1] or any(part in (".", "..") or "\\" in part or "\0" in part for part in parts)):
        raise http.HttpError(400, "path climbs or hides")
    root = os.path.realpath(web_root)
    found = os.path.realpath(os.path.join(root, *parts))
    if os.path.commonpath([root, found]) != root:
        raise http.HttpError(404, "link out of web_root")
    return found


def _send_file(conn, request, name):
    try:
        # O_NONBLOCK: opening a FIFO that sits in web_root must not hang the thread.
        file = os.fdopen(os.open(name, os.O_RDONLY | os.O_NONBLOCK), "rb")
    except OSError:
        raise http.HttpError(404, "not found") from None
    with file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise http.HttpError(404, "not a file")
        etag = f'"{info.st_mtime_ns:x}-{info.st_size:x}"'
        # no-cache: browsers keep the files but ask each time, so a noVNC upgrade shows at once.
        validators = [("Last-Modified", email.utils.formatdate(info.st_mtime, usegmt=True)), ("ETag", etag),
                      ("Cache-Control", "no-cache")]
        if _unchanged(request, etag, info.st_mtime):
            _reply(conn, request, 304, validators)
            return
        _reply(conn, request, 200, [("Content-Type", content_type(name)), ("Content-Length", str(info.st_size)),
                                    ("X-Content-Type-Options", "nosniff"), *validators])
        if request.method == "GET":
            conn.sendfile(file)


def _unchanged(request, etag, mtime):
    """If-None-Match decides when it is sent, else If-Modified-Since (RFC 9110, 13.2.2)."""
    tags = request.header("if-none-match")
    if tags:
        return tags.strip() == "*" or etag in (tag.strip().removeprefix("W/") for tag in tags.split(","))
    since = request.header("if-modified-since")
    try:
        return bool(since) and int(mtime) <= email.utils.parsedate_to_datetime(since).timestamp()
    except (TypeError, ValueError):
        return False  # a date we cannot read asks for nothing


def content_type(name):
    kind = _TYPES.guess_type(name)[0] or "application/octet-stream"
    return f"{kind}; charset=utf-8" if kind.startswith(_UTF8_TYPES) else kind


# -- health and metrics ---------------------------------------------------------------

def health(gateway):
    try:
        gateway.store.ping()
    except store_module.StoreError as error:
        return 503, "text/plain; charset=utf-8", f"store unavailable: {error}\n".encode()
    return 200, "text/plain; charset=utf-8", b"ok"


def metrics(gateway):
    return 200, PROMETHEUS_TYPE, exposition(_families(gateway))


def _families(gateway):
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
    ]
    try:
        tokens = gateway.store.count_by_state()
    except store_module.StoreError:
        tokens = None
    if tokens is not None:
        families.append(("vncgate_tokens", "gauge", "Tokens in the store by state.",
                         [({"state": state}, count) for state, count in sorted(tokens.items())]))
    families.append(("vncgate_store_up", "gauge", "1 when the token store answers, else 0.",
                     [({}, int(tokens is not None))]))
    return families


def exposition(families):
    """The Prometheus text format, version 0.0.4."""
    lines = []
    for name, kind, help_text, samples in families:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        lines += [f"{name}{_labels(labels)} {value}" for labels, value in samples]
    return ("\n".join(lines) + "\n").encode()


def _labels(labels):
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items()) + "}"


def _escape(value):
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
