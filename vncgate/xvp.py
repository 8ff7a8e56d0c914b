"""The XVP auth protocol of the Java console clients: CONNECT /console?token=T, then raw VNC."""

from vncgate import relay, store

OK = b"HTTP/1.1 200 OK\r\n\r\n"


def serve(gateway, conn, request, leftover, client):
    session = gateway.sessions.open(request.query_value("token"), store.XVP, "xvp", client)
    try:
        conn.sendall(OK)
    except OSError:
        gateway.sessions.discard(session)
        raise
    if session.needs_greeting:
        reader = relay.ChunkReader(relay.SocketSource(conn), initial=leftover)
        if not gateway.sessions.greet(session, reader.read_exact, conn.sendall):
            return
        leftover = reader.surplus
    gateway.sessions.run(session, relay.Relay.raw(conn, session.backend, session.backend_leftover, leftover))
