"""The XVP auth protocol of the Java console clients: CONNECT /console?token=T, then raw VNC."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Callable

from vncgate import store
from vncgate.console import relay, streams
from vncgate.net.http import Request
from vncgate.net.tls import TlsStream

if TYPE_CHECKING:
    from vncgate.front.server import Gateway

OK = b"HTTP/1.1 200 OK\r\n\r\n"


def serve(gateway: Gateway, conn: socket.socket | TlsStream, request: Request, leftover: bytes,
          client: str) -> Callable[[], None] | None:
    """The XVP path: 200 once the console is open, the gateway's RFB greeting when it does the
    security itself, then the relay; returns the rest of the session (SessionManager.begin), or
    None when it ended in its greeting."""
    session = gateway.sessions.open(request.query_value("token"), store.XVP, "xvp", client, conn)
    try:  # whatever fails before the relay runs, the session is given back (discard: once)
        conn.sendall(OK)
        if session.needs_greeting:
            # The gateway's own RFB handshake ends by one deadline, however the client drips bytes.
            timed = streams.DeadlineSocket(conn, gateway.config.handshake_timeout)
            reader = streams.ChunkReader(streams.SocketSource(timed), initial=leftover)
            if not gateway.sessions.greet(session, reader.read_exact, timed.sendall):
                return None
            leftover = reader.surplus
        return gateway.sessions.begin(session, relay.Relay.raw(
            conn, session.backend, session.backend_leftover, leftover,
            upstream_sink=session.client_filter, recorder=session.recorder))
    except BaseException:
        gateway.sessions.discard(session)
        raise
