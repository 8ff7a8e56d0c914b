"""The token store over a fake clock: states, every flag of every call, schema, safety."""

import secrets
import sqlite3

import pytest

from vncgate import store as store_module
from vncgate.config import Config
from vncgate.control.minting import mint
from vncgate.store import TokenRejected, TokenStore

T0 = 1000.0  # FakeClock's start; tokens below are minted then, ttl 300, idle_timeout 600

# name -> (ttl, touched_at or None, revoked, now). The comments give the state at `now`.
CASES = {
    "live": (300, None, False, 1100),           # fresh
    "at-expiry": (300, None, False, 1300),      # now == expires_at: not yet expired
    "expired": (300, 1350, False, 1400),        # past expiry, used 50 s ago
    "idle": (5000, None, False, 1700),          # unexpired, unused for 700 s
    "garbage": (300, None, False, 1700),        # expired and idle
    "revoked": (300, None, True, 1100),
}
FOUND_BY_GET = {"live", "at-expiry", "idle"}
BY_INSTANCE = {  # (include_idle, include_expired) -> states returned
    (True, False): {"live", "at-expiry", "idle"},
    (False, False): {"live", "at-expiry"},
    (True, True): {"live", "at-expiry", "idle", "expired", "garbage"},
    (False, True): {"live", "at-expiry", "expired"},
}
BY_HOST = {True: {"idle", "garbage"}, False: {"live", "at-expiry", "expired", "idle", "garbage"}}
VALIDATE_REJECTS = {"expired": "expired-token", "garbage": "expired-token", "revoked": "unknown-token"}
PURGED = {"garbage"}


def make(store, clock, case):
    ttl, touched_at, revoked, now = CASES[case]
    token = store.add_connection_details("vm-1", "ws-vnc", "10.0.0.5", 5901, ttl=ttl)
    if touched_at is not None:
        clock.now = touched_at
        assert store.touch_connection_details([token]) == 1
    if revoked:
        assert store.delete_connection_details([token]) == 1
    clock.now = now
    return token


@pytest.mark.parametrize("case", CASES)
def test_get_connection_details(store, clock, case):
    token = make(store, clock, case)
    found = store.get_connection_details(token)
    assert (found is not None) == (case in FOUND_BY_GET)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("include_idle, include_expired", BY_INSTANCE)
def test_get_by_instance_flags(store, clock, case, include_idle, include_expired):
    make(store, clock, case)
    rows = store.get_connection_details_by_instance("vm-1", include_idle=include_idle,
                                                    include_expired=include_expired)
    assert len(rows) == (case in BY_INSTANCE[include_idle, include_expired])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("only_idle", [True, False])
def test_get_by_host_flags(store, clock, case, only_idle):
    make(store, clock, case)
    assert len(store.get_connection_details_by_host("10.0.0.5", only_idle=only_idle)) == (
        case in BY_HOST[only_idle])


def test_by_instance_and_host_defaults(store, clock):
    make(store, clock, "idle")
    assert len(store.get_connection_details_by_instance("vm-1")) == 1  # include_idle=True
    assert len(store.get_connection_details_by_host("10.0.0.5")) == 1  # only_idle=True
    assert store.get_connection_details_by_instance("vm-2") == []
    assert store.get_connection_details_by_host("10.0.0.6") == []


@pytest.mark.parametrize("case", CASES)
def test_validate(store, clock, case):
    token = make(store, clock, case)
    if case in VALIDATE_REJECTS:
        with pytest.raises(TokenRejected) as rejected:
            store.validate(token, "ws-vnc")
        assert rejected.value.reason == VALIDATE_REJECTS[case]
    else:
        details = store.validate(token, "ws-vnc")
        assert details.updated_at == clock.now  # a new connection counts as use
        assert not details.is_idle(clock.now, store.idle_timeout)


@pytest.mark.parametrize("case", CASES)
def test_touch_makes_a_token_not_idle(store, clock, case):
    token = make(store, clock, case)
    assert store.touch_connection_details([token]) == (0 if case == "revoked" else 1)
    rows = store.get_connection_details_by_instance("vm-1", include_idle=False, include_expired=True)
    assert len(rows) == (0 if case == "revoked" else 1)


@pytest.mark.parametrize("case", CASES)
def test_purge_deletes_only_garbage(store, clock, case):
    make(store, clock, case)
    assert store.purge() == (1 if case in PURGED else 0)
    remaining = store.list_details(include_expired=True)
    assert len(remaining) == (0 if case in PURGED or case == "revoked" else 1)


@pytest.mark.parametrize("case", CASES)
def test_state_and_counts(store, clock, case):
    make(store, clock, case)
    counts = store.count_by_state()
    if case == "revoked":
        assert sum(counts.values()) == 0
    else:
        expected = "live" if case == "at-expiry" else case
        assert counts[expected] == 1 and sum(counts.values()) == 1
        row, = store.list_details(include_expired=True)
        assert row.state(clock.now, store.idle_timeout) == expected


def test_token_is_bound_to_its_console_type(store):
    token = store.add_connection_details("vm-1", "xvp-vnc", "h", 5900)
    with pytest.raises(TokenRejected) as rejected:
        store.validate(token, "ws-vnc")
    assert rejected.value.reason == "wrong-console-type"
    assert store.validate(token, "xvp-vnc").console_type == "xvp-vnc"


def test_unknown_console_type_is_refused_at_mint(store):
    with pytest.raises(ValueError, match="unknown console type"):
        store.add_connection_details("vm-1", "spice", "h", 5900)
    assert store.list_details(include_expired=True) == []


def test_tokens_are_long_unique_and_stored_only_as_hashes(store, stored_bytes):
    tokens = [store.add_connection_details("vm", "ws-vnc", "h", 5900, backend_password=b"s3cretpw")
              for _ in range(50)]
    assert len(set(tokens)) == 50
    assert all(len(token) >= 22 for token in tokens)  # >= 128 bits of urlsafe base64
    store.close()
    on_disk = stored_bytes()
    assert on_disk, "the store should hold something"
    for token in tokens:
        assert token.encode() not in on_disk
        assert store_module.hash_token(token).encode() in on_disk
    assert b"s3cretpw" not in on_disk


def test_backend_password_is_opened_only_with_the_token(store):
    token = store.add_connection_details("vm", "ws-vnc", "h", 5900, backend_password=b"pw")
    assert store.get_connection_details(token).backend_password is None
    assert store.get_connection_details(token).has_password
    assert store.validate(token, "ws-vnc").backend_password == b"pw"


def test_expires_at_is_fixed_at_mint(store, clock):
    token = store.add_connection_details("vm", "ws-vnc", "h", 5900, ttl=42)
    clock.advance(30)
    store.touch_connection_details([token])
    assert store.get_connection_details(token).expires_at == 1042


def test_migration_from_version_1_keeps_rows(tmp_path, clock):
    path = str(tmp_path / "old.db")
    old = sqlite3.connect(path)
    store_module.MIGRATIONS[0](old)
    old.execute("INSERT INTO console_tokens VALUES (?, 'vm-old', 'ws-vnc', 'h', 5900, '', '', 1, 1, 5000)",
                (store_module.hash_token("old-token"),))
    old.execute("PRAGMA user_version = 1")
    old.commit()
    old.close()
    upgraded = TokenStore(path, clock=clock)
    details = upgraded.validate("old-token", "ws-vnc")
    assert details.instance_id == "vm-old" and not details.has_password
    upgraded.add_connection_details("vm-new", "ws-vnc", "h", 5900, backend_password=b"x")
    version = sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0]
    assert version == store_module.SCHEMA_VERSION


def test_newer_schema_is_refused_clearly(tmp_path):
    path = str(tmp_path / "future.db")
    future = sqlite3.connect(path)
    future.execute(f"PRAGMA user_version = {store_module.SCHEMA_VERSION + 1}")
    future.commit()
    future.close()
    with pytest.raises(store_module.StoreError, match="newer than this vncgate knows"):
        TokenStore(path)


def test_a_file_that_is_not_sqlite_is_refused_and_kept(tmp_path):
    path = tmp_path / "notes.db"
    path.write_bytes(b"these are my notes, not a database\n" * 200)
    before = path.read_bytes()
    with pytest.raises(store_module.StoreError, match="not a vncgate SQLite database"):
        TokenStore(str(path))
    assert path.read_bytes() == before


def test_a_vanished_database_file_is_an_outage_not_a_new_empty_store(tmp_path, clock):
    path = tmp_path / "gone.db"
    store = TokenStore(str(path), clock=clock)
    token = store.add_connection_details("vm", "xvp-vnc", "h", 5900)
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"gone.db{suffix}").unlink(missing_ok=True)
    with pytest.raises(store_module.StoreError, match="has vanished"):
        store.validate(token, "xvp-vnc")
    assert not path.exists()


def test_a_replaced_database_file_is_reopened(tmp_path, clock):
    live, backup = tmp_path / "live.db", tmp_path / "backup.db"
    store = TokenStore(str(live), clock=clock)
    old = store.add_connection_details("vm-old", "xvp-vnc", "h", 5900)
    other = TokenStore(str(backup), clock=clock)
    restored = other.add_connection_details("vm-restored", "xvp-vnc", "h", 5900)
    other.close()
    backup.replace(live)  # an operator restores a backup over the live file
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"live.db{suffix}").unlink(missing_ok=True)
    assert store.validate(restored, "xvp-vnc").instance_id == "vm-restored"
    with pytest.raises(TokenRejected):
        store.validate(old, "xvp-vnc")


def test_tokens_never_start_with_a_dash(store, monkeypatch):
    draws = iter(["-looks-like-an-option", "-again", "fine-token"])
    monkeypatch.setattr(secrets, "token_urlsafe", lambda _size: next(draws))
    assert store.add_connection_details("vm", "ws-vnc", "h", 5900) == "fine-token"


def test_sessions_are_listed_and_removed_together(store):
    for number in range(3):
        store.record_session(f"s{number}", "gw-1", f"hash{number}", f"vm-{number}", "xvp-vnc", "127.0.0.1:1", 30)
    store.remove_sessions(["s0", "s2", "never-there"])
    assert [session.session_id for session in store.list_sessions()] == ["s1"]
    store.remove_sessions([])
    assert [session.instance_id for session in store.list_sessions()] == ["vm-1"]


# -- per-token shares, follow leases, the recordings index (issue 27) ---------------------------

def test_shares_are_capped_per_token_and_lapse_without_renewal(store, clock):
    one, other = "a" * 64, "b" * 64
    assert store.take_share(one, "s1", 2, 10) == (True, 0)
    assert store.take_share(one, "s2", 2, 10, recorded=True) == (True, 1)
    assert store.take_share(one, "s3", 2, 10) == (False, 2)
    assert store.take_share(other, "s4", 2, 10) == (True, 0)  # another token's count
    assert store.token_usage(one) == (2, 1)
    clock.advance(8)
    store.renew_shares({"s1": one}, 10)
    clock.advance(5)  # s2 lapsed (its gateway died); s1 was renewed
    assert store.token_usage(one) == (1, 0)
    assert store.take_share(one, "s5", 2, 10) == (True, 1)
    store.release_shares({"s1": one, "s5": one})
    assert store.token_usage(one) == (0, 0)
    assert store.take_share(one, "s6", 2, 10) == (True, 0)


def test_a_follow_lease_has_one_holder_until_it_lapses_or_is_let_go(store, clock):
    assert store.claim_follows("gw-a", ["vm-1", "vm-2"], 3) == {"vm-1", "vm-2"}
    assert store.claim_follows("gw-b", ["vm-1", "vm-2", "vm-3"], 3) == {"vm-3"}
    assert store.follow_holder("vm-1") == "gw-a" and store.follow_holder("vm-9") is None
    clock.advance(2)
    assert store.claim_follows("gw-a", ["vm-1"], 3) == {"vm-1"}  # renewed; vm-2 is not
    clock.advance(2)
    assert store.claim_follows("gw-b", ["vm-1", "vm-2"], 3) == {"vm-2"}
    store.release_follows("gw-b", ["vm-2", "vm-1"])  # only its own go
    assert store.follow_holder("vm-2") is None and store.follow_holder("vm-1") == "gw-a"


def test_the_recordings_index_lists_every_gateways_recordings(store):
    for number, (instance, gateway) in enumerate((("vm-1", "gw-a"), ("vm-2", "gw-b"), ("vm-1", "gw-b"))):
        store.index_recording({"session_id": f"{number:012x}", "instance_id": instance, "started_at": 100 - number,
                               "gateway_id": gateway, "bytes": 0})
    store.index_recording({"session_id": "000000000000", "instance_id": "vm-1", "started_at": 100,
                           "gateway_id": "gw-a", "bytes": 42})  # updated at its end
    rows = store.list_recordings()
    assert [row["session_id"] for row in rows] == ["000000000002", "000000000001", "000000000000"]
    assert rows[-1]["bytes"] == 42
    assert [row["gateway_id"] for row in store.list_recordings(instance_id="vm-1")] == ["gw-b", "gw-a"]
    store.remove_recordings(["000000000002", "000000000000"])
    assert [row["session_id"] for row in store.list_recordings()] == ["000000000001"]


def test_lapsed_shares_of_tokens_nobody_uses_again_are_purged(store, clock):
    token_hash = store_module.hash_token(store.add_connection_details("vm", "xvp-vnc", "h", 1))
    assert store.take_share(token_hash, "s1", 2, 10) == (True, 0)
    clock.advance(11)  # its gateway died
    store.purge_lapsed_shares()
    assert store.token_usage(token_hash) == (0, 0)
    if isinstance(store, store_module.SqliteStore):  # no row is left behind
        with store._db() as db:
            assert db.execute("SELECT COUNT(*) FROM token_shares").fetchone()[0] == 0


def test_a_kill_request_naming_no_session_marks_none(store):
    """Both engines answer 0 (SQLite raised TypeError when given neither ids nor an instance)."""
    store.record_session("s0", "gw-1", "hash0", "vm-0", "xvp-vnc", "127.0.0.1:1", 30)
    assert store.request_kill() == 0
    assert store.request_kill(session_ids=[]) == 0
    assert store.update_sessions({"s0": (0, 0)}) == set()


def test_mint_refuses_a_token_that_expired_before_it_was_read_back(store, clock, monkeypatch):
    """A ttl shorter than the store's own write (a replica's WAIT): a StoreError line, not
    details of None for the API's or the CLI's JSON to fail on."""
    ticks = iter(range(10))  # every read of the clock: one second later
    monkeypatch.setattr(store, "clock", lambda: clock.now + next(ticks))
    with pytest.raises(store_module.StoreError, match="expired before it was read back"):
        mint(Config(), store, "ws-vnc", "10.0.0.5", 5901, ttl=1.0)
