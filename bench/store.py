"""Token store benchmark: mint throughput, validate latency with many live tokens.

Usage: python3 bench/store.py [--tokens 100000] [--samples 20000]
Goal (issue 3): validate p99 under 1 ms with 100,000 live tokens.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from vncgate.store import TokenStore  # noqa: E402


def percentile(samples, fraction):
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--samples", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        store = TokenStore(os.path.join(folder, "bench.db"), token_ttl=3600)
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
        size_mb = sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder)) / 1e6
        store.close()
    print(f"tokens in store        {args.tokens}")
    print(f"mint throughput        {args.tokens / mint_seconds:,.0f} tokens/s")
    print(f"validate p50           {statistics.median(latencies) * 1e3:.3f} ms")
    print(f"validate p99           {percentile(latencies, 0.99) * 1e3:.3f} ms   (goal < 1 ms)")
    print(f"database size          {size_mb:.1f} MB")


if __name__ == "__main__":
    main()
