"""The XVP auth protocol of the Java console clients: CONNECT /console?token=T, then raw VNC."""

from vncgate import store
from vncgate.console import relay

OK = b"HTTP/1.1 200 OK\r\n\r\n"


def serve(gateway, conn, request, leftover, client):
    session = gateway.sessions.open(request.query_value("token"), store.XVP, "xvp", client, conn)
    try:  # whatever fails before the relay runs, the session is given back (discard: once)
        conn.sendall(OK)
        if session.needs_greeting:
            # The gateway's own RFB handshake ends by one deadline, however the client drips bytes.
            timed = relay.DeadlineSocket(conn, gateway.config.handshake_timeout)
            reader = relay.ChunkReader(relay.SocketSource(timed), initial=leftover)
            if not gateway.sessions.greet(session, reader.read_exact, timed.sendall):
                return
            leftover = reader.surplus
        relayed = relay.Relay.raw(conn, session.backend, session.backend_leftover, leftover,
                                  upstream_sink=session.client_filter, recorder=session.recorder)
    except BaseException:
        gateway.sessions.discard(session)
        raise
    gateway.sessions.run(session, relayed)
