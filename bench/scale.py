"""Scale benchmark (issue 13): thousands of concurrent XVP sessions on one gateway under a hard fd limit.

Usage: python3 bench/scale.py [--sessions 9500] [--fd-limit 20000] [--sample 500]
                              [--handshakes 1000] [--storm 2000] [--storm-batch 100]
                              [--source DIR] [--filler-tokens 100000]

Starts a backend that greets (an RFB banner) and echoes, in one asyncio process, and
`vncgate` under `prlimit --nofile=LIMIT:LIMIT`, then, as an operator would see it from
outside: the gateway's startup line; handshake latency on an empty gateway; SESSIONS
concurrent XVP sessions opened 100 at a time from 50 loopback addresses, each in a /24 of its
own (so the default max_pending_per_address = 50, counted per /24, is kept); the gateway's PSS per session; handshake latency
while they are open; a connect storm of STORM clients, STORM_BATCH at a time, each
echoing a byte; a byte echoed on a SAMPLE of the held sessions (every one must still
relay); then SIGTERM with every session open: exit status and time to exit.
--source runs the gateway from another checkout (to measure before/after).
Prints one JSON object.
"""

import argparse
import asyncio
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BANNER = b"RFB 003.008\n"
TOKENS_PER_SESSION_CAP = 10  # the default max_sessions_per_token
SPARE_TOKENS = 50  # for the handshakes and the storm, besides the held sessions' (10 a token)
ADDRESSES = [f"127.0.{number}.1" for number in range(1, 51)]


# -- the backend: greet, then echo; one process, one event loop ------------------------------

async def _greet_and_echo(reader, writer):
    writer.write(BANNER)
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    writer.close()


async def _serve_backend():
    server = await asyncio.start_server(_greet_and_echo, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


# -- the clients -------------------------------------------------------------------------------

class Session:
    def __init__(self, reader, writer):
        self.reader = reader
        self.writer = writer

    async def echo(self, payload=b"x"):
        self.writer.write(payload)
        return await self.reader.readexactly(len(payload)) == payload

    def close(self):
        self.writer.close()


async def open_session(port, token, source, timeout):
    """CONNECT, 200, the backend's banner; returns (Session, seconds it took)."""
    began = time.perf_counter()
    sock = socket.socket()
    sock.setblocking(False)
    sock.bind((source, 0))
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), timeout)
        reader, writer = await asyncio.open_connection(sock=sock)
    except BaseException:
        sock.close()
        raise
    try:
        writer.write(f"CONNECT /console?token={token} HTTP/1.1\r\nHost: gateway\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        if not head.startswith(b"HTTP/1.1 200 "):
            raise RuntimeError(head.split(b"\r\n", 1)[0].decode())
        if await asyncio.wait_for(reader.readexactly(len(BANNER)), timeout) != BANNER:
            raise RuntimeError("no banner")
    except BaseException:
        writer.close()
        raise
    return Session(reader, writer), time.perf_counter() - began


def percentiles(samples):
    ordered = sorted(samples)
    def pick(fraction):
        return round(1000 * ordered[min(len(ordered) - 1, int(len(ordered) * fraction))], 2)
    return {"p50_ms": pick(0.50), "p99_ms": pick(0.99), "max_ms": round(1000 * ordered[-1], 2),
            "mean_ms": round(1000 * statistics.fmean(ordered), 2)}


async def sequential_handshakes(port, tokens, count, timeout):
    took = []
    for number in range(count):
        session, seconds = await open_session(port, tokens[number % len(tokens)], ADDRESSES[number % 50], timeout)
        session.close()
        took.append(seconds)
        await asyncio.sleep(0.002)  # a steady trickle, not a storm
    return percentiles(took)


async def batched(count, batch, attempt):
    """attempt(number) for every number below count, batch at a time; returns (failures, seconds)."""
    failures = []
    gate = asyncio.Semaphore(batch)

    async def one(number):
        async with gate:
            try:
                await attempt(number)
            except (OSError, RuntimeError, asyncio.TimeoutError, asyncio.IncompleteReadError) as error:
                failures.append(repr(error))
    began = time.perf_counter()
    await asyncio.gather(*(one(number) for number in range(count)))
    return failures, time.perf_counter() - began


async def ramp(port, tokens, count, batch, timeout):
    """count sessions held open, batch at a time; returns (sessions, failures, seconds)."""
    held = []

    async def hold(number):
        session, _ = await open_session(port, tokens[number // TOKENS_PER_SESSION_CAP], ADDRESSES[number % 50],
                                        timeout)
        held.append(session)
    failures, seconds = await batched(count, batch, hold)
    return held, failures, seconds


async def storm(port, tokens, count, batch, timeout):
    """count clients, batch at a time, each: handshake, a byte echoed, gone."""
    took = []

    async def visit(number):
        session, seconds = await open_session(port, tokens[number % len(tokens)], ADDRESSES[number % 50], timeout)
        try:
            if not await asyncio.wait_for(session.echo(), timeout):
                raise RuntimeError("wrong echo")
        finally:
            session.close()
        took.append(seconds)
    failures, seconds = await batched(count, batch, visit)
    return {"clients": count, "at_a_time": batch, "failures": len(failures), "first_failures": failures[:3],
            "seconds": round(seconds, 2), **(percentiles(took) if took else {})}


def pss_kib(pid):
    with open(f"/proc/{pid}/smaps_rollup") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("Pss:"))


def start(folder, args, procs):
    backend = subprocess.Popen([sys.executable, os.path.abspath(__file__), "backend"], stdout=subprocess.PIPE,
                               text=True)
    procs.append(backend)
    backend_port = int(backend.stdout.readline())
    sys.path.insert(0, args.source)
    from vncgate.store import TokenStore  # noqa: E402 (from the checkout measured)
    store = TokenStore(os.path.join(folder, "scale.db"), token_ttl=86400)
    for number in range(args.filler_tokens):
        store.add_connection_details(f"filler-{number}", "xvp-vnc", "10.9.9.9", 5900)
    needed = -(-args.sessions // TOKENS_PER_SESSION_CAP) + SPARE_TOKENS
    tokens = [store.add_connection_details(f"vm-{number}", "xvp-vnc", "127.0.0.1", backend_port)
              for number in range(needed)]
    store.close()
    ini = os.path.join(folder, "scale.ini")
    with open(ini, "w") as handle:
        handle.write("[gateway]\ndatabase = scale.db\naudit_log = audit.jsonl\n"
                     f"max_connections = {args.max_connections}\ntoken_ttl = 86400\n")
    stderr = open(os.path.join(folder, "gateway.log"), "w")
    env = dict(os.environ, PYTHONPATH=args.source)
    gateway = subprocess.Popen(
        ["prlimit", f"--nofile={args.fd_limit}:{args.fd_limit}", "--", sys.executable, "-c",
         "from vncgate.control.cli_serve import serve_main_exit; serve_main_exit()", "-c", ini, "--port", "0"],
        cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    procs.append(gateway)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and gateway.poll() is None:
        lines = open(stderr.name).read().splitlines()
        listening = [line for line in lines if line.startswith("vncgate listening on ")]
        if listening:
            port = int(listening[0].rsplit(":", 1)[1])
            fit = [line.split(": ", 1)[1] for line in lines if "fd limit" in line]
            return gateway, port, tokens, fit, stderr.name
        time.sleep(0.05)
    raise RuntimeError(f"the gateway did not start: {open(stderr.name).read()}")


async def run(args, port, tokens, gateway):
    results = {}
    tokens, spare = tokens[SPARE_TOKENS:], tokens[:SPARE_TOKENS]
    results["handshake_empty"] = await sequential_handshakes(port, spare, args.handshakes, args.timeout)
    before = pss_kib(gateway.pid)
    held, failures, seconds = await ramp(port, tokens, args.sessions, args.storm_batch, args.timeout)
    await asyncio.sleep(1)
    after = pss_kib(gateway.pid)
    results["sessions"] = {"asked": args.sessions, "open": len(held), "failures": len(failures),
                           "first_failures": failures[:3], "ramp_seconds": round(seconds, 1),
                           "gateway_pss_mib": round(after / 1024, 1),
                           "pss_per_session_kib": round((after - before) / max(1, len(held)), 1),
                           "gateway_threads": len(os.listdir(f"/proc/{gateway.pid}/task")),
                           "gateway_fds": len(os.listdir(f"/proc/{gateway.pid}/fd"))}
    results["handshake_while_open"] = await sequential_handshakes(port, spare, args.handshakes, args.timeout)
    results["storm"] = await storm(port, spare, args.storm, args.storm_batch, args.timeout)
    sample = held[:: max(1, len(held) // args.sample)][: args.sample]
    echoed = await asyncio.gather(*(asyncio.wait_for(session.echo(), args.timeout) for session in sample),
                                  return_exceptions=True)
    results["echo_sample"] = {"sampled": len(sample), "echoed": sum(1 for ok in echoed if ok is True)}
    began = time.perf_counter()
    gateway.send_signal(signal.SIGTERM)
    try:
        status = await asyncio.get_running_loop().run_in_executor(None, gateway.wait, 60)
    except subprocess.TimeoutExpired:
        gateway.kill()
        status = "killed after 60 s"
    results["sigterm"] = {"sessions_open": len(held), "exit_status": status,
                          "seconds": round(time.perf_counter() - began, 2)}
    for session in held:
        session.close()
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=9500)
    parser.add_argument("--fd-limit", type=int, default=20000)
    parser.add_argument("--max-connections", type=int, default=10000,
                        help="asked of the gateway, which lowers it to what the fd limit holds")
    parser.add_argument("--sample", type=int, default=500)
    parser.add_argument("--handshakes", type=int, default=1000)
    parser.add_argument("--storm", type=int, default=2000)
    parser.add_argument("--storm-batch", type=int, default=100)
    parser.add_argument("--filler-tokens", type=int, default=0, help="extra tokens in the store")
    parser.add_argument("--timeout", type=float, default=10.0, help="the gateway's handshake_timeout")
    parser.add_argument("--source", default=ROOT, help="checkout to run the gateway from")
    args = parser.parse_args()
    args.source = os.path.abspath(args.source)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    procs = []
    with tempfile.TemporaryDirectory() as folder:
        try:
            gateway, port, tokens, fit, log_path = start(folder, args, procs)
            results = {"command": " ".join(sys.argv), "source": args.source, "startup_line": fit,
                       **asyncio.run(run(args, port, tokens, gateway))}
            with open(log_path) as handle:
                results["gateway_log_warnings"] = [line for line in handle if " WARNING " in line
                                                   or " ERROR " in line][:5]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    if sys.argv[1:] == ["backend"]:
        resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
        asyncio.run(_serve_backend())
    else:
        main()
