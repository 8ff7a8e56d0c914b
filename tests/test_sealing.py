import pytest

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
