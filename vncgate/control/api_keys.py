"""The control-plane API's keys: the key file (NAME:SHA256-HEX per line, never the key, then
the key's scope as words), read at start and on SIGHUP, and the vncgate-token api-key add /
remove that write it.
"""

from __future__ import annotations

import collections
import hashlib
import os
import re
import secrets

from vncgate import store as store_module
from vncgate.control import scope as scope_module

KEY_PREFIX = "vgk_"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


# -- API keys ---------------------------------------------------------------------------------

class KeyFileError(Exception):
    """The key file cannot be read or has a bad line; str() is one line."""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


ApiKey = collections.namedtuple("ApiKey", "digest scope")


def read_keys(path: str) -> dict[str, ApiKey]:
    """{name: ApiKey(sha256 hex, scope.KeyScope)} from the key file: NAME:SHA256-HEX, then the
    key's scope as words (networks=…, types=…, max-ttl=…); blank lines and # comments are skipped."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as error:
        raise KeyFileError(f"cannot read api_keys_file {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise KeyFileError(f"api_keys_file {path} is not UTF-8 text") from None
    keys = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition(":")
        digest, *words = rest.split() or [""]
        if not _NAME.fullmatch(name) or not _HEX64.fullmatch(digest.lower()):
            raise KeyFileError(f"{path}:{number}: not NAME:SHA256-HEX [SCOPE]")
        if name in keys:
            raise KeyFileError(f"{path}:{number}: key name {name!r} appears twice")
        try:
            keys[name] = ApiKey(digest.lower(), scope_module.KeyScope.parse(words, store_module.CONSOLE_TYPES))
        except ValueError as error:
            raise KeyFileError(f"{path}:{number}: bad scope: {error}") from None
    return keys


def add_key(path: str, name: str, scope: scope_module.KeyScope | None = None) -> str:
    """A new key named name, its hash (and scope.KeyScope) appended to the file (made 0600);
    returns the key."""
    if not _NAME.fullmatch(name):
        raise KeyFileError(f"key name {name!r}: letters, digits, '.', '_', '-' (at most 64), "
                           "starting with a letter or digit")
    keys = read_keys(path) if os.path.exists(path) else {}
    if name in keys:
        raise KeyFileError(f"{path} already has a key named {name!r}")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as handle:
            words = scope.words() if scope else ""
            handle.write(f"{name}:{hash_key(key)}{' ' + words if words else ''}\n")
    except OSError as error:
        raise KeyFileError(f"cannot write api_keys_file {path}: {error.strerror}") from None
    return key


def remove_key(path: str, name: str) -> None:
    """Delete the named key's line (rewritten atomically); the gateway drops it on SIGHUP."""
    if name not in read_keys(path):
        raise KeyFileError(f"{path} has no key named {name!r}")
    with open(path, encoding="utf-8") as handle:
        kept = [line for line in handle if line.strip().partition(":")[0] != name]
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.writelines(kept)
        os.replace(temporary, path)
    except OSError as error:
        raise KeyFileError(f"cannot write api_keys_file {path}: {error.strerror}") from None
