"""The websocket path of noVNC: GET with Upgrade: websocket, then RFB bytes in binary messages.

The handshake and the framing are websockify's WebSocket. Around it this module
adds what a gateway needs: the token (query, else cookie), the Origin check, an
upgrade that is checked before the backend is reached but answered only once the
console is open, and a Source and a Sink so that the relay's two threads can
share one WebSocket.
"""

import errno
import functools
import socket
import ssl
import struct
import threading
import urllib.parse

from websockify.websocket import WebSocket, WebSocketWantReadError, WebSocketWantWriteError

from vncgate import relay, store, tls
from vncgate.refusals import Refused

PATH = "websocket"
# websockify buffers a whole message; an RFB client sends small ones, so this
# bounds what one client can make the gateway hold.
MAX_MESSAGE = 4 * 1024 * 1024
# websockify asks for 4 KiB at a time and appends each read to its buffer, so a large
# message costs copying quadratic in its size; it takes whatever one read returns.
READ_SIZE = 64 * 1024
TOO_BIG = 1009  # RFC 6455 close code: message too big to process
_DEFAULT_PORTS = {"http": 80, "https": 443}


def serve(gateway, conn, request, leftover, client):
    token = request.query_value("token") or request.cookie("token")
    origin = request.header("origin")
    if origin and not origin_allowed(origin, gateway.config):
        raise Refused("origin-not-allowed", client=client, path=PATH, console_type=store.WEBSOCKET,
                               **({"token_id": store.hash_token(token)[:8]} if token else {}))
    transport = Transport(leftover)
    websocket = ClientWebSocket()
    headers = _Headers(request.headers)
    try:
        websocket.accept(transport, headers)
    except WebSocketWantWriteError:
        pass  # the upgrade is valid; its 101 waits in websockify's buffer
    except Exception as error:  # websockify reports a bad upgrade as a plain Exception
        raise Refused("bad-upgrade", str(error)) from None

    session = gateway.sessions.open(token, store.WEBSOCKET, PATH, client)
    stream = tls.TlsStream(conn) if isinstance(conn, ssl.SSLSocket) else conn
    try:
        transport.connect(stream)
        websocket.accept(transport, headers)  # sends the queued 101
    except OSError:
        gateway.sessions.discard(session)
        raise
    backend = session.backend
    source, sink = WebSocketSource(websocket, transport), WebSocketSink(websocket, transport)
    if session.needs_greeting:
        reader = relay.ChunkReader(source)
        if not gateway.sessions.greet(session, reader.read_exact, sink.write):
            return
        source = relay.PrefixedSource(reader.surplus, source)
    gateway.sessions.run(session, relay.Relay(
        stream, backend,
        upstream=Direction("client", source, relay.SocketSink(backend)),
        downstream=Direction("backend", relay.SocketSource(backend, session.backend_leftover), sink)))


def origin_allowed(origin, config):
    allowed = {_normal_origin(item) for item in (config.public_origin, *config.allowed_origins)}
    allowed.discard(None)
    return _normal_origin(origin) in allowed


def _normal_origin(origin):
    """scheme://host[:port] in lower case and without a default port, as browsers send it;
    None for anything that is not such an origin (browsers send "null" from sandboxes)."""
    parts = urllib.parse.urlsplit(origin.strip().lower())
    try:
        port = parts.port
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    if port is not None and port != _DEFAULT_PORTS.get(parts.scheme):
        host = f"{host}:{port}"
    return f"{parts.scheme}://{host}"


class _Headers(dict):
    """Our header names are lower case; websockify asks for them in their usual spelling."""

    def get(self, name, default=None):
        return super().get(name.lower(), default)


class Transport:
    """The client connection as websockify's WebSocket uses it.

    Until connect() it has no socket and cannot send, so that accept() can check the
    upgrade and queue its 101 before a backend is reached. It hands out the bytes
    that came with the request head before reading the socket, so none are lost. It
    sends whole buffers, because websockify treats a short send as "try again later".
    Its close() only shuts the connection down: the relay owns the socket and closes it.
    """

    def __init__(self, initial=b""):
        self.sock = None
        self.initial = initial
        self.received = 0  # bytes read so far, for the message size limit

    def connect(self, sock):
        self.sock = sock

    def recv(self, size):
        if self.initial:
            data, self.initial = self.initial, b""
        else:
            data = self.sock.recv(max(size, READ_SIZE))
        self.received += len(data)
        return data

    def pending(self):
        """Decrypted TLS bytes waiting: websockify reads them before it waits on the socket."""
        return isinstance(self.sock, tls.TlsStream) and self.sock.pending() > 0

    def send(self, data):
        if self.sock is None:
            raise BlockingIOError(errno.EWOULDBLOCK, "the upgrade waits until the console is open")
        self.sock.sendall(data)
        return len(data)

    def send_parts(self, header, payload):
        """header + payload without joining them (TLS streams have no sendmsg: one sendall)."""
        if isinstance(self.sock, tls.TlsStream):
            self.sock.sendall(header + payload)
            return
        sent = self.sock.sendmsg([header, payload])
        if sent < len(header) + len(payload):  # a signal cut the write short: send the rest
            rest = memoryview(header + payload)[sent:] if sent < len(header) else payload[sent - len(header):]
            self.sock.sendall(rest)

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # the peer is gone already


def binary_frame_header(length):
    """RFC 6455 section 5.2: FIN + binary opcode, then the payload length in 7, 16 or 64 bits;
    a server's frames are never masked."""
    if length < 126:
        return bytes((0x82, length))
    if length < 65536:
        return struct.pack("!BBH", 0x82, 126, length)
    return struct.pack("!BBQ", 0x82, 127, length)


def _one_sender_at_a_time(method):
    @functools.wraps(method)
    def serialized(self, *args, **kwargs):
        with self.send_lock:
            return method(self, *args, **kwargs)
    return serialized


class ClientWebSocket(WebSocket):
    """websockify's WebSocket on the server side, shared by the relay's two threads.

    The reader answers pings and closes while the writer sends RFB messages, and
    websockify keeps one send buffer and drops its socket on close from whichever
    thread gets there. One lock around every method that sends or closes keeps
    frames whole and in order, and no frame is sent on a dropped socket.
    """

    def __init__(self):
        super().__init__()
        self.send_lock = threading.RLock()  # shutdown() sends, then may close

    def select_subprotocol(self, protocols):
        # websockify splits the offer on commas only, and requires the very item it was offered.
        return next((offered for offered in protocols if offered.strip() == "binary"), "")

    sendmsg = _one_sender_at_a_time(WebSocket.sendmsg)
    pong = _one_sender_at_a_time(WebSocket.pong)
    shutdown = _one_sender_at_a_time(WebSocket.shutdown)

    def _close(self):
        with self.send_lock:
            # The writer that sent our close and the reader that got the answer may both see
            # the close handshake complete; websockify drops its socket on the first call.
            if self.socket is not None:
                super()._close()


class Direction(relay.CopyDirection):
    """A direction whose end is on record before its sink is closed. Closing the sink
    makes the other side end too (a close frame is answered at once, a backend closes
    on EOF), and the session's end reason must name the side that ended first."""

    def move(self, running):
        super().move(running)
        running.ended(self)


class WebSocketSource:
    """The payloads of the client's binary messages, until it closes or its connection ends."""

    def __init__(self, websocket, transport):
        self.websocket = websocket
        self.transport = transport

    def chunks(self):
        message_start = self.transport.received
        while True:
            try:
                message = self.websocket.recvmsg()
            except WebSocketWantReadError:  # only part of a message so far: read on
                if self.transport.received - message_start > MAX_MESSAGE:
                    self.websocket.shutdown(socket.SHUT_RDWR, TOO_BIG, "message too big")
                    return
                continue
            if message is None:
                return
            message_start = self.transport.received
            yield message


class WebSocketSink:
    """Backend bytes to the client, one binary message per chunk; a close frame at the end.

    Framing the bulk of a console (framebuffer updates) through websockify's sendmsg
    copies every payload three times (to bytes, header + payload, its send buffer); this
    writes the two-to-ten-byte header and the payload view with one sendmsg instead.
    Decoding, control frames and the close handshake stay websockify's. Holding its
    send lock keeps these frames whole and in order with the pongs and closes it sends.
    """

    def __init__(self, websocket, transport):
        self.websocket = websocket
        self.transport = transport

    def write(self, chunk):
        with self.websocket.send_lock:
            if self.websocket._sent_close:  # websockify's own rule: nothing after our close
                raise BrokenPipeError("the websocket is closed")
            self.transport.send_parts(binary_frame_header(len(chunk)), chunk)

    def close_write(self):
        self.websocket.shutdown(socket.SHUT_RDWR)  # code 1000; the client's answer ends the reader
