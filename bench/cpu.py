"""Gateway CPU per MiB relayed, by path: what a session costs the gateway, whatever the
client's speed (throughput on a shared 2-core machine is mostly the clients').

Usage: python3 bench/cpu.py [--mib 512] [--rounds 4]

bench.peers' RFB backend (its own process) streams --mib MiB after ServerInit to a thin
client through one gateway, on XVP and WebSocket sessions, plain and recorded; for each
kind the gateway's user+system CPU time (from /proc) per MiB, median of --rounds, and the
throughput seen. Recordings are deleted after each session (see bench/recording.py).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from bench import peers  # noqa: E402
from bench.recording import forget  # noqa: E402
from tests import harness  # noqa: E402

MiB = 1 << 20


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="vncgate-bench-cpu-")
    gateway = harness.GatewayProcess(folder, record_dir="rec", record_max_bytes=1 << 40)
    backend = subprocess.Popen([sys.executable, "-m", "bench.peers", "backend"], cwd=ROOT,
                               stdout=subprocess.PIPE, text=True)
    rfb_port = [int(backend.stdout.readline()) for _ in range(4)][3]
    results = {}
    try:
        for console_type in ("xvp-vnc", "ws-vnc"):
            for recorded in (False, True):
                cost, speed = [], []
                for _ in range(args.rounds):
                    token = gateway.mint("127.0.0.1", rfb_port, console_type, *(("--record",) if recorded else ()))
                    before = cpu_seconds(gateway.proc.pid)
                    speed.append(peers.rfb_throughput(gateway.port, console_type, token, args.mib * MiB))
                    cost.append((cpu_seconds(gateway.proc.pid) - before) * 1000 / args.mib)
                    if recorded:
                        forget(gateway, token, os.path.join(folder, "rec"))
                results[f"{console_type}{' recorded' if recorded else ''}"] = {
                    "gateway_cpu_ms_per_mib": round(statistics.median(cost), 3), "mib_s": round(statistics.median(speed))}
    finally:
        backend.terminate()
        backend.wait()
        gateway.stop()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
