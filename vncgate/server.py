"""The one port: a threaded socketserver that reads each connection's first bytes and dispatches.

A TLS ClientHello is wrapped in TLS and read again; then CONNECT goes to the XVP
path, a GET with Upgrade: websocket to the websocket path, any other GET or HEAD
to the web side; anything else is answered with an HTTP error. A connection beyond
max_connections is refused at once, and every connection is tracked so that
stop() can end handshakes and sessions alike within moments.
"""

import logging
import socket
import socketserver
import threading
import time

from vncgate import api, http, sessions, throttle, tls, web, websocket, xvp
from vncgate.refusals import Refused

log = logging.getLogger("vncgate.server")


class ConnectionHandler(socketserver.BaseRequestHandler):
    def handle(self):
        gateway, conn = self.server, self.request
        client = f"{self.client_address[0]}:{self.client_address[1]}"
        deadline = time.monotonic() + gateway.config.handshake_timeout
        path = "-"
        try:
            conn = self._maybe_tls(conn, deadline, client)
            if conn is None:
                return
            request, leftover = http.read_request(conn, deadline)
            if request.method == "CONNECT":
                path = "xvp"
                xvp.serve(gateway, conn, request, leftover, client)
            elif gateway.api and gateway.api.claims(request):
                path = "web"  # the API answers and audits its own errors; the admin page's are the web side's
                gateway.api.serve(conn, request, leftover, client)
            elif request.method == "GET" and _asks_for_websocket(request):
                path = "websocket"
                websocket.serve(gateway, conn, request, leftover, client)
            elif request.method in ("GET", "HEAD"):
                path = "web"
                web.serve(gateway, conn, request, client)
            else:
                raise Refused("bad-request", f"method {request.method} not served")
        except Refused as refusal:
            self._refuse(conn, refusal, path, client)
        except OSError as error:
            log.debug("%s: connection ended during the handshake: %s", client, error)
        except Exception:  # the gateway's own fault: the client still gets an answer
            log.exception("%s: unexpected error on the %s path", client, path)
            self._refuse(conn, Refused("internal-error"), path, client)
        finally:
            if conn is not None and conn is not self.request:
                conn.close()  # the TLS wrapper; socketserver closes the plain socket

    def _maybe_tls(self, conn, deadline, client):
        """The connection to read the request from: TLS-wrapped on a ClientHello, else as it is.
        None when a TLS handshake failed (there is no way to answer such a client)."""
        gateway = self.server
        conn.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            first = conn.recv(1, socket.MSG_PEEK)
        except socket.timeout:
            raise Refused("handshake-timeout", "nothing sent in time") from None
        if not tls.is_client_hello(first):
            if gateway.config.tls_only and first:
                raise Refused("tls-required")
            return conn
        if gateway.tls_context is None:
            raise Refused("tls-not-configured")
        try:
            return tls.accept(gateway.tls_context, conn, deadline,
                              on_wrapped=lambda wrapped: gateway.track(conn, wrapped))
        except tls.HandshakeFailed as error:
            gateway.audit.record("attempt", client=client, path="tls", result="rejected", reason=error.reason,
                                 detail=error.detail)
            return None

    def _refuse(self, conn, refusal, path, client):
        fields = refusal.fields or {"client": client, "path": path}
        # A file or page the web side cannot give is a "request" line, not a console attempt.
        event = "request" if path == "web" else "attempt"
        self.server.audit.record(event, **fields, result="rejected", **refusal.audit_fields())
        try:
            conn.sendall(http.error_response(refusal.status, refusal.sentence))
        except OSError:
            pass  # the client is gone; the audit line says what it was told


def _asks_for_websocket(request):
    return "websocket" in (item.strip().lower() for item in request.header("upgrade").split(","))


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
            throttle=throttle.FailureThrottle(config.failed_token_burst, config.failed_token_rate),
            heartbeat=config.touch_interval, settings=config,
            backend_tls=tls.backend_context(config.backend_ca, config.backend_cert, config.backend_key))
        self.housekeeper = sessions.Housekeeper(self.sessions, config.touch_interval,
                                                config.housekeeping_interval)
        self.tls_context = tls.server_context(config.cert, config.key) if config.cert else None
        self.api = api.ControlPlane(self) if config.api_keys_file else None
        self._connections = {}  # accepted socket -> what it is now (itself, or its TLS wrapper)
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
                self._connections[request] = request
        if not admitted:
            refusal = Refused("max-connections")
            self.audit.record("attempt", client=f"{client_address[0]}:{client_address[1]}", path="-",
                              result="rejected", **refusal.audit_fields())
            try:
                request.sendall(http.error_response(refusal.status, refusal.sentence))
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
                self._connections.pop(request, None)

    def track(self, plain, wrapped):
        """Follow a connection into its TLS wrapper, so that stop() can still wake it."""
        with self._lock:
            if plain in self._connections:
                self._connections[plain] = wrapped

    def reload(self):
        """SIGHUP: the TLS certificate and the API keys, read again."""
        self.reload_tls()
        if self.api:
            self.api.reload_keys()

    def reload_tls(self):
        """Load cert and key again (SIGHUP); live sessions keep the TLS state they have."""
        if not self.config.cert:
            return
        try:
            self.tls_context = tls.server_context(self.config.cert, self.config.key)
            log.info("reloaded TLS certificate %s", self.config.cert)
        except tls.TlsConfigError as error:
            log.error("%s; keeping the previous certificate", error)

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
            pending = list(self._connections.values())
        for conn in pending:
            tls.wake(conn)
        if self.housekeeper.is_alive():
            self.housekeeper.stop()
        self.server_close()
