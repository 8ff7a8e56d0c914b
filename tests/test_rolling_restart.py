"""A rolling restart behind HAProxy drops no one: drain_timeout, /healthz 503 draining, sessions that go on."""

import signal
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests import harness

DRAIN = 10
NOTICE = 3  # HAProxy checks every 300 ms and falls after one failure: 3 s is ample, even on a busy machine


class OpenLoop:
    """Opens a console through HAProxy every 100 ms (XVP, up to the backend's RFB banner) until stopped."""

    def __init__(self, port, token):
        self.port, self.token = port, token
        self.opened, self.failed = 0, []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop.wait(0.1):
            try:
                sock, status, rest = harness.xvp_connect(self.port, self.token, source="127.0.0.7")
                with sock:
                    banner = rest + harness.recv_exactly(sock, max(0, 12 - len(rest)))
                assert status == "HTTP/1.1 200 OK" and banner.startswith(b"RFB 003.00"), (status, banner)
                self.opened += 1
            except (OSError, AssertionError) as error:
                self.failed.append(f"{time.monotonic():.2f} {error!r}")

    def stop(self):
        self._stop.set()
        self.thread.join(15)


class LongSession:
    """A console session that asks for the whole screen every 200 ms; notes when data last came."""

    def __init__(self, port, token):
        self.sock, status, rest = harness.xvp_connect(port, token, source="127.0.0.8")
        assert status == "HTTP/1.1 200 OK"
        self.size = harness.rfb_client_handshake(self.sock, rest)[:2]
        self.local_port = self.sock.getsockname()[1]
        self.last_data = time.monotonic()
        self.ended = None
        self.sock.settimeout(30)
        threading.Thread(target=self._ask, daemon=True).start()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _ask(self):
        while self.ended is None:
            try:
                self.sock.sendall(harness.framebuffer_update_request(False, *self.size))
            except OSError:
                return
            time.sleep(0.2)

    def _read(self):
        try:
            while self.sock.recv(65536):
                self.last_data = time.monotonic()
        except OSError:
            pass
        self.ended = time.monotonic()


@pytest.fixture
def gateways(tmp_path, redis_server):
    redis_server.client().flushall()
    ports = [harness.free_port(), harness.free_port()]
    settings = {"database": redis_server.url, "trusted_proxies": "127.0.0.9", "drain_timeout": DRAIN,
                "drain_notice": NOTICE, "max_sessions_per_token": 50}
    started = [harness.GatewayProcess(str(tmp_path), name=f"gw{index}", bind_port=port, **settings)
               for index, port in enumerate(ports)]
    yield started, ports, settings
    for gateway in started:
        gateway.stop(sig=signal.SIGINT)


def test_rolling_restart_behind_haproxy_drops_no_one(qemu, gateways, tmp_path):
    started, ports, settings = gateways
    haproxy = harness.Haproxy(tmp_path, ports)
    try:
        haproxy.wait_states({"gw0": "UP", "gw1": "UP"})
        token = started[0].mint("127.0.0.1", qemu.port)
        long_session = None
        for _ in range(4):  # round robin: until one lands on gw0
            candidate = LongSession(haproxy.port, token)
            ours = [line for line in started[0].audit() if line["event"] == "attempt"
                    and line["client"] == f"127.0.0.8:{candidate.local_port}"]
            if ours:
                long_session = candidate
                break
            candidate.sock.close()
        assert long_session, "no session landed on gw0"
        loop = OpenLoop(haproxy.port, token)
        harness.wait_for(lambda: loop.opened >= 5, message="the open loop to run")

        for index in (0, 1):
            old = started[index]
            sigterm = time.monotonic()
            old.proc.send_signal(signal.SIGTERM)
            haproxy.wait_states({f"gw{index}": "DOWN"}, timeout=NOTICE)  # /healthz: 503 draining
            harness.wait_for(lambda old=old: "stopped accepting" in old.read_stderr(), NOTICE + 5,
                             message="the old gateway to free its port")
            started.append(harness.GatewayProcess(str(tmp_path), name=f"gw{index}-new", bind_port=ports[index],
                                                  **settings))
            haproxy.wait_states({f"gw{index}": "UP"})
            if index == 0:
                assert long_session.ended is None  # still relaying while the new gateway took over
                harness.wait_for(lambda: long_session.ended, DRAIN + 3, message="the long session to end")
                assert long_session.last_data - sigterm >= 5, long_session.last_data - sigterm
                assert long_session.ended - sigterm <= DRAIN + 1.5, long_session.ended - sigterm
                assert old.proc.wait(5) == 0
                ends = [line for line in old.audit() if line["event"] == "session-end"
                        and line["client"] == f"127.0.0.8:{long_session.local_port}"]
                assert [line["reason"] for line in ends] == ["shutdown"]
        assert started[1].proc.wait(DRAIN + 5) == 0  # nothing lived on it but the short opens
        harness.wait_for(lambda: loop.opened >= 60, 20, message="more opens")
        loop.stop()
        assert loop.failed == [], loop.failed
        assert "draining" in started[0].read_stderr()
    finally:
        haproxy.stop()


def test_draining_healthz_says_so_and_a_second_sigterm_ends_everything_at_once(tmp_path):
    backend = harness.FakeBackend(harness.rfb_banner_then_echo)
    gateway = harness.GatewayProcess(str(tmp_path), drain_timeout=60, drain_notice=30)
    try:
        token = gateway.mint("127.0.0.1", backend.port)
        sock, status, rest = harness.xvp_connect(gateway.port, token)
        assert status == "HTTP/1.1 200 OK"
        gateway.proc.send_signal(signal.SIGTERM)

        def healthz():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{gateway.port}/healthz", timeout=5) as reply:
                    return reply.status, reply.read()
            except urllib.error.HTTPError as error:
                return error.code, error.read()
        assert harness.wait_for(lambda: healthz()[0] == 503 and healthz()) == (503, b"draining\n")
        second, status, _ = harness.xvp_connect(gateway.port, token)  # within drain_notice: still served
        assert status == "HTTP/1.1 200 OK"
        sock.sendall(b"still here")
        assert rest + harness.recv_exactly(sock, 22 - len(rest)) == b"RFB 003.008\nstill here"
        asked = time.monotonic()
        gateway.proc.send_signal(signal.SIGTERM)
        assert gateway.proc.wait(10) == 0
        assert time.monotonic() - asked < 5
        ends = [line["reason"] for line in gateway.audit() if line["event"] == "session-end"]
        assert ends == ["shutdown", "shutdown"]
        assert "SIGTERM again: ending every session now" in gateway.read_stderr()
        sock.close()
        second.close()
    finally:
        gateway.stop()
        backend.stop()
