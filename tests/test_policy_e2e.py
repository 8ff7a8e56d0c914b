"""Console policies at a running gateway: qemu -vnc for view-only and input idleness, a recording
RFB server for pasted keystrokes and malformed messages."""

import json
import struct
import time

import pytest

from tests import harness
from tests.harness import (
    FakeBackend,
    GatewayProcess,
    framebuffer_update_request,
    read_framebuffer_update,
    recording_rfb_server,
    rfb_client_handshake,
    xvp_connect,
)

KEY = struct.Struct("!BBxxI")


def key(down, keysym):
    return KEY.pack(4, down, keysym)


@pytest.fixture(scope="module")
def traced_qemu(tmp_path_factory):
    """qemu whose VNC server logs every key event it takes: the guest's view of the keyboard."""
    machine = harness.Qemu(trace_keys=str(tmp_path_factory.mktemp("qemu") / "keys.log"))
    yield machine
    machine.stop()


@pytest.fixture
def gateway(tmp_path):
    process = GatewayProcess(str(tmp_path))
    yield process
    assert process.stop() == 0


@pytest.fixture
def recorder():
    backend = FakeBackend(recording_rfb_server)
    yield backend
    backend.stop()


def open_console(gateway, token, shared=1):
    sock, status, rest = xvp_connect(gateway.port, token, timeout=20)
    assert status == "HTTP/1.1 200 OK"
    width, height, pixel = rfb_client_handshake(sock, rest, shared=shared)
    return sock, width, height, pixel


def screen(sock, width, height, pixel):
    """Ask for the whole screen and read it: the console's picture still comes through."""
    sock.sendall(framebuffer_update_request(False, width, height))
    return read_framebuffer_update(sock, pixel)


def session_ends(gateway, count=1):
    return harness.wait_for(lambda: (lambda ends: ends if len(ends) >= count else None)(
        [line for line in gateway.audit() if line["event"] == "session-end"]), timeout=20,
        message=f"{count} session-end lines")


# -- view-only against qemu -----------------------------------------------------------------------

def test_view_only_keystrokes_never_reach_the_guest_while_its_screen_updates(traced_qemu, gateway):
    owner_token = gateway.mint("127.0.0.1", traced_qemu.port)
    viewer_token = gateway.mint("127.0.0.1", traced_qemu.port, "xvp-vnc", "--view-only")
    owner, *owner_screen = open_console(gateway, owner_token)
    # An exclusive ClientInit (shared 0) would make qemu drop every other client: the gateway
    # makes it shared, so the observer never disconnects the owner.
    viewer, width, height, pixel = open_console(gateway, viewer_token, shared=0)
    before = len(traced_qemu.key_events())
    try:
        assert screen(viewer, width, height, pixel) == width * height * pixel
        typed = b"".join(key(1, keysym) + key(0, keysym) for keysym in b"reboot\r")
        viewer.sendall(typed + struct.pack("!BBHH", 5, 1, 10, 10) + struct.pack("!BxxxI", 6, 4) + b"text"
                       + struct.pack("!BBHII", 255, 0, 1, 0x61, 0x1E) + struct.pack("!BBHH", 5, 0, 20, 20))
        # qemu answers an update request after the messages before it: they were all taken.
        assert screen(viewer, width, height, pixel) == width * height * pixel
        assert traced_qemu.key_events()[before:] == []
        # The owner is still connected, and the same keys from it do reach the guest.
        assert screen(owner, *owner_screen) > 0
        owner.sendall(key(1, 0x61) + key(0, 0x61))
        assert screen(owner, *owner_screen) > 0
        assert len(traced_qemu.key_events()[before:]) == 2
    finally:
        viewer.close()
        owner.close()
    ends = session_ends(gateway, 2)
    viewer_end = next(line for line in ends if line.get("policy") == "view-only")
    # The viewer closed and qemu closed at once in answer: either may be on record first.
    assert viewer_end["reason"] in ("client-closed", "backend-closed")
    assert viewer_end["bytes_down"] >= 2 * width * height * pixel


# -- input idleness against qemu: the framebuffer streams, the session still ends on time ----------

@pytest.mark.parametrize("where", ["token", "ini"])
def test_input_idle_session_ends_within_a_second_of_its_limit_while_the_screen_streams(traced_qemu, tmp_path,
                                                                                      where):
    limit = 2.0
    settings = {"input_idle_timeout": limit} if where == "ini" else {}
    gateway = GatewayProcess(str(tmp_path), **settings)
    try:
        extra = ("--input-idle", str(limit)) if where == "token" else ()
        token = gateway.mint("127.0.0.1", traced_qemu.port, "xvp-vnc", *extra)
        sock, width, height, pixel = open_console(gateway, token)
        last_input = time.monotonic()
        streamed, moved = 0, False
        try:
            while True:
                if not moved and time.monotonic() - last_input > 0.8:
                    sock.sendall(struct.pack("!BBHH", 5, 0, 30, 30))  # pointer motion: input
                    last_input, moved = time.monotonic(), True
                try:
                    streamed += screen(sock, width, height, pixel)
                except (AssertionError, ConnectionError):
                    break
                assert time.monotonic() - last_input < limit + 5, "the session outlived its limit"
        finally:
            ended = time.monotonic()
            sock.close()
        assert moved and limit - 0.05 <= ended - last_input <= limit + 1.0, ended - last_input
        assert streamed > 5 * width * height  # the framebuffer flowed the whole time
        end = session_ends(gateway)[0]
        assert end["reason"] == "input-idle" and end["bytes_down"] >= streamed
    finally:
        assert gateway.stop() == 0


# -- paste as keystrokes: a recording RFB server checks the exact sequence -------------------------

SHIFT = 0xFFE1


def test_pasted_text_arrives_as_exactly_these_key_events(recorder, gateway):
    token = gateway.mint("127.0.0.1", recorder.port, "xvp-vnc", "--paste-as-keys")
    sock, *_ = open_console(gateway, token)
    text = b"Hi 42, Bob!\n"
    sock.sendall(struct.pack("!BxxxI", 6, len(text)) + text + key(1, 0x7A) + key(0, 0x7A))
    # Each character, written out by hand: (keysym, typed with Shift).
    typed = [(0x48, True), (0x69, False), (0x20, False), (0x34, False), (0x32, False), (0x2C, False),
             (0x20, False), (0x42, True), (0x6F, False), (0x62, False), (0x21, True), (0xFF0D, False),
             (0x7A, False)]
    expected = []
    for keysym, shifted in typed:
        pair = [(1, keysym), (0, keysym)]
        expected += [(1, SHIFT), *pair, (0, SHIFT)] if shifted else pair
    size = 1 + 8 * len(expected)
    harness.wait_for(lambda: recorder.received and len(recorder.received[0]) >= size, timeout=20,
                     message="the typed keys at the console")
    got = recorder.received[0]
    assert got[:1] == b"\x01" and len(got) == size
    events = [KEY.unpack_from(got, offset) for offset in range(1, size, 8)]
    assert [(4, down, keysym) for down, keysym in expected] == events
    sock.close()


# -- malformed and oversized messages end the session; nothing of them reaches the console ---------

@pytest.mark.parametrize("bad, reason", [
    (b"\x07" + bytes(40), "client-bad-message"),
    (struct.pack("!BxxxI", 6, 2 << 20) + b"A" * 1000, "client-message-too-big"),
])
def test_a_malformed_message_ends_the_session_and_is_not_passed_on(recorder, gateway, bad, reason):
    token = gateway.mint("127.0.0.1", recorder.port, "xvp-vnc", "--input-idle", "600")
    sock, *_ = open_console(gateway, token)
    sock.sendall(key(1, 0x61) + bad[:5])
    harness.wait_for(lambda: recorder.received and len(recorder.received[0]) >= 9, message="the key event")
    sock.sendall(bad[5:])
    assert harness.closed_by_peer(sock, 10)
    end = session_ends(gateway)[0]
    assert end["reason"] == reason and end["policy"] == "input-idle=600" and end["detail"]
    assert recorder.received[0] == b"\x01" + key(1, 0x61)
    sock.close()
    # The gateway still serves: the next session of the same token works.
    again, *_ = open_console(gateway, token)
    again.sendall(key(1, 0x62))
    harness.wait_for(lambda: len(recorder.received) == 2 and recorder.received[1] == b"\x01" + key(1, 0x62),
                     message="the second session's key")
    again.close()


def test_a_console_that_asks_for_a_password_the_gateway_lacks_is_refused_in_rfb(gateway, tmp_path):
    def vnc_auth_only(backend, sock):
        sock.sendall(b"RFB 003.008\n")
        harness.recv_exactly(sock, 12)
        sock.sendall(b"\x01\x02")
        sock.recv(1)
    backend = FakeBackend(vnc_auth_only)
    try:
        token = gateway.mint("127.0.0.1", backend.port, "xvp-vnc", "--view-only")
        sock, status, rest = xvp_connect(gateway.port, token)
        assert rest + harness.recv_exactly(sock, 12 - len(rest)) == b"RFB 003.008\n"
        sock.sendall(b"RFB 003.008\n")
        assert harness.recv_exactly(sock, 1) == b"\0"  # no security types: a reason follows
        line = harness.wait_for(lambda: [e for e in gateway.audit() if e.get("reason") == "backend-needs-password"])
        assert line[0]["result"] == "rejected"
        sock.close()
    finally:
        backend.stop()


def test_a_plain_token_keeps_the_relay_byte_for_byte(recorder, gateway):
    """No policy: the gateway does no RFB of its own, the client speaks to the console directly."""
    token = gateway.mint("127.0.0.1", recorder.port)
    sock, status, rest = xvp_connect(gateway.port, token)
    assert rest + harness.recv_exactly(sock, 12 - len(rest)) == b"RFB 003.008\n"
    sock.sendall(b"RFB 003.008\n\x01\x01" + b"\x07anything")
    harness.wait_for(lambda: recorder.received and recorder.received[0] == b"\x01\x07anything",
                     message="the bytes passed as they were")
    sock.close()


def test_a_client_that_sends_nothing_more_cannot_hold_a_policy_session_past_its_idle_limit(recorder, tmp_path):
    gateway = GatewayProcess(str(tmp_path), input_idle_timeout=1)
    try:
        token = gateway.mint("127.0.0.1", recorder.port)
        sock, *_ = open_console(gateway, token)
        assert harness.closed_by_peer(sock, 5)
        assert session_ends(gateway)[0]["reason"] == "input-idle"
        sock.close()
    finally:
        assert gateway.stop() == 0


def test_an_identical_pointer_event_repeated_does_not_keep_an_idle_session_open(recorder, tmp_path):
    """Issue 25 item 6: the same no-button PointerEvent each 0.3 s kept the session alive forever;
    a pointer that moves keeps it alive, one that repeats itself does not."""
    gateway = GatewayProcess(str(tmp_path), input_idle_timeout=2)
    try:
        moving, *_ = open_console(gateway, gateway.mint("127.0.0.1", recorder.port, "xvp-vnc", "--instance", "moving"))
        still, *_ = open_console(gateway, gateway.mint("127.0.0.1", recorder.port, "xvp-vnc", "--instance", "still"))
        ended = {}
        for step in range(30):  # 9 s at most: the client's pace, one event each 0.3 s on each session
            moving.sendall(struct.pack("!BBHH", 5, 0, 100 + step, 100))
            try:
                still.sendall(struct.pack("!BBHH", 5, 0, 100, 100))
            except OSError:
                pass  # closed for idleness a moment before its audit line is read
            ended = {line["instance_id"]: line["reason"] for line in gateway.audit() if line["event"] == "session-end"}
            if ended:
                break
            time.sleep(0.3)
        assert ended == {"still": "input-idle"}  # while both kept sending
        assert harness.closed_by_peer(still, 5)
        moving.close()
        still.close()
    finally:
        assert gateway.stop() == 0


# -- single use: noVNC in Chromium consumes the token, reconnects after a cut, then nobody can -------

def attempts(gateway):
    return [line for line in gateway.audit() if line["event"] == "attempt"]


def test_single_use_refuses_others_resumes_its_client_within_the_grace_and_refuses_after(traced_qemu, tmp_path):
    from playwright.sync_api import sync_playwright

    grace = 3.0
    gateway_port = harness.free_port()
    proxy = harness.CuttableProxy(gateway_port)  # the browser's network, which the test cuts
    gateway = GatewayProcess(str(tmp_path), bind_port=gateway_port, public_url=f"http://127.0.0.1:{proxy.port}",
                             web_root=harness.NOVNC, resume_grace=grace)
    try:
        minted = gateway.token_cli("add", "--host", "127.0.0.1", "--port", str(traced_qemu.port), "--type", "ws-vnc",
                                   "--single-use", "--view-only", "--json")
        assert minted.returncode == 0, minted.stderr
        token = json.loads(minted.stdout)["token"]
        url = json.loads(minted.stdout)["access_url"] + "&reconnect=1&reconnect_delay=200"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=harness.CHROMIUM_ARGS)
            try:
                context = browser.new_context()
                page = context.new_page()
                page.goto(url)
                connected = "document.documentElement.classList.contains('noVNC_connected')"
                harness.wait_for(lambda: page.evaluate(connected), timeout=60, message="noVNC connected")
                assert [line.get("single_use") for line in attempts(gateway)] == ["consumed"]

                # Another client, from another address and without the cookie, is refused.
                other, status, _ = harness.raw_upgrade(gateway.port, token, source="127.0.0.2")
                other.close()
                assert status.startswith("HTTP/1.1 403 ")
                assert attempts(gateway)[-1]["reason"] == "refused-consumed"

                # The network drops: noVNC reconnects by itself and the gateway lets it back in.
                proxy.cut()
                harness.wait_for(lambda: [line for line in attempts(gateway) if line.get("single_use") == "resumed"],
                                 timeout=30, message="noVNC's reconnection")
                harness.wait_for(lambda: page.evaluate(connected), timeout=30, message="noVNC connected again")
                cookie = next(item for item in context.cookies() if item["name"] == "vncgate_resume")
                assert cookie["httpOnly"]
                page.goto("about:blank")
            finally:
                browser.close()
        session_ends(gateway, 2)

        # Within the grace, the cookie the gateway set lets the same browser in from another address.
        back, status, _ = harness.raw_upgrade(gateway.port, token, source="127.0.0.3",
                                                    cookie=f"vncgate_resume={cookie['value']}")
        assert status == "HTTP/1.1 101 Switching Protocols" and attempts(gateway)[-1]["single_use"] == "resumed"
        back.close()
        session_ends(gateway, 3)
        last_end = time.monotonic()  # the grace started before the session-end line was written

        # After the grace nobody gets in, not even the first client.
        time.sleep(max(0.0, last_end + grace + 0.5 - time.monotonic()))  # the grace is wall-clock time
        late, status, _ = harness.raw_upgrade(gateway.port, token, source="127.0.0.1",
                                                    cookie=f"vncgate_resume={cookie['value']}")
        late.close()
        assert status.startswith("HTTP/1.1 403 ") and attempts(gateway)[-1]["reason"] == "refused-consumed"
    finally:
        proxy.stop()
        assert gateway.stop() == 0


def test_over_the_websocket_path_view_only_filters_and_a_bad_message_ends_the_session(recorder, gateway):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    token = gateway.mint("127.0.0.1", recorder.port, "ws-vnc", "--view-only")
    with connect(f"ws://127.0.0.1:{gateway.port}/websockify?token={token}", open_timeout=20) as client:
        received = b""
        while len(received) < 12:
            received += client.recv(timeout=10)
        assert received == b"RFB 003.008\n"
        client.send(b"RFB 003.008\n")
        assert client.recv(timeout=10) == b"\x01\x01"
        client.send(b"\x01")
        assert client.recv(timeout=10) == bytes(4)
        # RFB messages split across websocket messages anyhow: the parser joins them.
        update = framebuffer_update_request()
        for part in (b"\x00" + key(1, 0x61)[:3], key(1, 0x61)[3:] + update[:4], update[4:] + b"\x09"):
            client.send(part)
        with pytest.raises(ConnectionClosed):
            while True:
                client.recv(timeout=10)
    end = session_ends(gateway)[0]
    assert end["reason"] == "client-bad-message" and end["path"] == "websocket"
    # Shared, no key, nothing of the bad message (waited for: the recorder reads in its own thread).
    harness.wait_for(lambda: recorder.received[0] == b"\x01" + update,
                     message="what the console got")
