"""Token store benchmark, both engines: mint throughput, validate latency with many tokens,
and revoke -> session-closed latency across two gateways sharing the store.

Usage: python3 bench/store.py [--tokens 100000] [--samples 20000] [--revocations 100]
                              [--engines sqlite redis] [--sqlite-touch 0.5]
Starts its own redis-server (no persistence) on a free loopback port, and two `vncgate`
processes on 127.0.0.2 and 127.0.0.3 (an installed vncgate, as the tests use).
Goals (issues 3 and 11): validate p99 < 1 ms (SQLite), <= 2 ms (Redis) with 100,000
tokens; revocation p99 <= 100 ms with Redis (SQLite's bound is touch_interval).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tests.harness import FakeBackend, GatewayProcess, RedisServer, closed_by_peer, rfb_banner_then_echo, xvp_connect  # noqa: E402
from vncgate.store import TokenStore  # noqa: E402


def percentile(samples, fraction):
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def ms(seconds):
    return f"{seconds * 1e3:.3f} ms"


def validate_figures(database, args):
    store = TokenStore(database, token_ttl=3600)
    started = time.perf_counter()
    tokens = [store.add_connection_details(f"vm-{number}", "ws-vnc", f"10.0.{number % 250}.1", 5900)
              for number in range(args.tokens)]
    mint_seconds = time.perf_counter() - started
    latencies = []
    for number in range(args.samples):
        token = tokens[(number * 7919) % len(tokens)]
        began = time.perf_counter()
        store.validate(token, "ws-vnc")
        latencies.append(time.perf_counter() - began)
    store.close()
    return {"mint throughput": f"{args.tokens / mint_seconds:,.0f} tokens/s",
            "validate p50": ms(statistics.median(latencies)), "validate p99": ms(percentile(latencies, 0.99))}


def revocation_figures(folder, database, touch_interval, count):
    """Each round: a session on each gateway, the token revoked from this process (as the CLI
    on a third host would), the time until the later of the two sessions is closed."""
    backend = FakeBackend(rfb_banner_then_echo)
    gateways = [GatewayProcess(folder, name=f"gw{number}", database=database, listen=f"127.0.0.{number}",
                               touch_interval=touch_interval, token_ttl=3600) for number in (2, 3)]
    store = TokenStore(database, token_ttl=3600)
    latencies = []
    try:
        for _ in range(count):
            token = store.add_connection_details("vm", "xvp-vnc", "127.0.0.1", backend.port)
            socks = []
            for gateway in gateways:
                sock, status, _ = xvp_connect(gateway.port, token, host=gateway.host)
                assert status == "HTTP/1.1 200 OK", status
                socks.append(sock)
            began = time.perf_counter()
            assert store.delete_connection_details([token]) == 1
            assert all(closed_by_peer(sock, touch_interval + 5) for sock in socks)
            latencies.append(time.perf_counter() - began)
            for sock in socks:
                sock.close()
    finally:
        store.close()
        for gateway in gateways:
            gateway.stop()
        backend.stop()
    return {"revoke->closed p50": ms(statistics.median(latencies)),
            "revoke->closed p99": ms(percentile(latencies, 0.99))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--revocations", type=int, default=100)
    parser.add_argument("--engines", nargs="+", default=["sqlite", "redis"], choices=["sqlite", "redis"])
    parser.add_argument("--sqlite-touch", type=float, default=0.5, help="touch_interval for SQLite's gateways")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        redis_server = RedisServer(folder) if "redis" in args.engines else None
        try:
            for engine in args.engines:
                database = redis_server.url if engine == "redis" else os.path.join(folder, "bench.db")
                touch = args.sqlite_touch if engine == "sqlite" else 30.0
                results[engine] = validate_figures(database, args)
                if engine == "redis":
                    redis_server.client().flushall()
                results[engine].update(revocation_figures(folder, database, touch, args.revocations))
                results[engine]["touch_interval"] = f"{touch:g} s"
        finally:
            if redis_server is not None:
                redis_server.stop()
    print(f"tokens in store {args.tokens}, validate samples {args.samples}, revocations {args.revocations}")
    rows = list(next(iter(results.values())))
    print(f"{'figure':22}" + "".join(f"{engine:>22}" for engine in results))
    for key in rows:
        print(f"{key:22}" + "".join(f"{results[engine].get(key, '-'):>22}" for engine in results))


if __name__ == "__main__":
    main()
