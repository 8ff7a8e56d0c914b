"""TLS on the one port: the server context (reloadable) and a relay-safe TLS stream.

OpenSSL forbids using one SSL object from two threads at once, and the relay runs
one thread per direction. TlsStream makes the socket non-blocking, takes a lock
around every OpenSSL call and waits in poll() outside the lock, so a reader
blocked on a quiet client never holds up the writer.
"""

import select
import socket
import ssl
import threading


class TlsConfigError(Exception):
    """The certificate or key cannot be loaded; str() is one line."""


def server_context(cert, key):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as error:
        raise TlsConfigError(f"cannot load TLS certificate {cert} and key {key}: "
                             f"{getattr(error, 'strerror', None) or error}") from None
    return context


def is_client_hello(first_byte):
    return first_byte == b"\x16"  # a TLS handshake record


class TlsStream:
    """A non-blocking SSLSocket that two relay threads may share."""

    def __init__(self, ssl_sock):
        ssl_sock.setblocking(False)
        self.ssl_sock = ssl_sock
        self._lock = threading.Lock()

    def fileno(self):
        return self.ssl_sock.fileno()

    def setsockopt(self, *args):
        self.ssl_sock.setsockopt(*args)

    def settimeout(self, timeout):
        if timeout is not None:
            raise ValueError("a relayed TLS stream waits without a timeout; stop() ends it")

    def _call(self, operation, *args):
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
            poller.poll()

    def recv_into(self, view):
        return self._call(self.ssl_sock.recv_into, view)

    def recv(self, size):
        buffer = bytearray(size)
        return bytes(buffer[:self.recv_into(memoryview(buffer))])

    def send(self, data):
        return self._call(self.ssl_sock.send, data)

    def sendall(self, data):
        view = memoryview(data)
        while view:
            view = view[self.send(view):]

    def pending(self):
        with self._lock:
            return self.ssl_sock.pending()

    def shutdown(self, how):
        # The socket's own shutdown: SSLSocket.shutdown would also drop the SSL state
        # that the other direction is still using.
        socket.socket.shutdown(self.ssl_sock, how)

    def close(self):
        self.ssl_sock.close()
