"""The gateway-held VNC password: DES, both RFB handshakes, and qemu with password=on."""

import os
import socket
import struct
import time

import pytest

from tests import harness, vnc_client
from tests.harness import FakeBackend, GatewayProcess
from tests.test_browser import NOVNC, open_console_in_chromium
from tests.test_xvp_e2e import bright_pixels
from vncgate import rfb

PASSWORD = b"s3cret!8"


@pytest.mark.parametrize("key, plain, cipher", [
    ("0123456789ABCDEF", b"Now is t".hex(), "3FA40E8A984D4815"),   # FIPS 81's example
    ("133457799BBCDFF1", "0123456789ABCDEF", "85E813540F0AB405"),  # the classic worked example
    ("0101010101010101", "95F8A5E5DD31D900", "8000000000000000"),  # NBS variable-plaintext table
    ("8001010101010101", "0000000000000000", "95A8D72813DAA94D"),  # NBS variable-key table
])
def test_des_published_vectors(key, plain, cipher):
    assert rfb.des_encrypt_block(bytes.fromhex(key), bytes.fromhex(plain)).hex().upper() == cipher


def test_des_against_an_independent_implementation():
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
    from cryptography.hazmat.primitives.ciphers import Cipher, modes
    for _ in range(200):
        key, block = os.urandom(8), os.urandom(8)
        oracle = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()  # 3DES with one key is DES
        assert rfb.des_encrypt_block(key, block) == oracle.update(block) + oracle.finalize()


def test_vnc_key_quirk_reverses_each_byte_and_pads():
    challenge = bytes(range(16))
    reversed_key = bytes(int(f"{byte:08b}"[::-1], 2) for byte in b"ab\0\0\0\0\0\0")
    assert rfb.vnc_auth_response(b"ab", challenge) == (rfb.des_encrypt_block(reversed_key, challenge[:8])
                                                        + rfb.des_encrypt_block(reversed_key, challenge[8:]))
    assert rfb.vnc_auth_response(b"12345678-ignored", challenge) == rfb.vnc_auth_response(b"12345678", challenge)


def fake_server(minor, types=(2,), answer=0, stall=False):
    """An RFB server of version 3.minor that checks the DES response to its challenge."""
    def behaviour(backend, sock):
        sock.sendall(rfb.version_line(minor))
        backend.received.append(harness.recv_exactly(sock, 12))
        if stall:
            sock.recv(1)
            return
        sock.sendall(struct.pack("!I", types[0]) if minor == 3 else bytes((len(types), *types)))
        if types in ((), (0,)):  # a refusal: the reason, then the server hangs up
            sock.sendall(struct.pack("!I", 7) + b"go away")
            return
        if minor != 3:
            backend.received.append(harness.recv_exactly(sock, 1))
        challenge = os.urandom(16)
        sock.sendall(challenge)
        passed = harness.recv_exactly(sock, 16) == rfb.vnc_auth_response(PASSWORD, challenge) and answer == 0
        sock.sendall(struct.pack("!I", 0 if passed else 1))
        if not passed and minor == 8:
            sock.sendall(struct.pack("!I", 14) + b"wrong password")
        sock.recv(1)
    return behaviour


def backend_handshake(server, password=PASSWORD, timeout=5):
    backend = FakeBackend(server)
    try:
        with socket.create_connection(("127.0.0.1", backend.port)) as sock:
            return rfb.authenticate_backend(sock, password, time.monotonic() + timeout), backend.received
    finally:
        backend.stop()


@pytest.mark.parametrize("minor", [3, 7, 8])
def test_backend_handshake_for_each_version(minor):
    agreed, received = backend_handshake(fake_server(minor))
    assert agreed == minor and received[0] == rfb.version_line(minor)
    if minor != 3:
        assert received[1] == b"\x02"


@pytest.mark.parametrize("server, reason", [
    (fake_server(8, answer=1), "backend-auth-failed"),
    (fake_server(8, types=(1, 16)), "backend-no-vnc-auth"),
    (fake_server(8, types=()), "backend-refused"),
    (fake_server(3, types=(0,)), "backend-refused"),
    (fake_server(8, stall=True), "backend-timeout"),
    (lambda backend, sock: sock.sendall(b"SSH-2.0-OpenSSH\r\n") or sock.recv(1), "backend-bad-rfb"),
])
def test_backend_handshake_failures(server, reason):
    with pytest.raises(rfb.RfbError) as error:
        backend_handshake(server, timeout=1)
    assert error.value.reason == reason


def test_wrong_password_reports_the_servers_reason():
    with pytest.raises(rfb.RfbError) as error:
        backend_handshake(fake_server(8), password=b"wrong")
    assert error.value.reason == "backend-auth-failed" and "wrong password" in error.value.detail


def client_side(client_version, action):
    gateway_end, client_end = socket.socketpair()
    with gateway_end, client_end:
        client_end.sendall(client_version)
        reader = lambda count: harness.recv_exactly(gateway_end, count)  # noqa: E731
        action(reader, gateway_end.sendall)
        gateway_end.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := client_end.recv(4096):
            received += chunk
        return received


@pytest.mark.parametrize("client_minor, expected", [
    (3, b"RFB 003.008\n" + struct.pack("!I", 1)),
    (7, b"RFB 003.008\n\x01\x01"),
    (8, b"RFB 003.008\n\x01\x01" + struct.pack("!I", 0)),
])
def test_offer_no_auth_for_each_client_version(client_minor, expected):
    choice = b"" if client_minor == 3 else b"\x01"
    assert client_side(rfb.version_line(client_minor) + choice,
                       lambda read, write: rfb.offer_no_auth(read, write, 8)) == expected


def test_client_choosing_another_type_is_an_error():
    with pytest.raises(rfb.RfbError) as error:
        client_side(b"RFB 003.008\n\x02", lambda read, write: rfb.offer_no_auth(read, write, 8))
    assert error.value.reason == "client-bad-security"


def test_client_that_is_not_rfb_is_an_error():
    with pytest.raises(rfb.RfbError) as error:
        client_side(b"GET / HTTP/1.1\r", lambda read, write: rfb.offer_no_auth(read, write, 8))
    assert error.value.reason == "client-bad-rfb"


@pytest.mark.parametrize("client_minor, prefix", [(3, struct.pack("!I", 0)), (8, b"\0")])
def test_refuse_client_sends_the_reason(client_minor, prefix):
    sent = client_side(rfb.version_line(client_minor), lambda read, write: rfb.refuse_client(read, write, 8, "no"))
    assert sent == b"RFB 003.008\n" + prefix + struct.pack("!I", 2) + b"no"


# -- the real thing: qemu -vnc ...,password=on ------------------------------------------------

@pytest.fixture(scope="module")
def locked_qemu():
    machine = harness.Qemu(extra_vnc=",password=on", monitor=True)
    machine.proc.stdin.write(f"set_password vnc {PASSWORD.decode()}\n")
    machine.proc.stdin.flush()

    def password_set():
        try:
            with socket.create_connection(("127.0.0.1", machine.port)) as sock:
                return rfb.authenticate_backend(sock, PASSWORD, time.monotonic() + 5)
        except rfb.RfbError:
            return None
    harness.wait_for(password_set, message="qemu to take the VNC password")
    yield machine
    machine.stop()


@pytest.fixture
def password_files(tmp_path):
    (tmp_path / "right").write_bytes(PASSWORD + b"\n")
    (tmp_path / "wrong").write_bytes(b"not-it\n")
    return str(tmp_path / "right"), str(tmp_path / "wrong")


def test_vncdotool_without_a_password_sees_the_locked_console(locked_qemu, tmp_path, password_files):
    gateway = GatewayProcess(str(tmp_path))
    try:
        token = gateway.mint("127.0.0.1", locked_qemu.port, "xvp-vnc", "--password-file", password_files[0])
        shot = harness.artifact("xvp-password-vncdotool.png")

        def screen_has_text():
            vnc_client.xvp_screenshot(gateway.port, token, shot)
            return bright_pixels(shot)[0] > 200
        harness.wait_for(screen_has_text, timeout=60, interval=0.5, message="SeaBIOS text via a held password")
        on_disk = b"".join(path.read_bytes() for path in tmp_path.iterdir() if path.name.startswith("tokens.db"))
        assert PASSWORD not in on_disk and token.encode() not in on_disk
    finally:
        assert gateway.stop() == 0


def test_novnc_without_a_password_sees_the_locked_console(locked_qemu, tmp_path, password_files):
    port = harness.free_port()
    gateway = GatewayProcess(str(tmp_path), bind_port=port, public_url=f"http://127.0.0.1:{port}", web_root=NOVNC)
    try:
        minted = gateway.token_cli("add", "--host", "127.0.0.1", "--port", str(locked_qemu.port),
                                   "--password-file", password_files[0])
        assert minted.returncode == 0, minted.stderr
        open_console_in_chromium(minted.stdout.strip(), harness.artifact("browser-password-novnc.png"))
    finally:
        assert gateway.stop() == 0


def test_wrong_stored_password_gives_an_rfb_reason_and_an_audit_line(locked_qemu, tmp_path, password_files):
    gateway = GatewayProcess(str(tmp_path))
    try:
        token = gateway.mint("127.0.0.1", locked_qemu.port, "xvp-vnc", "--password-file", password_files[1])
        sock, status, rest = harness.xvp_connect(gateway.port, token)
        assert status == "HTTP/1.1 200 OK"
        assert rest + harness.recv_exactly(sock, 12 - len(rest)) == b"RFB 003.008\n"
        sock.sendall(b"RFB 003.008\n")
        count = harness.recv_exactly(sock, 1)
        length = struct.unpack("!I", harness.recv_exactly(sock, 4))[0]
        reason = harness.recv_exactly(sock, length).decode()
        assert count == b"\0" and "refused its stored password" in reason
        assert harness.closed_by_peer(sock, 3)
        line = harness.wait_for(lambda: [e for e in gateway.audit() if e.get("reason") == "backend-auth-failed"])
        assert line[0]["result"] == "rejected" and line[0]["token_id"] == harness.token_id(token)
    finally:
        assert gateway.stop() == 0
