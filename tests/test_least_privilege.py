"""Least privilege (issue 25), the control plane: what a key may mint, policies on every console
type, names and terminals an attacker cannot bend, API numbers and faults, tokens kept out of the
audit trail. Each numbered test fails on the code before the issue."""

import json
import os
import pty
import select
import socket
import struct
import subprocess

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from tests import harness
from tests.harness import FakeBackend, GatewayProcess, RedisServer, wait_for
from vncgate import addresses, audit, text
from vncgate import store as store_module
from vncgate.console import allow, policy
from vncgate.control import scope

TOKEN_SHAPED = harness.TOKEN_SHAPED


# -- units ------------------------------------------------------------------------------------

def test_backend_allow_refuses_link_local_the_gateway_and_the_store_and_keeps_loopback():
    rule = allow.BackendAllow(own_ports=(6080,), store=(("127.0.0.1", 6379),))
    assert rule.refusal("127.0.0.1", 5901) is None  # qemu -vnc 127.0.0.1:1
    assert rule.refusal("10.1.2.3", 6080) is None  # another host's 6080 is not this gateway
    assert "link-local" in rule.refusal("169.254.169.254", 80)
    assert "link-local" in rule.refusal("fe80::1", 5900)
    assert "own port" in rule.refusal("127.0.0.1", 6080)
    assert "own port" in rule.refusal("::ffff:127.0.0.1", 6080)
    assert "token store" in rule.refusal("127.0.0.1", 6379)
    assert "no console's address" in rule.refusal("0.0.0.0", 5900)
    # Spellings the resolver turns into the same addresses are judged by what they resolve to.
    for spelling in ("2852039166", "0xa9.0xfe.0xa9.0xfe", "169.254.43518"):
        assert "link-local" in rule.check_target(spelling, 80), spelling
    assert "own port" in rule.check_target("0x7f.1", 6080)
    listed = allow.BackendAllow(addresses.parse("10.0.0.0/8:5900-5999, [fd00::/8]:5900, 127.0.0.1"),
                                own_ports=(6080,))
    assert listed.refusal("10.9.9.9", 5999) is None and listed.refusal("fd00::7", 5900) is None
    assert "outside backend_allow" in listed.refusal("10.9.9.9", 6000)
    assert "outside backend_allow" in listed.refusal("192.168.1.1", 5900)
    assert "own port" in listed.refusal("127.0.0.1", 6080)  # listed, but never the gateway itself
    assert listed.check_target("localhost", 5900) is None or "::1" in listed.check_target("localhost", 5900)
    assert "does not resolve" in listed.check_target("no-such-host.invalid", 5900)
    assert "by address only" in rule.check_target("localhost", 5900, within=addresses.parse("127.0.0.1"))
    for bad in ("10.0.0.0/8:0", "10.0.0.0/33", "[fd00::/8]5900", "10.0.0.1:5-4", "host:5900", "10.0.0.1:５"):
        with pytest.raises(ValueError):
            addresses.parse(bad)
    assert [str(reach) for reach in addresses.parse("10.0.0.0/8:5900-5999 [fd00::/8]:5900 ::1")] == [
        "10.0.0.0/8:5900-5999", "[fd00::/8]:5900", "::1"]


def test_one_text_rule_for_names_and_terminals():
    for bad in ("vm\x1b[2J", "vm\x7f", "vm\x9b31m", "vm\u202eexe.txt", "vm\u2028", "vm\u2066", "", "x" * 1025):
        assert text.name_problem(bad), repr(bad)
    assert text.name_problem("vm-01.example_é") == ""
    writer = text.TerminalWriter()
    shown = writer.feed(b"ok\r") + writer.feed(b"\n\x1b]52;c;cHduZWQ=\x07\x1b[2J caf\xc3") + writer.feed(b"\xa9\t!\n")
    assert shown == "ok\n\\x1b]52;c;cHduZWQ=\\x07\\x1b[2J café\t!\n"
    assert "\x1b" not in shown


def test_item6_a_repeated_pointer_event_is_no_input():
    """An identical no-button PointerEvent each second kept an input-idle session open forever."""
    inputs = []
    sink = type("Sink", (), {"write": lambda self, data: None, "close_write": lambda self: None})()
    flt = policy.Filter(sink, policy.Policy(input_idle=5), 4096, on_input=lambda: inputs.append(1),
                        on_violation=lambda reason, detail: None)
    still = struct.pack("!BBHH", policy.POINTER_EVENT, 0, 100, 100)
    flt.write(b"\x01" + still)
    assert len(inputs) == 1  # the first is news
    for _ in range(5):
        flt.write(still)
    assert len(inputs) == 1
    flt.write(struct.pack("!BBHH", policy.POINTER_EVENT, 0, 101, 100))  # a move
    flt.write(struct.pack("!BBHH", policy.POINTER_EVENT, 1, 101, 100))  # a button
    flt.write(struct.pack("!BBHH", policy.POINTER_EVENT, 1, 101, 100))  # held: nothing new
    flt.write(struct.pack("!BBxxI", policy.KEY_EVENT, 1, 0x61) * 2)  # keys always count
    assert len(inputs) == 5


def test_one_policy_rule_for_every_console_type():
    assert policy.Policy(view_only=True, input_idle=3).problem(store_module.SERIAL) == ""
    assert "serial" in policy.Policy(paste_as_keys=True).problem(store_module.SERIAL)
    assert policy.Policy(paste_as_keys=True).problem(store_module.WEBSOCKET) == ""
    rule = allow.BackendAllow()
    with pytest.raises(scope.Invalid, match="ttl must be from 1"):
        scope.check_mint(rule, 300, store_module.WEBSOCKET, "127.0.0.1", 5900, policy.Policy(), ttl=1e-300)
    limited = scope.KeyScope(addresses.parse("127.0.0.1:5900"), (store_module.SERIAL,), 60.0)
    assert scope.check_mint(rule, 300, store_module.SERIAL, "127.0.0.1", 5900, policy.Policy(), scope=limited) == 60
    for console_type, host, port, ttl, message in (
            (store_module.WEBSOCKET, "127.0.0.1", 5900, None, "serial consoles only"),
            (store_module.SERIAL, "127.0.0.1", 5901, None, "outside this key's networks"),
            (store_module.SERIAL, "127.0.0.1", 5900, 61, "at most 60 seconds")):
        with pytest.raises(scope.Invalid, match=message):
            scope.check_mint(rule, 300, console_type, host, port, policy.Policy(), ttl=ttl, scope=limited)
    assert scope.KeyScope.parse(limited.words().split(), store_module.CONSOLE_TYPES) == limited


def test_token_shaped_words_are_redacted_in_audit_lines(tmp_path):
    token = store_module.common.new_token()
    path = str(tmp_path / "audit.jsonl")
    trail = audit.Audit.open(path)
    trail.record("api", path=f"/api/v1/consoles/{token}", detail=f"no token {token}", key=f"vgk_{token}",
                 token_hash=store_module.hash_token(token), instance="a-long-lower-case-name-of-forty-three-chars")
    trail.close()
    line = json.loads(open(path).read())
    assert token not in json.dumps(line) and line["path"] == "/api/v1/consoles/<redacted>"
    assert line["token_hash"] == store_module.hash_token(token)  # 64 hex digits are no token
    assert line["instance"] == "a-long-lower-case-name-of-forty-three-chars"


# -- a gateway: the API -------------------------------------------------------------------------

def raw_call(port, key, head, body=b""):
    """(status, parsed JSON) of one API request written by hand: head is its request line and
    headers (without the final blank line)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"{head}\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n".encode() + body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head_bytes, _, payload = reply.partition(b"\r\n\r\n")
    assert b"Content-Type: application/json" in head_bytes, reply
    return int(head_bytes.split()[1]), json.loads(payload)


def api_lines(gateway):
    return [line for line in gateway.audit() if line["event"] == "api"]


def test_item1_serial_policies_from_the_api_are_enforced(api_gateway):
    """The API accepted view_only and input_idle for a serial console, and nobody enforced them."""
    def shell(backend, sock):
        while data := sock.recv(65536):
            backend.received.append(data)
            sock.sendall(b"ran " + data)
    console = FakeBackend(shell)
    api_client = api_gateway.api
    try:
        mint = {"host": "127.0.0.1", "port": console.port, "type": "serial", "instance": "vm-serial"}
        status, _, watcher = api_client.call("POST", "/consoles", {**mint, "view_only": True})
        assert status == 201 and watcher["policy"]["view_only"]
        status, _, typist = api_client.call("POST", "/consoles", mint)
        assert status == 201
        url = f"ws://127.0.0.1:{api_gateway.port}/serial?token="
        with ws_connect(url + watcher["token"]) as watching, ws_connect(url + typist["token"]) as typing:
            watching.send(b"rm -rf /\r")
            typing.send(b"root\r")
            assert watching.recv(timeout=10) == b"ran root\r"  # the watcher sees the console
            watching.send(b"reboot\r")
            typing.send(b"ls\r")
            wait_for(lambda: b"ls\r" in b"".join(console.received), message="the typist's next bytes")
        assert b"".join(console.received) == b"root\rls\r"  # nothing of the view-only viewer

        status, _, idle = api_client.call("POST", "/consoles", {**mint, "input_idle": 1})
        assert status == 201 and idle["policy"]["input_idle"] == 1
        with ws_connect(url + idle["token"]):
            ended = wait_for(lambda: [line for line in api_gateway.audit() if line["event"] == "session-end"
                                      and line["token_id"] == idle["token_id"]], 10, message="the idle end")
        assert ended[0]["reason"] == "input-idle"
        assert api_client.call("POST", "/consoles", {**mint, "paste_as_keys": True})[0] == 400
    finally:
        console.stop()


@pytest.mark.parametrize("head, body, message", [
    ("POST /api/v1/consoles HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: \u0661\u0662",
     b'{"port": 1}', "Content-Length must be a whole number"),
    ("POST /api/v1/consoles HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: " + "9" * 5000,
     b"", "Content-Length must be a whole number"),
    ("POST /api/v1/consoles HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: \u00b2",
     b"{}", "Content-Length must be a whole number"),
    ("GET /api/v1/consoles/log?instance=vm&tail=%C2%B2 HTTP/1.1", b"", "tail must be a whole number"),
    ("GET /api/v1/consoles/log?instance=vm&tail=" + "9" * 5000 + " HTTP/1.1", b"", "tail must be a whole number"),
], ids=["arabic-indic-digits", "5000-digits", "superscript-two", "tail-superscript", "tail-5000-digits"])
def test_item5_api_numbers_are_ascii_digits_with_bounds(api_gateway, head, body, message):
    status, answer = raw_call(api_gateway.port, api_gateway.key, head.encode("utf-8").decode("latin-1"), body)
    assert status == 400 and message in answer["error"], answer
    assert api_lines(api_gateway)[-1]["reason"] == "invalid-request"


def test_item5_a_tiny_ttl_is_refused_and_an_internal_fault_is_a_json_500_with_its_audit_line(tmp_path):
    keys = tmp_path / "api-keys"
    keys.write_text("")
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    gateway = GatewayProcess(str(tmp_path), api_keys_file=str(keys), console_log_dir=str(not_a_folder))
    try:
        key = gateway.token_cli("api-key", "add", "ops").stdout.strip()
        gateway.reload_keys(1)
        client = harness.ApiClient(gateway.port, key)
        status, _, body = client.call("POST", "/consoles", {"host": "127.0.0.1", "port": 5900, "ttl": 1e-300})
        assert status == 400 and "ttl must be from 1" in body["error"]
        assert client.call("GET", "/consoles")[2] == []  # no token row was written
        status, _, body = client.call("GET", "/consoles/log?instance=vm")  # reading under a file fails
        assert (status, body) == (500, {"error": "The gateway failed to handle this request."})
        line = api_lines(gateway)[-1]
        assert (line["key"], line["action"], line["status"], line["reason"]) == ("ops", "console-log", 500,
                                                                                  "internal-error")
        assert "Traceback" not in json.dumps(body)
        harness.check_openapi(client.responses)
    finally:
        assert gateway.stop() == 0


def test_item7_a_token_sent_as_a_token_id_never_reaches_the_audit_log(api_gateway):
    status, _, console = api_gateway.api.call("POST", "/consoles", {"host": "127.0.0.1", "port": 5900})
    assert status == 201
    token = console["token"]
    assert api_gateway.api.call("DELETE", f"/consoles/{token}")[0] == 404
    assert api_gateway.api.call("DELETE", f"/nothing/{token}")[0] == 404
    assert api_gateway.api.call("DELETE", f"/consoles/{console['token_id']}")[0] == 200
    assert api_gateway.api.call("DELETE", "/sessions/0123456789ab")[0] == 404
    paths = [line["path"] for line in api_lines(api_gateway)[1:]]
    assert paths == ["/api/v1/consoles/{token_id}", "/api/v1/nothing/<redacted>",
                     f"/api/v1/consoles/{console['token_id']}", "/api/v1/sessions/0123456789ab"]
    assert token not in open(api_gateway.audit_path).read()
    # api_gateway's teardown fails on any token-shaped word in its audit log or stderr


def test_item4_names_with_control_characters_are_refused_by_the_api_and_the_cli(api_gateway):
    for name in ("vm\x7f", "vm\u009b2J", "vm\u202egpj.exe", "vm\x1b]52;c;eA==\x07"):
        status, _, body = api_gateway.api.call("POST", "/consoles", {"host": "127.0.0.1", "port": 5900,
                                                                     "instance": name})
        assert status == 400 and "control character" in body["error"], (name, body)
        done = api_gateway.token_cli("add", "--host", "127.0.0.1", "--port", "5900", "--instance", name)
        assert done.returncode == 2 and "control character" in done.stderr, (name, done.stderr)
    assert api_gateway.api.call("GET", "/consoles")[2] == []


def run_on_a_terminal(argv, cwd):
    """What argv printed with a pseudo-terminal as its stdout."""
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(argv, stdout=follower, stderr=subprocess.PIPE, cwd=cwd)
        os.close(follower)
        shown = b""
        while True:
            ready, _, _ = select.select([leader], [], [], 30)
            assert ready, "the command printed nothing for 30 s"
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the command closed the terminal
                break
            if not chunk:
                break
            shown += chunk
        assert proc.wait(30) == 0, proc.stderr.read()
        return shown
    finally:
        os.close(leader)


def test_item4_tables_and_the_console_log_escape_control_characters_on_a_terminal(tmp_path):
    gateway_ini = tmp_path / "vncgate.ini"
    logs = tmp_path / "logs"
    gateway_ini.write_text(f"[gateway]\ndatabase = tokens.db\nconsole_log_dir = {logs}\n")
    # A name written before the text rule (or by another tool) is shown escaped, never obeyed.
    store = store_module.TokenStore(str(tmp_path / "tokens.db"))
    store.add_connection_details("vm\x1b[2J\u202e", "ws-vnc", "127.0.0.1", 5900)
    store.close()
    guest = b"login: \x1b]52;c;cm0gLXJmIC8=\x07\x1b[2Jforged\r\n"
    logs.mkdir()
    with open(logs / "vm-1.log", "wb") as handle:
        handle.write(guest)
    script = harness.console_script("vncgate-token")
    listed = run_on_a_terminal([script, "-c", str(gateway_ini), "list"], tmp_path)
    assert b"\x1b" not in listed and "\u202e".encode() not in listed and b"vm\\x1b[2J\\u202e" in listed
    shown = run_on_a_terminal([script, "-c", str(gateway_ini), "log", "--instance", "vm-1"], tmp_path)
    assert b"\x1b" not in shown and b"\\x1b]52;c;cm0gLXJmIC8=\\x07\\x1b[2Jforged" in shown
    raw = run_on_a_terminal([script, "-c", str(gateway_ini), "log", "--instance", "vm-1", "--raw"], tmp_path)
    assert b"\x1b]52;c;cm0gLXJmIC8=\x07\x1b[2Jforged" in raw
    piped = subprocess.run([script, "-c", str(gateway_ini), "log", "--instance", "vm-1"], capture_output=True,
                           cwd=tmp_path, timeout=30)
    assert piped.stdout == guest  # a pipe or a file gets the bytes as they are


# -- a gateway with its store on Redis: a key mints consoles, not tunnels -----------------------

def test_item2_a_serial_token_cannot_reach_the_store_or_the_gateway_itself(tmp_path):
    """A serial token's WebSocket carried raw bytes to anything: the Redis store answered INFO."""
    redis = RedisServer(tmp_path)
    keys = tmp_path / "api-keys"
    keys.write_text("")
    port = harness.free_port()  # the ini says the port too, so that the CLI knows it
    gateway = GatewayProcess(str(tmp_path), database=redis.url, api_keys_file=str(keys), bind_port=port, port=port)
    try:
        assert "backend_allow is not set" in gateway.read_stderr()
        key = gateway.token_cli("api-key", "add", "ops").stdout.strip()
        gateway.reload_keys(1)
        client = harness.ApiClient(gateway.port, key)
        for port, why in ((redis.port, "token store"), (gateway.port, "own port")):
            for host in ("127.0.0.1", "localhost"):
                status, _, body = client.call("POST", "/consoles", {"host": host, "port": port, "type": "serial"})
                assert status == 400 and why in body["error"], body
            done = gateway.token_cli("add", "--host", "127.0.0.1", "--port", str(port), "--type", "serial")
            assert done.returncode == 2 and why in done.stderr
        status, _, body = client.call("POST", "/consoles", {"host": "169.254.169.254", "port": 80})
        assert status == 400 and "link-local" in body["error"]
        # A token the rules did not see (minted before them, or a name that resolves elsewhere
        # now) is checked again as it connects.
        store = store_module.TokenStore(redis.url)
        try:
            tokens = {why: store.add_connection_details(f"vm-{why}", "serial", "localhost", port)
                      for port, why in ((redis.port, "token store"), (gateway.port, "own port"))}
        finally:
            store.close()
        for why, token in tokens.items():
            with pytest.raises(InvalidStatus) as refused:
                with ws_connect(f"ws://127.0.0.1:{gateway.port}/serial?token={token}") as ws:
                    ws.send(b"INFO\r\nCONFIG GET dir\r\nGET /metrics HTTP/1.0\r\n\r\n")
                    ws.recv(timeout=5)
            assert refused.value.response.status_code == 502
            line = wait_for(lambda why=why: [line for line in gateway.audit() if line.get("instance_id") == f"vm-{why}"
                                             and line.get("reason") == "backend-not-allowed"])
            assert why in line[0]["detail"]
        harness.check_openapi(client.responses)
        # the store never ran what came through the pivot (the gateway itself sends no CONFIG)
        assert "cmdstat_config" not in redis.client().info("commandstats")
    finally:
        assert gateway.stop() == 0
        redis.stop()


def test_item2_backend_allow_and_a_key_scope_narrow_where_consoles_are(tmp_path):
    console = FakeBackend(lambda backend, sock: harness.echo(sock))
    other = FakeBackend(lambda backend, sock: harness.echo(sock))
    keys = tmp_path / "api-keys"
    keys.write_text("")
    gateway = GatewayProcess(str(tmp_path), api_keys_file=str(keys),
                             backend_allow=f"127.0.0.1:{console.port}, 10.0.0.0/8")
    try:
        assert "backend_allow is not set" not in gateway.read_stderr()
        ops = gateway.token_cli("api-key", "add", "ops").stdout.strip()
        scoped = gateway.token_cli("api-key", "add", "narrow", "--networks", f"127.0.0.1:{console.port}",
                                   "--types", "serial", "--max-ttl", "60")
        assert scoped.returncode == 0, scoped.stderr
        assert f" networks=127.0.0.1:{console.port} types=serial max-ttl=60\n" in keys.read_text()
        bad = gateway.token_cli("api-key", "add", "bad", "--types", "rdp")
        assert bad.returncode == 2 and "console types are" in bad.stderr
        gateway.reload_keys(2)
        wide, narrow = harness.ApiClient(gateway.port, ops), harness.ApiClient(gateway.port, scoped.stdout.strip())
        serial = {"host": "127.0.0.1", "port": console.port, "type": "serial"}
        assert wide.call("POST", "/consoles", serial)[0] == 201
        status, _, body = wide.call("POST", "/consoles", {**serial, "port": other.port})
        assert status == 400 and "outside backend_allow" in body["error"]
        done = gateway.token_cli("add", "--host", "127.0.0.1", "--port", str(other.port))
        assert done.returncode == 2 and "outside backend_allow" in done.stderr
        status, _, minted = narrow.call("POST", "/consoles", serial)
        assert status == 201
        with ws_connect(f"ws://127.0.0.1:{gateway.port}/serial?token={minted['token']}") as ws:
            ws.send(b"ping")
            assert ws.recv(timeout=10) == b"ping"
        for body, message in (({**serial, "type": "ws-vnc"}, "serial consoles only"),
                              ({**serial, "ttl": 61}, "at most 60 seconds"),
                              ({**serial, "host": "10.1.2.3"}, "outside this key's networks"),
                              ({**serial, "host": "localhost"}, "by address only")):
            status, _, answer = narrow.call("POST", "/consoles", body)
            assert status == 400 and message in answer["error"], (body, answer)
        lines = [line for line in gateway.audit() if line["event"] == "api" and line["key"] == "narrow"]
        assert [line["result"] for line in lines] == ["ok", "rejected", "rejected", "rejected", "rejected"]
        harness.check_openapi(wide.responses + narrow.responses)
    finally:
        console.stop()
        other.stop()
        assert gateway.stop() == 0
