"""Serial consoles (issue 15): the serial path, shared viewers, followed consoles and their log."""

import os
import signal
import socket
import subprocess
import time

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from tests import harness
from tests.harness import FakeBackend, GatewayProcess, SerialPages, SerialQemu, raw_upgrade, terminal_text, wait_for
from vncgate import store as store_module
from vncgate.console import serial as consoles

TOUCH = 0.5


# -- units: the log on disk, the store's follows -------------------------------------------------

def test_log_keeps_the_newest_bytes_within_its_bound(tmp_path):
    log = consoles.ConsoleLog(str(tmp_path), "vm/../1", 1000)
    written = bytes(range(256)) * 40  # 10240 bytes, every byte value
    for start in range(0, len(written), 77):
        log.write(written[start:start + 77])
    log.close()
    files = os.listdir(tmp_path)
    assert sorted(files) == ["vm%2F%2E%2E%2F1.log", "vm%2F%2E%2E%2F1.log.1"]  # no id climbs out
    assert sum(os.path.getsize(tmp_path / name) for name in files) <= 1000
    kept = consoles.read_log(str(tmp_path), "vm/../1")
    assert 500 <= len(kept) <= 1000 and written.endswith(kept)


def test_last_lines_and_a_missing_log(tmp_path):
    assert consoles.last_lines(b"a\r\nb\r\nc\r\n", 2) == b"b\r\nc\r\n"
    assert consoles.last_lines(b"a\nb\nno newline", 1) == b"no newline"
    assert consoles.last_lines(b"a\nb\n", 5) == b"a\nb\n"
    assert consoles.last_lines(b"a\nb\n", 0) == b""
    assert consoles.read_log(str(tmp_path), "never-followed") is None


def test_follows_are_kept_by_both_engines(store):
    store.add_follow("vm-1", "10.0.0.5", 4555)
    store.add_follow("vm-2", "10.0.0.6", 4556)
    store.add_follow("vm-1", "10.0.0.7", 4557)  # re-pointed
    assert store.list_follows() == [store_module.Follow("vm-1", "10.0.0.7", 4557),
                                    store_module.Follow("vm-2", "10.0.0.6", 4556)]
    assert store.remove_follow("vm-2") is True
    assert store.remove_follow("vm-2") is False
    assert [follow.instance_id for follow in store.list_follows()] == ["vm-1"]


def test_serial_token_url(store):
    url = store_module.access_url("https://gw.example:8443", store_module.SERIAL, "T")
    assert url == "https://gw.example:8443/serial.html#token=T"


# -- end to end ---------------------------------------------------------------------------------

def _gateway(tmp_path, **settings):
    return GatewayProcess(str(tmp_path), touch_interval=TOUCH, housekeeping_interval=TOUCH,
                          console_log_dir=str(tmp_path / "logs"), **settings)


def _log(gateway, *args):
    result = gateway.token_cli("log", *args)
    return result.stdout if result.returncode == 0 else None


def test_followed_from_boot_and_again_after_a_restart(tmp_path):
    """The log holds what SeaBIOS printed though no viewer ever attached; a restarted VM is
    followed again without a command."""
    vm = None
    gateway = _gateway(tmp_path)
    try:
        vm = SerialQemu(wait=True)  # waits for the gateway's connection before it boots
        follow = gateway.token_cli("follow", "--instance", "vm-1", "--host", "127.0.0.1", "--port", str(vm.serial_port))
        assert follow.returncode == 0, follow.stderr
        text = wait_for(lambda: "No bootable device." in (_log(gateway, "--instance", "vm-1") or "")
                        and _log(gateway, "--instance", "vm-1"), 60, 0.2, "SeaBIOS in the console log")
        assert "SeaBIOS" in text
        assert _log(gateway, "--instance", "vm-1", "--tail", "1").strip() == "No bootable device."
        vm.stop()
        vm = SerialQemu(wait=True, serial_port=vm.serial_port)
        wait_for(lambda: (_log(gateway, "--instance", "vm-1") or "").count("No bootable device.") == 2,
                 60, 0.2, "the restarted VM's boot in the log")
        assert not any(line.get("path") == "serial" for line in gateway.audit())  # no viewer ever
    finally:
        if vm:
            vm.stop()
        assert gateway.stop() == 0


def test_log_follow_and_bad_log_requests(tmp_path):
    def flood_then_wait(backend, sock):
        sock.sendall(b"line one\r\n")
        while backend.received == []:
            time.sleep(0.05)
        sock.sendall(b"line two\r\n")
        sock.recv(1)
        backend.received.append(b"let go")
    backend = FakeBackend(flood_then_wait)
    gateway = _gateway(tmp_path)
    try:
        assert gateway.token_cli("follow", "--instance", "vm-2", "--host", "127.0.0.1",
                                 "--port", str(backend.port)).returncode == 0
        wait_for(lambda: _log(gateway, "--instance", "vm-2"), 20, 0.1, "the first line")
        reader = subprocess.Popen([harness.console_script("vncgate-token"), "-c", gateway.ini, "log",
                                   "--instance", "vm-2", "--follow"], stdout=subprocess.PIPE)
        assert reader.stdout.readline() == b"line one\r\n"
        backend.received.append(b"go")
        assert reader.stdout.readline() == b"line two\r\n"
        reader.send_signal(signal.SIGINT)
        assert reader.wait(10) == 130
        missing = gateway.token_cli("log", "--instance", "nobody")
        assert missing.returncode == 1 and "no console log for nobody" in missing.stderr
        negative = gateway.token_cli("log", "--instance", "vm-2", "--tail", "-1")
        assert negative.returncode == 2
        assert gateway.token_cli("unfollow", "--instance", "nobody").returncode == 1
        assert gateway.token_cli("follow", "--instance", "x" * 200, "--host", "h", "--port", "1").returncode == 2
        assert gateway.token_cli("unfollow", "--instance", "vm-2").returncode == 0
        wait_for(lambda: b"let go" in backend.received, 20, 0.1, "the follower to let go of the console")
    finally:
        backend.stop()
        assert gateway.stop() == 0


def _serial_ends(gateway):
    return [line for line in gateway.audit() if line.get("event") == "session-end" and line.get("path") == "serial"]


def test_browser_terminal_shared_viewers_and_revocation(tmp_path):
    """qemu's HMP monitor as a followed serial endpoint: two Chromium tabs show the log's last
    lines, input from one reaches the monitor, both see the answer, revoking closes both."""
    vm = SerialQemu(wait=False, monitor=True)
    port = harness.free_port()  # the browser's Origin names it: public_url must too
    gateway = _gateway(tmp_path, bind_port=port, public_url=f"http://127.0.0.1:{port}")
    pages = None
    try:
        assert gateway.token_cli("follow", "--instance", "vm-3", "--host", "127.0.0.1",
                                 "--port", str(vm.monitor_port)).returncode == 0
        wait_for(lambda: "(qemu)" in (_log(gateway, "--instance", "vm-3") or ""), 30, 0.1, "the monitor's banner")
        url = gateway.token_cli("add", "--type", "serial", "--host", "127.0.0.1", "--port", str(vm.monitor_port),
                                "--instance", "vm-3").stdout.strip()
        assert url.startswith(f"http://127.0.0.1:{port}/serial.html#token=")
        token = url.rpartition("=")[2]
        pages = SerialPages(url, count=2)
        first, second = pages.pages
        for page in pages.pages:  # the log's last lines, from before either tab opened
            wait_for(lambda page=page: "QEMU" in terminal_text(page) and "monitor" in terminal_text(page), 30, 0.2,
                     "the log's last lines in the terminal")
        wait_for(lambda: "connected" in first.inner_text("#status"), 30, 0.2, "the websocket")
        first.locator("#terminal").click()
        first.keyboard.type("info status")
        first.keyboard.press("Enter")
        for page in pages.pages:
            wait_for(lambda page=page: "VM status: running" in terminal_text(page), 30, 0.2, "the monitor's answer")
        first.screenshot(path=harness.artifact("serial-terminal.png"))
        assert "VM status: running" in _log(gateway, "--instance", "vm-3")
        assert pages.errors == []
        # The token went in Sec-WebSocket-Protocol: no request line a proxy logs holds it.
        assert pages.websocket_urls == [f"ws://127.0.0.1:{port}/serial"] * 2
        accepted = [line for line in gateway.audit()
                    if line.get("path") == "serial" and line.get("result") == "accepted"]
        assert len(accepted) == 2 and all(line["console_type"] == "serial" for line in accepted)
        revoked_at = time.monotonic()
        assert gateway.token_cli("revoke", "-", input=token + "\n").returncode == 0
        for page in pages.pages:
            wait_for(lambda page=page: "disconnected" in page.inner_text("#status"), 10, 0.05, "the tab to be closed")
        assert time.monotonic() - revoked_at < TOUCH + 2.0  # touch_interval, and a loaded machine's slack
        wait_for(lambda: len(_serial_ends(gateway)) == 2, 10, 0.1, "two session-end lines")
        assert [line["reason"] for line in _serial_ends(gateway)] == ["revoked", "revoked"]
    finally:
        if pages:
            pages.close()
        vm.stop()
        assert gateway.stop() == 0


def test_bytes_pass_unchanged_and_types_do_not_cross(tmp_path):
    """Every byte value both ways over /serial; a serial token is 401 on the VNC paths and a
    VNC token 401 on /serial; a wrong Origin is 403."""
    echo = FakeBackend(lambda backend, sock: harness.echo(sock))
    gateway = _gateway(tmp_path)
    try:
        serial = gateway.mint("127.0.0.1", echo.port, "serial")
        every_byte = bytes(range(256)) + "é€😀".encode() * 3
        with ws_connect(f"ws://127.0.0.1:{gateway.port}/serial?token={serial}", subprotocols=["binary"]) as ws:
            ws.send(every_byte[:100])
            ws.send(every_byte[100:])
            got = b""
            while len(got) < len(every_byte):
                got += ws.recv(timeout=10)
            assert got == every_byte
        websocket_token = gateway.mint("127.0.0.1", echo.port, "ws-vnc")
        xvp_token = gateway.mint("127.0.0.1", echo.port, "xvp-vnc")
        for token, path in ((serial, "/websockify"), (websocket_token, "/serial"), (xvp_token, "/serial")):
            sock, status, _ = raw_upgrade(gateway.port, token, path=path)
            sock.close()
            assert status.split()[1] == "401", (path, status)
        sock, status, _ = harness.xvp_connect(gateway.port, serial)
        sock.close()
        assert status.split()[1] == "401"
        sock, status, _ = raw_upgrade(gateway.port, serial, path="/serial", extra=b"")
        sock.close()
        assert status.split()[1] == "101"
        refused = [line for line in gateway.audit() if line.get("reason") == "wrong-console-type"]
        assert len(refused) == 4
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
            sock.sendall(b"GET /serial.html HTTP/1.1\r\nHost: x\r\n\r\n")
            head, _ = harness.read_until_blank_line(sock)
        assert head.startswith(b"HTTP/1.1 200") and b"text/html" in head
    finally:
        echo.stop()
        assert gateway.stop() == 0


FLOOD = 100 * 1024 * 1024


def test_a_flood_keeps_the_log_bounded_and_memory_flat(tmp_path):
    chunk = (b"flood " * 10 + b"\r\n") * 1024

    def flood_once(backend, sock):
        if backend.connections > 1:
            sock.recv(1)
            return
        for _ in range(FLOOD // len(chunk)):
            sock.sendall(chunk)
        sock.sendall(b"END OF FLOOD\r\n")
        sock.recv(1)
    backend = FakeBackend(flood_once)
    bound = 256 * 1024
    gateway = _gateway(tmp_path, console_log_bytes=bound)
    try:
        before = gateway.rss_kib()
        assert gateway.token_cli("follow", "--instance", "vm-4", "--host", "127.0.0.1",
                                 "--port", str(backend.port)).returncode == 0
        wait_for(lambda: (consoles.read_log(str(tmp_path / "logs"), "vm-4") or b"").endswith(b"END OF FLOOD\r\n"),
                 120, 0.2, "the end of the flood in the log")
        on_disk = sum(os.path.getsize(tmp_path / "logs" / name) for name in os.listdir(tmp_path / "logs"))
        assert bound // 2 <= on_disk <= bound
        assert gateway.rss_kib() - before < 20 * 1024, (before, gateway.rss_kib())
    finally:
        backend.stop()
        assert gateway.stop() == 0


def test_an_unwritable_log_dir_is_reported_and_viewers_still_work(tmp_path):
    (tmp_path / "not-a-folder").write_text("a file")
    echo = FakeBackend(lambda backend, sock: harness.echo(sock))
    gateway = GatewayProcess(str(tmp_path), touch_interval=TOUCH, console_log_dir=str(tmp_path / "not-a-folder"))
    try:
        assert gateway.token_cli("follow", "--instance", "vm-5", "--host", "127.0.0.1",
                                 "--port", str(echo.port)).returncode == 0
        wait_for(lambda: "cannot keep the console log of vm-5" in gateway.read_stderr(), 20, 0.1, "the error line")
        token = gateway.mint("127.0.0.1", echo.port, "serial")
        with ws_connect(f"ws://127.0.0.1:{gateway.port}/serial?token={token}") as ws:
            ws.send(b"still served")
            assert ws.recv(timeout=10) == b"still served"
        assert echo.connections == 1  # the viewer shared the follower's connection
    finally:
        echo.stop()
        assert gateway.stop() == 0


def test_serial_over_tls_with_the_origin_checked(tmp_path):
    cert, key = harness.make_certificate(str(tmp_path), "gw")
    echo = FakeBackend(lambda backend, sock: harness.echo(sock))
    gateway = _gateway(tmp_path, cert=cert, key=key, tls_only="true")
    try:
        token = gateway.mint("127.0.0.1", echo.port, "serial")
        url = f"wss://127.0.0.1:{gateway.port}/serial?token={token}"
        with ws_connect(url, ssl=harness.client_context(cert)) as ws:
            ws.send("é\x00\xff".encode())
            assert ws.recv(timeout=10) == "é\x00\xff".encode()
        with pytest.raises(InvalidStatus) as refused:
            ws_connect(url, ssl=harness.client_context(cert), origin="https://evil.example")
        assert refused.value.response.status_code == 403
        assert any(line.get("reason") == "origin-not-allowed" and line.get("path") == "serial"
                   for line in gateway.audit())
    finally:
        echo.stop()
        assert gateway.stop() == 0
