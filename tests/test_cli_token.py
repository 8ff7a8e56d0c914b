"""vncgate-token through real subprocesses: what an operator types and sees."""

import datetime
import hashlib
import json
import os
import time

import pytest


def one_clear_line(done):
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert lines[0].startswith("vncgate-token: error: ")
    return lines[0]


def token_of(url):
    return url.strip().rsplit("%3D", 1)[-1] if "%3D" in url else url.strip().rsplit("=", 1)[-1]


@pytest.mark.usefixtures("on_each_store")
def test_mint_then_list(run_token):
    url = run_token("add", "--host", "10.1.2.3", "--port", "5901", check=0).stdout
    assert url.startswith("http://127.0.0.1:6080/vnc.html#autoconnect=1&path=websockify&token=")
    token = token_of(url)
    listing = run_token("list", check=0).stdout
    assert hashlib.sha256(token.encode()).hexdigest()[:8] in listing
    assert token not in listing
    rows = json.loads(run_token("list", "--json", check=0).stdout)
    assert [(row["instance_id"], row["host"], row["port"], row["state"]) for row in rows] == [
        ("10.1.2.3:5901", "10.1.2.3", 5901, "live")]


@pytest.mark.usefixtures("on_each_store")
def test_add_json_and_xvp_url(run_token):
    minted = json.loads(run_token("add", "--host", "h", "--port", "5900", "--type", "xvp-vnc",
                                  "--instance", "vm-7", "--json", check=0).stdout)
    assert minted["access_url"] == f"http://127.0.0.1:6080/console?token={minted['token']}"
    assert (minted["console_type"], minted["instance_id"], minted["host"], minted["port"]) == (
        "xvp-vnc", "vm-7", "h", 5900)
    assert len(minted["token"]) >= 22


@pytest.mark.usefixtures("on_each_store")
def test_ttl_sets_expiry_and_expired_tokens_leave_the_default_list(run_token):
    before = datetime.datetime.now(datetime.timezone.utc)
    minted = json.loads(run_token("add", "--host", "h", "--port", "1", "--ttl", "1", "--json", check=0).stdout)
    expires = datetime.datetime.strptime(minted["expires_at"], "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=datetime.timezone.utc)
    assert abs((expires - before).total_seconds() - 1) <= 2
    deadline = time.monotonic() + 10
    while json.loads(run_token("list", "--json", check=0).stdout):  # poll until past expiry
        assert time.monotonic() < deadline, "token never expired"
    expired = json.loads(run_token("list", "--include-expired", "--json", check=0).stdout)
    assert [row["state"] for row in expired] == ["expired"]


@pytest.mark.usefixtures("on_each_store")
def test_revoke_by_token_instance_and_host(run_token):
    def mint(host, instance):
        return token_of(run_token("add", "--host", host, "--port", "5900", "--instance", instance, check=0).stdout)
    first = mint("a", "vm-1")
    for host, instance in (("a", "vm-2"), ("b", "vm-2"), ("c", "vm-3")):
        mint(host, instance)
    assert run_token("revoke", first, check=0).stdout == "revoked 1 token\n"
    assert run_token("revoke", "--instance", "vm-2", check=0).stdout == "revoked 2 tokens\n"
    assert run_token("revoke", "--host", "c", check=0).stdout == "revoked 1 token\n"
    assert json.loads(run_token("list", "--include-expired", "--json", check=0).stdout) == []
    assert "already gone" in one_clear_line(run_token("revoke", first, check=1))


@pytest.mark.usefixtures("on_each_store")
def test_touch_and_purge(run_token):
    token = token_of(run_token("add", "--host", "h", "--port", "5900", check=0).stdout)
    assert run_token("touch", token, check=0).stdout == "touched 1 token\n"
    assert "unknown" in one_clear_line(run_token("touch", token, "not-a-token", check=1))
    assert run_token("purge", check=0).stdout == "purged 0 tokens\n"


@pytest.mark.parametrize("args, fragment", [
    (["add", "--host", "h", "--port", "99999"], "invalid port 99999"),
    (["add", "--host", "h", "--port", "vnc"], "invalid port 'vnc'"),
    (["add", "--host", "h", "--port", "5900", "--type", "spice"], "invalid choice: 'spice'"),
    (["add", "--port", "5900"], "add takes --host H --port P, --domain NAME or --replay SESSION"),
    (["add", "--host", "h", "--port", "1", "--libvirt", "qemu:///system"], "--libvirt goes with --domain"),
    (["api-key"], "required: COMMAND"),
    (["add", "--host", "h", "--port", "1", "--ttl", "-3"], "invalid seconds '-3'"),
    (["add", "--host", "h", "--port", "1", "--input-idle", "0"], "invalid seconds '0'"),
    (["revoke"], "exactly one"),
    (["revoke", "tok", "--host", "h"], "exactly one"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "required: COMMAND"),
])
def test_usage_errors_exit_2_with_one_line(run_token, args, fragment):
    assert fragment in one_clear_line(run_token(*args, check=2))


def test_malformed_ini(run_token, tmp_path):
    bad = tmp_path / "bad.ini"
    bad.write_text("[gateway\nport = 1\n")
    line = one_clear_line(run_token("list", config=str(bad), check=1))
    assert str(bad) in line and "malformed" in line


def test_bad_value_in_ini_names_file_and_key(run_token, tmp_path):
    bad = tmp_path / "bad.ini"
    bad.write_text("[gateway]\ntoken_ttl = soon\n")
    line = one_clear_line(run_token("list", config=str(bad), check=1))
    assert str(bad) in line and "token_ttl" in line and "'soon'" in line


@pytest.mark.parametrize("database, fragment", [
    ("/proc/self/vncgate.db", "is not writable"),         # unwritable even for root
    ("missing/folder/vncgate.db", "does not exist"),
])
def test_unusable_database_folder(run_token, tmp_path, database, fragment):
    ini = tmp_path / "db.ini"
    ini.write_text(f"[gateway]\ndatabase = {database}\n")
    line = one_clear_line(run_token("add", "--host", "h", "--port", "1", config=str(ini), check=1))
    assert "cannot open database" in line and fragment in line


def test_database_that_is_not_sqlite_is_reported_and_untouched(run_token, tmp_path):
    (tmp_path / "tokens.db").write_bytes(b"PNG and other things \x00\x01" * 100)
    before = (tmp_path / "tokens.db").read_bytes()
    line = one_clear_line(run_token("list", check=1))
    assert "not a vncgate SQLite database" in line
    assert (tmp_path / "tokens.db").read_bytes() == before


def test_password_file_is_never_stored_in_clear(run_token, tmp_path):
    (tmp_path / "pw").write_text("hunter22\n")
    minted = json.loads(run_token("add", "--host", "h", "--port", "5900", "--password-file", str(tmp_path / "pw"),
                                  "--json", check=0).stdout)
    assert minted["has_password"] is True
    on_disk = b"".join((tmp_path / name).read_bytes() for name in os.listdir(tmp_path)
                       if name.startswith("tokens.db"))
    assert b"hunter22" not in on_disk and minted["token"].encode() not in on_disk
    (tmp_path / "empty").write_text("")
    assert "is empty" in one_clear_line(run_token("add", "--host", "h", "--port", "1", "--password-file",
                                                  str(tmp_path / "empty"), check=1))
    assert "cannot read password file" in one_clear_line(
        run_token("add", "--host", "h", "--port", "1", "--password-file", str(tmp_path / "nope"), check=1))


def test_raw_token_never_reaches_the_database_file(run_token, tmp_path):
    tokens = [token_of(run_token("add", "--host", "h", "--port", "5900", check=0).stdout) for _ in range(5)]
    run_token("touch", *tokens, check=0)
    on_disk = b"".join((tmp_path / name).read_bytes() for name in os.listdir(tmp_path)
                       if name.startswith("tokens.db"))
    for token in tokens:
        assert token.encode() not in on_disk
        assert hashlib.sha256(token.encode()).hexdigest().encode() in on_disk


def test_env_var_config(run_token, tmp_path, monkeypatch):
    (tmp_path / "other.ini").write_text("[gateway]\nport = 7123\ndatabase = other.db\n")
    monkeypatch.setenv("VNCGATE_CONFIG", str(tmp_path / "other.ini"))
    url = run_token("add", "--host", "h", "--port", "1", "--type", "xvp-vnc", config=None, check=0).stdout
    assert url.startswith("http://127.0.0.1:7123/console?token=")
    assert (tmp_path / "other.db").exists()


def test_policy_flags_are_kept_with_the_token(run_token):
    added = json.loads(run_token("add", "--host", "h", "--port", "5900", "--view-only", "--single-use",
                                 "--paste-as-keys", "--input-idle", "45", "--json", check=0).stdout)
    expected = {"view_only": True, "single_use": True, "paste_as_keys": True, "input_idle": 45.0}
    assert added["policy"] == expected
    plain = json.loads(run_token("add", "--host", "h", "--port", "5901", "--json", check=0).stdout)
    assert plain["policy"] == {"view_only": False, "single_use": False, "paste_as_keys": False, "input_idle": 0.0}
    listed = {row["port"]: row["policy"] for row in json.loads(run_token("list", "--json", check=0).stdout)}
    assert listed == {5900: expected, 5901: plain["policy"]}
