"""The control-plane API's keys: the key file (NAME:SHA256-HEX per line, never the key),
read at start and on SIGHUP, and the vncgate-token api-key add / remove that write it.
"""

import hashlib
import os
import re
import secrets

KEY_PREFIX = "vgk_"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


# -- API keys ---------------------------------------------------------------------------------

class KeyFileError(Exception):
    """The key file cannot be read or has a bad line; str() is one line."""


def hash_key(key):
    return hashlib.sha256(key.encode()).hexdigest()


def read_keys(path):
    """{name: sha256 hex} from the key file; blank lines and # comments are skipped."""
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
        name, _, digest = line.partition(":")
        if not _NAME.fullmatch(name) or not _HEX64.fullmatch(digest.lower()):
            raise KeyFileError(f"{path}:{number}: not NAME:SHA256-HEX")
        if name in keys:
            raise KeyFileError(f"{path}:{number}: key name {name!r} appears twice")
        keys[name] = digest.lower()
    return keys


def add_key(path, name):
    """A new key named name, its hash appended to the file (made 0600); returns the key."""
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
            handle.write(f"{name}:{hash_key(key)}\n")
    except OSError as error:
        raise KeyFileError(f"cannot write api_keys_file {path}: {error.strerror}") from None
    return key


def remove_key(path, name):
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
