"""The benchmark's synthetic VNC backend and its thin clients.

The backend (`python3 -m bench.peers backend`) prints three ports, one a mode, and
greets every connection with an RFB banner as a VNC server would:
  stream: reads an 8-byte length N, then sends N bytes (framebuffer updates' direction)
  sink:   reads an 8-byte length N, then N bytes, then answers N as 8 bytes
  echo:   echoes (input events and their replies, for round trips)
  rfb:    the RFB 3.8 handshake with security type None, ClientInit and ServerInit, then each
          FramebufferUpdateRequest asks for x MiB of stream (the console policies' runs,
          whose client-to-server bytes must be real RFB messages)
Lengths travel in-band because a websocket has no half-close.

The clients are deliberately thin so that the relay, not the client, is measured:
payloads are received into one reused buffer and never looked at, and websocket
frames from the client use an all-zero mask key (valid per RFC 6455; it costs the
client nothing and the relay still unmasks).
"""

import base64
import os
import socket
import struct
import sys
import threading
import time

BANNER = b"RFB 003.008\n"
CHUNK = 256 * 1024
_ZEROS = memoryview(bytes(CHUNK))
# 640x480, 32 bits per pixel, true colour, no name
SERVER_INIT = struct.pack("!HHBBBBHHHBBB3xI", 640, 480, 32, 24, 0, 1, 255, 255, 255, 16, 8, 0, 0)


def _exactly(sock, count):
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("peer closed early")
        data += chunk
    return bytes(data)


def _stream(sock):
    remaining = struct.unpack("!Q", _exactly(sock, 8))[0]
    while remaining:
        remaining -= sock.send(_ZEROS[:min(remaining, CHUNK)])
    sock.recv(1)  # hold the connection until the client closes


def _sink(sock):
    total = remaining = struct.unpack("!Q", _exactly(sock, 8))[0]
    buffer = memoryview(bytearray(CHUNK))
    while remaining:
        received = sock.recv_into(buffer[:min(remaining, CHUNK)])
        if not received:
            return
        remaining -= received
    sock.sendall(struct.pack("!Q", total))
    sock.recv(1)


def _echo(sock):
    while True:
        data = sock.recv(65536)
        if not data:
            return
        sock.sendall(data)


def _rfb(sock):
    _exactly(sock, 12)
    sock.sendall(b"\x01\x01")  # one security type: None
    _exactly(sock, 1)
    sock.sendall(bytes(4))  # SecurityResult OK
    _exactly(sock, 1)  # ClientInit
    sock.sendall(SERVER_INIT)
    while True:
        request = _exactly(sock, 10)
        remaining = struct.unpack("!H", request[2:4])[0] << 20
        while remaining:
            remaining -= sock.send(_ZEROS[:min(remaining, CHUNK)])


def _serve(listener, behaviour):
    while True:
        sock, _ = listener.accept()
        threading.Thread(target=_handle, args=(sock, behaviour), daemon=True).start()


def _handle(sock, behaviour):
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.sendall(BANNER)
            behaviour(sock)
        except OSError:
            pass


def serve_backend():
    threading.stack_size(256 * 1024)
    listeners = []
    for behaviour in (_stream, _sink, _echo, _rfb):
        listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
        print(listener.getsockname()[1], flush=True)
        listeners.append(threading.Thread(target=_serve, args=(listener, behaviour), daemon=True))
    for thread in listeners:
        thread.start()
    threading.Event().wait()


class RawEndpoint:
    """A client's end of a byte stream (direct, socat, XVP)."""

    def __init__(self, sock, pending=b""):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.pending = bytearray(pending)
        self.scratch = memoryview(bytearray(CHUNK))

    def _fill(self, count):
        while len(self.pending) < count:
            received = self.sock.recv_into(self.scratch)
            if not received:
                raise ConnectionError("relay closed early")
            self.pending += self.scratch[:received]

    def _take(self, count):
        self._fill(count)
        data = bytes(self.pending[:count])
        del self.pending[:count]
        return data

    def _discard(self, count):
        """Receive and drop count bytes of payload."""
        used = min(count, len(self.pending))
        del self.pending[:used]
        count -= used
        while count:
            received = self.sock.recv_into(self.scratch[:min(count, CHUNK)])
            if not received:
                raise ConnectionError("relay closed early")
            count -= received

    def send(self, data):
        self.sock.sendall(data)

    def recv_exactly(self, count):
        return self._take(count)

    def read_banner(self):
        assert self.recv_exactly(len(BANNER)) == BANNER

    def request_stream(self, total):
        self.send(struct.pack("!Q", total))

    def rfb_handshake(self):
        """The client's RFB handshake up to ServerInit, after read_banner (security None, whether
        the backend offers it or the gateway, which then did the backend's security itself)."""
        self.send(BANNER)
        assert self.recv_exactly(2) == b"\x01\x01"
        self.send(b"\x01")
        assert self.recv_exactly(4) == bytes(4)
        self.send(b"\x01")
        assert self.recv_exactly(len(SERVER_INIT)) == SERVER_INIT

    def request_rfb_stream(self, total):
        """A FramebufferUpdateRequest whose x says how many MiB the rfb backend streams."""
        self.send(struct.pack("!BBHHHH", 3, 0, total >> 20, 0, 640, 480))

    def drain(self, total):
        self._discard(total)
        return total

    def pour(self, total):
        self.send(struct.pack("!Q", total))
        remaining = total
        while remaining:
            size = min(remaining, CHUNK)
            self.send(_ZEROS[:size])
            remaining -= size
        return struct.unpack("!Q", self.recv_exactly(8))[0]

    def close(self):
        self.sock.close()


class WebSocketEndpoint(RawEndpoint):
    """The same, with RFC 6455 binary frames each way."""

    def send(self, data):
        size = len(data)
        if size < 126:
            header = struct.pack("!BB", 0x82, 0x80 | size)
        elif size < 65536:
            header = struct.pack("!BBH", 0x82, 0xFE, size)
        else:
            header = struct.pack("!BBQ", 0x82, 0xFF, size)
        self.sock.sendmsg([header, b"\0\0\0\0", data])  # zero mask: payload goes as it is

    def _frame_length(self):
        first, second = self._take(2)
        assert first & 0x0F in (0x0, 0x2), f"unexpected opcode {first & 0x0F}"
        length = second & 0x7F
        if length == 126:
            length = struct.unpack("!H", self._take(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", self._take(8))[0]
        return length

    def recv_exactly(self, count):
        data = b""
        while len(data) < count:
            data += self._take(self._frame_length())
        return data

    def drain(self, total):
        moved = 0
        while moved < total:
            length = self._frame_length()
            self._discard(length)
            moved += length
        return moved


def xvp_endpoint(port, token):
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(f"CONNECT /console?token={token} HTTP/1.1\r\n\r\n".encode())
    status, rest = _response_head(sock)
    if status != 200:
        raise RuntimeError(f"XVP handshake answered {status}")
    return RawEndpoint(sock, rest)


def ws_endpoint(port, path):
    sock = socket.create_connection(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                  "Sec-WebSocket-Protocol: binary\r\n\r\n").encode())
    status, rest = _response_head(sock)
    if status != 101:
        sock.close()
        raise RuntimeError(f"websocket handshake answered {status}")
    return WebSocketEndpoint(sock, rest)


def rfb_throughput(gateway_port, console_type, token, total):
    """Backend -> client MiB/s of an RFB session (the rfb backend) through the gateway."""
    endpoint = (xvp_endpoint(gateway_port, token) if console_type == "xvp-vnc"
                else ws_endpoint(gateway_port, f"/websockify?token={token}"))
    endpoint.read_banner()
    endpoint.rfb_handshake()
    started = time.perf_counter()
    endpoint.request_rfb_stream(total)
    moved = endpoint.drain(total)
    seconds = time.perf_counter() - started
    endpoint.close()
    assert moved == total
    return total / seconds / (1 << 20)


def ws_path_served(port, token):
    try:
        ws_endpoint(port, f"/websockify?token={token}").close()
        return True
    except (RuntimeError, OSError):
        return False


def _response_head(sock):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError("closed during the handshake")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), rest


if __name__ == "__main__" and sys.argv[1:] == ["backend"]:
    serve_backend()
