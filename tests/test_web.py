"""The web side from outside (SPEC section 5): files from web_root and nothing else, /healthz, /metrics."""

import email.utils
import http.client
import os
import socket
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

from tests import harness
from tests.harness import GatewayProcess
from vncgate.front import web

SECRET = b"the gateway must never serve this"
PAGE = b"<!doctype html><title>console</title>\n"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A web_root with files, a folder and links in and out, next to a secret outside it."""
    folder = tmp_path_factory.mktemp("site")
    (folder / "secret.txt").write_bytes(SECRET)
    (folder / "elsewhere").mkdir()
    (folder / "elsewhere" / "secret.txt").write_bytes(SECRET)
    root = folder / "web"
    (root / "app").mkdir(parents=True)
    (root / "vnc.html").write_bytes(PAGE)
    (root / "vnc_lite.html").write_bytes(PAGE)
    (root / "app" / "ui.js").write_bytes(b"export default 1;\n")
    (root / "app" / "styles.css").write_bytes(b"body { margin: 0 }\n")
    (root / "app" / "blob.unknown").write_bytes(bytes(range(256)))
    (root / "inside").symlink_to("vnc.html")
    (root / "escape").symlink_to(folder / "secret.txt")
    (root / "escape-dir").symlink_to(folder / "elsewhere")
    return folder


@pytest.fixture(scope="module")
def gateway(site):
    # Every 404 and 400 costs its address a failure (issue 24): these tests make hundreds.
    process = GatewayProcess(str(site), web_root="web", failed_token_burst=100000)
    yield process
    assert process.stop() == 0


def fetch(port, target, method="GET", headers=None):
    """(status, headers, body) of one request sent exactly as given."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, target, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


@pytest.mark.parametrize("target, content_type, body", [
    # noVNC's page gets the script that hands the token to the WebSocket (vncgate-token.js).
    ("/vnc.html", "text/html; charset=utf-8", PAGE + web.TOKEN_SCRIPT),
    ("/vnc.html?autoconnect=1", "text/html; charset=utf-8", PAGE + web.TOKEN_SCRIPT),
    ("/vnc_lite.html", "text/html; charset=utf-8", PAGE),
    ("/app/ui.js", "text/javascript; charset=utf-8", b"export default 1;\n"),
    ("/app/styles.css", "text/css; charset=utf-8", b"body { margin: 0 }\n"),
    ("/app/blob.unknown", "application/octet-stream", bytes(range(256))),
    ("/inside", "text/html; charset=utf-8", PAGE),  # a link that stays inside is followed
])
def test_files_with_their_types_and_cache_headers(gateway, target, content_type, body):
    status, headers, received = fetch(gateway.port, target)
    assert (status, headers["Content-Type"], received) == (200, content_type, body)
    assert headers["Content-Length"] == str(len(body))
    assert headers["Cache-Control"] == "no-cache"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["ETag"].startswith('"') and headers["ETag"].endswith('"')
    assert email.utils.parsedate_to_datetime(headers["Last-Modified"]).tzinfo is not None


def test_head_is_the_same_head_without_the_body(gateway):
    got, head = fetch(gateway.port, "/vnc.html"), fetch(gateway.port, "/vnc.html", "HEAD")
    assert head[0] == 200 and head[2] == b""
    assert {name: head[1][name] for name in ("Content-Type", "Content-Length", "ETag", "Last-Modified")} == {
        name: got[1][name] for name in ("Content-Type", "Content-Length", "ETag", "Last-Modified")}


def test_revalidation_answers_304_until_the_file_changes(gateway, site):
    _, headers, _ = fetch(gateway.port, "/app/ui.js")
    etag, modified = headers["ETag"], headers["Last-Modified"]
    status, headers, body = fetch(gateway.port, "/app/ui.js", headers={"If-None-Match": f'W/"x", {etag}'})
    assert (status, body, headers["ETag"]) == (304, b"", etag)
    assert fetch(gateway.port, "/app/ui.js", headers={"If-Modified-Since": modified})[0] == 304
    assert fetch(gateway.port, "/app/ui.js", headers={"If-None-Match": '"other"'})[0] == 200
    assert fetch(gateway.port, "/app/ui.js", headers={"If-Modified-Since": "not a date"})[0] == 200
    script = site / "web" / "app" / "ui.js"
    os.utime(script, (script.stat().st_atime, script.stat().st_mtime + 10))
    status, headers, _ = fetch(gateway.port, "/app/ui.js", headers={"If-None-Match": etag})
    assert status == 200 and headers["ETag"] != etag


def outside_targets(site):
    return ["/../secret.txt", "/%2e%2e/secret.txt", "/%2E%2E/secret.txt", "/app/../../secret.txt",
            "/app/%2e%2e/%2e%2e/secret.txt", "/..%2fsecret.txt", "/app/..%5c..%5csecret.txt",
            "/%2e%2e%2f%2e%2e%2fsecret.txt", "//etc/passwd", "/%2fetc/passwd", "//" + str(site / "secret.txt"),
            "/%2f" + str(site / "secret.txt").lstrip("/"), "/escape", "/escape-dir/secret.txt",
            "/vnc.html%00.png", "/./vnc.html", "/app//ui.js", "http://127.0.0.1/../secret.txt", "*"]


def test_nothing_outside_web_root_is_ever_served(gateway, site):
    for target in outside_targets(site):
        for method in ("GET", "HEAD"):
            status, _, body = fetch(gateway.port, target, method)
            assert status in (400, 404), (target, method, status)
            assert SECRET not in body and b"root:" not in body, target


@pytest.mark.parametrize("target", ["/missing.html", "/app", "/app/", "/", "/websockify"])
def test_missing_files_and_folders_are_404(gateway, target):
    assert fetch(gateway.port, target)[0] == 404


def test_web_requests_are_not_console_attempts_and_only_failures_are_audited(gateway, site):
    def web_lines():
        return [line for line in gateway.audit() if line.get("path") == "web"]
    before = len(web_lines())  # the gateway is shared with the module's other tests
    for target in ["/vnc.html", "/healthz", "/metrics"]:
        assert fetch(gateway.port, target)[0] == 200
    assert len(web_lines()) == before
    for target in ["/missing.html"] + outside_targets(site):
        fetch(gateway.port, target)
    lines = web_lines()[before:]
    assert len(lines) == 1 + len(outside_targets(site))
    assert {line["event"] for line in lines} == {"request"}
    assert {line["reason"] for line in lines} <= {"not-found", "bad-request"}


def test_no_web_root_means_no_files_but_health_and_metrics(tmp_path):
    gateway = GatewayProcess(str(tmp_path), web_root="off")
    try:
        assert fetch(gateway.port, "/vnc.html")[0] == 404
        status, _, body = fetch(gateway.port, "/healthz")
        assert (status, body) == (200, b"ok")
        assert fetch(gateway.port, "/metrics")[0] == 200
    finally:
        assert gateway.stop() == 0


def metrics(port):
    status, headers, body = fetch(port, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {family.name: family for family in text_string_to_metric_families(body.decode())}
    assert all(family.documentation for family in families.values())
    return families


def value(families, name, **labels):
    family = families[name]
    return next(sample.value for sample in family.samples if sample.labels == labels)


def test_metrics_count_sessions_bytes_handshakes_and_tokens(tmp_path, vnc):
    gateway = GatewayProcess(str(tmp_path))
    try:
        token = gateway.mint("127.0.0.1", vnc.port, "ws-vnc", "--ttl", "600")
        gateway.mint("127.0.0.1", vnc.port, "xvp-vnc", "--ttl", "600")
        expired = gateway.mint("127.0.0.1", vnc.port, "ws-vnc", "--ttl", "1")  # the shortest TTL a mint may ask for
        harness.wait_for(lambda: harness.token_id(expired) not in gateway.token_cli("list").stdout,
                         message="expiry")
        before = metrics(gateway.port)
        assert value(before, "vncgate_sessions_live") == 0
        assert before["vncgate_handshakes"].type == "counter" and before["vncgate_handshakes"].samples == []
        assert {sample.labels["state"]: sample.value for sample in before["vncgate_tokens"].samples} == {
            "live": 2, "idle": 0, "expired": 1, "garbage": 0}
        assert value(before, "vncgate_store_up") == 1

        with connect(f"ws://127.0.0.1:{gateway.port}/websockify?token={token}", open_timeout=10) as ws:
            assert ws.recv(timeout=10) == b"RFB 003.008\n"
            ws.send(b"0123456789")
            assert ws.recv(timeout=10) == b"0123456789"
            live = metrics(gateway.port)
            assert value(live, "vncgate_sessions_live") == 1
            assert value(live, "vncgate_live_session_bytes", direction="up") == 10
            assert value(live, "vncgate_live_session_bytes", direction="down") == 22
        harness.wait_for(lambda: [line for line in gateway.audit() if line["event"] == "session-end"],
                         message="the session's end")
        xvp, status, _ = harness.xvp_connect(gateway.port, "no-such-token")
        xvp.close()
        after = metrics(gateway.port)
        assert value(after, "vncgate_sessions_live") == 0
        assert value(after, "vncgate_live_session_bytes", direction="up") == 0
        assert value(after, "vncgate_session_bytes", direction="up") == 10
        assert value(after, "vncgate_session_bytes", direction="down") == 22
        assert value(after, "vncgate_handshakes", path="websocket", result="accepted") == 1
        assert value(after, "vncgate_handshakes", path="xvp", result="rejected") == 1
    finally:
        assert gateway.stop() == 0


def test_healthz_is_503_and_metrics_say_so_when_the_store_does_not_answer(tmp_path):
    gateway = GatewayProcess(str(tmp_path))
    try:
        status, headers, body = fetch(gateway.port, "/healthz")
        assert (status, body, headers["Cache-Control"]) == (200, b"ok", "no-store")
        for suffix in ("", "-wal", "-shm"):
            path = tmp_path / f"tokens.db{suffix}"
            if path.exists():
                path.unlink()
        assert fetch(gateway.port, "/healthz")[0] == 503
        families = metrics(gateway.port)
        assert value(families, "vncgate_store_up") == 0
        assert "vncgate_tokens" not in families
    finally:
        assert gateway.stop() == 0


def test_a_slow_reader_of_a_file_is_cut_at_the_reply_deadline(tmp_path):
    """Each send has a timeout, and so does the whole reply: a client that reads 1 KiB every
    0.2 s is cut at handshake_timeout, not served for as long as it keeps reading."""
    root = tmp_path / "web"
    root.mkdir()
    (root / "big.js").write_bytes(bytes(8 << 20))
    gateway = GatewayProcess(str(tmp_path), web_root="web", handshake_timeout=2)
    try:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", gateway.port))
        sock.sendall(b"GET /big.js HTTP/1.1\r\nHost: x\r\n\r\n")
        started, received = time.monotonic(), 0
        sock.settimeout(5)
        while time.monotonic() - started < 15:
            try:
                chunk = sock.recv(1024)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += len(chunk)
            time.sleep(0.2)
        elapsed = time.monotonic() - started
        sock.close()
        assert elapsed < 8, f"still served after {elapsed:.1f} s"
        assert 0 < received < 8 << 20
        assert fetch(gateway.port, "/healthz")[0] == 200
    finally:
        assert gateway.stop() == 0
