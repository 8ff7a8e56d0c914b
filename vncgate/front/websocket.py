"""The websocket path of noVNC: GET with Upgrade: websocket, then RFB bytes in binary messages.

The framing is vncgate.front.wsframes (RFC 6455, strict, streaming). Around it this module
adds what a gateway needs: the token (a Sec-WebSocket-Protocol item, else the query, else
the cookie), the Origin check, an
upgrade that is checked before the backend is reached but answered only once the
console is open, and a Source and a Sink so that the relay's two threads can share
one WebSocket. A WebSocket session ends as a whole: when either side ends, or the
client breaks the protocol, a close frame goes out and both directions stop.
"""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Iterator
from typing import TYPE_CHECKING, Callable, NoReturn

from vncgate import store
from vncgate.console import pipes, relay, resume, streams
from vncgate.front import wsframes
from vncgate.net import tls
from vncgate.refusals import Refused

if TYPE_CHECKING:
    from vncgate.config import Config
    from vncgate.console.sessions import Session
    from vncgate.console.streams import Sink
    from vncgate.front.server import Gateway
    from vncgate.net import http

PATH = "websocket"
_DEFAULT_PORTS = {"http": "80", "https": "443"}
# scheme://host[:port], nothing else: no userinfo, no path, a port without leading zeros.
_ORIGIN = re.compile(r"(https?)://([a-z0-9.-]+|\[[0-9a-f:.]+\])(?::([1-9][0-9]{0,4}))?")


def serve(gateway: Gateway, conn: socket.socket, request: http.Request, leftover: bytes, client: str,
          console_type: str = store.WEBSOCKET, path: str = PATH) -> Callable[[], None] | None:
    """One WebSocket console session: noVNC's (ws-vnc), or the serial terminal's (serial).
    Returns the rest of the session (SessionManager.begin), or None when it ended in its greeting."""
    token = wsframes.token_protocol(request) or request.query_value("token") or request.cookie("token")
    origin = request.headers.get("origin")
    # Present but blank is refused, as Nova does; only a request with no Origin at all (a native
    # client, not a browser) is let through without one.
    if origin is not None and not origin_allowed(origin, gateway.config):
        raise Refused("origin-not-allowed", f"Origin {origin[:100]!r}", client=client, path=path,
                      console_type=console_type,
                      **({"token_id": store.hash_token(token)[:8]} if token else {}))
    accept, subprotocol = wsframes.check_upgrade(request)

    secure = isinstance(conn, ssl.SSLSocket)
    session = gateway.sessions.open(token, console_type, path, client, conn,
                                    resume_cookie=request.cookie(resume.resume_cookie_name(secure)) or None)
    try:  # whatever fails before the relay runs, the session is given back (discard: once)
        relayed = _relay(gateway, conn, session, secure, leftover, accept, subprotocol)
        return gateway.sessions.begin(session, relayed) if relayed is not None else None
    except BaseException:
        gateway.sessions.discard(session)
        raise


def _relay(gateway: Gateway, conn: socket.socket, session: Session, secure: bool, leftover: bytes, accept: str,
           subprotocol: str) -> relay.Relay | None:
    """The upgrade's answer, the gateway's RFB greeting if it does one, and the session's Relay;
    None when the session ended in its greeting."""
    stream = tls.TlsStream(conn) if isinstance(conn, ssl.SSLSocket) else conn  # secure: the same test
    # A single-use token: every use gets a new cookie of the gateway's, by which its browser may
    # come back, from another address too.
    cookie = [resume.resume_cookie_header(session.resume_cookie, secure)] if session.resume_cookie else []
    stream.sendall(wsframes.upgrade_response(accept, subprotocol, cookie))
    sender = wsframes.Sender(stream)
    sink = ClientSink(sender)
    source: streams.ChunkReader | ClientSource
    if session.needs_greeting:
        # The gateway's own RFB handshake ends by one deadline, however the client drips or pings.
        timed = streams.DeadlineSocket(stream, gateway.config.handshake_timeout)
        source = streams.ChunkReader(ClientSource(timed, sender, leftover))
        if not gateway.sessions.greet(session, source.read_exact, sink.write):
            # The RFB reason (if any) went in binary messages; a close frame ends the WebSocket
            # cleanly, so a browser reports a closed connection, not 1006.
            sender.close(wsframes.NORMAL)
            return None
        timed.lift()
    else:
        source = ClientSource(stream, sender, leftover)
    backend, recorder = session.backend, session.recorder
    to_backend: Sink = BackendSink(backend)
    if session.client_filter:
        to_backend = session.client_filter(to_backend)
    return relay.Relay(
        stream, backend,
        upstream=relay.CopyDirection("client", streams.tapped(source, recorder.client if recorder else None), to_backend),
        # The backend's bytes are spliced (a frame header, then the payload from a kernel pipe)
        # unless either side is TLS.
        downstream=relay.from_backend(backend, sink, session.backend_leftover, recorder,
                                      splice=relay.splices(stream, backend)))


def origin_allowed(origin: str, config: Config) -> bool:
    allowed = {normal_origin(item) for item in (config.public_origin, *config.allowed_origins)}
    allowed.discard(None)
    return normal_origin(origin) in allowed


def normal_origin(origin: str) -> str | None:
    """scheme://host[:port] in lower case and without a default port, as browsers send it;
    None for anything else (browsers send "null" from sandboxes)."""
    match = _ORIGIN.fullmatch(origin.strip().lower())
    if not match:
        return None
    scheme, host, port = match.groups()
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}" if int(port) <= 65535 else None


class ClientSource:
    """The payloads of the client's binary messages; ends the session (wsframes.Ended)
    on its close frame or a protocol violation."""

    def __init__(self, sock: socket.socket | tls.TlsStream | streams.DeadlineSocket, sender: wsframes.Sender,
                 initial: bytes = b"") -> None:
        self.decoder = wsframes.Decoder(sock.recv, sender, initial)

    def chunks(self) -> Iterator[bytes]:
        return self.decoder.chunks()


class ClientSink:
    """Backend bytes to the client, one binary message per chunk (written, or spliced from a
    pipe). The backend's end is the session's end: a close frame (1000), then both ways stop."""

    def __init__(self, sender: wsframes.Sender) -> None:
        self.sender = sender
        self.write = sender.binary

    def write_from(self, read_end: int, count: int) -> None:
        """count bytes waiting in a pipe, as one binary message spliced to the client."""
        client = self.sender.sock.fileno()
        self.sender.binary_spliced(count, lambda: pipes.splice_out(read_end, client, count))

    def close_write(self) -> NoReturn:
        self.sender.close(wsframes.NORMAL)
        raise relay.Ended("backend-closed")


class BackendSink(streams.SocketSink):
    """Client bytes to the backend. A client connection that ends without a close frame
    ends the session as a whole: a WebSocket has no half-close."""

    def close_write(self) -> NoReturn:
        raise relay.Ended("client-closed", "connection ended without a close frame")
