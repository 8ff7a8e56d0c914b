"""RFC 6455 for the server side of the gateway: the upgrade, a strict streaming decoder
of the client's frames, and the server's frames.

Why our own and not websockify's WebSocket: websockify 0.13 buffers every message whole,
answers control frames of any size, ignores RSV bits and close codes and keeps
reading after it sent a close; making it strict would mean overriding its private
methods, which ties the gateway to one websockify version. The protocol needs only
what is below, and each rule of RFC 6455 sections 5 and 7 is a line here with a test.
The measured comparison on 15 hostile frames is in docs/decisions.md, and
tests/test_wsframes_differential.py holds the decoder to wsproto's on random streams.

The decoder streams: a binary frame's payload is handed on as it arrives, unmasked,
in pieces of at most one read, so a session holds one read buffer whatever the size
of the client's messages. RFB is a byte stream; message boundaries carry nothing.

Failing the connection (section 7.1.7): the gateway sends a close frame with the
code, and Ended is raised so that the session stops at once, both ways. Nothing read
after a close frame, ours or the client's, is passed on.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NoReturn

from vncgate.console.relay import Ended
from vncgate.net import http
from vncgate.refusals import Refused

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_DATA, _CONTROL = (CONTINUATION, TEXT, BINARY), (CLOSE, PING, PONG)
NORMAL, PROTOCOL_ERROR, UNSUPPORTED_DATA, INVALID_DATA, POLICY_VIOLATION = 1000, 1002, 1003, 1007, 1008
MAX_CONTROL = 125
READ_SIZE = 64 * 1024
PING_BURST, PINGS_PER_SECOND = 20, 5.0  # control frames a client may send: a bucket
TOKEN_PROTOCOL = "vncgate.token."  # a subprotocol item that carries the console token


# -- the upgrade (section 4.2) -------------------------------------------------------------

def check_upgrade(request: http.Request) -> tuple[str, str]:
    """The Sec-WebSocket-Accept value and the subprotocol to answer a valid upgrade with;
    Refused bad-upgrade otherwise. Checked before any backend is reached."""
    if request.version != "HTTP/1.1":
        raise Refused("bad-upgrade", "a websocket upgrade needs HTTP/1.1")
    if "upgrade" not in _items(request.header("connection")):
        raise Refused("bad-upgrade", "Connection does not name upgrade")
    if request.header("sec-websocket-version").strip() != "13":
        # RFC 6455 4.2.2: the refusal names the version the server speaks.
        raise Refused("bad-upgrade", "Sec-WebSocket-Version is not 13", reply_headers=[("Sec-WebSocket-Version", "13")])
    key = request.header("sec-websocket-key").strip()
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except ValueError:
        raise Refused("bad-upgrade", "Sec-WebSocket-Key is not 16 bytes in base64") from None
    accept = base64.b64encode(hashlib.sha1(key.encode("ascii") + GUID).digest()).decode("ascii")
    subprotocol = "binary" if "binary" in _items(request.header("sec-websocket-protocol")) else ""
    return accept, subprotocol


def token_protocol(request: http.Request) -> str:
    """The token a client sent as a Sec-WebSocket-Protocol item (vncgate.token.T), or "": the
    gateway's pages send it so, out of the request line that proxies log. Never echoed back."""
    for item in request.header("sec-websocket-protocol").split(","):
        if item.strip().startswith(TOKEN_PROTOCOL):
            return item.strip()[len(TOKEN_PROTOCOL):]
    return ""


def upgrade_response(accept: str, subprotocol: str, extra_headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """The 101; extra_headers: (name, value) pairs the gateway adds (a resume cookie)."""
    lines = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Accept: {accept}"]
    if subprotocol:
        lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    lines += [f"{name}: {value}" for name, value in extra_headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def _items(value: str) -> list[str]:
    return [item.strip().lower() for item in value.split(",")]


# -- the server's frames ---------------------------------------------------------------------

def frame_header(opcode: int, length: int) -> bytes:
    """FIN + opcode, then the payload length in 7, 16 or 64 bits; a server never masks."""
    if length < 126:
        return bytes((0x80 | opcode, length))
    if length < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, length)
    return struct.pack("!BBQ", 0x80 | opcode, 127, length)


class Sender:
    """Frames to the client from two threads (RFB data from the relay's writer, pongs and
    closes from its reader): one lock keeps each frame whole, and after the close frame
    nothing more is sent."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.closed = False
        self._lock = threading.Lock()
        self._vectored = hasattr(sock, "sendmsg")  # a TLS stream has no sendmsg

    def binary(self, payload: bytes | bytearray | memoryview) -> None:
        with self._lock:
            if self.closed:
                raise BrokenPipeError("the websocket is closed")
            self._send(frame_header(BINARY, len(payload)), payload)

    def binary_spliced(self, length: int, splice_payload: Callable[[], object]) -> None:
        """A binary frame whose length payload bytes splice_payload() splices into the socket
        itself (a plain socket's: the header goes with MSG_MORE, so both leave together)."""
        with self._lock:
            if self.closed:
                raise BrokenPipeError("the websocket is closed")
            self.sock.sendall(frame_header(BINARY, length), socket.MSG_MORE)
            splice_payload()

    def pong(self, payload: bytes) -> None:
        with self._lock:
            if not self.closed:
                self._send(frame_header(PONG, len(payload)), payload)

    def close(self, code: int, reason: str = "") -> None:
        """Send the one close frame (once); errors sending it are the peer's problem."""
        payload = struct.pack("!H", code) + reason.encode("utf-8")[:MAX_CONTROL - 2]
        with self._lock:
            if self.closed:
                return
            self.closed = True
            try:
                self._send(frame_header(CLOSE, len(payload)), payload)
            except OSError:
                pass

    def _send(self, header: bytes, payload: bytes | bytearray | memoryview) -> None:
        if not self._vectored:
            self.sock.sendall(header + bytes(payload))
            return
        sent = self.sock.sendmsg([header, payload])
        if sent < len(header) + len(payload):  # a signal cut the write short: send the rest
            rest = memoryview(header + bytes(payload))[sent:] if sent < len(header) else payload[sent - len(header):]
            self.sock.sendall(rest)


# -- the client's frames ---------------------------------------------------------------------

def valid_close_code(code: int) -> bool:
    """Section 7.4: the codes an endpoint may send (1004-1006 and 1015 are never sent)."""
    return code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014) or 3000 <= code <= 4999


def unmask(data: bytes, mask: bytes, offset: int) -> bytes:
    """data XOR the 4-byte mask, starting offset bytes into the masked payload."""
    if not data:
        return b""
    turn = offset % 4
    key = (mask[turn:] + mask[:turn]) * (len(data) // 4 + 1)
    value = int.from_bytes(data, "little") ^ int.from_bytes(key[:len(data)], "little")
    return value.to_bytes(len(data), "little")


class Decoder:
    """The payload bytes of the client's binary messages, as they arrive.

    recv(n) reads the connection (b"" at its end). Pings are answered and pongs
    ignored, both within a rate; a close frame is answered and ends the stream with
    Ended("client-closed"); every violation fails the connection with Ended. A
    connection that ends without a close frame simply ends the stream.
    """

    def __init__(self, recv: Callable[[int], bytes], sender: Sender, initial: bytes = b"",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.recv = recv
        self.sender = sender
        self.clock = clock
        self._buffer = bytearray(initial)
        self._in_message = False  # a fragmented data message has begun
        self._allowance, self._checked = float(PING_BURST), clock()

    def chunks(self) -> Iterator[bytes]:
        while True:
            head = self._read_exact(2)
            if head is None:
                return
            fin, opcode, masked, length = head[0] & 0x80, head[0] & 0x0F, head[1] & 0x80, head[1] & 0x7F
            if head[0] & 0x70:
                self._fail(PROTOCOL_ERROR, "ws-protocol-error", "RSV bits set without an extension")
            if not masked:
                self._fail(PROTOCOL_ERROR, "ws-protocol-error", "client frame not masked")
            length = self._length(length)
            mask = self._read_exact(4)
            if mask is None:
                return
            if opcode in _CONTROL:
                if not fin or length > MAX_CONTROL:
                    self._fail(PROTOCOL_ERROR, "ws-protocol-error", "control frame fragmented or over 125 bytes")
                payload = self._read_exact(length)
                if payload is None:
                    return
                self._control(opcode, unmask(payload, mask, 0))
                continue
            self._data_frame(opcode, fin)
            offset = 0
            while offset < length:
                piece = self._read_some(length - offset)
                if not piece:
                    return
                yield unmask(piece, mask, offset)
                offset += len(piece)

    def _length(self, length: int) -> int:
        if length == 126:
            length = struct.unpack("!H", self._need(2))[0]
            if length < 126:
                self._fail(PROTOCOL_ERROR, "ws-protocol-error", "length not in its shortest form")
        elif length == 127:
            length = struct.unpack("!Q", self._need(8))[0]
            if length >> 63 or length < 65536:
                self._fail(PROTOCOL_ERROR, "ws-protocol-error", "64-bit length invalid or not in its shortest form")
        return length

    def _data_frame(self, opcode: int, fin: int) -> None:
        if opcode not in _DATA:
            self._fail(PROTOCOL_ERROR, "ws-protocol-error", f"reserved opcode {opcode}")
        if opcode == CONTINUATION and not self._in_message:
            self._fail(PROTOCOL_ERROR, "ws-protocol-error", "continuation without a message")
        if opcode != CONTINUATION and self._in_message:
            self._fail(PROTOCOL_ERROR, "ws-protocol-error", "new message inside a fragmented one")
        if opcode == TEXT:
            self._fail(UNSUPPORTED_DATA, "ws-unsupported-data", "text message on a binary (RFB) connection")
        self._in_message = not fin

    def _control(self, opcode: int, payload: bytes) -> None:
        now = self.clock()
        self._allowance = min(PING_BURST, self._allowance + (now - self._checked) * PINGS_PER_SECOND)
        self._checked = now
        if opcode == CLOSE:
            self._close(payload)
        if self._allowance < 1:
            self._fail(POLICY_VIOLATION, "ws-ping-flood", "control frames faster than the limit")
        self._allowance -= 1
        if opcode == PING:
            self.sender.pong(payload)

    def _close(self, payload: bytes) -> NoReturn:
        if len(payload) == 1:
            self._fail(PROTOCOL_ERROR, "ws-protocol-error", "close payload of one byte")
        code = NORMAL
        if payload:
            code = struct.unpack("!H", payload[:2])[0]
            if not valid_close_code(code):
                self._fail(PROTOCOL_ERROR, "ws-protocol-error", f"invalid close code {code}")
            try:
                bytes(payload[2:]).decode("utf-8")
            except UnicodeDecodeError:
                self._fail(INVALID_DATA, "ws-protocol-error", "close reason not UTF-8")
        self.sender.close(code)
        raise Ended("client-closed", f"close frame {code}")

    def _fail(self, code: int, reason: str, detail: str) -> NoReturn:
        self.sender.close(code)
        raise Ended(reason, detail)

    # -- reading: whole small pieces, or what is there of a large one --

    def _fill(self) -> bool:
        data = self.recv(READ_SIZE)
        self._buffer += data
        return bool(data)

    def _read_exact(self, count: int) -> bytes | None:
        """count bytes, or None when the connection ended first."""
        while len(self._buffer) < count:
            if not self._fill():
                return None
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

    def _need(self, count: int) -> bytes:
        data = self._read_exact(count)
        if data is None:
            raise Ended("client-closed", "connection ended inside a frame header")
        return data

    def _read_some(self, most: int) -> bytes:
        if not self._buffer and not self._fill():
            return b""
        data = bytes(self._buffer[:most])
        del self._buffer[:most]
        return data

