"""Gateways on several hosts sharing one Redis: pushed revocation and kill, an outage and a
restart, a Sentinel failover, and migrating an SQLite store to Redis."""

import http.client
import json
import subprocess
import time

import pytest

from tests import harness
from tests.harness import GatewayProcess, RedisServer, SentinelGroup, closed_by_peer, xvp_connect
from vncgate import store as store_module

SLOW_TOUCH = 30  # the touch loop is far too slow to be what closes a session in these tests


@pytest.fixture
def two_hosts(tmp_path, redis_server):
    """Gateways listening on 127.0.0.2 and 127.0.0.3, each with its own config, one Redis."""
    redis_server.client().flushall()
    first = GatewayProcess(str(tmp_path), name="host-a", database=redis_server.url, listen="127.0.0.2",
                           touch_interval=SLOW_TOUCH)
    second = GatewayProcess(str(tmp_path), name="host-b", database=redis_server.url, listen="127.0.0.3",
                            touch_interval=SLOW_TOUCH)
    yield first, second
    for gateway in (first, second):
        assert gateway.stop() == 0
        assert "Traceback" not in gateway.read_stderr()


def open_session(gateway, token):
    sock, status, rest = xvp_connect(gateway.port, token, host=gateway.host)
    assert status == "HTTP/1.1 200 OK"
    assert rest + harness.recv_exactly(sock, 12 - len(rest)) == b"RFB 003.008\n"
    return sock


def handshake_ok(gateway, token):
    sock, status, _ = xvp_connect(gateway.port, token, host=gateway.host)
    sock.close()
    return status == "HTTP/1.1 200 OK"


def healthz(gateway):
    conn = http.client.HTTPConnection(gateway.host, gateway.port, timeout=10)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status
    finally:
        conn.close()


def sessions(gateway):
    done = gateway.token_cli("sessions", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_urls_from_either_config_open_on_both_and_sessions_lists_both(two_hosts, vnc):
    first, second = two_hosts
    from_a = first.mint("127.0.0.1", vnc.port, "xvp-vnc", "--instance", "vm-a")
    from_b = second.mint("127.0.0.1", vnc.port, "xvp-vnc", "--instance", "vm-b")
    socks = [open_session(gateway, token) for gateway in two_hosts for token in (from_a, from_b)]
    rows = sessions(second)
    assert len(rows) == 4 and len({row["gateway_id"] for row in rows}) == 2
    assert sorted(row["instance_id"] for row in rows) == ["vm-a", "vm-a", "vm-b", "vm-b"]
    assert {row["client"].rsplit(":", 1)[0] for row in rows} == {"127.0.0.1"}
    for sock in socks:
        sock.close()
    harness.wait_for(lambda: sessions(first) == [], message="ended sessions to leave the list")


def test_revoke_on_one_gateway_closes_a_session_on_the_other_within_200ms(two_hosts, vnc, redis_server):
    first, second = two_hosts
    token = first.mint("127.0.0.1", vnc.port, "xvp-vnc", "--instance", "vm-1")
    held = open_session(second, token)
    # The very call `revoke --instance` makes, timed from its start to the close on the other host.
    store = store_module.TokenStore(redis_server.url)
    started = time.monotonic()
    assert store.delete_by_instance("vm-1") == 1
    assert closed_by_peer(held, 2)
    latency = time.monotonic() - started
    store.close()
    assert latency < 0.2, f"revocation took {latency * 1000:.0f} ms"

    token = second.mint("127.0.0.1", vnc.port, "xvp-vnc", "--instance", "vm-2")
    held = open_session(second, token)
    started = time.monotonic()
    assert first.token_cli("revoke", "--instance", "vm-2").stdout == "revoked 1 token\n"
    assert closed_by_peer(held, 2) and time.monotonic() - started < 5  # CLI start-up included
    ends = [line for line in second.audit() if line["event"] == "session-end"]
    assert [line["reason"] for line in ends] == ["revoked", "revoked"]
    assert "revoked" in second.read_stderr() and "revoked" not in first.read_stderr()


def test_kill_works_across_gateways_at_once(two_hosts, vnc):
    first, second = two_hosts
    token = first.mint("127.0.0.1", vnc.port, "xvp-vnc", "--instance", "vm-k")
    on_a, on_b = open_session(first, token), open_session(second, token)
    victim, = [line["session_id"] for line in second.audit() if line["event"] == "attempt"]
    assert victim in {row["session_id"] for row in sessions(first)}
    done = first.token_cli("kill", victim)
    assert done.returncode == 0 and done.stdout == "kill requested for 1 session; they end at once\n"
    closed = [sock for sock in (on_a, on_b) if closed_by_peer(sock, 2)]
    assert len(closed) == 1  # exactly the one asked for, well before touch_interval
    assert second.token_cli("kill", "--instance", "vm-k").stdout.startswith("kill requested for 1 session")
    assert closed_by_peer(on_a if closed[0] is on_b else on_b, 2)
    harness.wait_for(lambda: sessions(second) == [], message="killed sessions to leave the list")
    ends = [line["reason"] for gateway in two_hosts for line in gateway.audit() if line["event"] == "session-end"]
    assert ends == ["killed", "killed"]


def test_redis_killed_and_restarted(tmp_path, qemu):
    """503 with one log line meanwhile, a live session to qemu keeps relaying, handshakes work
    again within 5 s of the restart (the server keeps its data in an append-only file)."""
    server = RedisServer(tmp_path, appendonly="yes", appendfsync="always")
    gateway = GatewayProcess(str(tmp_path), database=server.url, touch_interval=0.2, housekeeping_interval=0.2)
    try:
        token = gateway.mint("127.0.0.1", qemu.port, "xvp-vnc", "--ttl", "600")
        live = open_session(gateway, token)
        server.kill()
        assert healthz(gateway) == 503
        for _ in range(5):
            sock, status, _ = xvp_connect(gateway.port, token)
            assert status == "HTTP/1.1 503 Service Unavailable"
            sock.close()
        live.sendall(b"RFB 003.008\n")  # the RFB handshake goes on through the outage
        count = harness.recv_exactly(live, 1)[0]
        assert 1 in harness.recv_exactly(live, count)  # security type None offered
        server.start()
        restarted = time.monotonic()
        harness.wait_for(lambda: handshake_ok(gateway, token), 5, interval=0.05,
                         message="a handshake to succeed after the restart")
        assert time.monotonic() - restarted < 5
        assert healthz(gateway) == 200
        live.sendall(b"\x01")
        assert harness.recv_exactly(live, 4) == b"\x00\x00\x00\x00"  # SecurityResult OK
        live.sendall(b"\x01")  # ClientInit: shared
        width, height = int.from_bytes(harness.recv_exactly(live, 2), "big"), int.from_bytes(
            harness.recv_exactly(live, 2), "big")
        assert width > 0 and height > 0
        harness.wait_for(lambda: "revocation channel connected again" in gateway.read_stderr(),
                         message="the listener to re-check live sessions")
        log = gateway.read_stderr()
        assert log.count("token store unavailable") == 1
        assert log.count("housekeeping paused") <= 1
        live.close()
    finally:
        assert gateway.stop() == 0
        server.stop()
    assert "Traceback" not in gateway.read_stderr()


def test_sentinel_failover_keeps_tokens_and_service(tmp_path, vnc):
    group = SentinelGroup(tmp_path)
    gateway = GatewayProcess(str(tmp_path), database=group.url, touch_interval=0.5)
    try:
        token = gateway.mint("127.0.0.1", vnc.port, "xvp-vnc", "--ttl", "600")  # WAITs for the replica
        open_session(gateway, token).close()
        group.primary.kill()
        killed = time.monotonic()
        harness.wait_for(lambda: handshake_ok(gateway, token), 10, interval=0.1,
                         message="a handshake to succeed after the failover")
        assert time.monotonic() - killed < 10
        assert group.primary_port() == group.replica.port
        assert gateway.read_stderr().count("token store unavailable") <= 1
    finally:
        assert gateway.stop() == 0
        group.stop()
    assert "Traceback" not in gateway.read_stderr()


def test_sentinels_with_a_password_over_tls(tmp_path, vnc):
    group = SentinelGroup(tmp_path, tls=harness.make_certificate(str(tmp_path), "redis"), sentinel_password="s3ntinel")
    gateway = GatewayProcess(str(tmp_path), database=group.url, touch_interval=0.5)
    try:
        assert group.url.startswith("rediss+sentinel://")
        token = gateway.mint("127.0.0.1", vnc.port, "xvp-vnc", "--ttl", "600")
        open_session(gateway, token).close()
        assert store_module.hash_token(token).encode() in b"".join(group.primary.client().keys("*"))
        (tmp_path / "wrong.ini").write_text(f"[gateway]\ndatabase = {group.url.replace('s3ntinel', 'wrong')}\n")
        refused = subprocess.run([harness.console_script("vncgate-token"), "-c", str(tmp_path / "wrong.ini"), "list"],
                                 capture_output=True, text=True, timeout=30)
        assert refused.returncode != 0 and "wrong" not in refused.stderr and "s3ntinel" not in refused.stderr
    finally:
        assert gateway.stop() == 0
        group.stop()
    assert "Traceback" not in gateway.read_stderr() and "s3ntinel" not in gateway.read_stderr()


def test_migrate_sqlite_to_redis(tmp_path, run_token, redis_server):
    redis_server.client().flushall()
    (tmp_path / "pw").write_text("secret\n")
    with_password = json.loads(run_token("add", "--host", "h", "--port", "5901", "--type", "xvp-vnc",
                                         "--password-file", "pw", "--json", check=0).stdout)["token"]
    plain = json.loads(run_token("add", "--host", "h", "--port", "5902", "--json", check=0).stdout)["token"]
    run_token("add", "--host", "h", "--port", "5903", "--ttl", "1", check=0)  # soon expired, not garbage yet
    done = run_token("migrate", "--to", redis_server.url, check=0)
    assert done.stdout.startswith(f"copied 3 tokens to {redis_server.url} (0 garbage skipped)")
    moved = store_module.TokenStore(redis_server.url)
    try:
        assert moved.validate(with_password, "xvp-vnc").backend_password == b"secret"
        assert moved.validate(plain, "ws-vnc").port == 5902
        assert len(moved.list_details(include_expired=True)) == 3
        assert moved.get_connection_details_by_host("h", only_idle=False)[0].token_hash == store_module.hash_token(
            with_password)
    finally:
        moved.close()
    assert with_password.encode() not in harness.stored_bytes(redis_server.url)


@pytest.mark.parametrize("target, code, message", [
    ("postgres://h/db", 1, "--to: must be a file path or one of redis://"),
    ("redis://127.0.0.1:1/0", 1, "redis redis://127.0.0.1:1/0: "),
    ("tokens.db", 2, "--to names the database the config already uses"),
])
def test_migrate_refuses_clearly(tmp_path, run_token, target, code, message):
    run_token("add", "--host", "h", "--port", "5901", check=0)
    done = run_token("migrate", "--to", str(tmp_path / target) if target == "tokens.db" else target, check=code)
    assert message in done.stderr and len(done.stderr.splitlines()) == 1
    assert json.loads(run_token("list", "--json", check=0).stdout)  # nothing lost


def test_a_gateway_started_before_its_redis_answers_503_then_serves(tmp_path, vnc):
    port = harness.free_port()
    gateway = GatewayProcess(str(tmp_path), database=f"redis://127.0.0.1:{port}/0")
    try:
        sock, status, _ = xvp_connect(gateway.port, "some-token")
        sock.close()
        assert status == "HTTP/1.1 503 Service Unavailable"
        done = gateway.token_cli("list")
        assert done.returncode == 1 and done.stderr.startswith(f"vncgate-token: error: redis redis://127.0.0.1:{port}/0: ")
        assert len(done.stderr.splitlines()) == 1
        server = RedisServer(tmp_path, port=port)
        try:
            token = gateway.mint("127.0.0.1", vnc.port)
            harness.wait_for(lambda: handshake_ok(gateway, token), 5, message="service without a restart")
        finally:
            server.stop()
    finally:
        assert gateway.stop() == 0
    assert gateway.read_stderr().count("token store unavailable") == 1
    assert "token store available again" in gateway.read_stderr()


def test_rediss_speaks_tls_to_redis(tmp_path, vnc):
    server = RedisServer(tmp_path, tls=harness.make_certificate(str(tmp_path), "redis"))
    gateway = GatewayProcess(str(tmp_path), database=server.url)
    try:
        token = gateway.mint("127.0.0.1", vnc.port)
        assert handshake_ok(gateway, token)
        assert server.client().keys("vncgate:token:*")
        plain = store_module.TokenStore(server.url.replace("rediss://", "redis://").split("?")[0])
        with pytest.raises(store_module.StoreError, match=r"^redis redis://127\.0\.0\.1:\d+/0: "):
            plain.validate(token, "xvp-vnc")  # the server speaks TLS only
        plain.close()
    finally:
        assert gateway.stop() == 0
        server.stop()
