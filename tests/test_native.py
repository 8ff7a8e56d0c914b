"""vncgate-connect: TigerVNC's vncviewer (a native client that cannot send XVP's CONNECT) under
Xvfb, through a console URL, to qemu; and every way a URL can fail, told to the terminal and
to the viewer."""

import os
import socket
import stat
import struct
import subprocess
import sys

import pytest

from tests import harness
from tests.harness import CertificateAuthority, GatewayProcess, bright_pixels

SENTENCE = "This console link is not valid: it is unknown, expired or revoked."


@pytest.fixture
def gateway(tmp_path):
    process = GatewayProcess(str(tmp_path))
    yield process
    assert process.stop() == 0


@pytest.fixture(scope="module")
def screen():
    display = harness.Xvfb()
    yield display
    display.stop()


class Connect:
    """vncgate-connect in a subprocess; .address is what it printed for the viewer."""

    def __init__(self, *args, stdin=None):
        self.proc = subprocess.Popen([harness.console_script("vncgate-connect"), *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, stdin=subprocess.PIPE if stdin else None, text=True)
        if stdin:
            self.proc.stdin.write(stdin)
            self.proc.stdin.close()
        line = self.proc.stdout.readline().strip()
        assert line.startswith("vncviewer "), (line, self.proc.stderr.read())
        self.address = line.split()[1]  # a Unix socket's path (the default), or HOST::PORT (--listen)
        self.port = int(self.address.rsplit(":", 1)[1]) if "::" in self.address else None

    def dial(self):
        """A connection to where the viewer connects, as this test's (the invoking) user."""
        if self.port is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(30)
            sock.connect(self.address)
            return sock
        return socket.create_connection(("127.0.0.1", self.port), timeout=30)

    def finish(self, timeout=30):
        """(exit status, stderr lines) once it has exited."""
        status = self.proc.wait(timeout)
        return status, self.proc.stderr.read().splitlines()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def console_url(gateway, token, scheme="http"):
    return f"{scheme}://127.0.0.1:{gateway.port}/console?token={token}"


def viewer(screen, address):
    return subprocess.Popen(["vncviewer", address], env=screen.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def rfb_refusal(connect):
    """Connect as an RFB 3.8 viewer would; returns the failure reason the server gives."""
    with connect.dial() as sock:
        assert harness.recv_exactly(sock, 12) == b"RFB 003.008\n"
        sock.sendall(b"RFB 003.008\n")
        assert harness.recv_exactly(sock, 1) == b"\0"  # no security types: a reason follows
        length = struct.unpack("!I", harness.recv_exactly(sock, 4))[0]
        return harness.recv_exactly(sock, length).decode()


def test_tigervnc_shows_seabios_through_vncgate_connect(qemu, gateway, screen):
    # The URL comes on standard input: on a command line every local user could read it in ps.
    connect = Connect("-", "--once", stdin=console_url(gateway, gateway.mint("127.0.0.1", qemu.port)) + "\n")
    client = viewer(screen, connect.address)
    try:
        shot = harness.artifact("native-tigervnc.png")

        def seabios_on_the_x_display():
            screen.capture(shot)
            return 200 < bright_pixels(shot)[0] < 50_000  # text on black; an error dialog is bright
        harness.wait_for(seabios_on_the_x_display, timeout=60, interval=0.5, message="SeaBIOS in vncviewer")
        assert connect.proc.poll() is None
    finally:
        client.kill()
        client.wait(10)
    # --once: the viewer's end is the command's end, a clean one.
    assert connect.finish() == (0, [])
    end = harness.wait_for(lambda: [e for e in gateway.audit() if e["event"] == "session-end"])[0]
    assert end["path"] == "xvp" and end["bytes_down"] > 1000  # vncviewer asks for compressed encodings


def test_an_expired_url_is_an_error_in_the_viewer_and_one_line(qemu, gateway, screen):
    token = gateway.mint("127.0.0.1", qemu.port, "xvp-vnc", "--ttl", "1")  # the shortest TTL a mint may ask for
    harness.wait_for(lambda: '"state": "expired"' in gateway.token_cli("list", "--include-expired", "--json").stdout,
                     message="the token's expiry")
    connect = Connect(console_url(gateway, token))  # no --once: a refused link ends it all the same
    client = viewer(screen, connect.address)
    try:
        status, lines = connect.finish()
        assert status == 1
        assert lines == [f"vncgate-connect: error: the gateway refused the console link: 401 Unauthorized: {SENTENCE}"]
        shot = harness.artifact("native-tigervnc-expired.png")

        def error_dialog():
            screen.capture(shot)
            return bright_pixels(shot)[0] > 50_000
        harness.wait_for(error_dialog, timeout=60, interval=0.5, message="vncviewer's error dialog")
    finally:
        client.kill()
        said = " ".join(client.communicate(timeout=10)[0].split())
    assert f"Authentication failure: vncgate: {SENTENCE}" in said
    assert [e.get("reason") for e in gateway.audit()] == ["expired-token"]


def test_https_url_with_cacert_and_several_viewers(qemu, tmp_path):
    authority = CertificateAuthority(str(tmp_path), "gateway-ca")
    cert, key = authority.issue("gateway")
    gateway = GatewayProcess(str(tmp_path), cert=cert, key=key, tls_only="true")
    connect = None
    try:
        token = gateway.mint("127.0.0.1", qemu.port)
        # Without --once it serves viewer after viewer (up to --viewers at once).
        connect = Connect(console_url(gateway, token, "https"), "--cacert", authority.cert, "--viewers", "3")
        for _ in range(2):
            with connect.dial() as sock:
                assert harness.recv_exactly(sock, 12) == b"RFB 003.008\n"  # qemu's banner, through TLS
        assert connect.proc.poll() is None
        assert gateway.token_cli("revoke", token).returncode == 0
        assert rfb_refusal(connect) == f"vncgate: {SENTENCE}"
        assert connect.finish()[0] == 1
        accepted = [e for e in gateway.audit() if e.get("result") == "accepted"]
        assert len(accepted) == 2 and all(e["path"] == "xvp" for e in accepted)
    finally:
        if connect:
            connect.stop()
        assert gateway.stop() == 0


def test_a_gateway_certificate_that_does_not_verify(tmp_path):
    cert, key = CertificateAuthority(str(tmp_path), "gateway-ca").issue("gateway")
    stranger = CertificateAuthority(str(tmp_path), "stranger")
    secure = GatewayProcess(str(tmp_path), name="tls", cert=cert, key=key)
    try:
        connect = Connect(console_url(secure, "T" * 43, "https"), "--cacert", stranger.cert, "--once")
        reason = rfb_refusal(connect)
        status, lines = connect.finish()
        assert status == 1 and lines == [f"vncgate-connect: error: the gateway 127.0.0.1:{secure.port} has a "
                                         "certificate that does not verify: unable to get local issuer certificate"]
        assert reason == "vncgate: " + lines[0].partition("error: ")[2]
    finally:
        assert secure.stop() == 0


def test_an_unreachable_gateway():
    port = harness.free_port()  # nothing listens there
    connect = Connect(f"http://127.0.0.1:{port}/console?token=abc", "--once")
    reason = rfb_refusal(connect)
    status, lines = connect.finish()
    assert status == 1 and lines == [f"vncgate-connect: error: cannot reach the gateway 127.0.0.1:{port}: "
                                     "Connection refused"]
    assert reason == "vncgate: " + lines[0].partition("error: ")[2]


def test_a_client_that_is_not_a_viewer_does_not_stop_it(gateway):
    connect = Connect(console_url(gateway, "unknown-token"), "--once")
    with connect.dial() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")  # not RFB: it gets the version line and is dropped
        assert harness.closed_by_peer(sock, 30)
    status, lines = connect.finish()
    assert status == 1 and len(lines) == 1 and "401 Unauthorized" in lines[0]


@pytest.mark.parametrize("args, message", [
    (["ftp://127.0.0.1/console?token=x"], "not a console URL"),
    (["http://127.0.0.1:6080/console"], "not a console URL"),
    (["http://127.0.0.1:6080/console?tok=secret-ish"], "not a console URL"),
    (["http://127.0.0.1:99999/console?token=x"], "bad port"),
    (["http://127.0.0.1/console?token=x", "--listen", "nowhere"], "must be ADDR:PORT"),
    (["http://127.0.0.1/console?token=x", "--listen", "0.0.0.0:0"], "add --allow-remote"),
    (["http://127.0.0.1/console?token=x", "--viewers", "0"], "must be from 1 to 1000"),
    ([], "the following arguments are required: URL"),
])
def test_usage_errors_exit_2_with_one_line(args, message):
    done = subprocess.run([harness.console_script("vncgate-connect"), *args], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and message in done.stderr
    assert "secret-ish" not in done.stderr  # a mistyped URL may still hold a token: it is not echoed


def test_a_port_in_use_exits_1_with_one_line():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = subprocess.run([harness.console_script("vncgate-connect"), "http://127.0.0.1:1/console?token=x",
                               "--listen", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert done.stderr == f"vncgate-connect: error: cannot listen on 127.0.0.1:{port}: Address already in use\n"


def test_an_unreadable_cacert_exits_1_with_one_line(tmp_path):
    missing = tmp_path / "nowhere.pem"
    done = subprocess.run([harness.console_script("vncgate-connect"), "https://127.0.0.1:1/console?token=x",
                           "--cacert", str(missing)], capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == f"vncgate-connect: error: cannot load CA file {missing}: No such file or directory\n"


# -- least privilege (issue 25, item 3): only the invoking user's viewer, one at a time -----------

AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c"]


def test_the_default_is_a_unix_socket_in_a_folder_only_its_user_can_enter(gateway):
    connect = Connect(console_url(gateway, "unknown-token"), "--once")
    try:
        folder = os.path.dirname(connect.address)
        info = os.stat(folder)
        assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
        assert stat.S_ISSOCK(os.stat(connect.address).st_mode)
        if os.getuid() == 0:  # another user cannot even reach the socket
            other = subprocess.run([*AS_NOBODY, "import socket, sys; s = socket.socket(socket.AF_UNIX); "
                                    f"s.connect({connect.address!r})"], capture_output=True, text=True, timeout=30)
            assert other.returncode != 0 and "PermissionError" in other.stderr
        assert rfb_refusal(connect) == f"vncgate: {SENTENCE}"  # its own user's viewer is served
        assert connect.finish()[0] == 1
        assert not os.path.exists(folder)  # removed on the way out
    finally:
        connect.stop()


def test_over_tcp_only_connections_of_the_same_uid_are_served(gateway):
    connect = Connect(console_url(gateway, "unknown-token"), "--once", "--listen", "127.0.0.1:0")
    try:
        other = subprocess.run([*AS_NOBODY, "import socket; s = socket.create_connection(('127.0.0.1', "
                                f"{connect.port}), timeout=30); print(repr(s.recv(12)))"],
                               capture_output=True, text=True, timeout=30)
        assert other.stdout.strip() == "b''"  # closed at once: not even the gateway's banner
        assert rfb_refusal(connect) == f"vncgate: {SENTENCE}"  # --once: the refused stranger did not count
        status, lines = connect.finish()
        assert lines[0] == f"vncgate-connect: refused a connection from uid 65534: only uid {os.getuid()} may " \
                           "use this console"
    finally:
        connect.stop()


def test_one_viewer_at_a_time_unless_told_otherwise(qemu, gateway):
    connect = Connect(console_url(gateway, gateway.mint("127.0.0.1", qemu.port)))
    try:
        with connect.dial() as first:
            assert harness.recv_exactly(first, 12) == b"RFB 003.008\n"  # qemu's banner
            assert rfb_refusal(connect) == "vncgate: another viewer is using this console " \
                                           "(vncgate-connect --viewers N serves more)"
    finally:
        connect.stop()


def test_a_non_loopback_listen_needs_allow_remote_and_is_warned_about(gateway):
    connect = Connect(console_url(gateway, "unknown-token"), "--listen", "0.0.0.0:0", "--allow-remote")
    try:
        assert connect.address.startswith("0.0.0.0::")
    finally:
        connect.stop()
    assert connect.proc.stderr.read().splitlines()[0].startswith(
        "vncgate-connect: warning: listening on 0.0.0.0, not loopback")


def test_sigterm_removes_the_socket_and_its_folder(gateway):
    connect = Connect(console_url(gateway, "unknown-token"))
    folder = os.path.dirname(connect.address)
    assert os.path.isdir(folder)
    connect.proc.terminate()
    assert connect.proc.wait(30) == 143
    assert not os.path.exists(folder)
