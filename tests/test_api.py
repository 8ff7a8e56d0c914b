"""The control-plane API with a urllib-only client: minting, listing, revoking, sessions, every
error status, keys reread on SIGHUP, one audit line per call. Every response is checked against
the OpenAPI document (the api_gateway fixture's teardown)."""

import itertools
import json
import os
import signal
import ssl
import urllib.error
import urllib.parse
import urllib.request

import pytest
from openapi_spec_validator import validate as validate_spec

from tests import harness, vnc_client
from tests.harness import ApiClient, closed_by_peer, xvp_connect
from vncgate import store as store_module
from vncgate.console import serial as consoles
from vncgate.store import common as store_common
from vncgate.store.common import hash_token


def token_of(access_url):
    parts = urllib.parse.urlsplit(access_url)
    if parts.fragment:
        path = urllib.parse.parse_qs(parts.fragment)["path"][0]
        return urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)["token"][0]
    return urllib.parse.parse_qs(parts.query)["token"][0]


def test_a_urllib_client_mints_and_vncdotool_and_novnc_reach_qemu(api_gateway, qemu):
    api = api_gateway.api
    status, _, xvp = api.call("POST", "/consoles", {"host": "127.0.0.1", "port": qemu.port, "type": "xvp-vnc",
                                                      "instance": "vm-api", "ttl": 600})
    assert status == 201 and xvp["console_type"] == "xvp-vnc" and xvp["instance_id"] == "vm-api"
    assert xvp["access_url"] == f"http://127.0.0.1:{api_gateway.port}/console?token={xvp['token']}"
    assert xvp["token_id"] == harness.token_id(xvp["token"])
    shot = harness.artifact("api-xvp-vncdotool.png")

    def screen_has_text():
        vnc_client.xvp_screenshot(api_gateway.port, token_of(xvp["access_url"]), shot)
        return harness.bright_pixels(shot)[0] > 200
    harness.wait_for(screen_has_text, timeout=60, interval=0.5, message="SeaBIOS text over XVP")

    status, _, ws = api.call("POST", "/consoles", {"host": "127.0.0.1", "port": qemu.port, "instance": "vm-api"})
    assert status == 201 and ws["console_type"] == "ws-vnc"
    harness.open_console_in_chromium(ws["access_url"], harness.artifact("api-novnc.png"))

    status, _, rows = api.call("GET", "/consoles?instance=vm-api")
    assert status == 200 and {row["token_id"] for row in rows} == {xvp["token_id"], ws["token_id"]}
    assert all(row["state"] == "live" for row in rows)
    assert xvp["token"] not in json.dumps(rows)
    lines = [line for line in api_gateway.audit() if line["event"] == "api"]
    assert [(line["key"], line["action"], line["instance"], line["result"]) for line in lines[:2]] == [
        ("ops", "create-console", "vm-api", "ok")] * 2
    audit_text = open(api_gateway.audit_path).read()
    assert xvp["token"] not in audit_text and ws["token"] not in audit_text and api_gateway.key not in audit_text


def test_revoke_and_kill_end_live_sessions_at_once(api_gateway, vnc):
    api = api_gateway.api
    minted = [api.call("POST", "/consoles", {"host": "127.0.0.1", "port": vnc.port, "type": "xvp-vnc",
                                             "instance": name})[2] for name in ("vm-a", "vm-b", "vm-c")]
    socks = []
    for console in minted:
        sock, status, _ = xvp_connect(api_gateway.port, console["token"])
        assert status == "HTTP/1.1 200 OK"
        socks.append(sock)
    sessions = harness.wait_for(lambda: len(api.call("GET", "/sessions")[2]) == 3 and api.call("GET", "/sessions")[2])
    assert {row["instance_id"] for row in sessions} == {"vm-a", "vm-b", "vm-c"}
    assert all(row["path"] == "xvp" and row["client"].startswith("127.0.0.1:") for row in sessions)

    assert api.call("DELETE", f"/consoles/{minted[0]['token_id']}")[:3:2] == (200, {"revoked": 1})
    assert closed_by_peer(socks[0], 2)
    assert api.call("DELETE", "/consoles?instance=vm-b")[:3:2] == (200, {"revoked": 1})
    assert closed_by_peer(socks[1], 2)
    victim = next(row["session_id"] for row in sessions if row["instance_id"] == "vm-c")
    assert api.call("DELETE", f"/sessions/{victim}")[:3:2] == (202, {"kill_requested": 1})
    assert closed_by_peer(socks[2], 2)
    harness.wait_for(lambda: api.call("GET", "/sessions")[2] == [], message="the sessions to leave the list")
    assert api.call("DELETE", "/consoles?instance=nothing-here")[:3:2] == (200, {"revoked": 0})
    status, _, state = api.call("GET", "/store")
    assert status == 200 and state["up"] and state["tokens"]["live"] == 1
    ends = sorted(line["reason"] for line in api_gateway.audit() if line["event"] == "session-end")
    assert ends == ["killed", "revoked", "revoked"]
    actions = [(line["action"], line.get("instance"), line["result"]) for line in api_gateway.audit()
               if line["event"] == "api" and line["action"] in ("revoke-token", "revoke-by-instance", "kill-session")]
    assert actions == [("revoke-token", "vm-a", "ok"), ("revoke-by-instance", "vm-b", "ok"),
                       ("kill-session", "vm-c", "ok"), ("revoke-by-instance", "nothing-here", "ok")]
    for sock in socks:
        sock.close()


def test_every_error_status(api_gateway):
    api = api_gateway.api
    console = {"host": "127.0.0.1", "port": 5900}
    cases = [
        (400, "POST", "/consoles", {"data": b"{not json", "headers": {"Content-Type": "application/json"}}),
        (400, "POST", "/consoles", {"body": {**console, "port": 70000}}),
        (400, "POST", "/consoles", {"body": {**console, "type": "rdp"}}),
        (400, "POST", "/consoles", {"body": {**console, "ttl": -1}}),
        (400, "POST", "/consoles", {"body": {**console, "colour": "blue"}}),
        (400, "POST", "/consoles", {"body": {**console, "view_only": "yes"}}),
        (400, "POST", "/consoles", {"body": {"port": 5900}}),
        (400, "POST", "/consoles", {"body": [1, 2]}),
        (400, "POST", "/consoles", {"body": {"domain": "vm", "libvirt": "qemu+ext:///system?command=/bin/sh"}}),
        (400, "GET", "/consoles?colour=blue", {}),
        (400, "DELETE", "/consoles", {}),
        (401, "GET", "/sessions", {"key": None}),
        (401, "GET", "/sessions", {"key": "vgk_wrong"}),
        (403, "GET", "/sessions", {"headers": {"Origin": "http://evil.example"}}),
        (404, "GET", "/nothing", {}),
        (404, "DELETE", "/consoles/0123abcd", {}),
        (404, "DELETE", "/sessions/0123456789ab", {}),
        (405, "PUT", "/consoles", {"body": console}),
        (405, "GET", "/consoles/0123abcd", {}),
        (413, "POST", "/consoles", {"data": b"{" + b" " * (64 * 1024) + b"}",
                                    "headers": {"Content-Type": "application/json"}}),
        (415, "POST", "/consoles", {"data": json.dumps(console).encode(), "headers": {"Content-Type": "text/plain"}}),
    ]
    for status, method, path, options in cases:
        got, headers, body = api.call(method, path, **options)
        assert (got, set(body)) == (status, {"error"}), (method, path, options, got, body)
        if status == 405:
            assert headers["Allow"]
    assert "port must be a whole number from 1 to 65535" in api.call(
        "POST", "/consoles", {**console, "port": 0})[2]["error"]
    assert api.call("GET", "/consoles")[2] == []  # nothing was minted by the bad requests
    rejected = [line for line in api_gateway.audit() if line["event"] == "api" and line["result"] == "rejected"]
    assert len(rejected) == len(cases) + 1 and all("reason" in line and "status" in line for line in rejected)


def test_a_key_rate_limit_answers_429(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("")
    gateway = harness.GatewayProcess(str(tmp_path), api_keys_file=str(keys), api_burst=3, api_rate=0.01)
    try:
        key = gateway.token_cli("api-key", "add", "busy").stdout.strip()
        gateway.reload_keys(1)
        api = ApiClient(gateway.port, key)
        assert [api.call("GET", "/sessions")[0] for _ in range(5)] == [200, 200, 200, 429, 429]
        assert api.call("GET", "/sessions")[2] == {"error": "Too many requests with this API key; try again shortly."}
        assert harness.xvp_connect(gateway.port, "nope")[1] == "HTTP/1.1 401 Unauthorized"  # still serving
        harness.check_openapi(api.responses)
    finally:
        assert gateway.stop() == 0


def test_wrong_missing_and_removed_keys_get_one_answer_and_sighup_rereads_keys(api_gateway):
    api = api_gateway.api
    added = api_gateway.token_cli("api-key", "add", "panel")
    assert added.returncode == 0
    panel = added.stdout.strip()
    assert panel.startswith("vgk_") and panel not in open(api_gateway.ini.replace("gw.ini", "api-keys")).read()
    before = api.call("GET", "/sessions", key=panel)
    api_gateway.reload_keys(2)
    assert api.call("GET", "/sessions", key=panel)[0] == 200
    assert api_gateway.token_cli("api-key", "remove", "panel").returncode == 0
    api_gateway.reload_keys(1)
    removed = api.call("GET", "/sessions", key=panel)
    missing = api.call("GET", "/sessions", key=None)
    wrong = api.call("GET", "/sessions", key="vgk_" + "x" * 43)
    basic = api.call("GET", "/sessions", key=None, headers={"Authorization": f"Basic {panel}"})
    answers = {(status, json.dumps(body)) for status, _, body in (before, removed, missing, wrong, basic)}
    assert answers == {(401, json.dumps({"error": "A valid API key is required."}))}
    assert api.call("GET", "/sessions")[0] == 200  # the other key still works
    assert api_gateway.token_cli("api-key", "add", "ops").returncode == 1  # names are unique
    keys_file = api_gateway.ini.replace("gw.ini", "api-keys")
    with open(keys_file, "a") as handle:
        handle.write("broken line\n")
    api_gateway.proc.send_signal(signal.SIGHUP)
    harness.wait_for(lambda: "keeping the previous API keys" in api_gateway.read_stderr())
    assert api.call("GET", "/sessions")[0] == 200
    assert oct(os.stat(keys_file).st_mode & 0o777) == "0o600"


def test_the_openapi_document_is_served_and_valid(api_gateway):
    status, _, document = api_gateway.api.call("GET", "/openapi.json", key=None)
    with open(os.path.join(harness.REPO, "vncgate", "control", "openapi.json")) as handle:
        assert status == 200 and document == json.load(handle)
    validate_spec(document)


def test_without_api_keys_file_there_is_no_api(tmp_path):
    gateway = harness.GatewayProcess(str(tmp_path))
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{gateway.port}/api/v1/sessions", timeout=10)
        assert refused.value.code == 404
        done = gateway.token_cli("api-key", "add", "x")
        assert done.returncode == 1 and "api_keys_file is not set" in done.stderr
    finally:
        assert gateway.stop() == 0


def test_with_tls_only_the_api_is_never_served_in_clear(tmp_path):
    cert, key_file = harness.make_certificate(str(tmp_path), "api")
    keys = tmp_path / "keys"
    keys.write_text("")
    gateway = harness.GatewayProcess(str(tmp_path), api_keys_file=str(keys), cert=cert, key=key_file,
                                     tls_only="true")
    try:
        key = gateway.token_cli("api-key", "add", "ops").stdout.strip()
        gateway.reload_keys(1)
        with pytest.raises(urllib.error.HTTPError) as clear:
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{gateway.port}/api/v1/sessions",
                                                          headers={"Authorization": f"Bearer {key}"}), timeout=10)
        assert clear.value.code == 400 and b"TLS only" in clear.value.read()
        context = ssl.create_default_context(cafile=cert)
        with urllib.request.urlopen(urllib.request.Request(f"https://127.0.0.1:{gateway.port}/api/v1/sessions",
                                                           headers={"Authorization": f"Bearer {key}"}),
                                    timeout=10, context=context) as response:
            assert response.status == 200 and json.loads(response.read()) == []
        assert not [line for line in gateway.audit() if line["event"] == "api" and line["status"] != 200]
    finally:
        assert gateway.stop() == 0


def test_a_console_policy_is_minted_and_listed(api_gateway, vnc):
    api = api_gateway.api
    status, _, console = api.call("POST", "/consoles", {"host": "127.0.0.1", "port": vnc.port, "view_only": True,
                                                         "input_idle": 30, "instance": "vm-policy"})
    assert status == 201
    assert console["policy"] == {"view_only": True, "single_use": False, "paste_as_keys": False, "input_idle": 30}
    assert api.call("GET", "/consoles?instance=vm-policy")[2][0]["policy"] == console["policy"]
    listed = json.loads(api_gateway.token_cli("list", "--json").stdout)
    assert listed[0]["policy"] == console["policy"]  # the CLI and the API show one shape


def test_the_console_log_of_a_followed_instance(api_gateway, tmp_path):
    """GET /consoles/log serves what the console logger kept (its writing is test_serial's);
    an instance never followed is 404, bad queries 400."""
    folder = tmp_path / "console-logs"
    folder.mkdir(exist_ok=True)
    with open(consoles.log_path(str(folder), "vm/1"), "wb") as handle:
        handle.write(b"SeaBIOS (version 1.16)\r\nBooting...\r\nNo bootable device.\r\n\xff\n")
    status, _, body = api_gateway.api.call("GET", "/consoles/log?instance=vm/1&tail=2")
    assert status == 200 and body == {"instance_id": "vm/1", "output": "No bootable device.\r\n\ufffd\n"}
    status, _, body = api_gateway.api.call("GET", "/consoles/log?instance=vm/1")
    assert status == 200 and body["output"].startswith("SeaBIOS (version 1.16)")
    assert api_gateway.api.call("GET", "/consoles/log?instance=vm-2")[0] == 404
    for query in ("", "?instance=vm/1&tail=0", "?instance=vm/1&tail=x", "?instance=vm/1&lines=2"):
        assert api_gateway.api.call("GET", "/consoles/log" + query)[0] == 400, query
    assert api_gateway.api.call("GET", "/consoles/log?instance=vm/1", key="wrong")[0] == 401
    assert api_gateway.api.call("DELETE", "/consoles/log?instance=vm/1")[0] == 405
    lines = [line for line in api_gateway.audit() if line["event"] == "api" and line["action"] == "console-log"]
    assert lines and all("output" not in line for line in lines)


def test_a_token_id_two_tokens_share_is_refused_and_a_longer_one_names_one(api_gateway, monkeypatch):
    """A token id is its hash's first 8 hex digits, so two tokens can share one: revoking by
    it is refused (409, both kept); a prefix long enough to tell them apart revokes one."""
    seen = {}
    for number in itertools.count():  # a birthday search: ~80,000 hashes, well under a second
        candidate = f"twin-{number}"
        twin = seen.setdefault(hash_token(candidate)[:8], candidate)
        if twin != candidate:
            break
    pair = (twin, candidate)
    minted = iter(pair)
    monkeypatch.setattr(store_common, "new_token", lambda: next(minted))
    store = store_module.TokenStore(os.path.join(api_gateway.folder, "tokens.db"))
    for _ in pair:
        store.add_connection_details("vm-twins", "xvp-vnc", "127.0.0.1", 5900)
    first, second = (hash_token(token) for token in pair)
    status, _headers, body = api_gateway.api.call("DELETE", f"/consoles/{first[:8]}")
    assert status == 409 and "More than one token has this id" in body["error"]
    assert all(store.get_connection_details(token) for token in pair)
    apart = next(index for index in range(64) if first[index] != second[index]) + 1
    assert api_gateway.api.call("DELETE", f"/consoles/{first[:apart]}")[::2] == (200, {"revoked": 1})
    assert store.get_connection_details(pair[0]) is None and store.get_connection_details(pair[1])
    refused = [line for line in api_gateway.audit() if line["event"] == "api" and line.get("status") == 409]
    assert [line["reason"] for line in refused] == ["ambiguous-token-id"]


def test_a_store_outage_is_a_503_and_the_api_still_answers(api_gateway):
    api_gateway.api.call("POST", "/consoles", {"host": "127.0.0.1", "port": 5900})
    for suffix in ("", "-wal", "-shm"):  # the database vanishes (a volume unmounted, say)
        path = os.path.join(api_gateway.folder, "tokens.db" + suffix)
        if os.path.exists(path):
            os.unlink(path)
    status, _headers, body = api_gateway.api.call("GET", "/consoles")
    assert status == 503 and body == {"error": "The console service is busy or unavailable; try again shortly."}
    assert api_gateway.api.call("POST", "/consoles", {"host": "127.0.0.1", "port": 5900})[0] == 503
    assert api_gateway.api.call("GET", "/nothing")[0] == 404  # still serving
    outages = [line for line in api_gateway.audit() if line["event"] == "api" and line.get("status") == 503]
    assert [line["reason"] for line in outages] == ["store-unavailable", "store-unavailable"]
    assert not os.path.exists(os.path.join(api_gateway.folder, "tokens.db"))  # never silently recreated


def test_sessions_show_the_bytes_of_this_gateways_sessions_as_they_move(tmp_path, vnc):
    """The operator's page showed 0 bytes for a live session until the next heartbeat
    (touch_interval, 30 s by default): this gateway's own sessions are counted live."""
    gateway = harness.start_api_gateway(str(tmp_path))
    api = gateway.api
    try:
        minted = api.call("POST", "/consoles", {"host": "127.0.0.1", "port": vnc.port, "type": "xvp-vnc"})[2]
        sock, status, rest = xvp_connect(gateway.port, minted["token"])
        with sock:
            assert status == "HTTP/1.1 200 OK"
            harness.recv_exactly(sock, 12 - len(rest))
            sock.sendall(b"x" * 1000)
            harness.recv_exactly(sock, 1000)
            # Counted once passed on: the echo may reach this socket a moment before its count grows.
            harness.wait_for(lambda: [(row["bytes_up"], row["bytes_down"]) for row in api.call("GET", "/sessions")[2]]
                             == [(1000, 1012)], timeout=5, interval=0.25, message="the session's bytes")
    finally:
        assert gateway.stop() == 0
    harness.check_openapi(api.responses)
