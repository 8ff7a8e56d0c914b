"""The one port: a threaded socketserver that reads each connection's first bytes and dispatches.

A TLS ClientHello is wrapped in TLS and read again; then CONNECT goes to the XVP
path, a GET with Upgrade: websocket to the websocket path, any other GET or HEAD
to the web side; anything else is answered with an HTTP error. A connection beyond
max_connections is refused at once, and every connection is registered
(vncgate.front.connections) so that stop() can end handshakes and sessions alike
within moments.

Fair shares: max_connections is lowered at start to what the fd limit holds, one
client address may have at most max_pending_per_address connections that are not
relaying yet (an address's idle sockets cannot take every slot), and an accept that
fails for want of fds or memory answers 503 or backs off instead of spinning.

Behind a trusted proxy the client is the one its PROXY header or forwarding header
names (vncgate.front.proxied), and that client's share is what is counted.
"""

from __future__ import annotations

import gc
import logging
import socket
import socketserver
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from vncgate import config as config_module
from vncgate import store as store_module
from vncgate.audit import Audit
from vncgate.console import cluster, housekeeping, screenshot, sessions
from vncgate.console import serial as consoles
from vncgate.console.recordings import Recordings
from vncgate.front import connections, limits, proxied, throttle, web, websocket, xvp
from vncgate.net import fds, http, tls
from vncgate.refusals import Refused
from vncgate.store import watch as store_watch

if TYPE_CHECKING:
    from vncgate.store import AnyStore

log = logging.getLogger("vncgate.front.server")


class ConnectionHandler(socketserver.BaseRequestHandler):
    server: Gateway
    then: Callable[[], None] | None = None  # a session's relay, run once this handshake's thread is done

    def handle(self) -> None:
        gateway, conn = self.server, self.request
        client = f"{self.client_address[0]}:{self.client_address[1]}"
        started = time.monotonic()
        deadline = started + gateway.config.handshake_timeout
        # The request head (and a TLS handshake before it) has a shorter deadline of its own.
        head_deadline = min(deadline, started + gateway.config.request_head_timeout)
        path = "-"
        try:
            # The PROXY header, like the request head after it, is due by the head's deadline.
            client = proxied.from_proxy_header(conn, head_deadline, self.client_address,
                                               gateway.config.trusted_proxies)
            conn = self._maybe_tls(conn, head_deadline, client)
            if conn is None:
                return
            request, leftover = http.read_request(conn, head_deadline)
            gateway.connections.head_read(self.request)
            client = proxied.from_request(request, client, gateway.config.trusted_proxies)
            gateway.pending_as(self.request, client)
            if request.method == "CONNECT":
                path = "xvp"
                self.then = xvp.serve(gateway, conn, request, leftover, client)
            elif gateway.api and gateway.api.claims(request):
                path = "web"  # the API answers and audits its own errors; the admin page's are the web side's
                gateway.api.serve(conn, request, leftover, client)
            elif request.method == "GET" and _asks_for_websocket(request) and _is_serial(request):
                path = "serial"
                self.then = websocket.serve(gateway, conn, request, leftover, client, store_module.SERIAL, path)
            elif request.method == "GET" and _asks_for_websocket(request):
                path = "websocket"
                self.then = websocket.serve(gateway, conn, request, leftover, client)
            else:  # the web side answers its files, and 405 to any method but GET and HEAD
                path = "web"
                web.serve(gateway, conn, request, client)
        except Refused as refused:
            refusal = Refused("shed", "closed in its request head to make room") if gateway.connections.was_shed(
                self.request) else refused
            self._refuse(conn, refusal, path, client)
        except OSError as error:
            log.debug("%s: connection ended during the handshake: %s", client, error)
        except Exception:  # the gateway's own fault: the client still gets an answer
            log.exception("%s: unexpected error on the %s path", client, path)
            self._refuse(conn, Refused("internal-error"), path, client)
        finally:
            if conn is not None and conn is not self.request and self.then is None:
                conn.close()  # the TLS wrapper (a relay closes its own); the plain socket is closed by Gateway._finish

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
                              on_wrapped=lambda wrapped: gateway.connections.track(conn, wrapped))
        except tls.HandshakeFailed as error:
            self._audit_failure(error.reason, "attempt", client=client, path="tls", result="rejected",
                                reason=error.reason, detail=error.detail)
            return None

    def _refuse(self, conn, refusal, path, client):
        gateway = self.server
        fields = refusal.fields or {"client": client, "path": path}
        # A file or page the web side cannot give is a "request" line, not a console attempt.
        event = "request" if path == "web" else "attempt"
        key = gateway.address_key(self.client_address[0])
        if not gateway.failures.charge(key, refusal.reason):  # valid credentials never get here
            refusal = Refused("throttled", f"{refusal.reason}, from an address out of failures")
            gateway.audit.sampled(key, event, **fields, result="rejected", **refusal.audit_fields())
        else:
            gateway.audit.record(event, **fields, result="rejected", **refusal.audit_fields())
        try:
            conn.sendall(http.error_response(refusal.status, refusal.sentence, refusal.reply_headers))
        except OSError:
            pass  # the client is gone; the audit line says what it was told

    def _audit_failure(self, reason, event, /, **fields):
        """An audit line of a failure no answer can be sent for: charged, sampled once throttled."""
        gateway = self.server
        key = gateway.address_key(self.client_address[0])
        if gateway.failures.charge(key, reason):
            gateway.audit.record(event, **fields)
        else:
            gateway.audit.sampled(key, event, **fields)


def _asks_for_websocket(request):
    return "websocket" in (item.strip().lower() for item in request.header("upgrade").split(","))


def _is_serial(request):
    """The serial terminal's WebSocket: a path whose last segment is "serial" (any prefix)."""
    return request.path.rsplit("/", 1)[-1] == "serial"


class Gateway(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    # Daemon threads, waited for by stop() through the connection registry: CPython scans every
    # live non-daemon thread each time one starts (and socketserver its list of them), which
    # cost a handshake ~20 ms with 9,500 sessions open.
    daemon_threads = True
    block_on_close = False
    stop_wait = 30.0  # seconds stop() waits for the connections it ended to finish
    pause = staticmethod(time.sleep)  # the accept back-off's (tests record it instead)
    request_queue_size = 512
    server_address: tuple[Any, ...]  # (host, port) or IPv6's (host, port, flowinfo, scope_id)

    def __init__(self, config: config_module.Config, store: AnyStore, audit: Audit,
                 control_plane: Callable[[Gateway], Any] | None = None,
                 listen_socket: socket.socket | None = None) -> None:
        """control_plane: a callable taking this gateway and returning the handler of the API's
        requests (claims/serve/reload_keys), handed in by whoever builds the gateway.
        listen_socket: a listening socket to serve instead of binding listen:port (socket activation)."""
        self.config = config
        self.store = store
        self.audit = audit
        # Failed attempts per address network; charged only once credentials were found invalid.
        self.failures = throttle.FailureThrottle(config.failed_token_burst, config.failed_token_rate)
        gateway_id = sessions.new_gateway_id()
        self.sessions = sessions.SessionManager(
            store, audit, backend_timeout=config.handshake_timeout,
            heartbeat=config.touch_interval, settings=config,
            backend_tls=tls.backend_context(config.backend_ca, config.backend_cert, config.backend_key),
            recordings=Recordings.from_config(config, store, gateway_id), gateway_id=gateway_id)
        self.consoles = consoles.Consoles(config.console_log_dir, config.console_log_bytes,
                                          config.handshake_timeout, self.sessions.backend_allow, store)
        self.sessions.backend_openers[store_module.SERIAL] = self.consoles.open_backend
        self.screenshots = screenshot.Screenshots(audit, config.screenshot_max_concurrent, config.screenshot_timeout,
                                                  config.screenshot_max_pixels, self.sessions.backend_allow,
                                                  self.sessions.backend_tls,
                                                  held_key=config_module.read_key_file(config.screenshot_key_file))
        self.follower = cluster.Follower(store, self.sessions.gateway_id, self.consoles.sync)
        self.sessions.event_handlers["follow"] = self.follower.wake
        self.sessions.event_handlers["recordings-purged"] = self.sessions.recordings.remove
        self.housekeeper = housekeeping.Housekeeper(self.sessions, config.touch_interval, config.housekeeping_interval,
                                                tasks=(self.sessions.recordings.prune,))
        self.prober = store_watch.Prober(store.ping)  # /healthz's bounded look at the store
        self.tls_context = tls.server_context(config.cert, config.key) if config.cert else None
        self.api = control_plane(self) if control_plane else None
        self.connections = connections.Connections()
        self._spare = fds.Spare()
        self._accept_failing = False
        self._accept_backoff = 0.0
        self.draining = False  # stopping after a drain: /healthz says so, consoles are still served
        self.loop_beat = time.monotonic()  # when the accept loop last turned (the watchdog reads it)
        self.address_family = socket.AF_INET6 if ":" in config.listen else socket.AF_INET
        super().__init__((config.listen, config.port), ConnectionHandler, bind_and_activate=listen_socket is None)
        if listen_socket is not None:
            self.socket.close()
            self.socket, self.server_address = listen_socket, listen_socket.getsockname()
        self.sessions.backend_allow.add_own_port(self.server_address[1])
        if self.api and not config.backend_allow:
            log.warning("the API is on and backend_allow is not set: API keys may mint consoles at any "
                        "address but link-local, the gateway's own port and the store's; set backend_allow "
                        "to the networks where consoles live")
        # Once started for sure (a bad certificate or a busy port is one error line, nothing else).
        self.config = limits.fit_to_fd_limit(config)
        self.sessions.settings = self.config  # max_sessions_per_token may have been lowered

    def serve_forever(self, poll_interval: float = 0.1) -> None:
        self.housekeeper.start()
        self.follower.start()
        super().serve_forever(poll_interval)

    def service_actions(self) -> None:
        self.loop_beat = time.monotonic()

    def stop_accepting(self) -> None:
        """End the accept loop and close the listening socket (another process may bind the port);
        what is open goes on until stop()."""
        self.shutdown()
        self.socket.close()

    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            request = super().get_request()
        except OSError as error:
            if error.errno in fds.ACCEPT_SHORTAGES:
                self._accept_failed(error)
            raise  # serve_forever's loop skips this round
        if self._accept_failing:
            log.info("accepting connections again")
            self._accept_failing, self._accept_backoff = False, 0.0
        return request

    def _accept_failed(self, error):
        """Out of fds or buffers: answer the waiting client 503 through the spare fd, else back
        off (never spin on a listening socket that stays readable)."""
        if not self._accept_failing:
            log.warning("cannot accept connections: %s; answering 503 and backing off until it clears",
                        error.strerror)
            self._accept_failing = True
        if error.errno in fds.EXHAUSTION and self._spare.release():
            try:
                request, client_address = self.socket.accept()
            except OSError:
                pass
            else:
                self._reject(request, client_address, Refused("no-free-fds", error.strerror))
                return
            finally:
                self._spare.restore()
        self._accept_backoff = min(0.5, max(0.01, 2 * self._accept_backoff))
        self.pause(self._accept_backoff)  # short enough for shutdown() to stay prompt

    def address_key(self, address: str) -> str:
        """What per-address shares and failures count by (throttle.address_key's network)."""
        return throttle.address_key(address, self.config.address_prefix_v4, self.config.address_prefix_v6)

    # A TCP server is handed sockets only (the supertype's union covers UDP servers too).
    def process_request(self, request: socket.socket, client_address: tuple) -> None:  # type: ignore[override]
        # A trusted proxy's connections are counted by the client they turn out to be from (pending_as).
        behind_proxy = bool(self.config.trusted_proxies) and web.address_in(client_address[0],
                                                                            self.config.trusted_proxies)
        key = None if behind_proxy else self.address_key(client_address[0])
        # The live sessions' extra fds (recorded, serial: fds.RECORDED_EXTRA...) count as connections' worth.
        extra = (self.sessions.extra_fds + 1) // fds.PER_CONNECTION
        try:
            shed = self.connections.admit(request, key, self.config.max_pending_per_address,
                                          self.config.max_connections, extra)
        except Refused as refusal:
            self._reject(request, client_address, refusal)
            return
        if shed is not None:
            tls.wake(shed)
        super().process_request(request, client_address)

    def pending_as(self, request: socket.socket, client: str) -> None:
        """A trusted proxy's connection, now known to be client's: counted in client's share.
        Raises Refused too-many-pending when client has its share."""
        self.connections.pending_as(request, self.address_key(client.rsplit(":", 1)[0]),
                                    self.config.max_pending_per_address)

    def _reject(self, request, client_address, refusal):
        """Refused before any thread is started for it: one audit line, the answer, closed."""
        self.audit.record("attempt", client=f"{client_address[0]}:{client_address[1]}", path="-",
                          result="rejected", **refusal.audit_fields())
        try:
            request.sendall(http.error_response(refusal.status, refusal.sentence))
        except OSError:
            pass
        self.shutdown_request(request)

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:  # type: ignore[override]
        """A connection's handshake in this thread; a session's relay in threads of its own,
        so that this one ends with the handshake. Its stack went deep (TLS, the store) and the
        allocator keeps per-thread caches of what it freed: a relay lives for hours, and kept
        them, ~5 KiB a session (docs/performance.md, "The handshake's thread ends")."""
        then = None
        try:
            then = self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.connections.handshake_over(request)
            if then is None or not self._hand_over(then, request, client_address):
                self._finish(request, client_address, then)

    def finish_request(self, request: socket.socket, client_address: Any) -> Callable[[], None] | None:  # type: ignore[override]
        """The handshake; returns the session's relay to run, if it has one."""
        return ConnectionHandler(request, client_address, self).then

    def _hand_over(self, then: Callable[[], None], request: socket.socket, client_address: Any) -> bool:
        try:
            threading.Thread(target=self._finish, args=(request, client_address, then), name="relay-up",
                             daemon=True).start()
        except RuntimeError as error:  # no thread to be had: the session relays in this one
            log.warning("relaying in the handshake's thread: %s", error)
            return False
        return True

    def _finish(self, request: socket.socket, client_address: Any, then: Callable[[], None] | None) -> None:
        """What is left of a connection (a session's relay), then the connection let go."""
        try:
            if then is not None:
                then()
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self.connections.ended(request)

    def reload(self) -> None:
        """SIGHUP: the TLS certificate and the API keys, read again."""
        self.reload_tls()
        if self.api:
            self.api.reload_keys()

    def reload_tls(self) -> None:
        """Load cert and key again (SIGHUP); live sessions keep the TLS state they have."""
        if not self.config.cert:
            return
        try:
            self.tls_context = tls.server_context(self.config.cert, self.config.key)
            log.info("reloaded TLS certificate %s", self.config.cert)
        except tls.TlsConfigError as error:
            log.error("%s; keeping the previous certificate", error)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("unexpected error serving %s:%s", *client_address[:2])

    def threads(self) -> dict[str, bool]:
        """{name: up} of the gateway's long-lived threads (vncgate_thread_up, /healthz)."""
        return {**self.housekeeper.threads(), "follower": self.follower.up}

    def connection_count(self) -> int:
        return self.connections.count()

    def stop(self) -> None:
        """Stop accepting, end every session and handshake, wait for their threads."""
        self.shutdown()
        # Thousands of threads end: no full garbage collection (60 ms each with 9,500
        # sessions) meanwhile.
        gc.disable()
        try:
            self.sessions.stop_all("shutdown")
            for conn in self.connections.in_handshake():  # the sessions' are woken by stop_all: these are the others
                tls.wake(conn)
            if not self.connections.wait_all_ended(self.stop_wait):
                log.warning("%d connections still open after %.0f s", self.connections.count(), self.stop_wait)
        finally:
            gc.enable()
        self.server_close()
        if self.housekeeper.is_alive():
            self.housekeeper.stop()  # after every session ended: it writes their end to the store
        if self.follower.is_alive():
            self.follower.stop()  # lets its leases go: another gateway follows at its next round
        self.consoles.stop()  # after the follower, which syncs the follows
        self._spare.close()
        self.sessions.breaker.close()
