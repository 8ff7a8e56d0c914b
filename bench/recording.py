"""Recording benchmark: server-to-client throughput of recorded XVP and WebSocket sessions
against the same run's plain ones, update latency, and the recording's size per minute of an
idle and a busy qemu console.

Usage: python3 bench/recording.py [--mib 256] [--rounds 5] [--seconds 30] [--updates 3000]
                                  [--record-dir DIR] [--gateway-cpus LIST]

Throughput: bench.peers' RFB backend (its own process; security None, then --mib MiB of
updates on request) and its thin clients, as bench/relay.py's console-policy figures. For
each console type, after one warm-up pair, each round runs a plain and a --record session
one after the other, each going first in turn; the figure is the median of the rounds' own
ratios, with best to best beside it. Each recording is deleted once its round is over (see
forget()). Update latency, at console rates: a backend answers each one-byte request with an
--update-kib KiB update; p50 and p99 of --updates round trips on a plain and on a recorded
XVP session (after one warm-up pair). Console sizes: a Python RFB client over the gateway
asks qemu for incremental updates for --seconds, once with the screen left alone (idle) and
once while the monitor resets the machine every 2 s (busy); the recording's bytes are scaled
to a minute.
"""

import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from bench import peers  # noqa: E402
from tests import harness  # noqa: E402

MiB = 1 << 20


def client_handshake(sock, rest):
    harness.rfb_client_handshake(sock, rest)


def update_latency(gateway, port, record, count, size):
    """Microseconds from a one-byte request to the whole size-byte answer, count times: a
    console's update round trips at console rates."""
    token = gateway.mint("127.0.0.1", port, "xvp-vnc", *(("--record",) if record else ()))
    sock, status, rest = harness.xvp_connect(gateway.port, token)
    assert status.startswith("HTTP/1.1 200"), status
    client_handshake(sock, rest)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    for _ in range(count):
        started = time.perf_counter()
        sock.sendall(b"\x03")
        harness.recv_exactly(sock, size)
        times.append((time.perf_counter() - started) * 1e6)
    sock.close()
    times.sort()
    return times[len(times) // 2], times[len(times) * 99 // 100]


def forget(gateway, token, record_dir):
    """Once the session has ended, delete its recording: the next round's file then reuses
    page-cache memory, as on a host that has been up a while (see docs/performance.md)."""
    harness.wait_for(lambda: [line for line in gateway.audit() if line["event"] == "session-end"
                              and line["token_id"] == harness.token_id(token)], timeout=30)
    for name in os.listdir(record_dir):
        os.unlink(os.path.join(record_dir, name))


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


def summary(samples):
    """The rounds' figures and their ratios: the median of each round's own ratio (the two ran
    one after the other under the same load; bench/relay.py's statistic), and best to best."""
    plain, recorded = samples["plain"], samples["recorded"]
    return {"plain_mib_s": [round(x) for x in plain], "recorded_mib_s": [round(x) for x in recorded],
            "ratio_median_of_rounds": round(statistics.median(r / p for r, p in zip(recorded, plain)), 3),
            "ratio_best": round(max(recorded) / max(plain), 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--updates", type=int, default=3000, help="update round trips per session")
    parser.add_argument("--update-kib", type=int, default=64, help="size of each update")
    parser.add_argument("--record-dir", default="rec", help="where recordings go (e.g. on tmpfs: /dev/shm/rec)")
    parser.add_argument("--gateway-cpus", help="run the gateway on these CPUs only (taskset -c), e.g. 1 with "
                                               "the bench itself under taskset -c 0")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="vncgate-bench-recording-")
    gateway = harness.GatewayProcess(folder, record_dir=args.record_dir, record_max_bytes=1 << 40,
                                     wrapper=("taskset", "-c", args.gateway_cpus) if args.gateway_cpus else ())
    backend = subprocess.Popen([sys.executable, "-m", "bench.peers", "backend"], cwd=ROOT,
                               stdout=subprocess.PIPE, text=True)  # its own process: not our GIL
    rfb_port = [int(backend.stdout.readline()) for _ in range(4)][3]
    record_dir = os.path.join(folder, args.record_dir)
    results = {}
    try:
        for console_type in ("xvp-vnc", "ws-vnc"):
            results[console_type] = samples = {"plain": [], "recorded": []}
            for round_number in range(args.rounds + 1):  # round 0 warms up: not counted
                for kind in sorted(samples, reverse=bool(round_number % 2)):  # each goes first in turn
                    token = gateway.mint("127.0.0.1", rfb_port, console_type,
                                         *(("--record",) if kind == "recorded" else ()))
                    speed = peers.rfb_throughput(gateway.port, console_type, token, args.mib * MiB)
                    if round_number:
                        samples[kind].append(speed)
                    if kind == "recorded":
                        forget(gateway, token, record_dir)
        answering = harness.FakeBackend(harness.rfb_server_streaming([], answer=os.urandom(args.update_kib << 10)))
        try:
            latency = {kind: update_latency(gateway, answering.port, kind == "recorded", args.updates,
                                            args.update_kib << 10)
                       for _ in range(2) for kind in ("plain", "recorded")}  # the second round counts
        finally:
            answering.stop()
        qemu = harness.Qemu(monitor=True)
        try:
            idle = console_minute(gateway, qemu, args.seconds, busy=False)
            busy = console_minute(gateway, qemu, args.seconds, busy=True)
        finally:
            qemu.stop()
    finally:
        backend.terminate()
        backend.wait()
        gateway.stop()
    print(json.dumps({**{console_type: summary(samples) for console_type, samples in results.items()},
                      "update_us_p50_p99": {kind: [round(x) for x in value] for kind, value in latency.items()},
                      "idle_console_bytes_per_minute": round(idle), "busy_console_bytes_per_minute": round(busy)},
                     indent=1))


if __name__ == "__main__":
    main()
