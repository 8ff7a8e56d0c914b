"""Where a Redis store lives: the `database` URL forms, parsed without the Redis client.

Kept apart from the engine (store/redis.py) so that config checks, `vncgate-token` and an
SQLite-only install never import the `redis` package (the `[redis]` extra).
"""

from __future__ import annotations

import dataclasses
import urllib.parse

SCHEMES = ("redis", "rediss", "redis+sentinel", "rediss+sentinel")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
# What a Sentinel URL may say after "?": the Sentinels' own password, and the CA that signed
# the certificates of TLS Sentinels and servers (rediss+sentinel://).
SENTINEL_OPTIONS = ("sentinel_password", "ssl_ca_certs")
DEFAULT_PREFIX = "vncgate:"
DEFAULT_PORT, DEFAULT_SENTINEL_PORT = 6379, 26379
URL_FORMS = ("redis://[:PASSWORD@]HOST:PORT/DB, rediss://[:PASSWORD@]HOST:PORT/DB or "
             "redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE/DB[?sentinel_password=P] "
             "(rediss+sentinel:// for TLS to the Sentinels and the server)")


def is_redis_url(database: str) -> bool:
    return urllib.parse.urlsplit(database).scheme in SCHEMES


@dataclasses.dataclass(frozen=True)
class RedisTarget:
    """A parsed `database` URL."""
    url: str
    scheme: str
    hosts: tuple[tuple[str, int], ...]  # ((host, port), ...): the server, or the sentinels
    service: str  # the Sentinel service name, "" otherwise
    db: int
    username: str
    password: str
    options: tuple = ()  # ((name, value), ...) of SENTINEL_OPTIONS given after "?"

    @property
    def sentinel(self) -> bool:
        return self.scheme in SENTINEL_SCHEMES

    @property
    def tls(self) -> bool:
        return self.scheme.startswith("rediss")

    def option(self, name: str) -> str:
        return dict(self.options).get(name, "")

    @classmethod
    def parse(cls, url: str) -> RedisTarget:
        """Raises ValueError whose text says what must change."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in SCHEMES:
            raise ValueError(f"must be {URL_FORMS}")
        credentials, _, locations = parts.netloc.rpartition("@")
        username, _, password = credentials.partition(":")
        sentinel = parts.scheme in SENTINEL_SCHEMES
        hosts = tuple(_host_port(item, DEFAULT_SENTINEL_PORT if sentinel else DEFAULT_PORT)
                      for item in locations.split(","))
        if len(hosts) > 1 and not sentinel:
            raise ValueError("must name one HOST:PORT (several are for redis+sentinel://)")
        path = [item for item in parts.path.split("/") if item]
        service = path.pop(0) if sentinel and path else ""
        if sentinel and not service:
            raise ValueError("must name the Sentinel service: redis+sentinel://HOST:PORT/SERVICE/DB")
        if len(path) > 1 or (path and not path[0].isdigit()):
            raise ValueError(f"must end in a database number, as in {URL_FORMS}")
        options: tuple[tuple[str, str], ...] = ()
        if sentinel:
            query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
            unknown = sorted({name for name, _ in query} - set(SENTINEL_OPTIONS))
            if unknown:
                raise ValueError(f"may set only {', '.join(SENTINEL_OPTIONS)} after '?', not {', '.join(unknown)}")
            options = tuple(query)
        return cls(url, parts.scheme, hosts, service, int(path[0]) if path else 0,
                   urllib.parse.unquote(username), urllib.parse.unquote(password), options)

    @property
    def redacted(self) -> str:
        """The URL without its password, for logs and messages."""
        where = ",".join(f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host, port in self.hosts)
        path = f"/{self.service}/{self.db}" if self.service else f"/{self.db}"
        return f"{self.scheme}://{where}{path}"


def _host_port(text: str, default_port: int) -> tuple[str, int]:
    host, port = text, str(default_port)
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            port = rest.lstrip(":")
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host:
        raise ValueError(f"must name a host, as in {URL_FORMS}")
    if not str(port).isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"must have ports from 1 to 65535, got {port!r}")
    return host, int(port)
