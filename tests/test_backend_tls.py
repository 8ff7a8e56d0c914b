"""TLS to the consoles: qemu speaking VeNCrypt with x509 certificates, and the gateway its client."""

import socket
import ssl
import struct
import subprocess
import time

import pytest

from tests import harness, vnc_client
from tests.harness import NOVNC, CertificateAuthority, GatewayProcess, bright_pixels, open_console_in_chromium
from vncgate import config, refusals
from vncgate.console import pipes, relay, rfb
from vncgate.net import tls

PASSWORD = "x509-pw1"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """The consoles' authority (its server certificate in qemu's folder, a client certificate for
    the gateway) and a second, unrelated authority."""
    folder = str(tmp_path_factory.mktemp("pki"))
    consoles, stranger = CertificateAuthority(folder, "consoles"), CertificateAuthority(folder, "stranger")
    client_cert, client_key = consoles.issue("gateway", usage="clientAuth")
    return {"qemu_dir": consoles.qemu_dir(), "ca": consoles.cert, "cert": client_cert, "key": client_key,
            "wrong_ca": stranger.cert}


@pytest.fixture(scope="module")
def tls_qemu(pki):
    """qemu -vnc ...,tls-creds=...: VeNCrypt X509None, a client certificate required."""
    machine = harness.Qemu(tls_dir=pki["qemu_dir"])
    yield machine
    machine.stop()


@pytest.fixture(scope="module")
def tls_password_qemu(pki):
    """The same with password=on: VeNCrypt X509Vnc."""
    machine = harness.Qemu(extra_vnc=",password=on", monitor=True, tls_dir=pki["qemu_dir"])
    machine.set_vnc_password(PASSWORD)
    yield machine
    machine.stop()


def gateway_args(pki):
    return {"ca": pki["ca"], "cert": pki["cert"], "key": pki["key"]}


def gateway_settings(pki, ca="ca"):
    return {"backend_ca": pki[ca], "backend_cert": pki["cert"], "backend_key": pki["key"]}


def vencrypt(machine, context, password=None):
    with socket.create_connection(("127.0.0.1", machine.port)) as sock:
        version, secured = rfb.vencrypt_backend(sock, context, "127.0.0.1", password, time.monotonic() + 10)
        with secured:
            secured.sendall(b"\x01")  # ClientInit: qemu answers ServerInit inside the TLS
            width, height, _, length = struct.unpack("!HH16sI", harness.recv_exactly(secured, 24))
            return version, width, height, harness.recv_exactly(secured, length)


# -- rfb.vencrypt_backend against qemu ------------------------------------------------------------

def test_x509none_then_server_init_inside_tls(pki, tls_qemu):
    version, width, height, name = vencrypt(tls_qemu, tls.backend_context(**gateway_args(pki)))
    assert version == rfb.RFB_3_8 and width > 0 and height > 0 and name.startswith(b"QEMU")


def test_x509vnc_answers_the_password_inside_tls(pki, tls_password_qemu):
    version, width, _, _ = vencrypt(tls_password_qemu, tls.backend_context(**gateway_args(pki)), PASSWORD.encode())
    assert version == rfb.RFB_3_8 and width > 0
    with pytest.raises(rfb.RfbError) as error:
        vencrypt(tls_password_qemu, tls.backend_context(**gateway_args(pki)), b"wrong")
    assert error.value.reason == "backend-auth-failed"


def test_x509vnc_without_a_held_password_is_a_tls_failure(pki, tls_password_qemu):
    with pytest.raises(rfb.RfbError) as error:
        vencrypt(tls_password_qemu, tls.backend_context(**gateway_args(pki)))
    assert error.value.reason == "backend-tls-failed" and "261" in error.value.detail


@pytest.mark.parametrize("case", ["wrong-ca", "wrong-host", "no-client-certificate"])
def test_certificates_that_do_not_verify(pki, tls_qemu, case):
    args = gateway_args(pki)
    if case == "wrong-ca":
        args["ca"] = pki["wrong_ca"]
    elif case == "no-client-certificate":
        args["cert"] = args["key"] = ""
    context = tls.backend_context(**args)
    with socket.create_connection(("127.0.0.1", tls_qemu.port)) as sock, pytest.raises(rfb.RfbError) as error:
        rfb.vencrypt_backend(sock, context, "localhost" if case == "wrong-host" else "127.0.0.1", None,
                             time.monotonic() + 10)
    assert error.value.reason == "backend-tls-failed"
    if case != "no-client-certificate":  # qemu refuses that one after the certificates: a TLS alert
        expected = ("Hostname mismatch, certificate is not valid for 'localhost'." if case == "wrong-host"
                    else "unable to get local issuer certificate")
        assert error.value.detail == f"the VNC server's certificate does not verify: {expected}"


def test_a_console_without_vencrypt(pki, qemu):
    with socket.create_connection(("127.0.0.1", qemu.port)) as sock, pytest.raises(rfb.RfbError) as error:
        rfb.vencrypt_backend(sock, tls.backend_context(**gateway_args(pki)), "127.0.0.1", None, time.monotonic() + 10)
    assert error.value.reason == "backend-tls-failed" and "19 (VeNCrypt)" in error.value.detail


def scripted_vencrypt_server(script):
    """A fake console: RFB 3.8, VeNCrypt offered, then script(sock) after the client's choice."""
    def behaviour(backend, sock):
        sock.sendall(b"RFB 003.008\n")
        harness.recv_exactly(sock, 12)
        sock.sendall(b"\x01\x13")
        harness.recv_exactly(sock, 1)
        script(sock)
        sock.recv(1)
    return behaviour


@pytest.mark.parametrize("script, detail", [
    (lambda sock: sock.sendall(b"\x00\x01"), "VeNCrypt 0.1"),
    (lambda sock: (sock.sendall(b"\x00\x02"), harness.recv_exactly(sock, 2), sock.sendall(b"\x01")), "refused VeNCrypt"),
    # anonymous TLS only (TLSNone, TLSVnc): no certificate to check, so not done
    (lambda sock: (sock.sendall(b"\x00\x02"), harness.recv_exactly(sock, 2),
                   sock.sendall(b"\x00\x02" + struct.pack("!II", 257, 258))), "[257, 258]"),
    (lambda sock: (sock.sendall(b"\x00\x02"), harness.recv_exactly(sock, 2),
                   sock.sendall(b"\x00\x01" + struct.pack("!I", 260)), harness.recv_exactly(sock, 4),
                   sock.sendall(b"\x00")), "refused VeNCrypt sub-type 260"),
    (lambda sock: (sock.sendall(b"\x00\x02"), harness.recv_exactly(sock, 2),
                   sock.sendall(b"\x00\x01" + struct.pack("!I", 260)), harness.recv_exactly(sock, 4),
                   sock.sendall(b"\x01not TLS at all\n")), ""),
])
def test_misbehaving_vencrypt_servers(pki, script, detail):
    server = harness.FakeBackend(scripted_vencrypt_server(script))
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as sock, pytest.raises(rfb.RfbError) as error:
            rfb.vencrypt_backend(sock, tls.backend_context(**gateway_args(pki)), "127.0.0.1", None,
                                 time.monotonic() + 5)
        assert error.value.reason in ("backend-tls-failed", "backend-bad-rfb") and detail in error.value.detail
    finally:
        server.stop()


def test_a_stalling_vencrypt_server_is_a_timeout(pki):
    server = harness.FakeBackend(scripted_vencrypt_server(lambda sock: sock.recv(1)))
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as sock, pytest.raises(rfb.RfbError) as error:
            started = time.monotonic()
            rfb.vencrypt_backend(sock, tls.backend_context(**gateway_args(pki)), "127.0.0.1", None,
                                 time.monotonic() + 0.5)
        assert error.value.reason == "backend-timeout" and time.monotonic() - started < 5
    finally:
        server.stop()


# -- through the gateway -------------------------------------------------------------------------

def xvp_shows_seabios(gateway, token, shot):
    def screen_has_text():
        vnc_client.xvp_screenshot(gateway.port, token, shot)
        return bright_pixels(shot)[0] > 200
    harness.wait_for(screen_has_text, timeout=60, interval=0.5, message="SeaBIOS text over VeNCrypt")


def test_vncdotool_over_xvp_to_a_tls_console(pki, tls_qemu, tmp_path):
    gateway = GatewayProcess(str(tmp_path), **gateway_settings(pki))
    try:
        token = gateway.mint("127.0.0.1", tls_qemu.port, "xvp-vnc", "--backend-tls")
        xvp_shows_seabios(gateway, token, harness.artifact("backend-tls-vncdotool.png"))
        ends = harness.wait_for(lambda: [e for e in gateway.audit() if e["event"] == "session-end"])
        assert ends[-1]["bytes_down"] > 100_000  # a whole framebuffer, copied out of TLS
    finally:
        assert gateway.stop() == 0


def test_a_console_policy_reads_the_stream_out_of_the_tls(pki, tls_qemu, tmp_path):
    """--view-only: the gateway filters the client's messages and writes them into the TLS."""
    gateway = GatewayProcess(str(tmp_path), **gateway_settings(pki))
    try:
        token = gateway.mint("127.0.0.1", tls_qemu.port, "xvp-vnc", "--backend-tls", "--view-only")
        xvp_shows_seabios(gateway, token, harness.artifact("backend-tls-view-only.png"))
    finally:
        assert gateway.stop() == 0


def test_vncdotool_over_xvp_to_a_tls_console_with_a_password(pki, tls_password_qemu, tmp_path):
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    gateway = GatewayProcess(str(tmp_path), **gateway_settings(pki))
    try:
        token = gateway.mint("127.0.0.1", tls_password_qemu.port, "xvp-vnc", "--backend-tls",
                             "--password-file", str(tmp_path / "pw"))
        xvp_shows_seabios(gateway, token, harness.artifact("backend-x509vnc-vncdotool.png"))
    finally:
        assert gateway.stop() == 0


def test_novnc_in_chromium_to_a_tls_console_with_a_password(pki, tls_password_qemu, tmp_path):
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    port = harness.free_port()
    gateway = GatewayProcess(str(tmp_path), bind_port=port, public_url=f"http://127.0.0.1:{port}", web_root=NOVNC,
                             **gateway_settings(pki))
    try:
        minted = gateway.token_cli("add", "--host", "127.0.0.1", "--port", str(tls_password_qemu.port),
                                   "--backend-tls", "--password-file", str(tmp_path / "pw"))
        assert minted.returncode == 0, minted.stderr
        open_console_in_chromium(minted.stdout.strip(), harness.artifact("backend-x509vnc-novnc.png"))
    finally:
        assert gateway.stop() == 0


def test_a_console_certificate_from_another_ca_is_502_and_audited(pki, tls_qemu, tmp_path):
    gateway = GatewayProcess(str(tmp_path), **gateway_settings(pki, ca="wrong_ca"))
    try:
        token = gateway.mint("127.0.0.1", tls_qemu.port, "xvp-vnc", "--backend-tls")
        sock, status, rest = harness.xvp_connect(gateway.port, token)
        assert status == "HTTP/1.1 502 Bad Gateway"
        assert refusals.REASONS["backend-tls-failed"].sentence.encode() in rest + harness.recv_exactly(sock, 4096)
        line = harness.wait_for(lambda: [e for e in gateway.audit() if e.get("reason") == "backend-tls-failed"])
        assert line[0]["status"] == 502 and line[0]["token_id"] == harness.token_id(token)
        assert "certificate does not verify" in line[0]["detail"]
        # The gateway still serves: a token without --backend-tls reaches a plain console.
        plain = harness.FakeBackend(harness.rfb_banner_then_echo)
        try:
            sock, status, _ = harness.xvp_connect(gateway.port, gateway.mint("127.0.0.1", plain.port))
            assert status == "HTTP/1.1 200 OK"
            sock.close()
        finally:
            plain.stop()
    finally:
        assert gateway.stop() == 0


def test_a_backend_tls_token_to_a_plain_console_is_502(pki, qemu, tmp_path):
    gateway = GatewayProcess(str(tmp_path), **gateway_settings(pki))
    try:
        token = gateway.mint("127.0.0.1", qemu.port, "xvp-vnc", "--backend-tls")
        sock, status, _ = harness.xvp_connect(gateway.port, token)
        assert status == "HTTP/1.1 502 Bad Gateway"
        sock.close()
        line = harness.wait_for(lambda: [e for e in gateway.audit() if e.get("reason") == "backend-tls-failed"])
        assert "VeNCrypt" in line[0]["detail"]
    finally:
        assert gateway.stop() == 0


# -- configuration and minting --------------------------------------------------------------------

def test_backend_cert_and_key_go_together(tmp_path):
    ini = tmp_path / "g.ini"
    ini.write_text("[gateway]\nbackend_cert = c.pem\n")
    with pytest.raises(config.ConfigError, match="backend_cert and backend_key must be set together"):
        config.load(str(ini))
    ini.write_text("[gateway]\nbackend_ca = ca.pem\n")
    assert config.load(str(ini)).backend_ca == str(tmp_path / "ca.pem")  # relative to the ini's folder


def test_unreadable_backend_files_stop_the_gateway_with_one_line(tmp_path):
    ini = tmp_path / "g.ini"
    ini.write_text(f"[gateway]\ndatabase = t.db\nport = {harness.free_port()}\nbackend_ca = missing.pem\n")
    done = subprocess.run([harness.console_script("vncgate"), "-c", str(ini)], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"vncgate: error: cannot load the consoles' TLS files "
                                                f"{tmp_path / 'missing.pem'}: No such file or directory"]


def test_backend_tls_is_stored_and_listed(run_token):
    minted = run_token("add", "--host", "10.0.0.1", "--port", "5901", "--backend-tls", "--json", check=0)
    plain = run_token("add", "--host", "10.0.0.1", "--port", "5902", "--json", check=0)
    assert '"backend_tls": true' in minted.stdout and '"backend_tls": false' in plain.stdout
    listed = run_token("list", "--json", check=0).stdout
    assert listed.count('"backend_tls": true') == 1 and listed.count('"backend_tls": false') == 1


def test_the_store_keeps_backend_tls(store):
    secured = store.add_connection_details("vm-1", "xvp-vnc", "10.0.0.1", 5901, backend_tls=True)
    plain = store.add_connection_details("vm-2", "xvp-vnc", "10.0.0.1", 5902)
    assert store.validate(secured, "xvp-vnc").backend_tls is True
    assert store.get_connection_details(plain).backend_tls is False
    assert {row.instance_id: row.backend_tls for row in store.list_details()} == {"vm-1": True, "vm-2": False}


def test_a_tls_backend_is_copied_not_spliced():
    """The relay splices plain sockets; a TLS socket's bytes are in OpenSSL, so they are copied."""
    left, right = socket.socketpair()
    context = ssl.create_default_context()
    wrapped = context.wrap_socket(socket.socket(), server_hostname="x", do_handshake_on_connect=False)
    try:
        secured = relay.Relay.raw(left, wrapped)
        assert all(isinstance(way, relay.CopyDirection) for way in (secured.upstream, secured.downstream))
        assert isinstance(secured.sockets[1], tls.TlsStream)
        if pipes.CAN_SPLICE:
            plain = relay.Relay.raw(left, right)
            assert isinstance(plain.upstream, relay.SpliceDirection)
    finally:
        for sock in (left, right, wrapped):
            sock.close()
