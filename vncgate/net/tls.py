"""TLS on the one port: the server context (reloadable), the one place connections are
wrapped (accept) and woken (wake), and a relay-safe TLS stream.

OpenSSL forbids using one SSL object from two threads at once, and the relay runs
one thread per direction. TlsStream makes the socket non-blocking, takes a lock
around every OpenSSL call and waits in poll() outside the lock, so a reader
blocked on a quiet client never holds up the writer. Another thread ends a TLS
connection only through wake(), which shuts the socket down beneath OpenSSL
instead of touching the SSL object.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any


class TlsConfigError(Exception):
    """The certificate or key cannot be loaded; str() is one line."""


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """The context of TLS on the one port (TLS 1.2 or later); TlsConfigError when the files do not load."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as error:
        raise TlsConfigError(f"cannot load TLS certificate {cert} and key {key}: "
                             f"{getattr(error, 'strerror', None) or error}") from None
    return context


def backend_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    """The client context for consoles' VeNCrypt: their certificate must chain to ca (the
    system's trust store when ca is empty) and name the host the token gives; cert and key
    are presented when a console asks for a client certificate."""
    try:
        context = ssl.create_default_context(cafile=ca or None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert:
            context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as error:
        files = " and ".join(name for name in (ca, cert, key) if name)
        raise TlsConfigError(f"cannot load the consoles' TLS files {files}: "
                             f"{getattr(error, 'strerror', None) or error}") from None
    return context


def is_client_hello(first_byte: bytes) -> bool:
    return first_byte == b"\x16"  # a TLS handshake record


class HandshakeFailed(Exception):
    """The client's TLS handshake failed; .reason is the audit word, .detail one line."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def accept(context: ssl.SSLContext, sock: socket.socket, deadline: float,
           on_wrapped: Callable[[ssl.SSLSocket], None] = lambda wrapped: None) -> ssl.SSLSocket:
    """The server side of a TLS handshake, finished by deadline; returns the SSLSocket.
    on_wrapped sees the wrapper before the handshake starts (so stop() can wake it)."""
    wrapped = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    on_wrapped(wrapped)
    try:
        wrapped.settimeout(max(0.001, deadline - time.monotonic()))
        wrapped.do_handshake()
        return wrapped
    except (ssl.SSLError, OSError) as error:
        wrapped.close()
        reason = "handshake-timeout" if isinstance(error, socket.timeout) else "tls-handshake-failed"
        raise HandshakeFailed(reason, str(error)[:200]) from None


def wake(sock: Any) -> None:
    """End a connection, TLS or not, from any thread: both ways shut down at the socket.
    Never SSLSocket.shutdown, which drops the SSL state another thread may be inside."""
    try:
        socket.socket.shutdown(sock.ssl_sock if isinstance(sock, TlsStream) else sock, socket.SHUT_RDWR)
    except OSError:
        pass  # closed already, or its peer is gone


class TlsStream:
    """A non-blocking SSLSocket that two relay threads may share."""

    def __init__(self, ssl_sock: ssl.SSLSocket) -> None:
        ssl_sock.setblocking(False)
        self.ssl_sock = ssl_sock
        self._lock = threading.Lock()
        self._timeout: float | None = None

    def fileno(self) -> int:
        return self.ssl_sock.fileno()

    def setsockopt(self, *args: Any) -> None:
        self.ssl_sock.setsockopt(*args)

    def settimeout(self, timeout: float | None) -> None:
        """Each call waits at most timeout seconds (socket.timeout after); None: no limit."""
        self._timeout = timeout

    def _call(self, operation: Callable[..., int], *args: Any) -> int:
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        while True:
            with self._lock:
                try:
                    return operation(*args)
                except ssl.SSLWantReadError:
                    events = select.POLLIN
                except ssl.SSLWantWriteError:
                    events = select.POLLOUT
                except ssl.SSLZeroReturnError:
                    return 0  # the peer's close_notify: end of stream
            poller = select.poll()
            poller.register(self.fileno(), events)
            if deadline is None:
                poller.poll()
            elif not poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
                raise socket.timeout("timed out")

    def recv_into(self, view: memoryview | bytearray) -> int:
        return self._call(self.ssl_sock.recv_into, view)

    def recv(self, size: int) -> bytes:
        buffer = bytearray(size)
        return bytes(buffer[:self.recv_into(memoryview(buffer))])

    def send(self, data: Any) -> int:
        return self._call(self.ssl_sock.send, data)

    def sendall(self, data: Any) -> None:
        view = memoryview(data)
        while view:
            view = view[self.send(view):]

    def pending(self) -> int:
        with self._lock:
            return self.ssl_sock.pending()

    def shutdown(self, how: int) -> None:
        # The socket's own shutdown, as in wake(): the other direction still uses the SSL state.
        socket.socket.shutdown(self.ssl_sock, how)

    def close(self) -> None:
        self.ssl_sock.close()
