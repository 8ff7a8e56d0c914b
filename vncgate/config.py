"""The [gateway] section of vncgate.ini: schema, defaults, validation.

Every key has a default, so the gateway starts with no file at all. A bad file
raises ConfigError whose message names the file, the key and the problem in one
line, because that line is all an operator sees.
"""

from __future__ import annotations

import configparser
import dataclasses
import ipaddress
import os
import re
import urllib.parse
from collections.abc import Callable

from vncgate import addresses, store

SECTION = "gateway"
ENV_VAR = "VNCGATE_CONFIG"
DEFAULT_FILE = "vncgate.ini"


class ConfigError(Exception):
    """A configuration problem a user can fix; str() is one line."""


def _text(value: str) -> str:
    return value.strip()


def _port(value: str) -> int:
    port = int(value)
    if not 1 <= port <= 65535:
        raise ValueError("must be from 1 to 65535")
    return port


def _positive(kind: type[float]) -> Callable[[str], float]:
    def parse(value: str) -> float:
        number = kind(value)
        if number <= 0:
            raise ValueError("must be greater than 0")
        return number
    parse.__name__ = kind.__name__
    return parse


def _not_negative(value: str) -> float:
    number = float(value)
    if number < 0:
        raise ValueError("must be 0 or more")
    return number


def _bytes(value: str) -> int:
    """A size in bytes, 0 or more (0: no bound)."""
    number = int(value)
    if number < 0:
        raise ValueError("must be 0 or more")
    return number


def _percent(value: str) -> float:
    number = float(value)
    if not 0 <= number < 100:
        raise ValueError("must be from 0 to less than 100")
    return number


def _prefix(bits: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        number = int(value)
        if not 0 < number <= bits:
            raise ValueError(f"must be from 1 to {bits}")
        return number
    parse.__name__ = "int"
    return parse


def _bool(value: str) -> bool:
    words = {"true": True, "yes": True, "on": True, "1": True,
             "false": False, "no": False, "off": False, "0": False}
    try:
        return words[value.strip().lower()]
    except KeyError:
        raise ValueError("must be true or false") from None


def _origins(value: str) -> tuple[str, ...]:
    return tuple(item for item in (part.strip() for part in value.replace(",", " ").split()) if item)


# A CSP host-source: scheme://host[:port], the host may start with "*."; or 'self' / 'none'.
_SOURCE = re.compile(r"(?:https?://)?(?:\*\.)?[a-z0-9.-]+(?::(?:[0-9]{1,5}|\*))?|'self'|'none'")


def _frame_ancestors(value: str) -> tuple:
    """Sources allowed to frame the console pages (Content-Security-Policy frame-ancestors)."""
    sources = _origins(value.lower())
    bad = [item for item in sources if not _SOURCE.fullmatch(item)]
    if bad:
        raise ValueError(f"{bad[0]!r} is not an origin such as https://panel.example.com")
    return sources


def _key_prefix(value: str) -> str:
    value = value.strip()
    if not value or any(char.isspace() for char in value):
        raise ValueError("must be a non-empty word without spaces")
    return value


def _networks(value: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Addresses or CIDR networks, separated by commas or spaces."""
    try:
        return tuple(ipaddress.ip_network(item, strict=False) for item in _origins(value))
    except ValueError as error:
        raise ValueError(f"must be addresses or networks ({error})") from None


def _backend_allow(value: str) -> tuple[addresses.Reach, ...]:
    """Networks and port ranges where consoles live (vncgate.addresses' syntax)."""
    try:
        return addresses.parse(value)
    except ValueError as error:
        raise ValueError(f"must be networks with optional ports ({error})") from None


# key -> its parser (a ValueError says what is wrong); Config below holds the defaults.
PARSERS = {
    "listen": _text,
    "port": _port,
    "public_url": _text,
    "database": _text,
    "key_prefix": _key_prefix,
    "token_ttl": _positive(float),
    "idle_timeout": _positive(float),
    "touch_interval": _positive(float),
    "housekeeping_interval": _positive(float),
    "web_root": _text,
    "allowed_origins": _origins,
    "frame_ancestors": _frame_ancestors,
    "cert": _text,
    "key": _text,
    "tls_only": _bool,
    "max_connections": _positive(int),
    "max_pending_per_address": _positive(int),
    "max_sessions_per_token": _positive(int),
    "failed_token_burst": _positive(int),
    "failed_token_rate": _positive(float),
    "handshake_timeout": _positive(float),
    "request_head_timeout": _positive(float),
    "address_prefix_v4": _prefix(32),
    "address_prefix_v6": _prefix(128),
    "audit_log": _text,
    "audit_max_bytes": _bytes,
    "audit_keep": _positive(int),
    "metrics_allow": _networks,
    "trusted_proxies": _networks,
    "drain_timeout": _not_negative,
    "drain_notice": _not_negative,
    "backend_allow": _backend_allow,
    # console policies
    "resume_grace": _positive(float),
    "paste_max_chars": _positive(int),
    "input_idle_timeout": _not_negative,
    "api_keys_file": _text,
    "api_burst": _positive(int),
    "api_rate": _positive(float),
    "backend_ca": _text,
    "backend_cert": _text,
    "backend_key": _text,
    "console_log_dir": _text,
    "console_log_bytes": _positive(int),
    "record_dir": _text,
    "record_all": _bool,
    "record_max_bytes": _positive(int),
    "record_keep_days": _positive(float),
    "screenshot_max_concurrent": _positive(int),
    "screenshot_timeout": _positive(float),
    "screenshot_max_pixels": _positive(int),
    "screenshot_key_file": _text,
    "record_dir_max_bytes": _bytes,
    "record_min_free": _percent,
}

# Where an installed noVNC is found when web_root = auto.
NOVNC_DIRS = ("/usr/share/novnc", "/usr/local/share/novnc")


@dataclasses.dataclass(frozen=True)
class Config:
    """Every key of [gateway] and its default, written here only: what an empty file yields
    before load() resolves the paths against the file's folder (and web_root = auto to an
    installed noVNC)."""
    listen: str = "127.0.0.1"
    port: int = 6080
    public_url: str = ""
    database: str = "vncgate.db"
    key_prefix: str = store.DEFAULT_PREFIX
    token_ttl: float = 300.0
    idle_timeout: float = 600.0
    touch_interval: float = 30.0
    housekeeping_interval: float = 60.0
    web_root: str = "auto"
    allowed_origins: tuple = ()
    frame_ancestors: tuple = ()  # besides 'self': the panels that may embed the console pages
    cert: str = ""
    key: str = ""
    tls_only: bool = False
    max_connections: int = 1000
    max_pending_per_address: int = 50
    max_sessions_per_token: int = 10
    failed_token_burst: int = 10
    failed_token_rate: float = 1.0
    handshake_timeout: float = 10.0
    request_head_timeout: float = 3.0  # the request head's own deadline, inside handshake_timeout
    address_prefix_v4: int = 24  # per-address shares and failures: one per /24 ...
    address_prefix_v6: int = 64  # ... and one per /64
    audit_log: str = ""
    audit_max_bytes: int = 100 << 20  # the audit file rotated past this; 0: never (logrotate's job)
    audit_keep: int = 5  # rotated audit files kept
    metrics_allow: tuple = _networks("127.0.0.0/8, ::1")
    trusted_proxies: tuple = ()  # whose PROXY and forwarding headers name the client
    drain_timeout: float = 0.0  # SIGTERM: seconds live sessions may go on; 0: they end at once
    drain_notice: float = 5.0  # of those, seconds new consoles are still served (the balancer notices)
    # Where consoles may be reached (addresses.Reach items); empty: anywhere but link-local,
    # the gateway's own port and the store (console.allow).
    backend_allow: tuple = ()
    resume_grace: float = 30.0
    paste_max_chars: int = 4096
    input_idle_timeout: float = 0.0  # 0: off
    api_keys_file: str = ""
    api_burst: int = 60
    api_rate: float = 10.0
    backend_ca: str = ""  # empty: the system's trust store checks consoles' certificates
    backend_cert: str = ""
    backend_key: str = ""
    console_log_dir: str = "console-logs"
    console_log_bytes: int = 1024 * 1024
    record_dir: str = "recordings"
    record_all: bool = False
    record_max_bytes: int = 1 << 30
    record_keep_days: float = 30.0
    screenshot_max_concurrent: int = 4  # screenshots in flight on one gateway; more answer 503
    screenshot_timeout: float = 10.0  # seconds for one screenshot, from connect to the last pixel
    screenshot_max_pixels: int = 3840 * 2160  # a larger console is refused before any buffer is made
    screenshot_key_file: str = ""  # the gateways' own key: passwords sealed under it too (screenshots)
    record_dir_max_bytes: int = 10 << 30  # record_dir as a whole; the oldest finished pruned; 0: no bound
    record_min_free: float = 5.0  # percent of the filesystem kept free: no recording below it
    source: str = ""  # the file read, "" when built-in defaults only (not a key)

    @property
    def base_url(self) -> str:
        """public_url, or the URL of the listening address when it is not set."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "localhost" if self.listen in ("0.0.0.0", "::") else self.listen
        if ":" in host:
            host = f"[{host}]"
        scheme = "https" if self.cert else "http"
        return f"{scheme}://{host}:{self.port}"

    @property
    def public_origin(self) -> str:
        parts = urllib.parse.urlsplit(self.base_url)
        return f"{parts.scheme}://{parts.netloc}".lower()


DEFAULTS = {field.name: field.default for field in dataclasses.fields(Config) if field.name != "source"}


def find_file(explicit: str | None = None) -> str | None:
    """The file to read: -c, else $VNCGATE_CONFIG, else ./vncgate.ini if present."""
    if explicit:
        return explicit
    if os.environ.get(ENV_VAR):
        return os.environ[ENV_VAR]
    return DEFAULT_FILE if os.path.exists(DEFAULT_FILE) else None


def load(path: str | None = None) -> Config:
    """Read the config; path=None means find_file(). Raises ConfigError."""
    path = find_file(path)
    if path is None:
        return _finish({}, base_dir=os.getcwd(), source="")
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config file: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: config file is not UTF-8 text") from None
    except configparser.Error as error:
        first_line = str(error).splitlines()[0]
        raise ConfigError(f"{path}: malformed config file: {first_line}") from None
    unknown_sections = [name for name in parser.sections() if name != SECTION]
    if unknown_sections:
        raise ConfigError(f"{path}: unknown section [{unknown_sections[0]}] (only [{SECTION}] is read)")
    raw = dict(parser[SECTION]) if parser.has_section(SECTION) else {}
    base_dir = os.path.dirname(os.path.abspath(path))
    return _finish(raw, base_dir=base_dir, source=path)


def _finish(raw, base_dir, source):
    values = dict(DEFAULTS)
    for key, text in raw.items():
        if key not in PARSERS:
            raise ConfigError(f"{source}: [{SECTION}] {key}: unknown key")
        parse = PARSERS[key]
        try:
            values[key] = parse(text)
        except ValueError as error:
            reason = str(error) if "must" in str(error) else f"must be {_kind(parse)}"
            raise ConfigError(f"{source}: [{SECTION}] {key}: {reason}, got {text!r}") from None

    check_database(values["database"], f"{source}: [{SECTION}] database")
    for key in ("database", "cert", "key", "audit_log", "api_keys_file", "backend_ca", "backend_cert", "backend_key",
                "console_log_dir", "record_dir", "screenshot_key_file"):
        if values[key] and not os.path.isabs(values[key]) and not store.is_redis_url(values[key]):
            values[key] = os.path.join(base_dir, values[key])
    values["web_root"] = _resolve_web_root(values["web_root"], base_dir)
    for cert, key in (("cert", "key"), ("backend_cert", "backend_key")):
        if bool(values[cert]) != bool(values[key]):
            raise ConfigError(f"{source}: [{SECTION}] {cert} and {key} must be set together")
    if values["tls_only"] and not values["cert"]:
        raise ConfigError(f"{source}: [{SECTION}] tls_only: needs cert and key")
    parts = urllib.parse.urlsplit(values["public_url"])
    if values["public_url"] and (parts.scheme not in ("http", "https") or not parts.netloc):
        raise ConfigError(f"{source}: [{SECTION}] public_url: must be an http:// or https:// URL, "
                          f"got {values['public_url']!r}")
    return Config(source=source, **values)


MIN_KEY_BYTES = 16


def read_key_file(path: str) -> bytes | None:
    """The gateways' own sealing key from screenshot_key_file (None when it is not set): its
    bytes, surrounding whitespace stripped. Raises ConfigError naming the file."""
    if not path:
        return None
    try:
        with open(path, "rb") as handle:
            key = handle.read().strip()
    except OSError as error:
        raise ConfigError(f"cannot read screenshot_key_file {path}: {error.strerror}") from None
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"screenshot_key_file {path} holds {len(key)} bytes; a key is at least {MIN_KEY_BYTES} "
                          "(e.g. head -c 32 /dev/urandom | base64)")
    return key


def check_database(database: str, where: str) -> None:
    """A file path, or a Redis URL the store can use; raises ConfigError starting with where.
    The message never shows a password."""
    if store.is_redis_url(database):
        try:
            store.RedisTarget.parse(database)
        except ValueError as error:
            parts = urllib.parse.urlsplit(database)
            shown = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
            raise ConfigError(f"{where}: {error}, got {shown!r}") from None
    elif "://" in database or not database:
        raise ConfigError(f"{where}: must be a file path or one of {store.URL_FORMS}, got {database!r}")


def _kind(parse: Callable[[str], object]) -> str:
    kinds = {"int": "a whole number", "float": "a number", "_not_negative": "a number", "_port": "a port number",
             "_bytes": "a whole number", "_percent": "a number"}
    return kinds.get(parse.__name__, "valid")


def _resolve_web_root(value: str, base_dir: str) -> str:
    if value.lower() == "auto":
        return next((path for path in NOVNC_DIRS if os.path.isfile(os.path.join(path, "vnc.html"))), "")
    if value.lower() in ("", "off", "none"):
        return ""
    return value if os.path.isabs(value) else os.path.join(base_dir, value)

