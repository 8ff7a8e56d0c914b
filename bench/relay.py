"""Relay benchmark: vncgate against socat and websockify on the same synthetic backend, one run.

Usage: python3 bench/relay.py [--mib 192] [--rounds 3] [--rtt 2000] [--handshakes 2000]
                              [--tokens 100000] [--sessions 1000] [--max-sessions 2000] [--plot FILE]
                              [--only policy]

Prints throughput both ways for every relay as a ratio to `socat -b 262144`, the
small-message round trip as a ratio to a direct connection, vncgate's handshake
latency with many tokens in the store, memory per idle session (PSS) against
websockify's, how many concurrent sessions vncgate held, and the backend-to-client
throughput of a session with a console policy (view-only: the gateway reads the
client's stream) as a ratio to the same run's plain session. Absolute numbers on a
shared machine are noise; the ratios are the result.
"""

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bench import peers  # noqa: E402

MiB = 1 << 20


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_port(port, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


class Relays:
    """Starts the peers and vncgate in front of one backend process; knows how to reach each."""

    def __init__(self, folder, tokens, with_peers=True):
        """with_peers=False: vncgate alone (the policy figures compare vncgate with itself)."""
        self.folder = folder
        self.procs = []
        self.backend = self._spawn([sys.executable, "-m", "bench.peers", "backend"], read_ports=4)
        self.stream_port, self.sink_port, self.echo_port, self.rfb_port = self.backend_ports
        self.gateway_port = free_port()
        ini = os.path.join(folder, "bench.ini")
        with open(ini, "w") as handle:
            handle.write(f"[gateway]\nport = {self.gateway_port}\ndatabase = bench.db\n"
                         f"audit_log = audit.jsonl\nmax_connections = 100000\ntoken_ttl = 86400\n"
                         # the memory and concurrency figures hold thousands of sessions of one token
                         "max_sessions_per_token = 100000\n")
        self._fill_store(os.path.join(folder, "bench.db"), tokens)
        self.ini = ini
        self.gateway = self._spawn(["vncgate", "-c", ini, "--log-level", "WARNING"])
        wait_port(self.gateway_port)
        peer_modes = self.modes() if with_peers else ()
        self.socat = {mode: self._forwarder(["socat", "-b", "262144", "TCP-LISTEN:{port},reuseaddr,fork",
                                             "TCP:127.0.0.1:{backend}"], backend)
                      for mode, backend in peer_modes}
        self.websockify = {mode: self._forwarder(["websockify", "127.0.0.1:{port}", "127.0.0.1:{backend}"],
                                                 backend) for mode, backend in peer_modes}
        self.tokens = {(console_type, mode): self.mint(console_type, backend)
                       for console_type in ("xvp-vnc", "ws-vnc") for mode, backend in self.modes()}
        self.websocket_served = peers.ws_path_served(self.gateway_port, self.tokens["ws-vnc", "echo"])
        self.rfb_tokens = {(console_type, policy): self.mint(console_type, self.rfb_port, *flags)
                           for console_type in ("xvp-vnc", "ws-vnc")
                           for policy, flags in (("plain", ()), ("view-only", ("--view-only",)))}

    def modes(self):
        return (("stream", self.stream_port), ("sink", self.sink_port), ("echo", self.echo_port))

    def _spawn(self, argv, read_ports=0):
        proc = subprocess.Popen(argv, cwd=os.path.dirname(HERE) if read_ports else self.folder,
                                stdout=subprocess.PIPE if read_ports else subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, text=True)
        self.procs.append(proc)
        if read_ports:
            self.backend_ports = [int(proc.stdout.readline()) for _ in range(read_ports)]
        return proc

    def _forwarder(self, template, backend):
        port = free_port()
        self._spawn([part.format(port=port, backend=backend) for part in template])
        wait_port(port)
        return port

    @staticmethod
    def _fill_store(path, count):
        from vncgate.store import TokenStore
        store = TokenStore(path, token_ttl=86400)
        for number in range(count):
            store.add_connection_details(f"filler-{number}", "xvp-vnc", "10.9.9.9", 5900)
        store.close()

    def mint(self, console_type, backend, *flags):
        out = subprocess.run(["vncgate-token", "-c", self.ini, "add", "--host", "127.0.0.1", "--port",
                              str(backend), "--type", console_type, "--json", *flags], capture_output=True,
                             text=True, check=True).stdout
        return json.loads(out)["token"]

    def connect(self, relay, mode):
        """A socket-like Endpoint through the named relay to the backend's mode port."""
        backend = dict(self.modes())[mode]
        if relay == "direct":
            return peers.RawEndpoint(socket.create_connection(("127.0.0.1", backend)))
        if relay == "socat":
            return peers.RawEndpoint(socket.create_connection(("127.0.0.1", self.socat[mode])))
        if relay == "vncgate-xvp":
            return peers.xvp_endpoint(self.gateway_port, self.tokens["xvp-vnc", mode])
        if relay == "websockify":
            return peers.ws_endpoint(self.websockify[mode], "/")
        if relay == "vncgate-ws":
            return peers.ws_endpoint(self.gateway_port, f"/websockify?token={self.tokens['ws-vnc', mode]}")
        raise ValueError(relay)

    def stop(self):
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def throughput(relays, relay, mode, total):
    endpoint = relays.connect(relay, mode)
    endpoint.read_banner()
    started = time.perf_counter()
    if mode == "stream":
        endpoint.request_stream(total)
        moved = endpoint.drain(total)
    else:
        moved = endpoint.pour(total)
    seconds = time.perf_counter() - started
    endpoint.close()
    assert moved == total, f"{relay} {mode}: moved {moved} of {total} bytes"
    return total / seconds / MiB


def report_policy(relays, args):
    """Each round measures the plain and the policy session one after the other, so both see
    the same machine, in turns (the second runs while the first one's teardown finishes).
    Spliced throughput on a shared machine swings by a third between runs, so the figure is
    the median of the rounds' own ratios (each pair ran under the same load); the medians
    of each side are shown beside it."""
    total = args.mib * MiB
    rounds = max(args.rounds, 5)
    print(f"\nthroughput backend->client with a console policy (MiB/s; view-only vs plain, "
          f"{rounds} rounds, {args.mib} MiB per run)")
    consoles = ("xvp-vnc", "ws-vnc") if relays.websocket_served else ("xvp-vnc",)
    for console_type in consoles:
        samples = {"plain": [], "view-only": []}
        for round_number in range(rounds):
            for policy in sorted(samples, reverse=bool(round_number % 2)):
                samples[policy].append(peers.rfb_throughput(relays.gateway_port, console_type,
                                                            relays.rfb_tokens[console_type, policy], total))
        ratio = statistics.median(ours / plain for ours, plain in zip(samples["view-only"], samples["plain"]))
        print(f"  {console_type:8} {ratio:5.2f}x (median of the rounds' ratios; goal >= 0.95x)   medians: plain "
              f"{statistics.median(samples['plain']):6.0f}  view-only {statistics.median(samples['view-only']):6.0f}")


def round_trips(relays, relay, count):
    endpoint = relays.connect(relay, "echo")
    endpoint.read_banner()
    samples = []
    message = b"\x05\x00\x01\x00\x02\x00"  # a PointerEvent's size
    for _ in range(count):
        began = time.perf_counter()
        endpoint.send(message)
        endpoint.recv_exactly(len(message))
        samples.append(time.perf_counter() - began)
    endpoint.close()
    return statistics.median(samples)


def handshakes(relays, count):
    samples = []
    for _ in range(count):
        began = time.perf_counter()
        endpoint = relays.connect("vncgate-xvp", "echo")
        endpoint.read_banner()
        samples.append(time.perf_counter() - began)
        endpoint.close()
    samples.sort()
    return samples[len(samples) // 2], samples[int(len(samples) * 0.99)]


def pss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as handle:
                total += next(int(line.split()[1]) for line in handle if line.startswith("Pss:"))
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def family(pid):
    """pid and all its descendants (websockify forks one process per connection)."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid] + [member for child in children for member in family(int(child))]


def idle_session_cost(relays, relay, pid, sessions):
    before = pss_kib(family(pid))
    held = []
    for _ in range(sessions):
        endpoint = relays.connect(relay, "echo")
        endpoint.read_banner()
        held.append(endpoint)
    time.sleep(1)  # let forked children settle their copy-on-write pages before measuring
    after = pss_kib(family(pid))
    for endpoint in held:
        endpoint.close()
    return (after - before) / sessions


def most_sessions(relays, limit):
    held = []
    try:
        while len(held) < limit:
            endpoint = relays.connect("vncgate-xvp", "echo")
            endpoint.read_banner()
            held.append(endpoint)
        for endpoint in held[:: max(1, len(held) // 50)]:  # a sample of them still relays
            endpoint.send(b"ok")
            assert endpoint.recv_exactly(2) == b"ok"
        return len(held), None
    except (OSError, AssertionError, RuntimeError) as error:
        return len(held), repr(error)
    finally:
        for endpoint in held:
            endpoint.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=192, help="MiB per throughput run")
    parser.add_argument("--rounds", type=int, default=3, help="throughput runs per relay (best is kept)")
    parser.add_argument("--rtt", type=int, default=2000, help="small-message round trips per relay")
    parser.add_argument("--handshakes", type=int, default=2000)
    parser.add_argument("--tokens", type=int, default=100_000, help="tokens in the store during the run")
    parser.add_argument("--sessions", type=int, default=1000, help="idle sessions for the memory figure")
    parser.add_argument("--max-sessions", type=int, default=2000, help="bound of the concurrency ramp")
    parser.add_argument("--plot", metavar="FILE", help="write a PNG of throughput by relay (needs matplotlib)")
    parser.add_argument("--only", choices=("policy",), help="run only this part")
    args = parser.parse_args()
    for tool in ("socat", "websockify", "vncgate", "vncgate-token"):
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} not found (scripts/test installs socat; pip install -e . the rest)")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    with tempfile.TemporaryDirectory() as folder:
        relays = Relays(folder, args.tokens, with_peers=args.only != "policy")
        try:
            if args.only != "policy":
                report(relays, args)
            report_policy(relays, args)
        finally:
            relays.stop()


def report(relays, args):
    total = args.mib * MiB
    names = ["direct", "socat", "websockify", "vncgate-xvp"] + (["vncgate-ws"] if relays.websocket_served else [])
    print(f"# vncgate relay benchmark: {args.mib} MiB per run, best of {args.rounds}, "
          f"{args.tokens} tokens in the store, {os.cpu_count()} cores")
    results = {}
    for mode, label in (("stream", "backend->client"), ("sink", "client->backend")):
        for name in names:
            results[name, mode] = max(throughput(relays, name, mode, total) for _ in range(args.rounds))
        socat = results["socat", mode]
        print(f"\nthroughput {label} (MiB/s, ratio to socat)")
        for name in names:
            print(f"  {name:12} {results[name, mode]:9.0f}   {results[name, mode] / socat:5.2f}x")
    if relays.websocket_served:
        for mode in ("stream", "sink"):
            print(f"  vncgate-ws / websockify ({mode}): "
                  f"{results['vncgate-ws', mode] / results['websockify', mode]:.2f}x")
    else:
        print("  vncgate-ws: not measured (the gateway does not serve websockets yet)")

    direct_rtt = round_trips(relays, "direct", args.rtt)
    print(f"\nsmall-message round trip p50 (ms, ratio to direct; {args.rtt} round trips)")
    for name in names:
        rtt = direct_rtt if name == "direct" else round_trips(relays, name, args.rtt)
        print(f"  {name:12} {rtt * 1e3:7.3f}   {rtt / direct_rtt:5.2f}x")

    p50, p99 = handshakes(relays, args.handshakes)
    print(f"\nvncgate XVP handshake ({args.handshakes} sequential, {args.tokens} tokens in the store)")
    print(f"  p50 {p50 * 1e3:.2f} ms   p99 {p99 * 1e3:.2f} ms   (goal p99 <= 5 ms)")

    print(f"\nmemory per idle session (PSS, {args.sessions} sessions)")
    ours = idle_session_cost(relays, "vncgate-xvp", relays.gateway.pid, args.sessions)
    theirs = idle_session_cost(relays, "websockify", relays.procs[-1].pid, min(args.sessions, 200))
    print(f"  vncgate-xvp  {ours:8.1f} KiB   (goal <= 150 KB)")
    print(f"  websockify   {theirs:8.1f} KiB   (one process per session; measured at {min(args.sessions, 200)})")

    held, error = most_sessions(relays, args.max_sessions)
    print(f"\nconcurrent sessions held by vncgate: {held} of {args.max_sessions} tried"
          + (f" (stopped by {error})" if error else ", all relaying"))
    if args.plot:
        plot(results, names, args.plot)


def plot(results, names, path):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot
    figure, axes = pyplot.subplots(figsize=(8, 4))
    width = 0.38
    for offset, (mode, label) in enumerate((("stream", "backend -> client"), ("sink", "client -> backend"))):
        values = [results[name, mode] / results["socat", mode] for name in names]
        axes.bar([index + offset * width for index in range(len(names))], values, width, label=label)
    axes.axhline(1.0, color="grey", linewidth=0.8)
    axes.set_xticks([index + width / 2 for index in range(len(names))], names)
    axes.set_ylabel("throughput, ratio to socat -b 262144")
    axes.set_title("Relay throughput on one 2-core machine, one run")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"\nplot written to {path}")


if __name__ == "__main__":
    threading.stack_size(512 * 1024)
    main()
