import pytest

from vncgate import config
from vncgate.store import common as store_common
from vncgate.store import sealing


def test_round_trip_for_many_lengths():
    for length in (1, 8, 31, 32, 33, 100):
        secret = bytes(range(length))
        assert sealing.unseal("token-a", sealing.seal("token-a", secret)) == secret


def test_sealing_is_randomised():
    assert sealing.seal("t", b"password") != sealing.seal("t", b"password")


def test_another_token_cannot_open_it():
    with pytest.raises(sealing.SealError, match="does not match"):
        sealing.unseal("token-b", sealing.seal("token-a", b"password"))


@pytest.mark.parametrize("position", [0, 5, 20, -1])
def test_any_altered_byte_is_detected(position):
    blob = bytearray(sealing.seal("t", b"password"))
    blob[position] ^= 0x01
    with pytest.raises(sealing.SealError):
        sealing.unseal("t", bytes(blob))


def test_truncated_blob_is_malformed():
    with pytest.raises(sealing.SealError, match="malformed"):
        sealing.unseal("t", b"\x01short")


HELD = b"a key of the gateways' own, 32+ bytes"


def test_sealed_twice_opens_with_the_token_or_the_held_key_and_nothing_else():
    blob = sealing.seal("token-a", b"password", HELD)
    assert sealing.unseal("token-a", blob) == b"password"
    assert sealing.unseal_held(HELD, blob) == b"password"
    with pytest.raises(sealing.SealError, match="does not match"):
        sealing.unseal_held(b"another key of the same length!!!!!!!", blob)
    with pytest.raises(sealing.SealError, match="does not match"):
        sealing.unseal("token-b", blob)
    with pytest.raises(sealing.SealError, match="without screenshot_key_file"):
        sealing.unseal_held(HELD, sealing.seal("token-a", b"password"))
    altered = bytearray(blob)
    altered[-1] ^= 0x01
    with pytest.raises(sealing.SealError):
        sealing.unseal_held(HELD, bytes(altered))
    assert sealing.unseal("token-a", bytes(altered)) == b"password"  # the token's part is whole


def test_each_engine_keeps_the_twice_sealed_password_for_screenshots(store):
    token = store.add_connection_details("vm-1", "ws-vnc", "10.0.0.1", 5900, backend_password=b"pw", held_key=HELD)
    plain = store.add_connection_details("vm-2", "ws-vnc", "10.0.0.1", 5901)
    assert store.validate(token, "ws-vnc").backend_password == b"pw"
    assert sealing.unseal_held(HELD, store.sealed_secret(store_common.hash_token(token))) == b"pw"
    assert store.sealed_secret(store_common.hash_token(plain)) is None
    assert store.sealed_secret("0" * 64) is None


def test_the_key_file_is_read_or_refused_in_one_line(tmp_path):
    assert config.read_key_file("") is None
    path = tmp_path / "key"
    path.write_bytes(b"  " + HELD + b"\n")
    assert config.read_key_file(str(path)) == HELD
    path.write_bytes(b"short\n")
    with pytest.raises(config.ConfigError, match="holds 5 bytes"):
        config.read_key_file(str(path))
    with pytest.raises(config.ConfigError, match="cannot read screenshot_key_file"):
        config.read_key_file(str(tmp_path / "missing"))
