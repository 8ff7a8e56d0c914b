"""TLS and plain connections on the same port; tls_only; certificate reload; bad TLS input."""

import hashlib
import os
import shutil
import signal
import socket
import ssl
import subprocess

import pytest

from tests import harness
from tests.harness import GatewayProcess, closed_by_peer, make_certificate


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("certs"))
    return make_certificate(folder, "first"), make_certificate(folder, "second")


def client_context(cert):
    context = ssl.create_default_context(cafile=cert)
    context.check_hostname = False  # the certificate names 127.0.0.1; the fingerprint is what we compare
    return context


def tls_xvp(port, token, cert):
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock = client_context(cert).wrap_socket(raw)
    sock.sendall(f"CONNECT /console?token={token} HTTP/1.1\r\n\r\n".encode())
    status, rest = harness.read_head(sock)
    return sock, status, rest


def fingerprint(sock):
    return hashlib.sha256(sock.getpeercert(binary_form=True)).hexdigest()


def test_tls_and_plain_on_the_same_port(tmp_path, vnc, certificates):
    (cert, key), _ = certificates
    gateway = GatewayProcess(str(tmp_path), cert=cert, key=key)
    try:
        token = gateway.mint("127.0.0.1", vnc.port, "xvp-vnc", "--ttl", "600")
        secure, status, rest = tls_xvp(gateway.port, token, cert)
        assert status == "HTTP/1.1 200 OK"
        assert rest + harness.recv_exactly(secure, 12 - len(rest)) == b"RFB 003.008\n"
        payload = os.urandom(1 << 20)
        secure.sendall(payload)  # 1 MiB through TLS both ways: both relay threads share one TLS stream
        assert harness.recv_exactly(secure, len(payload)) == payload
        plain, status, _ = harness.xvp_connect(gateway.port, token)
        assert status == "HTTP/1.1 200 OK"
        secure.close()
        plain.close()
    finally:
        assert gateway.stop() == 0


def test_tls_only_refuses_plain_with_a_clear_reply(tmp_path, vnc, certificates):
    (cert, key), _ = certificates
    gateway = GatewayProcess(str(tmp_path), cert=cert, key=key, tls_only="true")
    try:
        token = gateway.mint("127.0.0.1", vnc.port, "xvp-vnc", "--ttl", "600")
        sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
        sock.sendall(f"CONNECT /console?token={token} HTTP/1.1\r\n\r\n".encode())
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 400 Bad Request") and b"TLS only" in reply
        secure, status, _ = tls_xvp(gateway.port, token, cert)
        assert status == "HTTP/1.1 200 OK"
        secure.close()
    finally:
        assert gateway.stop() == 0


def test_sighup_reloads_the_certificate_without_dropping_sessions(tmp_path, vnc, certificates):
    (first_cert, first_key), (second_cert, second_key) = certificates
    cert, key = str(tmp_path / "live.pem"), str(tmp_path / "live-key.pem")
    shutil.copy(first_cert, cert)
    shutil.copy(first_key, key)
    gateway = GatewayProcess(str(tmp_path), cert=cert, key=key)
    try:
        token = gateway.mint("127.0.0.1", vnc.port, "xvp-vnc", "--ttl", "600")
        live, status, _ = tls_xvp(gateway.port, token, first_cert)
        assert status == "HTTP/1.1 200 OK"
        before = fingerprint(live)
        shutil.copy(second_cert, cert)
        shutil.copy(second_key, key)
        gateway.proc.send_signal(signal.SIGHUP)

        def served_fingerprint():  # unverified: before the reload lands, the old certificate answers
            probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            probe.check_hostname, probe.verify_mode = False, ssl.CERT_NONE
            with probe.wrap_socket(socket.create_connection(("127.0.0.1", gateway.port), timeout=10)) as sock:
                return fingerprint(sock)
        harness.wait_for(lambda: served_fingerprint() != before, message="the reloaded certificate")
        verified, status, _ = tls_xvp(gateway.port, token, second_cert)
        assert status == "HTTP/1.1 200 OK"
        verified.close()
        live.sendall(b"still relaying")
        harness.wait_for(lambda: b"still relaying" in live.recv(65536))
        live.close()
    finally:
        assert gateway.stop() == 0


@pytest.mark.parametrize("junk", [
    b"\x16\x03\x01\x00\x05hello",                # a handshake record that is no ClientHello
    b"\x16" + os.urandom(300),                   # random bytes after the handshake byte
])
def test_bad_tls_records_are_closed_and_audited(tmp_path, vnc, certificates, junk):
    (cert, key), _ = certificates
    gateway = GatewayProcess(str(tmp_path), cert=cert, key=key, handshake_timeout=2)
    try:
        sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
        sock.sendall(junk)
        assert closed_by_peer(sock, 5)
        failed = harness.wait_for(lambda: [e for e in gateway.audit() if e.get("path") == "tls"])
        assert failed[0]["reason"] in ("tls-handshake-failed", "handshake-timeout")
        token = gateway.mint("127.0.0.1", vnc.port, "xvp-vnc")
        good, status, _ = tls_xvp(gateway.port, token, cert)  # and it keeps serving
        assert status == "HTTP/1.1 200 OK"
        good.close()
    finally:
        assert gateway.stop() == 0


def test_slow_tls_handshake_times_out(tmp_path, certificates):
    (cert, key), _ = certificates
    gateway = GatewayProcess(str(tmp_path), cert=cert, key=key, handshake_timeout=1)
    try:
        sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
        sock.sendall(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
        assert closed_by_peer(sock, 4)
    finally:
        assert gateway.stop() == 0


def test_tls_client_without_tls_configured_gets_400(tmp_path):
    gateway = GatewayProcess(str(tmp_path))
    try:
        raw = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            ssl.create_default_context().wrap_socket(raw, server_hostname="localhost")
        attempt = harness.wait_for(lambda: [e for e in gateway.audit() if e["event"] == "attempt"])
        assert attempt[0]["status"] == 400
    finally:
        assert gateway.stop() == 0


def test_unloadable_certificate_is_one_clear_line(tmp_path):
    (tmp_path / "bad.pem").write_text("not a certificate")
    ini = tmp_path / "bad.ini"
    ini.write_text("[gateway]\ncert = bad.pem\nkey = bad.pem\ndatabase = t.db\n")
    done = subprocess.run([harness.console_script("vncgate"), "-c", str(ini), "--port", "0"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert done.stderr.strip().startswith("vncgate: error: cannot load TLS certificate")
    assert len(done.stderr.strip().splitlines()) == 1
