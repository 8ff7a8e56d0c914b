"""vncgate-token screenshot: a PNG of a console, taken by this process as the gateway takes
one (console/screenshot.py), with the config's backend TLS files and limits."""

import argparse
import os
from typing import Any, TextIO

from vncgate import config as config_module
from vncgate import store as store_module
from vncgate.config import Config
from vncgate.console import allow, screenshot
from vncgate.control.api_consoles import token_row
from vncgate.control.api_screenshots import MIN_WIDTH
from vncgate.control.cli_common import CommandFailed
from vncgate.net import tls
from vncgate.refusals import Refused
from vncgate.store.common import ConnectionDetails


def add_parser(commands: argparse._SubParsersAction) -> None:
    shot = commands.add_parser("screenshot", help="save a PNG of a VNC console's screen")
    which = shot.add_mutually_exclusive_group(required=True)
    which.add_argument("--token-id", metavar="ID", help="the token's id (as list shows it)")
    which.add_argument("--instance", metavar="ID", help="the instance's newest VNC token that has not expired")
    shot.add_argument("-o", "--output", required=True, metavar="FILE", help="where the PNG goes")
    shot.add_argument("--max-width", type=_width, metavar="N", help="scale down to at most N pixels wide")


def _width(text: str) -> int:
    if not text.isdigit() or int(text) < MIN_WIDTH:
        raise argparse.ArgumentTypeError(f"invalid width {text!r}: a whole number from {MIN_WIDTH}")
    return int(text)


def _row(args: argparse.Namespace, store: Any) -> ConnectionDetails:
    if args.token_id:
        return token_row(store, args.token_id.lower())
    rows = [row for row in store.list_details(instance_id=args.instance)
            if row.console_type != store_module.SERIAL and not row.replay]
    if not rows:
        raise Refused("not-found", f"no VNC token of instance {args.instance} that has not expired")
    return max(rows, key=lambda row: row.created_at)


def take(args: argparse.Namespace, config: Config, store: Any) -> str:
    """Save the screenshot args ask for; returns the line to print. Raises Refused."""
    row = _row(args, store)
    context = tls.backend_context(config.backend_ca, config.backend_cert, config.backend_key) if row.backend_tls else None
    # No session runs in this process: a token's password opens only with screenshot_key_file.
    details = screenshot.openable(row, [], store, config_module.read_key_file(config.screenshot_key_file))
    shot = screenshot.capture(details, config.screenshot_timeout, config.screenshot_max_pixels,
                              allow.BackendAllow.from_config(config), context, args.max_width)
    temporary = f"{args.output}.{os.getpid()}.tmp"
    with open(temporary, "wb") as handle:
        handle.write(shot.png)
    os.replace(temporary, args.output)
    return (f"{args.output}: {shot.width}x{shot.height} PNG of {row.instance_id} (token {row.token_id}, "
            f"screen {shot.console_width}x{shot.console_height})")


def cmd_screenshot(args: argparse.Namespace, config: Config, store: Any, out: TextIO) -> None:
    try:
        out.write(take(args, config, store) + "\n")
    except Refused as refusal:
        raise CommandFailed(f"{refusal.sentence} ({refusal.reason}: {refusal.detail})" if refusal.detail
                            else refusal.sentence) from None
    except (OSError, tls.TlsConfigError) as error:
        raise CommandFailed(str(error)) from None
