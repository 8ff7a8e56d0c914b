"""Behind real load balancers: nginx (TLS, WebSocket, X-Forwarded-For) and HAProxy (TCP mode,
send-proxy-v2) in front of gateways; the client they name is the one every rule and audit line uses."""

import concurrent.futures
import os
import socket
import time
import urllib.error
import urllib.request

import pytest

from tests import harness, vnc_client
from tests.harness import bright_pixels
from vncgate.net import proxy_protocol

UPGRADE = ("GET /websockify?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
           "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
           "{extra}\r\n")


def wss_upgrade(port, token, source, cert):
    """A WebSocket upgrade over TLS from source; (socket, status line, rest)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    sock = harness.client_context(cert).wrap_socket(raw, server_hostname="127.0.0.1")
    sock.sendall(UPGRADE.format(token=token, extra="").encode())
    status, rest = harness.read_head(sock)
    return sock, status, rest


def attempts(gateway, **match):
    return [line for line in gateway.audit()
            if line["event"] == "attempt" and all(line.get(key) == value for key, value in match.items())]


def from_address(lines, address):
    return [line for line in lines if line["client"].rsplit(":", 1)[0] == address]


@pytest.fixture
def behind_nginx(tmp_path):
    gateway = harness.GatewayProcess(str(tmp_path), trusted_proxies="127.0.0.1", failed_token_burst=5,
                                     failed_token_rate=0.01)
    cert, key = harness.make_certificate(str(tmp_path), "nginx")
    nginx = harness.Nginx(tmp_path, gateway.port, cert, key)
    yield gateway, nginx, cert
    nginx.stop()
    assert gateway.stop() == 0


def test_behind_nginx_the_guesser_is_throttled_and_another_user_is_served(qemu, behind_nginx):
    gateway, nginx, cert = behind_nginx
    statuses = []
    for _ in range(8):
        sock, status, _ = wss_upgrade(nginx.port, "x" * 43, "127.0.5.5", cert)
        sock.close()
        statuses.append(status.split(" ")[1])
    assert statuses[:5] == ["401"] * 5 and set(statuses[5:]) == {"429"}, statuses

    token = gateway.mint("127.0.0.1", qemu.port, "ws-vnc")
    sock, status, rest = wss_upgrade(nginx.port, token, "127.0.6.6", cert)
    assert status.split(" ")[1] == "101", status
    frames = harness.frames_until(sock, rest, lambda frames: len(harness.payload_of(frames)) >= 12)
    assert harness.payload_of(frames).startswith(b"RFB 003.00")
    sock.close()

    guesses = from_address(attempts(gateway, path="websocket"), "127.0.5.5")
    reasons = [line["reason"] for line in guesses]  # throttled lines are sampled: the first one is written
    assert reasons[:5] == ["unknown-token"] * 5 and reasons[5:6] == ["throttled"] and set(reasons[5:]) == {"throttled"}
    served = from_address(attempts(gateway, path="websocket", result="accepted"), "127.0.6.6")
    assert len(served) == 1
    for line in guesses + served:  # the proxy is named apart: nginx, from 127.0.0.1
        assert line["via"].startswith("127.0.0.1:") and line["client"].endswith(":0"), line
    assert not from_address(attempts(gateway), "127.0.0.1")  # nginx itself is no client


def test_a_direct_client_sending_x_forwarded_for_is_audited_as_itself(behind_nginx):
    gateway = behind_nginx[0]
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10, source_address=("127.0.0.8", 0))
    sock.sendall(UPGRADE.format(token="y" * 43, extra="X-Forwarded-For: 10.9.9.9\r\n"
                                                      "Forwarded: for=10.9.9.9\r\n").encode())
    status, _ = harness.read_head(sock)
    sock.close()
    assert status.split(" ")[1] == "401"
    line = harness.wait_for(lambda: from_address(attempts(gateway), "127.0.0.8"), message="the attempt line")[0]
    assert "via" not in line and line["reason"] == "unknown-token"
    assert not from_address(attempts(gateway), "10.9.9.9")


# -- HAProxy, TCP mode, send-proxy-v2, two gateways on one Redis ---------------------------------------

@pytest.fixture
def balanced(tmp_path, redis_server):
    redis_server.client().flushall()
    gateways = [harness.GatewayProcess(str(tmp_path), name=f"gw{index}", database=redis_server.url,
                                       trusted_proxies="127.0.0.9") for index in range(2)]
    haproxy = harness.Haproxy(tmp_path, [gateway.port for gateway in gateways])
    haproxy.wait_states({"gw0": "UP", "gw1": "UP"})
    yield gateways, haproxy
    haproxy.stop()
    for gateway in gateways:
        assert gateway.stop() == 0


def test_behind_haproxy_send_proxy_v2_clients_reach_qemu_and_are_audited_as_themselves(qemu, balanced, tmp_path):
    gateways, haproxy = balanced
    xvp_token = gateways[0].mint("127.0.0.1", qemu.port)
    ws_token = gateways[1].mint("127.0.0.1", qemu.port, "ws-vnc")
    shot = str(tmp_path / "haproxy-xvp.png")

    def screen_has_text():
        vnc_client.xvp_screenshot(haproxy.port, xvp_token, shot)
        return bright_pixels(shot)[0] > 200
    harness.wait_for(screen_has_text, timeout=60, interval=0.5, message="SeaBIOS text through HAProxy")

    for _ in range(2):  # round robin: one on each gateway
        sock, status, rest = harness.raw_upgrade(haproxy.port, ws_token, source="127.0.0.7")
        assert status.split(" ")[1] == "101", status
        frames = harness.frames_until(sock, rest, lambda frames: len(harness.payload_of(frames)) >= 12)
        assert harness.payload_of(frames).startswith(b"RFB 003.00")
        sock.close()

    lines = [line for gateway in gateways for line in attempts(gateway, result="accepted")]
    websocket = [line for line in lines if line["path"] == "websocket"]
    assert len(from_address(websocket, "127.0.0.7")) == 2
    assert {len(from_address(attempts(gateway, path="websocket"), "127.0.0.7")) for gateway in gateways} == {1}
    assert from_address([line for line in lines if line["path"] == "xvp"], "127.0.0.1")
    for line in lines:
        assert line["via"].startswith("127.0.0.9:"), line  # HAProxy's address is the via, never the client
    assert not from_address(lines, "127.0.0.9")


def test_a_proxy_header_from_an_untrusted_address_is_refused(balanced):
    gateway = balanced[0][0]
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10, source_address=("127.0.0.7", 0))
    sock.sendall(proxy_protocol.v2_header(("10.6.6.6", 1234)) + b"CONNECT /console?token=x HTTP/1.1\r\n\r\n")
    status, _ = harness.read_head(sock)
    sock.close()
    assert status.split(" ")[1] == "400"
    line = harness.wait_for(lambda: from_address(attempts(gateway), "127.0.0.7"), message="the refusal line")[0]
    assert line["reason"] == "proxy-not-trusted" and "via" not in line
    assert not from_address(attempts(gateway), "10.6.6.6")


SIG = proxy_protocol.V2_SIGNATURE
HOSTILE = {
    "v2 bad signature": (SIG[:-1] + b"X" + bytes(20), "400"),
    "v2 bad version": (SIG + b"\x31\x11\x00\x0c" + bytes(12), "400"),
    "v2 bad family": (SIG + b"\x21\x51\x00\x0c" + bytes(12), "400"),
    "v2 length too short for the family": (SIG + b"\x21\x11\x00\x04" + bytes(4), "400"),
    "v2 length over the bound": (SIG + b"\x21\x11\xff\xff", "400"),
    "v2 length past the buffer, then silent": (SIG + b"\x21\x11\x00\x40" + bytes(12), "408"),
    "v2 truncated, then silent": (SIG[:7], "408"),
    "v1 bad family": (b"PROXY TCP9 1.2.3.4 5.6.7.8 1 2\r\n", "400"),
    "v1 bad address": (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "400"),
    "v1 longer than 107 bytes": (b"PROXY TCP4 " + b"1" * 200, "400"),
    "v1 truncated, then silent": (b"PROXY TCP4 1.2.3.4 ", "408"),
    "a second header": (proxy_protocol.v1_header(("1.2.3.4", 1), ("5.6.7.8", 2)) + proxy_protocol.v2_header(None), "400"),
}


def test_hostile_proxy_headers_are_answered_and_the_gateway_keeps_serving(tmp_path):
    gateway = harness.GatewayProcess(str(tmp_path), trusted_proxies="127.0.0.0/8", handshake_timeout=1.5)

    def send(data):
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
            sock.sendall(data)
            status, _ = harness.read_head(sock)
        return status.split(" ")[1] if status else "closed", time.monotonic() - started

    try:
        with concurrent.futures.ThreadPoolExecutor(len(HOSTILE)) as pool:
            answers = dict(zip(HOSTILE, pool.map(send, [data for data, _ in HOSTILE.values()])))
        for name, (status, took) in answers.items():
            assert status == HOSTILE[name][1], (name, status)
            assert took < 1.5 + 1.5, (name, took)  # handshake_timeout, and a busy machine's scheduling
        with urllib.request.urlopen(f"http://127.0.0.1:{gateway.port}/healthz", timeout=10) as reply:
            assert reply.status == 200
        reasons = {line["reason"] for line in attempts(gateway)}
        assert {"bad-proxy-header", "handshake-timeout", "bad-request"} <= reasons
        assert "Traceback" not in gateway.read_stderr()
    finally:
        assert gateway.stop() == 0


def test_proxy_v1_from_a_trusted_address_names_the_client_and_tls_follows(tmp_path):
    """A v1 header, then TLS: the header is read before the ClientHello, and the client is the header's."""
    cert, key = harness.make_certificate(str(tmp_path), "gw")
    gateway = harness.GatewayProcess(str(tmp_path), trusted_proxies="127.0.0.1", cert=cert, key=key)
    try:
        raw = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
        raw.sendall(proxy_protocol.v1_header(("192.0.2.44", 4444), ("127.0.0.1", gateway.port)))
        sock = harness.client_context(cert).wrap_socket(raw, server_hostname="127.0.0.1")
        sock.sendall(b"CONNECT /console?token=zz HTTP/1.1\r\n\r\n")
        status, _ = harness.read_head(sock)
        sock.close()
        assert status.split(" ")[1] == "401"
        line = harness.wait_for(lambda: attempts(gateway, client="192.0.2.44:4444"), message="the line")[0]
        assert line["via"].startswith("127.0.0.1:")
    finally:
        assert gateway.stop() == 0


def test_metrics_allow_reads_the_forwarded_client(tmp_path):
    gateway = harness.GatewayProcess(str(tmp_path), trusted_proxies="127.0.0.1", metrics_allow="127.0.0.0/8")
    try:
        def metrics(forwarded_for):
            request = urllib.request.Request(f"http://127.0.0.1:{gateway.port}/metrics",
                                             headers={"X-Forwarded-For": forwarded_for})
            try:
                with urllib.request.urlopen(request, timeout=10) as reply:
                    return reply.status
            except urllib.error.HTTPError as error:
                return error.code
        assert metrics("127.0.0.3") == 200
        assert metrics("192.0.2.1") == 403
        assert metrics("not an address") == 400
        assert os.path.exists(gateway.audit_path)
    finally:
        assert gateway.stop() == 0


def test_the_pending_share_is_each_client_behind_the_proxy(tmp_path):
    """max_pending_per_address counts the client a trusted proxy names, not the proxy: one client's
    stuck handshakes take its own share, and another client through the same proxy is still served."""
    backend = harness.FakeBackend(harness.silent)  # the handshake waits on the backend: it stays pending
    gateway = harness.GatewayProcess(str(tmp_path), trusted_proxies="127.0.0.1", max_pending_per_address=2,
                                     handshake_timeout=4)
    token = gateway.mint("127.0.0.1", backend.port)
    opened = []

    def through_proxy(client):
        sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
        opened.append(sock)
        sock.sendall(proxy_protocol.v2_header((client, 4000 + len(opened)))
                     + f"CONNECT /console?token={token} HTTP/1.1\r\n\r\n".encode())
        return sock

    try:
        for _ in range(2):
            through_proxy("192.0.2.1")
        harness.wait_for(lambda: backend.connections == 2, message="two handshakes waiting on the backend")
        third = through_proxy("192.0.2.1")
        status, _ = harness.read_head(third)
        assert status.split(" ")[1] == "429"
        line = attempts(gateway, reason="too-many-pending")[0]
        assert line["client"].startswith("192.0.2.1:") and line["via"].startswith("127.0.0.1:")
        other = through_proxy("198.51.100.2")  # another user (another /24) through the same proxy: served
        other.settimeout(1.0)
        with pytest.raises(socket.timeout):
            other.recv(1)  # waiting on the backend like the first two, not answered 429
    finally:
        for sock in opened:
            sock.close()
        gateway.stop()
        backend.stop()


def test_the_api_throttles_bad_keys_by_the_forwarded_client(tmp_path):
    keys = tmp_path / "api-keys"
    keys.write_text("# vncgate API keys\n")
    gateway = harness.GatewayProcess(str(tmp_path), trusted_proxies="127.0.0.1", api_keys_file=str(keys),
                                     failed_token_burst=3, failed_token_rate=0.01)

    def bad_key(forwarded_for):
        request = urllib.request.Request(f"http://127.0.0.1:{gateway.port}/api/v1/sessions",
                                         headers={"X-Forwarded-For": forwarded_for, "Authorization": "Bearer nope"})
        try:
            urllib.request.urlopen(request, timeout=10).close()
        except urllib.error.HTTPError as error:
            return error.code
        return 200

    try:
        assert [bad_key("192.0.2.1") for _ in range(4)] == [401, 401, 401, 429]
        assert bad_key("198.51.100.2") == 401  # another client (another /24) behind the same proxy: not throttled
        lines = [line for line in gateway.audit() if line.get("reason") in ("bad-api-key", "throttled")]
        assert [line["client"] for line in lines] == ["192.0.2.1:0"] * 4 + ["198.51.100.2:0"]
        assert all(line["via"].startswith("127.0.0.1:") for line in lines)
    finally:
        assert gateway.stop() == 0


def test_behind_haproxy_send_proxy_v1(tmp_path):
    backend = harness.FakeBackend(harness.rfb_banner_then_echo)
    gateway = harness.GatewayProcess(str(tmp_path), trusted_proxies="127.0.0.9")
    haproxy = harness.Haproxy(tmp_path, [gateway.port], proxy="send-proxy")
    try:
        haproxy.wait_states({"gw0": "UP"})
        token = gateway.mint("127.0.0.1", backend.port, "ws-vnc")
        sock, status, _ = harness.raw_upgrade(haproxy.port, token, source="127.0.0.6")
        own = f"127.0.0.6:{sock.getsockname()[1]}"  # the port too: v1 carries it
        sock.close()
        assert status.split(" ")[1] == "101", status
        line = harness.wait_for(lambda: attempts(gateway, result="accepted"), message="the attempt line")[0]
        assert line["client"] == own and line["via"].startswith("127.0.0.9:")
    finally:
        haproxy.stop()
        assert gateway.stop() == 0
        backend.stop()
