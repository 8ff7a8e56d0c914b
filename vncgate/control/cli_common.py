"""What both console scripts (vncgate and vncgate-token) share: the exit codes, the two
failures a command reports as one line (UsageError, CommandFailed), an argparse that says a
usage error in one line, the argument types, opening the store the config names, and
run_reporting_errors, which turns every expected failure into one stderr line and an exit
code.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

from vncgate import addresses
from vncgate import config as config_module
from vncgate import store as store_module
from vncgate.control import scope

if TYPE_CHECKING:
    from vncgate.store import AnyStore

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad command-line usage: exit 2 with one line."""


class CommandFailed(Exception):
    """The command could not do what was asked: exit 1 with one line."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def _port_in(lowest: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            port = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid port {text!r}: not a whole number") from None
        if not lowest <= port <= 65535:
            raise argparse.ArgumentTypeError(f"invalid port {port}: must be from {lowest} to 65535")
        return port
    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid seconds {text!r}: must be a number above 0")
    return value


def _networks(text: str) -> tuple[addresses.Reach, ...]:
    try:
        return addresses.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"invalid networks: {error}") from None


def _types(text: str) -> tuple[str, ...]:
    try:
        return scope.check_types(text, store_module.CONSOLE_TYPES)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def open_store(config: config_module.Config, busy_timeout: float = 5.0, database: str | None = None,
               checkpoint_on_commit: bool = True) -> AnyStore:
    return store_module.TokenStore(database or config.database, token_ttl=config.token_ttl,
                                   idle_timeout=config.idle_timeout, busy_timeout=busy_timeout,
                                   key_prefix=config.key_prefix, checkpoint_on_commit=checkpoint_on_commit)


def run_reporting_errors(prog: str, body: Callable[[], object]) -> int:
    """Run body(); turn every expected failure into one stderr line and an exit code.
    Every file either program creates (database, its WAL, audit log) is the owner's only:
    the umask says so once, here, whatever the caller's umask was."""
    os.umask(0o077)
    try:
        body()
        return EXIT_OK
    except (UsageError, store_module.RedisMissing) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (CommandFailed, config_module.ConfigError, store_module.StoreError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
