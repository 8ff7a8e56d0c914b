"""Behind a balancer: throughput through HAProxy (TCP mode) to vncgate vs to socat, one run.

Usage: python3 bench/balanced.py [--mib 192] [--rounds 7] [--opens 500]

One synthetic backend (bench/peers.py), `socat -b 262144` and vncgate in front of it,
and one HAProxy in TCP mode with two frontends: one to vncgate with send-proxy-v2 (the
gateway trusts HAProxy's address and reads the client from the PROXY header), one to
socat. Prints throughput both ways through each path as MiB/s and as a ratio to the
same path without HAProxy, then the ratio that matters: HAProxy+vncgate against
HAProxy+socat, taken within each round (the median of the rounds is the figure). Also the time to open a console (XVP, up to the banner) through HAProxy
against straight to the gateway: what the PROXY header costs a handshake.
"""

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bench import peers  # noqa: E402
from bench.relay import MiB, Relays, free_port, throughput, wait_port  # noqa: E402

HAPROXY_BIN = shutil.which("haproxy") or "/usr/sbin/haproxy"  # Debian's, off a user's PATH
HAPROXY = """
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend to_vncgate
    bind 127.0.0.1:{vncgate_front}
    default_backend vncgate
frontend to_socat_stream
    bind 127.0.0.1:{socat_stream_front}
    default_backend socat_stream
frontend to_socat_sink
    bind 127.0.0.1:{socat_sink_front}
    default_backend socat_sink
backend vncgate
    server gw 127.0.0.1:{gateway} send-proxy-v2
backend socat_stream
    server socat 127.0.0.1:{socat_stream}
backend socat_sink
    server socat 127.0.0.1:{socat_sink}
"""


class Balanced(Relays):
    """Relays (bench/relay.py) with the gateway trusting 127.0.0.1, and HAProxy in front."""

    def __init__(self, folder):
        super().__init__(folder, tokens=1000, with_peers=False)
        self.gateway.terminate()
        self.gateway.wait(10)
        with open(self.ini, "a") as handle:
            handle.write("trusted_proxies = 127.0.0.1\n")
        self.gateway = self._spawn(["vncgate", "-c", self.ini, "--log-level", "WARNING"])
        wait_port(self.gateway_port)
        template = ["socat", "-b", "262144", "TCP-LISTEN:{port},reuseaddr,fork", "TCP:127.0.0.1:{backend}"]
        self.socat = {mode: self._forwarder(template, backend) for mode, backend in self.modes()}
        self.front = {"vncgate": free_port(), "stream": free_port(), "sink": free_port()}
        config = os.path.join(folder, "haproxy.cfg")
        with open(config, "w") as handle:
            handle.write(HAPROXY.format(vncgate_front=self.front["vncgate"], socat_stream_front=self.front["stream"],
                                        socat_sink_front=self.front["sink"], gateway=self.gateway_port,
                                        socat_stream=self.socat["stream"], socat_sink=self.socat["sink"]))
        self._spawn([HAPROXY_BIN, "-db", "-f", config])
        for port in self.front.values():
            wait_port(port)

    def connect(self, relay, mode):
        if relay == "haproxy+socat":
            return peers.RawEndpoint(socket.create_connection(("127.0.0.1", self.front[mode])))
        if relay == "haproxy+vncgate":
            return peers.xvp_endpoint(self.front["vncgate"], self.tokens["xvp-vnc", mode])
        return super().connect(relay, mode)


def opens(relays, port, count):
    """p50 and p99 seconds to open an XVP console up to the backend's banner."""
    times = []
    for _ in range(count):
        started = time.perf_counter()
        endpoint = peers.xvp_endpoint(port, relays.tokens["xvp-vnc", "echo"])
        endpoint.read_banner()
        times.append(time.perf_counter() - started)
        endpoint.close()
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99) - 1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=192, help="MiB per throughput run")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved runs per path")
    parser.add_argument("--opens", type=int, default=500, help="console opens per path for the handshake figure")
    args = parser.parse_args()
    for tool in ("socat", HAPROXY_BIN, "vncgate", "vncgate-token"):
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} not found (scripts/test installs socat and haproxy; pip install -e . the rest)")
    total = args.mib * MiB
    names = ("socat", "vncgate-xvp", "haproxy+socat", "haproxy+vncgate")
    with tempfile.TemporaryDirectory() as folder:
        relays = Balanced(folder)
        try:
            print(f"# behind HAProxy (TCP mode, send-proxy-v2 to vncgate): {args.mib} MiB per run, "
                  f"{args.rounds} rounds, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
            for mode, label in (("stream", "backend->client"), ("sink", "client->backend")):
                # Interleaved rounds: each path sees the same moments of a shared machine, and the
                # ratio is taken within each round, then the median of the rounds is reported.
                runs: dict = {name: [] for name in names}
                for _ in range(args.rounds):
                    for name in names:
                        runs[name].append(throughput(relays, name, mode, total))
                print(f"\nthroughput {label} (MiB/s: median of {args.rounds}, best)")
                for name in names:
                    print(f"  {name:16} {statistics.median(runs[name]):8.0f} {max(runs[name]):8.0f}")
                for ours, theirs, what in (("haproxy+vncgate", "haproxy+socat", ""),
                                           ("vncgate-xvp", "socat", " (no balancer)")):
                    ratios = sorted(a / b for a, b in zip(runs[ours], runs[theirs]))
                    print(f"  {ours} / {theirs}{what}: median {statistics.median(ratios):.2f}x "
                          f"(rounds {ratios[0]:.2f}x to {ratios[-1]:.2f}x)")
            direct, balanced = opens(relays, relays.gateway_port, args.opens), opens(relays, relays.front["vncgate"],
                                                                                     args.opens)
            print(f"\nconsole open (XVP, to the banner; {args.opens} sequential)")
            print(f"  straight to vncgate     p50 {direct[0] * 1e3:.2f} ms   p99 {direct[1] * 1e3:.2f} ms")
            print(f"  through HAProxy (PROXY) p50 {balanced[0] * 1e3:.2f} ms   p99 {balanced[1] * 1e3:.2f} ms")
        finally:
            relays.stop()


if __name__ == "__main__":
    main()
