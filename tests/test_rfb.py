"""The gateway-held VNC password: DES, both RFB handshakes, and qemu with password=on."""

import io
import os
import socket
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import harness, vnc_client
from tests.harness import NOVNC, FakeBackend, GatewayProcess, bright_pixels, fake_rfb_server, open_console_in_chromium
from vncgate import refusals
from vncgate.console import rfb, vncauth

PASSWORD = b"s3cret!8"
U32 = struct.Struct("!I")


# -- DES and VNC Authentication's response ------------------------------------------------------

@pytest.mark.parametrize("key, plain, cipher", [
    ("0123456789ABCDEF", b"Now is t".hex(), "3FA40E8A984D4815"),   # FIPS 81, appendix B
    ("133457799BBCDFF1", "0123456789ABCDEF", "85E813540F0AB405"),  # the classic worked example
    # NBS Special Publication 500-20, variable plaintext (key 0101...: the all-zero key)
    ("0101010101010101", "8000000000000000", "95F8A5E5DD31D900"),
    ("0101010101010101", "4000000000000000", "DD7F121CA5015619"),
    ("0101010101010101", "0000000000000001", "166B40B44ABA4BD6"),
    # ... variable key (plaintext 0)
    ("8001010101010101", "0000000000000000", "95A8D72813DAA94D"),
    ("4001010101010101", "0000000000000000", "0EEC1487DD8C26D5"),
    ("0101010101010102", "0000000000000000", "869EFD7F9F265A09"),
    # ... permutation operation, and substitution table
    ("1046913489980131", "0000000000000000", "88D55E54F54C97B4"),
    ("7CA110454A1A6E57", "01A1D6D039776742", "690F5B0D9A26939B"),
    ("0131D9619DC1376E", "5CD54CA83DEF57DA", "7A389D10354BD271"),
])
def test_des_published_vectors(key, plain, cipher):
    assert vncauth.des_encrypt_block(bytes.fromhex(key), bytes.fromhex(plain)).hex().upper() == cipher


def des_oracle(key, block):
    """The cryptography package's DES (three-key 3DES with one key three times is DES)."""
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
    from cryptography.hazmat.primitives.ciphers import Cipher, modes
    encryptor = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()
    return encryptor.update(block) + encryptor.finalize()


def test_des_against_an_independent_implementation():
    for _ in range(200):
        key, block = os.urandom(8), os.urandom(8)
        assert vncauth.des_encrypt_block(key, block) == des_oracle(key, block)


def test_vnc_known_answer_from_vncpasswd():
    """vncpasswd stores "password" DES-encrypted the VNC way under the fixed key
    23 82 107 6 35 78 88 7 as dbd83cfd727a1458, a value quoted wherever VNC password files
    are decoded: the same key quirk (bits reversed) as VNC Authentication."""
    fixed_key = bytes((23, 82, 107, 6, 35, 78, 88, 7))
    assert vncauth.vnc_auth_response(fixed_key, b"password" * 2).hex() == "dbd83cfd727a1458" * 2


def test_vnc_response_against_an_independent_implementation():
    def mirrored(byte):  # bit 0 <-> bit 7, written differently from rfb.py's
        return sum(((byte >> bit) & 1) << (7 - bit) for bit in range(8))
    for password in (b"", b"a", b"s3cret!8", b"\xff\x80\x01", os.urandom(8)):
        challenge = os.urandom(16)
        key = bytes(mirrored(byte) for byte in password.ljust(8, b"\0"))
        expected = des_oracle(key, challenge[:8]) + des_oracle(key, challenge[8:])
        assert vncauth.vnc_auth_response(password, challenge) == expected


def test_vnc_password_is_cut_to_eight_bytes_and_the_challenge_must_be_sixteen():
    challenge = bytes(range(16))
    assert vncauth.vnc_auth_response(b"12345678-ignored", challenge) == vncauth.vnc_auth_response(b"12345678", challenge)
    assert vncauth.vnc_auth_response(b"ab", challenge) == vncauth.vnc_auth_response(b"ab\0\0\0\0\0\0", challenge)
    with pytest.raises(ValueError):
        vncauth.vnc_auth_response(PASSWORD, challenge[:8])


# -- with the backend: fake RFB servers ---------------------------------------------------------

def backend_handshake(server, password=PASSWORD, timeout=5.0, then=None):
    """authenticate_backend against a fake server: (version line, what the server got, then(sock))."""
    backend = FakeBackend(server)
    try:
        with socket.create_connection(("127.0.0.1", backend.port)) as sock:
            agreed = rfb.authenticate_backend(sock, password, time.monotonic() + timeout)
            return agreed, backend.received, then(sock) if then else None
    finally:
        backend.stop()


def client_init(sock):
    sock.sendall(b"\x01")
    return harness.recv_exactly(sock, 10)


@pytest.mark.parametrize("banner, agreed", [
    (rfb.RFB_3_3, rfb.RFB_3_3),
    (rfb.RFB_3_7, rfb.RFB_3_7),
    (rfb.RFB_3_8, rfb.RFB_3_8),
    (b"RFB 003.889\n", rfb.RFB_3_8),  # Apple's Screen Sharing
    (b"RFB 003.005\n", rfb.RFB_3_3),  # unofficial minors below 7 speak 3.3
    (b"RFB 004.001\n", rfb.RFB_3_8),  # RealVNC 4 and later take a 3.8 client
])
def test_backend_handshake_for_each_version(banner, agreed):
    line, received, after = backend_handshake(fake_rfb_server(PASSWORD, banner), then=client_init)
    assert line == agreed and received[0] == agreed
    assert received[1:] == ([b"\x01"] if agreed == rfb.RFB_3_3 else [b"\x02", b"\x01"])
    assert after == b"ServerInit"  # nothing of the stream after the handshake was held back


def test_backend_offering_several_types_gets_vnc_authentication_chosen():
    line, received, _ = backend_handshake(fake_rfb_server(PASSWORD, types=(1, 16, 2, 19)))
    assert line == rfb.RFB_3_8 and received[1] == b"\x02"


def backend_failure(server, password=PASSWORD, timeout=5.0):
    with pytest.raises(rfb.RfbError) as error:
        backend_handshake(server, password=password, timeout=timeout)
    return error.value


@pytest.mark.parametrize("minor", [3, 7, 8])
def test_wrong_password_is_backend_auth_failed(minor):
    error = backend_failure(fake_rfb_server(PASSWORD, rfb.version_line(minor)), password=b"wrong")
    assert error.reason == "backend-auth-failed"
    # Only RFB 3.8 servers say why.
    assert error.detail == ("wrong password" if minor == 8 else "the VNC server refused the password")


def test_a_38_server_that_hangs_up_without_a_reason_is_still_auth_failed():
    error = backend_failure(fake_rfb_server(PASSWORD, fail_reason=None), password=b"wrong")
    assert error.reason == "backend-auth-failed" and error.detail == "the VNC server refused the password"


@pytest.mark.parametrize("banner, types", [(rfb.RFB_3_8, (1, 16)), (rfb.RFB_3_7, (1,)), (rfb.RFB_3_3, (1,))])
def test_server_without_vnc_authentication(banner, types):
    error = backend_failure(fake_rfb_server(PASSWORD, banner, types=types))
    assert error.reason == "backend-no-vnc-auth" and str(list(types)) in error.detail


@pytest.mark.parametrize("banner, types", [(rfb.RFB_3_8, ()), (rfb.RFB_3_7, ()), (rfb.RFB_3_3, (0,))])
def test_server_refusing_the_connection_gives_its_reason(banner, types):
    error = backend_failure(fake_rfb_server(PASSWORD, banner, types=types))
    assert error.reason == "backend-refused" and error.detail.endswith(": go away")


@pytest.mark.parametrize("banner", [b"SSH-2.0-OpenSSH\r\n", b"RFB 003.00x\n", b"RFB 002.000\n", b"RFB 003.002\n",
                                    b"rfb 003.008\n", b"RFB 003.008\r"])
def test_malformed_banner(banner):
    def server(backend, sock):
        sock.sendall(banner)
        sock.recv(1)
    assert backend_failure(server).reason == "backend-bad-rfb"


def stall_after_banner(backend, sock):
    sock.sendall(rfb.RFB_3_8)
    sock.recv(12)
    sock.recv(1)  # returns when the client gives up


@pytest.mark.parametrize("server", [harness.silent, stall_after_banner])
def test_stalling_server_is_a_timeout_at_the_deadline(server):
    started = time.monotonic()
    assert backend_failure(server, timeout=0.5).reason == "backend-timeout"
    assert 0.45 < time.monotonic() - started < 2.5


def test_server_that_hangs_up_or_resets_is_backend_closed():
    def hang_up(backend, sock):
        sock.sendall(rfb.RFB_3_8)
        sock.recv(12)

    def reset(backend, sock):
        hang_up(backend, sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends RST
    assert backend_failure(hang_up).reason == "backend-closed"
    assert backend_failure(reset).reason == "backend-closed"


def test_bytes_already_read_from_the_backend_are_used_first():
    """A XenServer CONNECT's reply can carry the RFB banner with it: passed as initial."""
    backend = FakeBackend(fake_rfb_server(PASSWORD))
    try:
        with socket.create_connection(("127.0.0.1", backend.port)) as sock:
            start = harness.recv_exactly(sock, 5)
            assert rfb.authenticate_backend(sock, PASSWORD, time.monotonic() + 5, initial=start) == rfb.RFB_3_8
            assert client_init(sock) == b"ServerInit"
    finally:
        backend.stop()


def test_initial_bytes_beyond_the_handshake_are_malformed():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        script = rfb.RFB_3_8 + b"\x01\x02" + bytes(16) + U32.pack(0) + b"more"
        with pytest.raises(rfb.RfbError) as error:
            rfb.authenticate_backend(ours, PASSWORD, time.monotonic() + 5, initial=script)
        assert error.value.reason == "backend-bad-rfb"


@pytest.mark.parametrize("timeout", [None, 7.0])
def test_the_sockets_timeout_is_restored(timeout):
    backend = FakeBackend(fake_rfb_server(PASSWORD))
    try:
        with socket.create_connection(("127.0.0.1", backend.port)) as sock:
            sock.settimeout(timeout)
            rfb.authenticate_backend(sock, PASSWORD, time.monotonic() + 5)
            assert sock.gettimeout() == timeout
    finally:
        backend.stop()


RFB_PREFIXES = st.sampled_from([rfb.RFB_3_3, rfb.RFB_3_7, rfb.RFB_3_8, b"RFB 003.889\n", b"RFB 004.001\n"])
FUZZ = st.one_of(st.binary(max_size=48), st.builds(bytes.__add__, RFB_PREFIXES, st.binary(max_size=40)))


@settings(max_examples=150, deadline=None)
@given(FUZZ)
def test_any_backend_bytes_give_a_version_or_an_rfb_error(data):
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(data)
        theirs.shutdown(socket.SHUT_WR)
        try:
            assert rfb.authenticate_backend(ours, PASSWORD, time.monotonic() + 5) in (rfb.RFB_3_3, rfb.RFB_3_7,
                                                                                     rfb.RFB_3_8)
        except rfb.RfbError as error:
            assert error.reason in ("backend-bad-rfb", "backend-refused", "backend-no-vnc-auth",
                                    "backend-auth-failed", "backend-closed")


# -- with the client: the gateway as RFB server -------------------------------------------------

def client_side(client_bytes, action):
    """Run action(read_exact, write) as the gateway over a socketpair whose client sent
    client_bytes and then nothing: (what the client got, what the gateway left unread)."""
    gateway_end, client_end = socket.socketpair()
    with gateway_end, client_end:
        client_end.sendall(client_bytes)
        client_end.shutdown(socket.SHUT_WR)
        try:
            action(lambda count: harness.recv_exactly(gateway_end, count), gateway_end.sendall)
        finally:
            gateway_end.shutdown(socket.SHUT_WR)
        return harness.recv_exactly(client_end, 1 << 16), harness.recv_exactly(gateway_end, 1 << 16)


def offer(version):
    return lambda read, write: rfb.offer_no_auth(read, write, version)


NO_AUTH_38 = b"\x01\x01" + U32.pack(0)  # one type, None; SecurityResult OK


@pytest.mark.parametrize("version, client_answer, expected", [
    (rfb.RFB_3_8, rfb.RFB_3_3, rfb.RFB_3_8 + U32.pack(1)),  # 3.3: the server decides
    (rfb.RFB_3_8, rfb.RFB_3_7 + b"\x01", rfb.RFB_3_8 + b"\x01\x01"),  # RFC 6143: no SecurityResult for None in 3.7
    (rfb.RFB_3_8, rfb.RFB_3_8 + b"\x01", rfb.RFB_3_8 + NO_AUTH_38),
    (rfb.RFB_3_8, b"RFB 003.889\n\x01", rfb.RFB_3_8 + NO_AUTH_38),
    (rfb.RFB_3_8, b"RFB 003.005\n", rfb.RFB_3_8 + U32.pack(1)),
    (rfb.RFB_3_7, rfb.RFB_3_7 + b"\x01", rfb.RFB_3_7 + b"\x01\x01"),
    (rfb.RFB_3_3, rfb.RFB_3_3, rfb.RFB_3_3 + U32.pack(1)),
    (rfb.RFB_3_3, rfb.RFB_3_8, rfb.RFB_3_3 + U32.pack(1)),  # asked for more than offered: gets the offer
])
def test_offer_no_auth(version, client_answer, expected):
    sent, unread = client_side(client_answer + b"\x01ClientInit", offer(version))
    assert sent == expected
    assert unread == b"\x01ClientInit"  # the client's next bytes are left for the backend


@pytest.mark.parametrize("client_bytes, reason", [
    (b"RFB 004.000\n", "client-bad-rfb"),
    (b"RFB 003.002\n", "client-bad-rfb"),
    (b"GET / HTTP/1.1\r\n\r\n", "client-bad-rfb"),
    (rfb.RFB_3_8 + b"\x02", "client-bad-security"),
    (rfb.RFB_3_7 + b"\x00", "client-bad-security"),
    (b"RFB 003", "client-closed"),
    (rfb.RFB_3_8, "client-closed"),
])
def test_offer_no_auth_refuses_bad_clients(client_bytes, reason):
    with pytest.raises(rfb.RfbError) as error:
        client_side(client_bytes, offer(rfb.RFB_3_8))
    assert error.value.reason == reason


@pytest.mark.parametrize("failure, reason", [
    (ConnectionResetError(104, "reset"), "client-closed"),
    (ConnectionError("the client closed during the handshake"), "client-closed"),  # streams.ChunkReader at EOF
    (socket.timeout("timed out"), "handshake-timeout"),
])
def test_client_io_errors_become_rfb_errors(failure, reason):
    def read_exact(count):
        raise failure

    def write(data):
        raise failure
    for action in (offer(rfb.RFB_3_8), lambda read, write: rfb.refuse_client(read, write, rfb.RFB_3_8, "no")):
        with pytest.raises(rfb.RfbError) as error:
            action(read_exact, lambda data: None)
        assert error.value.reason == reason
        with pytest.raises(rfb.RfbError) as error:
            action(read_exact, write)
        assert error.value.reason == reason


def scripted_client(data):
    """A sans-IO client: read_exact over data (short at its end), write into a list."""
    return io.BytesIO(data).read, [].append


@settings(max_examples=300, deadline=None)
@given(FUZZ)
def test_any_client_bytes_give_success_or_an_rfb_error(data):
    for action in (offer(rfb.RFB_3_8), offer(rfb.RFB_3_3), lambda r, w: rfb.refuse_client(r, w, rfb.RFB_3_8, "no")):
        try:
            action(*scripted_client(data))
        except rfb.RfbError as error:
            assert error.reason in ("client-bad-rfb", "client-bad-security", "client-closed")


@pytest.mark.parametrize("version, client_version, prefix", [
    (rfb.RFB_3_8, rfb.RFB_3_3, U32.pack(0)),
    (rfb.RFB_3_8, rfb.RFB_3_7, b"\0"),
    (rfb.RFB_3_8, rfb.RFB_3_8, b"\0"),
    (rfb.RFB_3_3, rfb.RFB_3_3, U32.pack(0)),
    (rfb.RFB_3_8, rfb.RFB_3_8, b"\0"),
])
def test_refuse_client_sends_the_reason(version, client_version, prefix):
    reason = "the console refused its stored password ✗"
    sent, _ = client_side(client_version, lambda read, write: rfb.refuse_client(read, write, version, reason))
    text = reason.encode()
    assert sent == version_of(version) + prefix + U32.pack(len(text)) + text


def version_of(version):
    return rfb.version_line(version) if isinstance(version, int) else version


def test_the_gateway_offers_only_the_versions_it_speaks():
    for version in (b"RFB 003.889\n", b"RFB 004.001\n", 5):
        with pytest.raises(ValueError):
            rfb.offer_no_auth(*scripted_client(rfb.RFB_3_8), version)


# -- the real thing: qemu -vnc ...,password=on --------------------------------------------------

@pytest.fixture(scope="module")
def locked_qemu():
    machine = harness.Qemu(extra_vnc=",password=on", monitor=True)
    machine.set_vnc_password(PASSWORD.decode())
    yield machine
    machine.stop()


def qemu_handshake(machine, password, then=None):
    with socket.create_connection(("127.0.0.1", machine.port)) as sock:
        agreed = rfb.authenticate_backend(sock, password, time.monotonic() + 5)
        return agreed, then(sock) if then else None


def server_init_name(sock):
    """Send ClientInit (shared) and read ServerInit: width, height, pixel format, name."""
    sock.sendall(b"\x01")
    width, height, _, length = struct.unpack("!HH16sI", harness.recv_exactly(sock, 24))
    return width, height, harness.recv_exactly(sock, length)


def test_qemu_takes_the_right_password_and_then_waits_for_client_init(locked_qemu):
    agreed, (width, height, name) = qemu_handshake(locked_qemu, PASSWORD, then=server_init_name)
    assert agreed == rfb.RFB_3_8 and width > 0 and height > 0 and name.startswith(b"QEMU")


def test_qemu_refuses_a_wrong_password_with_its_reason(locked_qemu):
    with pytest.raises(rfb.RfbError) as error:
        qemu_handshake(locked_qemu, b"wrong")
    assert error.value.reason == "backend-auth-failed" and error.value.detail == "Authentication failed"


def test_qemu_password_set_at_the_monitors_prompt(locked_qemu):
    """`change vnc password` prompts "Password: "; the harness answers it (its fallback)."""
    try:
        locked_qemu.monitor("change vnc password", answers=["other"])
        assert qemu_handshake(locked_qemu, b"other")[0] == rfb.RFB_3_8
        with pytest.raises(rfb.RfbError):
            qemu_handshake(locked_qemu, PASSWORD)
    finally:
        locked_qemu.set_vnc_password(PASSWORD.decode())
    assert qemu_handshake(locked_qemu, PASSWORD)[0] == rfb.RFB_3_8


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
        length = U32.unpack(harness.recv_exactly(sock, 4))[0]
        reason = harness.recv_exactly(sock, length).decode()
        # The client reads the gateway's fixed sentence; the console's own words stay in the audit line.
        assert count == b"\0" and reason == "vncgate: " + refusals.REASONS["backend-auth-failed"].sentence
        assert harness.closed_by_peer(sock, 3)
        line = harness.wait_for(lambda: [e for e in gateway.audit() if e.get("reason") == "backend-auth-failed"])
        assert line[0]["result"] == "rejected" and line[0]["token_id"] == harness.token_id(token)
        assert "Authentication failed" in line[0]["detail"]
    finally:
        assert gateway.stop() == 0
