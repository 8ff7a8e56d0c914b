"""Hostile WebSocket frames against websockify, vncgate and wsproto: the table in docs/decisions.md.

    python3 -m bench.wsframes          # prints the Markdown table (about 30 s)

Each case sends one hostile client frame (or a short sequence) after the upgrade, then a valid
binary frame b"AFTER". websockify 0.13 and vncgate run as real proxies in front of a TCP
backend that greets with an RFB banner and records what it receives; wsproto (a library, not
a proxy) is fed the same bytes through its frame reader (server side). A cell says what the
server answered (close code, pong, nothing), whether b"AFTER" (or the frame's own payload)
reached the backend, and whether the connection ended.
"""

import base64
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

from bench.relay import free_port, wait_port

MASK = b"\x37\xfa\x21\x3d"


def frame(opcode: int, payload: bytes, fin: bool = True, rsv: int = 0, masked: bool = True,
          length: "int | None" = None, form: str = "") -> bytes:
    """One client frame; length/form forge the header (form: "16" or "64" bit length)."""
    size = len(payload) if length is None else length
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0x80 if masked else 0
    if form == "64" or (not form and size >= 65536):
        head = struct.pack("!BBQ", first, mask_bit | 127, size)
    elif form == "16" or (not form and size >= 126):
        head = struct.pack("!BBH", first, mask_bit | 126, size)
    else:
        head = struct.pack("!BB", first, mask_bit | size)
    if not masked:
        return head + payload
    body = bytes(byte ^ MASK[index % 4] for index, byte in enumerate(payload))
    return head + MASK + body


AFTER = frame(0x2, b"AFTER")
CASES = [
    ("unmasked binary frame", frame(0x2, b"UNMSK", masked=False)),
    ("RSV1 set, no extension", frame(0x2, b"RSVSET", rsv=4)),
    ("reserved data opcode 0x3", frame(0x3, b"OP3")),
    ("reserved control opcode 0xB", frame(0xB, b"OPB")),
    ("ping of 200 bytes", frame(0x9, b"p" * 200)),
    ("fragmented ping (FIN=0)", frame(0x9, b"frag", fin=False)),
    ("continuation without a message", frame(0x0, b"CONT")),
    ("new message inside a fragmented one", frame(0x2, b"one", fin=False) + frame(0x2, b"TWO")),
    ("16-bit length for 5 bytes", frame(0x2, b"SHORT", form="16")),
    ("64-bit length with the top bit set", frame(0x2, b"", length=1 << 63, form="64") + b"TOPBIT"),
    ("2^63-1-byte frame, 64 KiB sent", frame(0x2, b"", length=(1 << 63) - 1, form="64")
     + bytes(a ^ b for a, b in zip(b"STREAM" + bytes(65530), MASK * 16384))),
    ("close with a 1-byte payload", frame(0x8, b"\x03")),
    ("close code 1005 (never sent)", frame(0x8, struct.pack("!H", 1005))),
    ("close code 2000 (reserved)", frame(0x8, struct.pack("!H", 2000))),
    ("close reason not UTF-8", frame(0x8, struct.pack("!H", 1000) + b"\xff\xfe")),
]


def _exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


class Backend:
    """Greets with an RFB banner, keeps every byte it receives per connection."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received: list[bytearray] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            data = bytearray()
            self.received.append(data)
            threading.Thread(target=self._handle, args=(sock, data), daemon=True).start()

    @staticmethod
    def _handle(sock: socket.socket, data: bytearray) -> None:
        with sock:
            sock.sendall(b"RFB 003.008\n")
            try:
                while chunk := sock.recv(65536):
                    data += chunk
            except OSError:
                pass


def _server_frames(sock: socket.socket, seconds: float) -> "tuple[list[tuple[int, bytes]], bool]":
    """The frames the server sends within seconds, and whether it closed the connection."""
    sock.settimeout(0.2)
    data, closed, deadline = b"", False, time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            closed = True
            break
        if not chunk:
            closed = True
            break
        data += chunk
    frames = []
    while len(data) >= 2:
        opcode, length = data[0] & 0x0F, data[1] & 0x7F
        start = 2
        if length == 126:
            length, start = struct.unpack("!H", data[2:4])[0], 4
        elif length == 127:
            length, start = struct.unpack("!Q", data[2:10])[0], 10
        frames.append((opcode, data[start:start + length]))
        data = data[start + length:]
    return frames, closed


def _open(port: int, path: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                 f"Sec-WebSocket-Protocol: binary\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += _exactly(sock, 1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def proxy_outcome(port: int, path: str, backend: Backend, hostile: bytes) -> str:
    """What a running proxy does with hostile followed by AFTER."""
    before = len(backend.received)
    sock = _open(port, path)
    with sock:
        _exactly(sock, 2 + 12)  # the banner's frame
        deadline = time.monotonic() + 5
        while len(backend.received) == before and time.monotonic() < deadline:
            time.sleep(0.01)
        try:
            sock.sendall(hostile + AFTER)
        except OSError:
            pass
        frames, closed = _server_frames(sock, 1.5)
    received = bytes(backend.received[-1]) if len(backend.received) > before else b""
    words = []
    for opcode, payload in frames:
        if opcode == 0x8:
            words.append(f"close {struct.unpack('!H', payload[:2])[0]}" if len(payload) >= 2 else "close")
        elif opcode == 0xA:
            words.append(f"pong {len(payload)} B")
    if not words:
        words.append("no answer")
    leaked = [word for word in (b"AFTER", b"UNMSK", b"RSVSET", b"OP3", b"CONT", b"TWO", b"SHORT", b"TOPBIT",
                                b"STREAM") if word in received]
    if leaked:
        words.append("passes " + "+".join(word.decode() for word in leaked))
    words.append("ends" if closed else "stays open")
    return ", ".join(words)


def wsproto_outcome(hostile: bytes) -> str:
    """What wsproto's frame reader (server side) makes of the same bytes."""
    from wsproto.frame_protocol import FrameProtocol, Opcode, ParseFailed
    reader = FrameProtocol(client=False, extensions=[])
    reader.receive_bytes(hostile + AFTER)
    words, data = [], b""
    try:
        for event in reader.received_frames():
            if event.opcode == Opcode.CLOSE:
                words.append(f"close {int(event.payload[0])} (echo)")
                break
            if event.opcode == Opcode.PING:
                words.append(f"ping {len(event.payload)} B")
            elif event.opcode in (Opcode.BINARY, Opcode.CONTINUATION, Opcode.TEXT):
                data += bytes(event.payload)
    except ParseFailed as error:
        words.append(f"refuses {int(error.code)}")
    if b"AFTER" in data or b"STREAM" in data:
        words.append("delivers " + "+".join(word for word in ("STREAM", "AFTER") if word.encode() in data))
    return ", ".join(words) or "waits"


def main() -> None:
    backend = Backend()
    with tempfile.TemporaryDirectory() as folder:
        ini = os.path.join(folder, "ws.ini")
        with open(ini, "w") as handle:
            handle.write("[gateway]\ndatabase = ws.db\naudit_log = audit.jsonl\n")
        with open(os.path.join(folder, "gw.log"), "w") as log:
            gateway = subprocess.Popen(["vncgate", "-c", ini, "--port", "0"], stderr=log, cwd=folder)
        websockify_port = free_port()
        websockify = subprocess.Popen(["websockify", f"127.0.0.1:{websockify_port}", f"127.0.0.1:{backend.port}"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            gateway_port = _listening(os.path.join(folder, "gw.log"))
            token = subprocess.run(["vncgate-token", "-c", ini, "add", "--host", "127.0.0.1", "--port",
                                    str(backend.port), "--ttl", "3600", "--json"], capture_output=True, text=True,
                                   check=True, timeout=30).stdout.split('"token": "')[1].split('"')[0]
            wait_port(websockify_port)
            import wsproto

            print(f"| hostile client frame | websockify {_version('websockify')} | vncgate | "
                  f"wsproto {wsproto.__version__} (frame reader) |")
            print("| --- | --- | --- | --- |")
            for name, hostile in CASES:
                cells = (proxy_outcome(websockify_port, "/", backend, hostile),
                         proxy_outcome(gateway_port, f"/websockify?token={token}", backend, hostile),
                         wsproto_outcome(hostile))
                print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
        finally:
            for proc in (gateway, websockify):
                proc.terminate()
                proc.wait(10)


def _version(package: str) -> str:
    from importlib.metadata import version

    return ".".join(version(package).split(".")[:2])


def _listening(log: str) -> int:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with open(log) as handle:
            for line in handle:
                if line.startswith("vncgate listening on "):
                    return int(line.rsplit(":", 1)[1])
        time.sleep(0.05)
    sys.exit("vncgate did not start")


if __name__ == "__main__":
    main()
