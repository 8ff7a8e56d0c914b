"""Live sessions seen and ended from the CLI, across two gateways sharing one store (each engine)."""

import json
import signal
import time

import pytest

from tests import harness
from tests.harness import GatewayProcess, closed_by_peer, xvp_connect


@pytest.fixture
def two_gateways(tmp_path, database):
    first = GatewayProcess(str(tmp_path), name="gw1", database=database, touch_interval=0.3,
                           housekeeping_interval=0.3)
    second = GatewayProcess(str(tmp_path), name="gw2", database=database, touch_interval=0.3,
                            housekeeping_interval=0.3)
    yield first, second
    for gateway in (first, second):
        if gateway.proc.poll() is None:
            assert gateway.stop() == 0


def sessions(gateway, *args):
    done = gateway.token_cli("sessions", "--json", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def open_session(gateway, token):
    sock, status, rest = xvp_connect(gateway.port, token)
    assert status == "HTTP/1.1 200 OK"
    harness.recv_exactly(sock, 12 - len(rest))
    return sock


def test_sessions_lists_both_gateways_with_bytes(two_gateways, vnc):
    first, second = two_gateways
    token = first.mint("127.0.0.1", vnc.port, "xvp-vnc", "--instance", "vm-1", "--ttl", "600")
    one, two = open_session(first, token), open_session(second, token)
    one.sendall(b"x" * 1000)
    harness.recv_exactly(one, 1000)
    rows = harness.wait_for(lambda: [r for r in sessions(first) if r["bytes_up"] == 1000] and sessions(first))
    assert len(rows) == 2 and len({row["gateway_id"] for row in rows}) == 2
    assert {row["instance_id"] for row in rows} == {"vm-1"}
    assert token not in json.dumps(rows) and rows[0]["token_id"] == harness.token_id(token)
    table = first.token_cli("sessions").stdout
    assert rows[0]["session_id"] in table and "vm-1" in table
    one.close()
    harness.wait_for(lambda: len(sessions(first)) == 1, message="the ended session to leave the list")
    two.close()


def test_kill_by_session_and_by_instance(two_gateways, vnc):
    first, second = two_gateways
    token_a = first.mint("127.0.0.1", vnc.port, "xvp-vnc", "--instance", "vm-a", "--ttl", "600")
    token_b = first.mint("127.0.0.1", vnc.port, "xvp-vnc", "--instance", "vm-b", "--ttl", "600")
    a1, a2, b1 = open_session(first, token_a), open_session(second, token_a), open_session(second, token_b)
    rows = harness.wait_for(lambda: len(sessions(first)) == 3 and sessions(first))
    victim = next(row["session_id"] for row in rows if row["instance_id"] == "vm-b")
    done = first.token_cli("kill", victim)
    assert done.returncode == 0 and "kill requested for 1 session" in done.stdout
    killed_at = time.monotonic()
    assert closed_by_peer(b1, 3) and time.monotonic() - killed_at < 0.3 + 0.7
    assert first.token_cli("kill", "--instance", "vm-a").stdout.startswith("kill requested for 2 sessions")
    assert closed_by_peer(a1, 3) and closed_by_peer(a2, 3)
    harness.wait_for(lambda: sessions(first) == [], message="killed sessions to leave the list")
    ends = [e for gateway in two_gateways for e in gateway.audit() if e["event"] == "session-end"]
    assert sorted(e["reason"] for e in ends) == ["killed"] * 3
    assert first.token_cli("kill", "no-such-session").returncode == 1
    assert first.token_cli("kill").returncode == 2


def test_rows_of_a_dead_gateway_are_cleaned(two_gateways, vnc, database):
    first, second = two_gateways
    token = first.mint("127.0.0.1", vnc.port, "xvp-vnc", "--ttl", "600")
    held = open_session(second, token)
    harness.wait_for(lambda: len(sessions(first)) == 1)
    second.stop(signal.SIGKILL)  # no chance to remove its rows
    harness.wait_for(lambda: sessions(first) == [], message="the dead gateway's session to disappear")
    harness.wait_for(lambda: harness.session_rows(database) == 0,
                     message="the first gateway's housekeeping to delete the stale row")
    held.close()
