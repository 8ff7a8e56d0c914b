"""Bounded reading of HTTP heads, shared by every client path and the XenServer backend.

Reads at most `limit` bytes before the blank line and gives up at a deadline, so a
slow or oversized client costs one thread for handshake_timeout at most. Bytes
that arrive after the head are returned, never lost: they belong to the relay.
"""

from __future__ import annotations

import http
import re
import socket
import time
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Protocol

from vncgate.refusals import Refused

MAX_HEAD = 8192
MAX_HEADERS = 64
_METHOD = re.compile(rb"[A-Z]{1,16}")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


class Readable(Protocol):
    """What reading a head needs: a socket, or a TlsStream."""

    def settimeout(self, timeout: float | None) -> None: ...

    def recv(self, size: int) -> bytes: ...


class Request:
    """A request head: method, target, version, headers; the path and query split from the target."""

    def __init__(self, method: str, target: str, version: str, headers: dict[str, str]) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers  # lower-case name -> value; repeated names joined by ", "
        # Split by hand: urlsplit reads "//x" as a host and raises on "//[".
        self.path, _, query = target.partition("?")
        self.query = urllib.parse.parse_qs(query.partition("#")[0], keep_blank_values=True)

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name.lower(), default)

    def query_value(self, name: str) -> str:
        """The one value of a query parameter; '' when absent, Refused when repeated."""
        values = self.query.get(name, [])
        if len(values) > 1:
            raise Refused("bad-request", f"more than one {name} in the query")
        return values[0] if values else ""

    def cookie(self, name: str) -> str:
        """A cookie's value; a value in double quotes (as Python's SimpleCookie and some
        proxies write it: token="T") is read without them."""
        for part in self.header("cookie").split(";"):
            key, _, value = part.strip().partition("=")
            if key.strip() == name:
                value = value.strip()
                return value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value
        return ""


def _read_head(sock: Readable, deadline: float, limit: int, timeout_reason: str,
               first_line_check: Callable[[bytes], None] | None = None) -> tuple[bytes, bytes]:
    """Read up to and including the blank line; returns (head bytes, leftover bytes)."""
    buffer = b""
    while True:
        if first_line_check:
            first_line_check(buffer)
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            return buffer[:end], buffer[end + 4:]
        if len(buffer) > limit:
            raise Refused("bad-request", f"head larger than {limit} bytes")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Refused(timeout_reason, "head not complete in time")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(limit + 4 - len(buffer) if len(buffer) < limit else 1)
        except socket.timeout:
            raise Refused(timeout_reason, "head not complete in time") from None
        if not chunk:
            raise Refused("bad-request", "connection closed before the head was complete")
        buffer += chunk


def _check_method_early(buffer: bytes) -> None:
    """Refuse junk at once instead of waiting for 8 KiB or the timeout."""
    method, space, _ = buffer.partition(b" ")
    if (method or space) and not _METHOD.fullmatch(method):
        raise Refused("bad-request", "not an HTTP request")


def _parse_headers(lines: list[str]) -> dict[str, str]:
    if len(lines) > MAX_HEADERS:
        raise Refused("bad-request", f"more than {MAX_HEADERS} header lines")
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            raise Refused("bad-request", "malformed header line")
        name, value = name.lower(), value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


def read_request(sock: Readable, deadline: float, limit: int = MAX_HEAD) -> tuple[Request, bytes]:
    """A client's request head; returns (Request, leftover). Raises Refused (bad-request or
    handshake-timeout)."""
    head, leftover = _read_head(sock, deadline, limit, "handshake-timeout", _check_method_early)
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[1] or not re.fullmatch(r"HTTP/1\.[01]", parts[2]):
        raise Refused("bad-request", "malformed request line")
    return Request(parts[0], parts[1], parts[2], _parse_headers(lines[1:])), leftover


def read_response_status(sock: Readable, deadline: float, limit: int) -> tuple[int, bytes]:
    """A server's response head (the XenServer CONNECT reply); returns (status, leftover).
    Raises Refused: backend-timeout, or backend-bad-reply for anything but a status line."""
    try:
        head, leftover = _read_head(sock, deadline, limit, "backend-timeout")
    except Refused as error:
        raise Refused(error.reason if error.reason == "backend-timeout" else "backend-bad-reply",
                      error.detail) from None
    # Exactly three digits and then a space or the end of the line: "2000" is no 200.
    match = re.match(rb"HTTP/1\.[01] ([1-5]\d\d)(?: |\r\n|$)", head)
    if not match:
        raise Refused("backend-bad-reply", "malformed status line")
    return int(match.group(1)), leftover


def response(status: int, headers: Iterable[tuple[str, str]] = (), body: bytes = b"") -> bytes:
    """A complete response as bytes: status line, headers, body."""
    phrase = http.HTTPStatus(status).phrase
    lines = [f"HTTP/1.1 {status} {phrase}"] + [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def error_response(status: int, sentence: str, headers: tuple = ()) -> bytes:
    """A short plain-text error that closes the connection; headers: (name, value) pairs it adds."""
    body = f"{status} {http.HTTPStatus(status).phrase}: {sentence}\n".encode()
    return response(status, [("Content-Type", "text/plain; charset=utf-8"), *headers,
                             ("Content-Length", str(len(body))), ("Connection", "close")], body)
