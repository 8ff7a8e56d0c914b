"""What a mint may ask for: the one set of rules `vncgate-token add` and `POST /api/v1/consoles`
share, and the narrower scope an API key may carry.

Each rule answers in the same words on both sides (the CLI's usage error, the API's 400):
names hold no control characters (vncgate.text), a TTL is from 1 second to 10 years, the
policy fits the console type (Policy.problem), and the console's address is one the gateway
may reach (console.allow, backend_allow) and, for a scoped key, one inside the key's networks,
of one of its console types, for no longer than its max TTL.
"""

import dataclasses
from typing import Optional

from vncgate import addresses, text
from vncgate.console import allow as allow_module
from vncgate.console.policy import Policy

MIN_TTL, MAX_TTL = 1.0, 10 * 365 * 86400.0


class Invalid(ValueError):
    """A mint the rules refuse; str() is the sentence a caller reads."""


@dataclasses.dataclass(frozen=True)
class KeyScope:
    """What an API key may mint: consoles in networks (addresses.Reach items; empty: wherever
    backend_allow allows), of types (empty: any), for at most max_ttl seconds (0: token_ttl's)."""
    networks: tuple = ()
    types: tuple = ()
    max_ttl: float = 0.0

    def words(self) -> str:
        """The key file's words for the scope ("" for none)."""
        words = []
        if self.networks:
            words.append("networks=" + ",".join(str(reach) for reach in self.networks))
        if self.types:
            words.append("types=" + ",".join(self.types))
        if self.max_ttl:
            words.append(f"max-ttl={self.max_ttl:g}")
        return " ".join(words)

    @classmethod
    def parse(cls, words: list, console_types: tuple) -> "KeyScope":
        """From the key file's words after NAME:HASH; ValueError says which is wrong."""
        values: dict = {}
        for word in words:
            name, _, value = word.partition("=")
            if name in values or not value:
                raise ValueError(f"{word!r}: networks=, types= or max-ttl=, each once")
            if name == "networks":
                values[name] = addresses.parse(value)
            elif name == "types":
                values[name] = check_types(value, console_types)
            elif name == "max-ttl":
                values["max_ttl"] = check_ttl(_seconds(value))
            else:
                raise ValueError(f"{word!r}: networks=, types= or max-ttl=, each once")
        return cls(**values)


def _seconds(value: str) -> float:
    if not value.isascii() or not value.replace(".", "", 1).isdigit() or len(value) > 12:
        raise Invalid(f"{value!r} is not a number of seconds")
    return float(value)


def check_types(value: str, console_types: tuple) -> tuple:
    types = tuple(item for item in value.replace(",", " ").split() if item)
    unknown = [item for item in types if item not in console_types]
    if unknown or not types:
        raise Invalid(f"console types are {', '.join(console_types)}; got {value!r}")
    return types


def check_ttl(ttl: float) -> float:
    if not MIN_TTL <= ttl <= MAX_TTL:
        raise Invalid(f"ttl must be from {MIN_TTL:g} to {MAX_TTL:g} seconds")
    return ttl


def check_name(field: str, value: str) -> None:
    problem = text.name_problem(value)
    if problem:
        raise Invalid(f"{field} {problem}")


def check_mint(allow: allow_module.BackendAllow, token_ttl: float, console_type: str, host: str, port: int,
               policy: Policy, ttl: Optional[float] = None, names: Optional[dict] = None,
               scope: Optional[KeyScope] = None, replay: bool = False) -> Optional[float]:
    """Every rule for one mint; returns the TTL to mint with (None: token_ttl), or raises Invalid.
    names: the request's other names ({"instance": ..., "internal_path": ...}) for the text
    rule; policy: the console.policy.Policy asked for; replay: the console is a recording the
    gateway plays (host and port are not an address)."""
    scope = scope or KeyScope()
    for field, value in (names or {}).items():
        if value:
            check_name(field, value)
    check_name("host", host)
    if scope.types and console_type not in scope.types:
        raise Invalid(f"this key mints {', '.join(scope.types)} consoles only")
    problem = policy.problem(console_type)
    if problem:
        raise Invalid(problem)
    if ttl is not None:
        check_ttl(ttl)
    if scope.max_ttl and ttl is None:
        ttl = min(token_ttl, scope.max_ttl)
    elif scope.max_ttl and ttl is not None and ttl > scope.max_ttl:
        raise Invalid(f"ttl must be at most {scope.max_ttl:g} seconds with this key")
    why = None if replay else allow.check_target(host, port, within=scope.networks)
    if why:
        raise Invalid(f"the console may not be at {host}:{port}: {why}")
    return ttl
