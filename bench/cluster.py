"""Cluster benchmark (issue 27): follower takeover time, and the latency of serial output from
the follower on gateway A to a viewer on gateway B.

Usage: python3 bench/cluster.py [--lines 2000] [--interval 0.005] [--takeovers 5] [--shares 5000]
Starts its own redis-server (no persistence), a fake serial console (a TCP server that takes
one connection at a time, as qemu's does) and `vncgate` processes on 127.0.0.2 and 127.0.0.3.
Latency: the console prints numbered lines; a serial viewer (websocket) on B, the gateway
that does not follow, times each line from the console's write to its arrival. Takeover: the
follower is killed -9; the time until the other gateway's connection reaches the console.
Shares: what the per-token share costs a handshake on each engine (take, and release at the end).
"""

import argparse
import os
import socket
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from websockets.sync.client import connect as ws_connect  # noqa: E402

from tests.harness import GatewayProcess, RedisServer, wait_for  # noqa: E402
from vncgate.store import TokenStore  # noqa: E402


def percentile(samples, fraction):
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


class SerialConsole:
    """One client at a time; .accepted holds the monotonic time of each connection."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=1)
        self.port = self.listener.getsockname()[1]
        self.accepted = []
        self.conn = None
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.accepted.append(time.monotonic())
                self.conn = conn

    def write(self, data):
        with self.lock:
            conn = self.conn
        if conn is None:
            return False
        try:
            conn.sendall(data)
            return True
        except OSError:
            return False


def gateway(folder, name, host, database):
    return GatewayProcess(folder, name=name, database=database, listen=host, touch_interval=5, token_ttl=3600)


def holder_pid(store, instance):
    holder = store.follow_holder(instance)
    return int(holder.split(":")[1]) if holder else None


def latency_figures(console, gateways, store, args):
    first, second = gateways
    token = store.add_connection_details("vm-bench", "serial", "127.0.0.1", console.port)
    sent = {}
    times = []
    with ws_connect(f"ws://{second.host}:{second.port}/serial?token={token}", subprotocols=["binary"]) as viewer:
        time.sleep(0.5)  # attached: its tail read, its reader waiting

        def write_lines():
            for number in range(args.lines):
                sent[number] = time.perf_counter()
                console.write(f"line {number:06d}\n".encode())
                time.sleep(args.interval)
        writer = threading.Thread(target=write_lines, daemon=True)
        writer.start()
        buffer, seen = b"", 0
        while seen < args.lines:
            buffer += viewer.recv(timeout=10)
            arrived = time.perf_counter()
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if line.startswith(b"line "):
                    times.append(arrived - sent[int(line[5:])])
                    seen += 1
        writer.join()
    return {"serial output A->B p50": f"{statistics.median(times) * 1e3:.2f} ms",
            "serial output A->B p99": f"{percentile(times, 0.99) * 1e3:.2f} ms",
            "lines": str(len(times))}


def takeover_figures(console, gateways, store, folder, database, args):
    """Kill the follower -9, time the other's connection; start a new gateway in its place."""
    samples = []
    for round_number in range(args.takeovers):
        pid = holder_pid(store, "vm-bench")
        follower = next(item for item in gateways if item.proc.pid == pid)
        count = len(console.accepted)
        follower.proc.kill()
        killed = time.monotonic()
        wait_for(lambda count=count: len(console.accepted) > count, 30, 0.005, "the takeover")
        samples.append(console.accepted[count] - killed)
        follower.proc.wait(10)
        gateways[gateways.index(follower)] = gateway(folder, f"gw-r{round_number}", follower.host, database)
    return {"takeover median": f"{statistics.median(samples):.2f} s", "takeover max": f"{max(samples):.2f} s",
            "takeovers": ", ".join(f"{sample:.2f}" for sample in samples)}


def share_figures(database, count):
    """The per-token share a handshake now takes (and its session's end gives back): one store
    round trip each, timed on an engine."""
    store = TokenStore(database, token_ttl=3600)
    token_hash = "f" * 64
    takes, releases = [], []
    try:
        for number in range(count):
            began = time.perf_counter()
            store.take_share(token_hash, f"{number:012x}", 10, 91)
            took = time.perf_counter()
            store.release_shares({f"{number:012x}": token_hash})
            takes.append(took - began)
            releases.append(time.perf_counter() - took)
    finally:
        store.close()
    return {"take p50": f"{statistics.median(takes) * 1e3:.3f} ms",
            "take p99": f"{percentile(takes, 0.99) * 1e3:.3f} ms",
            "release p99": f"{percentile(releases, 0.99) * 1e3:.3f} ms"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=2000)
    parser.add_argument("--interval", type=float, default=0.005)
    parser.add_argument("--takeovers", type=int, default=5)
    parser.add_argument("--shares", type=int, default=5000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        server = RedisServer(folder)
        console = SerialConsole()
        store = TokenStore(server.url, token_ttl=3600)
        gateways = [gateway(folder, "gw-a", "127.0.0.2", server.url)]
        try:
            store.add_follow("vm-bench", "127.0.0.1", console.port)
            wait_for(lambda: holder_pid(store, "vm-bench") == gateways[0].proc.pid, 10, 0.05, "A to follow")
            wait_for(lambda: console.accepted, 10, 0.05, "A's connection")
            gateways.append(gateway(folder, "gw-b", "127.0.0.3", server.url))
            figures = {f"share {name} ({engine})": value
                       for engine, database in (("SQLite", os.path.join(folder, "shares.db")), ("Redis", server.url))
                       for name, value in share_figures(database, args.shares).items()}
            figures.update(latency_figures(console, gateways, store, args))
            figures.update(takeover_figures(console, gateways, store, folder, server.url, args))
        finally:
            store.close()
            for item in gateways:
                if item.proc.poll() is None:
                    item.stop()
            server.stop()
    width = max(map(len, figures))
    for name, value in figures.items():
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
