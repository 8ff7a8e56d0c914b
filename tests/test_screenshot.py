"""Screenshots of consoles (console/screenshot.py, png.py): the PNG encoder and the RFB reader
fed bytes, then real qemu consoles through the API and the CLI (plain, VNC password,
VeNCrypt), a live vncdotool session that ten screenshots leave alone, and hostile backends
that must each end in a clear error within the deadline with the gateway's memory flat."""

import base64
import io
import os
import socket
import struct
import threading
import time
import urllib.request
import zlib

import pytest
from PIL import Image, ImageChops

from tests import harness, vnc_client
from tests.harness import CertificateAuthority, FakeBackend, Qemu, check_openapi, recv_exactly, wait_for
from vncgate.console import png, rfb, screenshot

PASSWORD = "shot-pw1"


# -- the PNG encoder and the RFB reader, fed bytes ------------------------------------------------

def test_png_round_trips_through_pillow_and_shrinks_by_whole_factors():
    width, height = 37, 11
    rgb = bytes((x * 7 + y * 3 + channel * 50) % 256 for y in range(height) for x in range(width) for channel in range(3))
    image = Image.open(io.BytesIO(png.encode(width, height, rgb)))
    assert image.format == "PNG" and image.size == (width, height) and image.mode == "RGB"
    assert image.tobytes() == rgb
    out_width, out_height, small = png.shrink(width, height, rgb, 16)
    assert (out_width, out_height) == (13, 4)  # factor 3
    assert small[:3] == rgb[:3] and small[3:6] == rgb[9:12]
    assert small[13 * 3:13 * 3 + 3] == rgb[3 * width * 3:3 * width * 3 + 3]
    assert png.shrink(width, height, rgb, 100) == (width, height, rgb)
    with pytest.raises(ValueError):
        png.encode(width, height, rgb[:-1])


class BytesIO:
    """A BackendIO over bytes already received (the reader never touches a socket)."""

    def __init__(self, data):
        self.data = data
        self.written = b""

    def read_exact(self, count):
        if len(self.data) < count:
            raise rfb.RfbError("backend-closed", "out of bytes")
        chunk, self.data = self.data[:count], self.data[count:]
        return chunk

    def read_into(self, view):
        view[:] = self.read_exact(len(view))

    def write(self, data):
        self.written += data


def server_init(width, height, name=b"fake"):
    return struct.pack("!HH16sI", width, height, b"\0" * 16, len(name)) + name


def rect(x, y, width, height, encoding, body=b""):
    return struct.pack("!HHHHi", x, y, width, height, encoding) + body


def update(*rects):
    return struct.pack("!BxH", 0, len(rects)) + b"".join(rects)


def pixel(red, green, blue):
    return bytes((blue, green, red, 0))


def test_raw_copyrect_and_desktop_size_paint_the_screen_the_gateway_asked_for():
    resized = update(rect(0, 0, 4, 2, screenshot.RAW, pixel(1, 1, 1) * 8), rect(0, 0, 3, 1, screenshot.DESKTOP_SIZE))
    after = (b"\x02" + b"\x03\0\0\0" + struct.pack("!I", 2) + b"hi"  # a Bell and clipboard text meanwhile
             + update(rect(0, 0, 1, 1, screenshot.RAW, pixel(9, 9, 9)),
                      rect(1, 0, 1, 1, screenshot.COPYRECT, struct.pack("!HH", 0, 0)),
                      rect(2, 0, 1, 1, screenshot.COPYRECT, struct.pack("!HH", 1, 0))))
    feed = BytesIO(server_init(4, 2) + resized + after)
    screen = screenshot.read_screen(feed, max_pixels=100)
    assert (screen.width, screen.height) == (3, 1)
    assert screen.rgb() == bytes((9, 9, 9)) * 3
    assert feed.written.startswith(b"\x01\0\0\0\0" + screenshot.PIXEL_FORMAT + b"\x02\0\0\x03")
    assert feed.written.count(screenshot.update_request(4, 2)) == 1 and feed.written.endswith(
        screenshot.update_request(3, 1))

    # A DesktopSize of the size it has already changes nothing: this one update is the picture.
    painted = screenshot.read_screen(BytesIO(server_init(4, 2) + update(
        rect(0, 0, 4, 2, screenshot.DESKTOP_SIZE), rect(0, 0, 4, 2, screenshot.RAW, pixel(255, 0, 0) * 8),
        rect(1, 1, 2, 1, screenshot.RAW, pixel(0, 0, 255) * 2))), max_pixels=100).rgb()
    assert painted[:12] == bytes((255, 0, 0)) * 4 and painted[15:21] == bytes((0, 0, 255)) * 2


@pytest.mark.parametrize("tail, reason", [
    (b"", "screenshot-too-large"),
    (update(rect(0, 0, 2, 2, 7)), "backend-bad-update"),
    (update(rect(3, 0, 2, 2, screenshot.RAW)), "backend-bad-update"),
    (update(rect(0, 0, 2, 2, screenshot.COPYRECT, struct.pack("!HH", 3, 3))), "backend-bad-update"),
    (update(rect(0, 0, 4, 4, screenshot.RAW, b"\0" * 10)), "backend-closed"),
    (b"\x09", "backend-bad-update"),
    (update(rect(0, 0, 60000, 60000, screenshot.DESKTOP_SIZE)), "screenshot-too-large"),
])
def test_what_the_reader_refuses(tail, reason):
    width = 65535 if reason == "screenshot-too-large" and not tail else 4
    with pytest.raises(rfb.RfbError) as error:
        screenshot.read_screen(BytesIO(server_init(width, width) + tail), max_pixels=4096)
    assert error.value.reason == reason


# -- real qemu consoles ---------------------------------------------------------------------------

def picture(data):
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def bright(image):
    return sum(image.convert("L").histogram()[129:])


def console_size(port, password=None):
    """The console's own size, from its ServerInit (a shared client of qemu directly)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        rfb.authenticate_backend(sock, password, time.monotonic() + 10)
        sock.sendall(b"\x01")
        return struct.unpack("!HH", recv_exactly(sock, 4))


def screenshot_with_text(api, token_id, query=""):
    def shown():
        status, _, body = api.screenshot(token_id, query)
        return status == 200 and bright(picture(body)) > 200 and picture(body)
    return wait_for(shown, timeout=60, interval=0.5, message="SeaBIOS text in a screenshot")


def test_a_qemu_console_through_the_api_and_the_cli(api_gateway, qemu, tmp_path):
    api = api_gateway.api
    _, _, console = api.call("POST", "/consoles", {"host": "127.0.0.1", "port": qemu.port, "instance": "vm-shot"})
    image = screenshot_with_text(api, console["token_id"])
    image.save(harness.artifact("screenshot-api.png"))
    assert image.size == console_size(qemu.port) and len(image.getcolors(1 << 16)) > 1

    status, headers, thumb = api.screenshot(console["token_id"], "?max_width=320")
    assert status == 200 and headers["Cache-Control"] == "no-store"
    assert picture(thumb).width <= 320 and picture(thumb).width == -(-image.width // -(-image.width // 320))

    for how in (("--token-id", console["token_id"]), ("--instance", "vm-shot")):
        out = str(tmp_path / f"cli{how[0]}.png")
        done = api_gateway.token_cli("screenshot", *how, "-o", out)
        assert done.returncode == 0, done.stderr
        assert picture(open(out, "rb").read()).size == image.size and out in done.stdout

    small = str(tmp_path / "small.png")
    assert api_gateway.token_cli("screenshot", "--instance", "vm-shot", "--max-width", "320", "-o", small).returncode == 0
    assert picture(open(small, "rb").read()).size == picture(thumb).size
    both = api_gateway.token_cli("screenshot", "--instance", "vm-shot", "--token-id", console["token_id"], "-o", small)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr

    _, _, serial = api.call("POST", "/consoles", {"host": "127.0.0.1", "port": qemu.port, "type": "serial"})
    status, _, error = api.screenshot(serial["token_id"])
    assert status == 400 and "serial console has its log" in error["error"]
    done = api_gateway.token_cli("screenshot", "--token-id", serial["token_id"], "-o", str(tmp_path / "x.png"))
    assert done.returncode == 1 and "serial console has its log" in done.stderr and not os.path.exists(tmp_path / "x.png")
    assert api.screenshot(console["token_id"], "?max_width=3")[0] == 400
    assert api.screenshot(console["token_id"], "?colour=1")[0] == 400
    assert api.screenshot("0123456789abcdef")[0] == 404

    shots = [line for line in api_gateway.audit() if line["event"] == "screenshot"]
    assert shots[-1]["result"] == "ok" and shots[-1]["instance_id"] == "vm-shot" and shots[-1]["key"] == "ops"
    assert (shots[-1]["width"], shots[-1]["height"]) == image.size
    assert [line["reason"] for line in api_gateway.audit() if line["event"] == "screenshot"
            and line["result"] == "rejected"] == []  # the 400s are refused before any screenshot
    assert any(line["event"] == "api" and line["action"] == "console-screenshot" and line.get("reason") ==
               "screenshot-not-vnc" for line in api_gateway.audit())


@pytest.fixture(scope="module")
def password_qemu():
    machine = Qemu(extra_vnc=",password=on", monitor=True)
    machine.set_vnc_password(PASSWORD)
    yield machine
    machine.stop()


def test_a_password_console_is_pictured_while_a_session_holds_its_token(api_gateway, password_qemu, tmp_path):
    """Without screenshot_key_file the gateway opens a password only with the token: while a
    client of it is connected."""
    api = api_gateway.api
    _, _, console = api.call("POST", "/consoles", {"host": "127.0.0.1", "port": password_qemu.port,
                                                   "type": "xvp-vnc", "instance": "vm-locked", "password": PASSWORD})
    status, _, error = api.screenshot(console["token_id"])
    assert status == 409 and "while a session" in error["error"]
    done = api_gateway.token_cli("screenshot", "--instance", "vm-locked", "-o", str(tmp_path / "locked.png"))
    assert done.returncode == 1 and "screenshot-needs-session" in done.stderr

    client = vnc_client.xvp_client(api_gateway.port, console["token"])
    try:
        image = screenshot_with_text(api, console["token_id"])
    finally:
        client.disconnect()
    assert image.size == console_size(password_qemu.port, PASSWORD.encode())
    for path in (api_gateway.audit_path, api_gateway.stderr_path):
        assert PASSWORD not in open(path).read()


def test_with_a_screenshot_key_file_a_password_console_is_pictured_without_a_session(password_qemu, tmp_path):
    key = tmp_path / "screenshot.key"
    key.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    gateway = harness.start_api_gateway(str(tmp_path), screenshot_key_file=str(key))
    try:
        api = gateway.api
        _, _, console = api.call("POST", "/consoles", {"host": "127.0.0.1", "port": password_qemu.port,
                                                       "instance": "vm-keyed", "password": PASSWORD})
        image = screenshot_with_text(api, console["token_id"])
        assert image.size == console_size(password_qemu.port, PASSWORD.encode())
        assert api.call("GET", "/sessions")[2] == []  # no session opened the password

        password_file = tmp_path / "pw"
        password_file.write_text(PASSWORD)
        minted = gateway.token_cli("add", "--host", "127.0.0.1", "--port", str(password_qemu.port), "--instance",
                                   "vm-cli", "--password-file", str(password_file))
        assert minted.returncode == 0, minted.stderr
        out = str(tmp_path / "keyed.png")
        done = gateway.token_cli("screenshot", "--instance", "vm-cli", "-o", out)
        assert done.returncode == 0, done.stderr
        assert picture(open(out, "rb").read()).size == image.size
        for path in (gateway.audit_path, gateway.stderr_path):
            assert PASSWORD not in open(path).read()
    finally:
        assert gateway.stop() == 0
    check_openapi(gateway.api.responses)


def test_ten_screenshots_leave_a_live_vncdotool_session_connected_and_unchanged(api_gateway, qemu, tmp_path):
    api = api_gateway.api
    _, _, console = api.call("POST", "/consoles", {"host": "127.0.0.1", "port": qemu.port, "type": "xvp-vnc",
                                                   "instance": "vm-watched"})
    screenshot_with_text(api, console["token_id"])
    client = vnc_client.xvp_client(api_gateway.port, console["token"])
    try:
        before, after = str(tmp_path / "before.png"), str(tmp_path / "after.png")
        client.captureScreen(before)
        for _ in range(10):
            assert api.screenshot(console["token_id"])[0] == 200
        client.captureScreen(after)
        sessions = api.call("GET", "/sessions?instance=vm-watched")[2]
    finally:
        client.disconnect()
    assert len(sessions) == 1
    # The same picture in the same pixel format, but for the text cursor, which blinks: one 9x16 cell at most.
    changed = ImageChops.difference(Image.open(before).convert("RGB"), Image.open(after).convert("RGB")).getbbox()
    assert changed is None or (changed[2] - changed[0] <= 9 and changed[3] - changed[1] <= 16), changed
    ends = [line for line in api_gateway.audit() if line["event"] == "session-end"]
    assert [line["reason"] for line in ends] in ([], ["client-closed"])  # only the disconnect() at the end


def test_a_vencrypt_console(tmp_path_factory, tmp_path):
    authority = CertificateAuthority(str(tmp_path_factory.mktemp("pki")), "consoles")
    cert, key = authority.issue("gateway", usage="clientAuth")
    machine = Qemu(tls_dir=authority.qemu_dir())
    gateway = harness.start_api_gateway(str(tmp_path), backend_ca=authority.cert, backend_cert=cert, backend_key=key)
    try:
        _, _, console = gateway.api.call("POST", "/consoles", {"host": "127.0.0.1", "port": machine.port,
                                                               "backend_tls": True, "instance": "vm-tls"})
        image = screenshot_with_text(gateway.api, console["token_id"])
        out = str(tmp_path / "tls.png")
        done = gateway.token_cli("screenshot", "--token-id", console["token_id"], "-o", out)
        assert done.returncode == 0, done.stderr
        assert picture(open(out, "rb").read()).size == image.size and image.size[0] > 0
    finally:
        machine.stop()
        assert gateway.stop() == 0
    check_openapi(gateway.api.responses)


# -- hostile backends -------------------------------------------------------------------------------

SMALL = harness.rfb_server_streaming

HOSTILE = {
    "absurd dimensions": (SMALL([], server_init=server_init(65535, 65535)), "screenshot-too-large"),
    "an unknown encoding": (SMALL([update(rect(0, 0, 64, 32, 7))], server_init=server_init(64, 32)),
                            "backend-bad-update"),
    "a truncated rectangle, then silence": (
        SMALL([update(rect(0, 0, 2000, 1500, screenshot.RAW, b"\0" * 100_000))],
              server_init=server_init(2000, 1500)), "backend-timeout"),
    "a truncated rectangle, then a close": (None, "backend-closed"),
    "silence": (harness.silent, "backend-silent"),
    "silence after ServerInit": (SMALL([], server_init=server_init(640, 480)), "backend-timeout"),
}


def truncated_then_closed(backend, sock):
    sock.sendall(b"RFB 003.008\n")
    recv_exactly(sock, 12)
    sock.sendall(b"\x01\x01")
    recv_exactly(sock, 1)
    sock.sendall(b"\0\0\0\0")
    recv_exactly(sock, 1)
    sock.sendall(server_init(2000, 1500) + update(rect(0, 0, 2000, 1500, screenshot.RAW, b"\0" * 100_000)))


def metrics(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def test_hostile_backends_each_get_a_clear_error_within_the_deadline_and_memory_stays_flat(tmp_path):
    timeout = 2.0
    gateway = harness.start_api_gateway(str(tmp_path), screenshot_timeout=timeout, screenshot_max_concurrent=1)
    backends = {name: FakeBackend(behaviour or truncated_then_closed) for name, (behaviour, _) in HOSTILE.items()}
    try:
        api = gateway.api
        ids = {name: api.call("POST", "/consoles", {"host": "127.0.0.1", "port": backend.port, "instance": name})[2][
            "token_id"] for name, backend in backends.items()}
        rss = []
        for _round in range(3):
            for name, (_, reason) in HOSTILE.items():
                started = time.monotonic()
                status, _, error = api.screenshot(ids[name])
                took = time.monotonic() - started
                assert status == 502 and error["error"], (name, status, error)
                assert took < timeout + 1.5, (name, took)
                line = [line for line in gateway.audit() if line["event"] == "screenshot"][-1]
                assert (line["instance_id"], line["reason"]) == (name, reason)
            rss.append(gateway.rss_kib())
        assert rss[-1] - rss[0] < 16 * 1024, rss  # KiB: rounds 2 and 3 left nothing behind

        # The cap: one screenshot in flight (a silent console), the next is refused at once.
        slow = threading.Thread(target=api.screenshot, args=(ids["silence after ServerInit"],))
        slow.start()
        wait_for(lambda: "vncgate_screenshots_in_flight 1" in metrics(gateway.port), message="one in flight")
        started = time.monotonic()
        status, _, error = api.screenshot(ids["an unknown encoding"])
        assert status == 503 and time.monotonic() - started < 1.0
        slow.join(30)
        text = metrics(gateway.port)
        assert 'vncgate_screenshots_total{result="screenshot-busy"} 1' in text
        assert 'vncgate_screenshots_total{result="screenshot-too-large"} 3' in text
        busy = [line for line in gateway.audit() if line["event"] == "screenshot" and line["result"] == "rejected"]
        assert busy[-2]["reason"] == "screenshot-busy" and busy[-2]["status"] == 503
    finally:
        for backend in backends.values():
            backend.stop()
        assert gateway.stop() == 0
    check_openapi(gateway.api.responses)


def test_png_is_what_zlib_and_struct_make():
    """The encoder's bytes, checked by hand (not only by Pillow): signature, IHDR, CRCs, rows."""
    data = png.encode(2, 1, b"\x01\x02\x03\x04\x05\x06")
    assert data[:8] == png.SIGNATURE
    length, kind = struct.unpack("!I4s", data[8:16])
    assert (length, kind) == (13, b"IHDR") and struct.unpack("!IIBBBBB", data[16:29]) == (2, 1, 8, 2, 0, 0, 0)
    assert struct.unpack("!I", data[29:33])[0] == zlib.crc32(data[12:29])
    idat_length = struct.unpack("!I", data[33:37])[0]
    assert zlib.decompress(data[41:41 + idat_length]) == b"\0\x01\x02\x03\x04\x05\x06"
    assert data.endswith(b"\0\0\0\0IEND" + struct.pack("!I", zlib.crc32(b"IEND")))
