"""Recording benchmark: server-to-client throughput of a recorded XVP session against the same
run's plain (spliced) session, and the recording's size per minute of an idle and a busy qemu console.

Usage: python3 bench/recording.py [--mib 256] [--rounds 5] [--seconds 30]

The backend is an RFB server (security None) that streams --mib MiB after ServerInit; the
client does the handshake and reads it all. Rounds alternate plain and recorded; the best
of each is compared. Console sizes: a python RFB client over the gateway asks qemu for
incremental updates for --seconds, once with the screen left alone (idle) and once while
the monitor resets the machine every 2 s (busy); the recording's bytes are scaled to a minute.
"""

import argparse
import json
import os
import socket
import struct
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from tests import harness  # noqa: E402

MiB = 1 << 20


def streaming_backend(total):
    return harness.FakeBackend(harness.rfb_server_streaming([os.urandom(MiB)] * (total // MiB)))


def client_handshake(sock, rest):
    harness.recv_exactly(sock, 12 - len(rest))
    sock.sendall(b"RFB 003.008\n")
    harness.recv_exactly(sock, 2)
    sock.sendall(b"\x01")
    harness.recv_exactly(sock, 4)
    sock.sendall(b"\x01")
    harness.recv_exactly(sock, len(harness.SERVER_INIT))


def throughput(gateway, token, total):
    sock, status, rest = harness.xvp_connect(gateway.port, token)
    assert status.startswith("HTTP/1.1 200"), status
    client_handshake(sock, rest)
    buffer = bytearray(1 << 20)
    got, started = 0, time.perf_counter()
    while got < total:
        count = sock.recv_into(buffer)
        assert count, "the stream ended early"
        got += count
    elapsed = time.perf_counter() - started
    sock.close()
    return total / MiB / elapsed


def console_minute(gateway, qemu, seconds, busy):
    token = gateway.mint("127.0.0.1", qemu.port, "xvp-vnc", "--record")
    sock, _status, rest = harness.xvp_connect(gateway.port, token)
    harness.recv_exactly(sock, 12 - len(rest))
    sock.sendall(b"RFB 003.008\n")
    count = harness.recv_exactly(sock, 1)[0]
    harness.recv_exactly(sock, count)
    sock.sendall(b"\x01")
    harness.recv_exactly(sock, 4)
    sock.sendall(b"\x01")
    width, height = struct.unpack("!HH", harness.recv_exactly(sock, 4))
    stop = threading.Event()

    def drain():
        sock.settimeout(0.5)
        while not stop.is_set():
            try:
                if not sock.recv(1 << 20):
                    return
            except socket.timeout:
                pass
            except OSError:
                return
    reader = threading.Thread(target=drain)
    reader.start()
    sock.sendall(struct.pack("!BBHi", 2, 0, 2, 5) + struct.pack("!i", 16))  # SetEncodings: Hextile, ZRLE
    sock.sendall(struct.pack("!BBHHHH", 3, 0, 0, 0, width, height))
    started = time.monotonic()
    next_reset = started
    while time.monotonic() - started < seconds:
        if busy and time.monotonic() >= next_reset:
            qemu.monitor("system_reset")
            next_reset += 2
        sock.sendall(struct.pack("!BBHHHH", 3, 1, 0, 0, width, height))
        time.sleep(0.05)  # a viewer's request pace (noVNC asks after each update)
    stop.set()
    reader.join()
    sock.close()
    end = harness.wait_for(lambda: [line for line in gateway.audit() if line["event"] == "session-end"
                                    and line["token_id"] == harness.token_id(token)], timeout=30)[0]
    return end["recording_bytes"] * 60 / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--record-dir", default="rec", help="where recordings go (e.g. on tmpfs: /dev/shm/rec)")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="vncgate-bench-recording-")
    gateway = harness.GatewayProcess(folder, record_dir=args.record_dir, record_max_bytes=1 << 40)
    backend = streaming_backend(args.mib * MiB)
    results = {"plain": [], "recorded": []}
    try:
        for _ in range(args.rounds):
            for kind, extra in (("plain", ()), ("recorded", ("--record",))):
                token = gateway.mint("127.0.0.1", backend.port, "xvp-vnc", *extra)
                results[kind].append(throughput(gateway, token, args.mib * MiB))
        qemu = harness.Qemu(monitor=True)
        try:
            idle = console_minute(gateway, qemu, args.seconds, busy=False)
            busy = console_minute(gateway, qemu, args.seconds, busy=True)
        finally:
            qemu.stop()
    finally:
        backend.stop()
        gateway.stop()
    plain, recorded = max(results["plain"]), max(results["recorded"])
    print(json.dumps({"plain_mib_s": [round(x) for x in results["plain"]],
                      "recorded_mib_s": [round(x) for x in results["recorded"]],
                      "ratio_best": round(recorded / plain, 3),
                      "idle_console_bytes_per_minute": round(idle), "busy_console_bytes_per_minute": round(busy)},
                     indent=1))


if __name__ == "__main__":
    main()
