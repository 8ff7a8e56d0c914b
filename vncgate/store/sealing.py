"""Sealing a backend secret (a VNC password) under a key only the token gives.

The store keeps a token's SHA-256 hash, never the token, so a secret sealed
under a key derived from the token cannot be opened from a copy of the
database. Built from the standard library's HMAC-SHA256 alone: a keystream of
HMAC(enc_key, nonce || counter) blocks (a PRF in counter mode) and an
encrypt-then-MAC tag, so no third-party cipher package is needed.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

_NONCE = 16
_TAG = 16
_VERSION = b"\x01"


class SealError(Exception):
    """The sealed blob was not made with this token, or was altered."""


def _keys(token: str) -> tuple[bytes, bytes]:
    master = hmac.new(token.encode(), b"vncgate backend secret v1", hashlib.sha256).digest()
    enc = hmac.new(master, b"encrypt", hashlib.sha256).digest()
    mac = hmac.new(master, b"authenticate", hashlib.sha256).digest()
    return enc, mac


def _keystream(key: bytes, nonce: bytes, length: int) -> bytes:
    blocks = (hmac.new(key, nonce + counter.to_bytes(8, "big"), hashlib.sha256).digest()
              for counter in range((length + 31) // 32))
    return b"".join(blocks)[:length]


def _xor(data: bytes, stream: bytes) -> bytes:
    return (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(len(data), "big")


def seal(token: str, secret: bytes) -> bytes:
    """secret sealed under a key derived from token: version, nonce, body, tag."""
    enc, mac = _keys(token)
    nonce = secrets.token_bytes(_NONCE)
    body = _xor(secret, _keystream(enc, nonce, len(secret)))
    tag = hmac.new(mac, _VERSION + nonce + body, hashlib.sha256).digest()[:_TAG]
    return _VERSION + nonce + body + tag


def unseal(token: str, blob: bytes) -> bytes:
    """The secret seal() sealed under token; SealError when blob is not that."""
    if len(blob) < 1 + _NONCE + _TAG or blob[:1] != _VERSION:
        raise SealError("sealed secret is malformed")
    enc, mac = _keys(token)
    nonce, body, tag = blob[1:1 + _NONCE], blob[1 + _NONCE:-_TAG], blob[-_TAG:]
    expected = hmac.new(mac, _VERSION + nonce + body, hashlib.sha256).digest()[:_TAG]
    if not hmac.compare_digest(tag, expected):
        raise SealError("sealed secret does not match this token")
    return _xor(body, _keystream(enc, nonce, len(body)))
