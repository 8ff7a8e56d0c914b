"""Bounded load on loopback: 500 live sessions plus 50 handshakes a second for 30 s."""

import os
import resource
import time

import pytest

from tests import harness
from tests.harness import FakeBackend, GatewayProcess, xvp_connect
from vncgate.console import pipes

LIVE_SESSIONS = 500
HANDSHAKES_PER_SECOND = 50
SECONDS = float(os.environ.get("VNCGATE_LOAD_SECONDS", "30"))


@pytest.fixture(autouse=True)
def enough_file_descriptors():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_live_sessions_plus_steady_handshakes(tmp_path):
    backend = FakeBackend(harness.rfb_banner_then_echo)
    gateway = GatewayProcess(str(tmp_path), touch_interval=1, max_sessions_per_token=1000)
    try:
        token = gateway.mint("127.0.0.1", backend.port, "xvp-vnc", "--ttl", "3600")
        baseline_threads = gateway.threads()
        baseline_fds = gateway.session_fds()
        live = []
        for _ in range(LIVE_SESSIONS):
            sock, status, rest = xvp_connect(gateway.port, token)
            assert status == "HTTP/1.1 200 OK"
            harness.recv_exactly(sock, 12 - len(rest))
            live.append(sock)

        failures, handshakes, latencies = [], 0, []
        started = time.monotonic()
        while time.monotonic() - started < SECONDS:
            began = time.monotonic()
            sock, status, rest = xvp_connect(gateway.port, token)
            if status != "HTTP/1.1 200 OK":
                failures.append(status)
            else:
                sock.sendall(b"x")
                if rest + harness.recv_exactly(sock, 13 - len(rest)) != b"RFB 003.008\nx":
                    failures.append("bad relay")
            sock.close()
            latencies.append(time.monotonic() - began)
            handshakes += 1
            probe = live[handshakes % LIVE_SESSIONS]  # the live sessions keep relaying meanwhile
            probe.sendall(b"p")
            if harness.recv_exactly(probe, 1) != b"p":
                failures.append("live session stopped relaying")
            time.sleep(max(0.0, started + handshakes / HANDSHAKES_PER_SECOND - time.monotonic()))
        assert failures == []
        assert handshakes >= HANDSHAKES_PER_SECOND * SECONDS * 0.9
        assert gateway.threads() >= baseline_threads + 2 * LIVE_SESSIONS  # they really were live

        for sock in live:
            sock.close()
        harness.wait_for(lambda: gateway.threads() == baseline_threads, timeout=20,
                         message=f"threads back to {baseline_threads}")
        harness.wait_for(lambda: gateway.session_fds() == baseline_fds,
                         timeout=20, message="file descriptors back to where they were")
        pipe_fds = [fd for fd in gateway.fds() if fd.startswith("pipe:")]
        assert len(pipe_fds) <= 2 * pipes.PIPES.keep
        print(f"\n{handshakes} handshakes, p99 {sorted(latencies)[int(len(latencies) * 0.99)] * 1e3:.1f} ms")
    finally:
        backend.stop()
        assert gateway.stop() == 0
