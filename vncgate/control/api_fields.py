"""Validation of what an API call sends: a JSON body's fields (_Fields, with the CLI's rules;
unknown fields are refused) and the query parameters (_Query, only the named ones, each at
most once). Every bad value is Refused("invalid-request") with a sentence naming it.
"""

from vncgate.refusals import Refused


class _Fields:
    """Validation of a JSON body's fields, with the CLI's rules; unknown fields are refused."""

    def __init__(self, body):
        self.body = body
        self.seen = set()

    def _take(self, name, default):
        self.seen.add(name)
        if name not in self.body:
            if default is _REQUIRED:
                raise Refused("invalid-request", f"{name} is required")
            return default, False
        return self.body[name], True

    def text(self, name, default=None):
        default = _REQUIRED if default is None else default
        value, given = self._take(name, default)
        if given and (not isinstance(value, str) or not value or len(value) > 1024
                      or any(ord(char) < 32 for char in value)):
            raise Refused("invalid-request", f"{name} must be a non-empty string without control characters")
        return value

    def port(self, name):
        value, _ = self._take(name, _REQUIRED)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise Refused("invalid-request", f"{name} must be a whole number from 1 to 65535")
        return value

    def number(self, name):
        value, given = self._take(name, None)
        if given and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
                      or value > 10 * 365 * 86400):
            raise Refused("invalid-request", f"{name} must be a number of seconds above 0")
        return value

    def flag(self, name):
        value, _ = self._take(name, False)
        if not isinstance(value, bool):
            raise Refused("invalid-request", f"{name} must be true or false")
        return value

    def choice(self, name, choices, default):
        value, _ = self._take(name, default)
        if value not in choices:
            raise Refused("invalid-request", f"{name} must be one of {', '.join(choices)}")
        return value

    def done(self):
        unknown = sorted(set(self.body) - self.seen)
        if unknown:
            raise Refused("invalid-request", f"unknown field {unknown[0]}")


_REQUIRED = object()


class _Query:
    """A request's query parameters: only the named ones, each at most once."""

    def __init__(self, request, names):
        unknown = sorted(set(request.query) - set(names))
        if unknown:
            raise Refused("invalid-request", f"unknown query parameter {unknown[0]}")
        self.values = {name: request.query_value(name) or None for name in names}

    def get(self, name):
        return self.values[name]
