"""Sealing a backend secret (a VNC password) under a key only the token gives.

The store keeps a token's SHA-256 hash, never the token, so a secret sealed
under a key derived from the token cannot be opened from a copy of the
database. Built from the standard library's HMAC-SHA256 alone: a keystream of
HMAC(enc_key, nonce || counter) blocks (a PRF in counter mode) and an
encrypt-then-MAC tag, so no third-party cipher package is needed.

When the operator gives the gateways a key of their own (screenshot_key_file), the secret
is sealed twice in one blob (version 2): under the token, as always, and under that key,
so that a gateway can open it without the token (to take a screenshot of the console).
A copy of the database alone still opens nothing; with the key file too, it does.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct

_NONCE = 16
_TAG = 16
_VERSION = b"\x01"
_TWICE = b"\x02"  # the token's blob, then the held key's
_TOKEN_LABEL = b"vncgate backend secret v1"
_HELD_LABEL = b"vncgate held backend secret v1"


class SealError(Exception):
    """The sealed blob was not made with this token, or was altered."""


def _keys(secret: bytes, label: bytes = _TOKEN_LABEL) -> tuple[bytes, bytes]:
    master = hmac.new(secret, label, hashlib.sha256).digest()
    enc = hmac.new(master, b"encrypt", hashlib.sha256).digest()
    mac = hmac.new(master, b"authenticate", hashlib.sha256).digest()
    return enc, mac


def _keystream(key: bytes, nonce: bytes, length: int) -> bytes:
    blocks = (hmac.new(key, nonce + counter.to_bytes(8, "big"), hashlib.sha256).digest()
              for counter in range((length + 31) // 32))
    return b"".join(blocks)[:length]


def _xor(data: bytes, stream: bytes) -> bytes:
    return (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(len(data), "big")


def seal(token: str, secret: bytes, held_key: bytes | None = None) -> bytes:
    """secret sealed under token; and under held_key too, when given."""
    blob = _seal(_keys(token.encode()), secret)
    if held_key is None:
        return blob
    return _TWICE + struct.pack("!H", len(blob)) + blob + _seal(_keys(held_key, _HELD_LABEL), secret)


def _parts(blob: bytes) -> tuple[bytes, bytes | None]:
    """(the token's blob, the held key's blob or None)."""
    if blob[:1] != _TWICE:
        return blob, None
    if len(blob) < 3:
        raise SealError("sealed secret is malformed")
    length = struct.unpack("!H", blob[1:3])[0]
    return blob[3:3 + length], blob[3 + length:]


def _seal(keys: tuple[bytes, bytes], secret: bytes) -> bytes:
    enc, mac = keys
    nonce = secrets.token_bytes(_NONCE)
    body = _xor(secret, _keystream(enc, nonce, len(secret)))
    tag = hmac.new(mac, _VERSION + nonce + body, hashlib.sha256).digest()[:_TAG]
    return _VERSION + nonce + body + tag


def unseal(token: str, blob: bytes) -> bytes:
    return _open(_keys(token.encode()), _parts(blob)[0])


def unseal_held(held_key: bytes, blob: bytes) -> bytes:
    """The secret, opened with the gateways' own key; SealError when it was not sealed under it
    (minted before screenshot_key_file was set, or under another key)."""
    held = _parts(blob)[1]
    if held is None:
        raise SealError("sealed under the token only (minted without screenshot_key_file)")
    return _open(_keys(held_key, _HELD_LABEL), held)


def _open(keys: tuple[bytes, bytes], blob: bytes) -> bytes:
    if len(blob) < 1 + _NONCE + _TAG or blob[:1] != _VERSION:
        raise SealError("sealed secret is malformed")
    enc, mac = keys
    nonce, body, tag = blob[1:1 + _NONCE], blob[1 + _NONCE:-_TAG], blob[-_TAG:]
    expected = hmac.new(mac, _VERSION + nonce + body, hashlib.sha256).digest()[:_TAG]
    if not hmac.compare_digest(tag, expected):
        raise SealError("sealed secret does not match this token")
    return _xor(body, _keystream(enc, nonce, len(body)))
