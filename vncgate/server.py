"""The one port: a threaded socketserver that reads each connection's first bytes and dispatches.

CONNECT goes to the XVP path; anything else is answered with an HTTP error.
A connection beyond max_connections is refused at once, and every connection is
tracked so that stop() can end handshakes and sessions alike within moments.
"""

import logging
import socket
import socketserver
import threading
import time

from vncgate import http, sessions, throttle, xvp

log = logging.getLogger("vncgate.server")


class ConnectionHandler(socketserver.BaseRequestHandler):
    def handle(self):
        gateway, conn = self.server, self.request
        client = f"{self.client_address[0]}:{self.client_address[1]}"
        deadline = time.monotonic() + gateway.config.handshake_timeout
        path = "-"
        try:
            request, leftover = http.read_request(conn, deadline)
            if request.method == "CONNECT":
                path = "xvp"
                xvp.serve(gateway, conn, request, leftover, client)
            elif request.method in ("GET", "HEAD"):
                path = "web"
                raise http.HttpError(501, "websocket and web side not served yet")
            else:
                raise http.HttpError(400, f"method {request.method} not served")
        except http.HttpError as error:
            self._refuse(error, path, client)
        except OSError as error:
            log.debug("%s: connection ended during the handshake: %s", client, error)

    def _refuse(self, error, path, client):
        fields = getattr(error, "fields", None) or {"client": client, "path": path}
        reason = getattr(error, "reason", None) or {408: "handshake-timeout"}.get(error.status, "bad-request")
        self.server.audit.record("attempt", **fields, result="rejected", status=error.status, reason=reason,
                                 **({"detail": error.detail} if error.detail != reason else {}))
        try:
            self.request.sendall(http.error_response(error.status))
        except OSError:
            pass  # the client is gone; the audit line says what it was told


class Gateway(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = False  # stop() ends every connection; server_close() joins their threads
    block_on_close = True
    request_queue_size = 512

    def __init__(self, config, store, audit):
        self.config = config
        self.store = store
        self.audit = audit
        self.sessions = sessions.SessionManager(
            store, audit, backend_timeout=config.handshake_timeout,
            throttle=throttle.FailureThrottle(config.failed_token_burst, config.failed_token_rate))
        self.housekeeper = sessions.Housekeeper(self.sessions, config.touch_interval,
                                                config.housekeeping_interval)
        self._connections = set()
        self._lock = threading.Lock()
        self.address_family = socket.AF_INET6 if ":" in config.listen else socket.AF_INET
        super().__init__((config.listen, config.port), ConnectionHandler)

    def serve_forever(self, poll_interval=0.5):
        self.housekeeper.start()
        super().serve_forever(poll_interval)

    def process_request(self, request, client_address):
        with self._lock:
            admitted = len(self._connections) < self.config.max_connections
            if admitted:
                self._connections.add(request)
        if not admitted:
            self.audit.record("attempt", client=f"{client_address[0]}:{client_address[1]}", path="-",
                              result="rejected", status=503, reason="max-connections")
            try:
                request.sendall(http.error_response(503))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._connections.discard(request)

    def handle_error(self, request, client_address):
        log.exception("unexpected error serving %s:%s", *client_address[:2])

    def connection_count(self):
        with self._lock:
            return len(self._connections)

    def stop(self):
        """Stop accepting, end every session and handshake, join every thread."""
        self.shutdown()
        self.sessions.stop_all("shutdown")
        with self._lock:
            pending = list(self._connections)
        for conn in pending:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self.housekeeper.is_alive():
            self.housekeeper.stop()
        self.server_close()
