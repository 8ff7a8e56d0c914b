"""Validation of what an API call sends: a JSON body's fields (_Fields, with the CLI's rules;
unknown fields are refused) and the query parameters (_Query, only the named ones, each at
most once), and numbers a request spells (_whole_number). Every bad value is
Refused("invalid-request") with a sentence naming it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from vncgate import text as text_module
from vncgate.refusals import Refused

if TYPE_CHECKING:
    from vncgate.net import http


class _Fields:
    """Validation of a JSON body's fields, with the CLI's rules; unknown fields are refused."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.seen: set[str] = set()

    def _take(self, name: str, default: object) -> tuple[Any, bool]:
        self.seen.add(name)
        if name not in self.body:
            if default is _REQUIRED:
                raise Refused("invalid-request", f"{name} is required")
            return default, False
        return self.body[name], True

    def text(self, name: str, default: object = None, secret: bool = False) -> str:
        """A name (vncgate.text's rule), or with secret=True a password (no C0 control characters)."""
        default = _REQUIRED if default is None else default
        value, given = self._take(name, default)
        if not given:
            return value
        if not isinstance(value, str):
            raise Refused("invalid-request", f"{name} must be a string")
        problem = _secret_problem(value) if secret else text_module.name_problem(value)
        if problem:
            raise Refused("invalid-request", f"{name} {problem}")
        return value

    def port(self, name: str) -> int:
        value, _ = self._take(name, _REQUIRED)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise Refused("invalid-request", f"{name} must be a whole number from 1 to 65535")
        return value

    def number(self, name: str) -> float | None:
        value, given = self._take(name, None)
        if given and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
                      or value > 10 * 365 * 86400):
            raise Refused("invalid-request", f"{name} must be a number of seconds above 0")
        return value

    def flag(self, name: str) -> bool:
        value, _ = self._take(name, False)
        if not isinstance(value, bool):
            raise Refused("invalid-request", f"{name} must be true or false")
        return value

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value, _ = self._take(name, default)
        if value not in choices:
            raise Refused("invalid-request", f"{name} must be one of {', '.join(choices)}")
        return value

    def done(self) -> None:
        unknown = sorted(set(self.body) - self.seen)
        if unknown:
            raise Refused("invalid-request", f"unknown field {unknown[0]}")


_REQUIRED = object()


def _secret_problem(value: str) -> str:
    if not value or len(value) > text_module.MAX_NAME:
        return f"must be 1 to {text_module.MAX_NAME} characters"
    return "holds a control character" if any(ord(char) < 32 for char in value) else ""


_DIGITS = re.compile(r"[0-9]{1,15}")


def _whole_number(text: str, name: str, lowest: int = 0) -> int:
    """A number the request spells in ASCII digits (never int()'s Unicode digits, signs,
    underscores or thousands of digits), at most 15 of them; else invalid-request."""
    if not _DIGITS.fullmatch(text) or int(text) < lowest:
        raise Refused("invalid-request", f"{name} must be a whole number from {lowest} written in digits")
    return int(text)


class _Query:
    """A request's query parameters: only the named ones, each at most once."""

    def __init__(self, request: http.Request, names: tuple[str, ...]) -> None:
        unknown = sorted(set(request.query) - set(names))
        if unknown:
            raise Refused("invalid-request", f"unknown query parameter {unknown[0]}")
        self.values = {name: request.query_value(name) or None for name in names}

    def get(self, name: str) -> str | None:
        return self.values[name]
