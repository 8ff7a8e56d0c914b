"""The console scripts: vncgate (serve) and vncgate-token (mint, list, revoke, touch, purge,
sessions, kill, migrate, follow, unfollow, log, screenshot).

This module keeps vncgate-token: its parser and its commands. The serve command is in
cli_serve, what both share (errors, exit codes, argument types, opening the store) in
cli_common; setup.py names each entry point in its own module.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from typing import TYPE_CHECKING, TextIO

from vncgate import config as config_module
from vncgate import store as store_module
from vncgate.console import allow
from vncgate.console import policy as policy_module
from vncgate.console import serial as consoles
from vncgate.console.recordings import Recordings
from vncgate.control import api_keys, cli_screenshot, libvirt, minting, scope
from vncgate.control.cli_common import (
    CommandFailed,
    UsageError,
    _networks,
    _Parser,
    _port_in,
    _seconds,
    _types,
    open_store,
    run_reporting_errors,
)
from vncgate.control.cli_output import log_writer, write_table

if TYPE_CHECKING:
    from vncgate.store import AnyStore


def _instance_id(text: str) -> str:
    if not text or len(text) > MAX_INSTANCE_ID:
        raise argparse.ArgumentTypeError(f"an instance id is 1 to {MAX_INSTANCE_ID} characters")
    return text


MAX_INSTANCE_ID = 128  # it names the console log's file


def token_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vncgate-token", description="Mint, list, touch and revoke console tokens.")
    parser.add_argument("-c", "--config", metavar="FILE", help="config file (default: $VNCGATE_CONFIG, "
                        "else ./vncgate.ini, else built-in defaults)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    add = commands.add_parser("add", help="mint a token and print its access URL")
    add.add_argument("--host", help="VNC server (or serial endpoint) address on the management network "
                     "(or --domain, --replay)")
    add.add_argument("--port", type=_port_in(1), help="VNC server port")
    add.add_argument("--domain", metavar="NAME", help="a running libvirt domain: its VNC address, port and "
                     "password are read from libvirt (instead of --host/--port/--password-file)")
    add.add_argument("--libvirt", metavar="URI", help=f"libvirt URI for --domain (default: {libvirt.DEFAULT_URI})")
    add.add_argument("--type", dest="console_type", default=store_module.WEBSOCKET,
                     choices=store_module.CONSOLE_TYPES,
                     help="console type (default: ws-vnc; serial: a TCP serial port)")
    add.add_argument("--instance", help='instance id (default: "HOST:PORT")')
    add.add_argument("--internal-path", default="", help="XenServer internal_access_path for a CONNECT")
    add.add_argument("--ttl", type=_seconds, help="seconds until the token expires (default: token_ttl)")
    add.add_argument("--password-file", metavar="F", help="file holding the backend's VNC password")
    add.add_argument("--view-only", action="store_true",
                     help="the user sees the console but cannot type, click or paste into it")
    add.add_argument("--single-use", action="store_true",
                     help="the first connection consumes the token; only that client may reconnect "
                          "(within resume_grace of a drop)")
    add.add_argument("--paste-as-keys", action="store_true",
                     help="pasted text is typed as keystrokes (for consoles without a clipboard)")
    add.add_argument("--input-idle", type=_seconds, metavar="SECONDS",
                     help="close the session after this long without a key or pointer event "
                          "(default: input_idle_timeout)")
    add.add_argument("--backend-tls", action="store_true", help="the console speaks VeNCrypt: the gateway does "
                     "TLS to it, checking its certificate against backend_ca")
    add.add_argument("--json", action="store_true", help="print one JSON object")
    add.add_argument("--record", action="store_true", help="record the token's sessions in record_dir")
    add.add_argument("--replay", metavar="SESSION", help="a ws-vnc URL that plays the recording of SESSION")
    add.add_argument("--speed", type=_seconds, default=1.0, help="replay speed factor (default: 1)")

    listing = commands.add_parser("list", help="list tokens (never the tokens themselves)")
    listing.add_argument("--instance")
    listing.add_argument("--host")
    listing.add_argument("--include-expired", action="store_true")
    listing.add_argument("--only-idle", action="store_true")
    listing.add_argument("--json", action="store_true")

    revoke = commands.add_parser("revoke", help="delete tokens; their live sessions close")
    revoke.add_argument("tokens", nargs="*", metavar="TOKEN", help=TOKENS_HELP)
    revoke.add_argument("--token-file", metavar="F", help="read tokens from F, one per line")
    revoke.add_argument("--instance")
    revoke.add_argument("--host")

    touch = commands.add_parser("touch", help="mark tokens as in use now")
    touch.add_argument("tokens", nargs="*", metavar="TOKEN", help=TOKENS_HELP)
    touch.add_argument("--token-file", metavar="F", help="read tokens from F, one per line")

    commands.add_parser("purge", help="delete garbage (expired and idle) and recordings older than "
                                      "record_keep_days now")

    recordings = commands.add_parser("recordings", help="list the session recordings in record_dir")
    recordings.add_argument("--instance")
    recordings.add_argument("--json", action="store_true")

    sessions = commands.add_parser("sessions", help="list live sessions on every gateway sharing the database")
    sessions.add_argument("--instance")
    sessions.add_argument("--json", action="store_true")

    kill = commands.add_parser("kill", help="end live sessions (at once with Redis, else within touch_interval)")
    kill.add_argument("session_ids", nargs="*", metavar="SESSION")
    kill.add_argument("--instance")

    follow = commands.add_parser("follow", help="keep the gateways attached to a serial console, logging it")
    follow.add_argument("--instance", required=True, type=_instance_id)
    follow.add_argument("--host", required=True, help="serial endpoint address (e.g. qemu -serial tcp:…,server=on)")
    follow.add_argument("--port", required=True, type=_port_in(1), help="serial endpoint port")

    unfollow = commands.add_parser("unfollow", help="stop following a serial console (its log stays)")
    unfollow.add_argument("--instance", required=True)

    console_log = commands.add_parser("log", help="print a followed serial console's log")
    console_log.add_argument("--instance", required=True)
    console_log.add_argument("--tail", type=int, metavar="N", help="only the last N lines")
    console_log.add_argument("--follow", action="store_true", help="then print new output as it comes, until ^C")
    console_log.add_argument("--raw", action="store_true", help="the bytes as they are, also on a terminal "
                             "(where control characters are otherwise shown as escapes)")

    migrate = commands.add_parser("migrate", help="copy every token that is not garbage to another store")
    migrate.add_argument("--to", required=True, metavar="DATABASE",
                         help="an SQLite file or a redis://, rediss:// or redis+sentinel:// URL")

    cli_screenshot.add_parser(commands)

    keys = commands.add_parser("api-key", help="keys of the control-plane API (api_keys_file)")
    key_commands = keys.add_subparsers(dest="key_command", metavar="COMMAND", parser_class=_Parser)
    key_commands.required = True
    key_add = key_commands.add_parser("add", help="make a key, print it once, keep its hash (and scope)")
    key_add.add_argument("name")
    key_add.add_argument("--networks", metavar="CIDRS", type=_networks,
                         help="the key mints consoles at these addresses only (networks with optional "
                              ":PORT or :LOW-HIGH, comma-separated; within backend_allow)")
    key_add.add_argument("--types", metavar="T,...", type=_types, help="the key mints these console types only")
    key_add.add_argument("--max-ttl", metavar="S", type=_seconds, help="the key's tokens live at most S seconds")
    key_commands.add_parser("remove", help="delete a key (the gateway drops it on SIGHUP)").add_argument("name")
    return parser


def _shown(database: str) -> str:
    return store_module.RedisTarget.parse(database).redacted if store_module.is_redis_url(database) else database


def _read_password(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            password = handle.read().rstrip(b"\r\n")
    except OSError as error:
        raise CommandFailed(f"cannot read password file {path}: {error.strerror}") from None
    if not password:
        raise CommandFailed(f"password file {path} is empty")
    return password


def _replay_target(args: argparse.Namespace, config: config_module.Config,
                   store: AnyStore) -> tuple[str, int, str]:
    """(host, port, instance) of a replay token, after checking the recording exists (on any
    gateway of the store: one whose record_dir is not shared is named on stderr)."""
    if args.host or args.port or args.domain or args.password_file or args.internal_path or args.record:
        raise UsageError("--replay takes no --host, --port, --domain, --password-file, --internal-path or --record")
    if args.console_type != store_module.WEBSOCKET:
        raise UsageError("--replay makes ws-vnc URLs only")
    recordings = Recordings.from_config(config, store)
    meta = recordings.find(args.replay)
    if meta is None:
        raise CommandFailed(f"no recording of session {args.replay} in {config.record_dir} or the store's index")
    elsewhere = recordings.elsewhere(args.replay)
    if elsewhere:
        sys.stderr.write(f"vncgate-token: note: {elsewhere}: the replay plays through that gateway only\n")
    return "recording", 0, args.instance or meta.get("instance_id") or args.replay


def cmd_add(args: argparse.Namespace, config: config_module.Config, store: AnyStore, out: TextIO) -> None:
    if args.replay:
        host, port, instance = _replay_target(args, config, store)
        password = None
    elif args.domain:
        if args.host or args.port or args.password_file or args.internal_path:
            raise UsageError("add --domain takes no --host, --port, --password-file or --internal-path")
        try:
            console = libvirt.console_of(args.domain, args.libvirt)
        except libvirt.DomainError as error:
            raise CommandFailed(str(error)) from None
        host, port, password, instance = console.host, console.port, console.password, args.instance or args.domain
    elif args.host and args.port:
        if args.libvirt:
            raise UsageError("--libvirt goes with --domain")
        password = _read_password(args.password_file) if args.password_file else None
        host, port, instance = args.host, args.port, args.instance
    else:
        raise UsageError("add takes --host H --port P, --domain NAME or --replay SESSION")
    policy = policy_module.Policy(view_only=args.view_only, single_use=args.single_use,
                                  paste_as_keys=args.paste_as_keys, input_idle=args.input_idle or 0.0)
    try:
        ttl = scope.check_mint(allow.BackendAllow.from_config(config), config.token_ttl, args.console_type,
                               host, port, policy, args.ttl,
                               names={"instance": instance, "internal_path": args.internal_path},
                               replay=bool(args.replay))
    except scope.Invalid as error:
        raise UsageError(str(error)) from None
    token, details, url = minting.mint(config, store, args.console_type, host, port, instance, args.internal_path,
                                   ttl, password, policy.to_json(), args.backend_tls, record=args.record,
                                   replay=args.replay or "", replay_speed=args.speed,
                                   held_key=config_module.read_key_file(config.screenshot_key_file) if password else None)
    if args.json:
        json.dump(minting.console_json(token, details, url), out)
        out.write("\n")
    else:
        out.write(url + "\n")


def cmd_list(args: argparse.Namespace, config: config_module.Config, store: AnyStore, out: TextIO) -> None:
    rows = store.list_details(instance_id=args.instance, host=args.host,
                              include_expired=args.include_expired, only_idle=args.only_idle)
    now = store.clock()
    if args.json:
        json.dump([minting.token_json(row, now, config.idle_timeout) for row in rows], out)
        out.write("\n")
        return
    write_table(out, ("ID", "TYPE", "INSTANCE", "BACKEND", "STATE", "EXPIRES (UTC)", "IDLE"),
                 [(row.token_id, row.console_type, row.instance_id, f"{row.host}:{row.port}",
                   row.state(now, config.idle_timeout), minting.iso(row.expires_at), f"{now - row.updated_at:.0f}s")
                  for row in rows])


TOKENS_HELP = "tokens; - reads them from standard input, one per line (keeps them out of ps)"


def _tokens(args: argparse.Namespace, stdin: TextIO) -> list[str]:
    """The tokens named on the command line, read from stdin for '-', and from --token-file:
    a token on a command line is visible to every local user in ps."""
    tokens = [token for token in args.tokens if token != "-"]
    lines = []
    if "-" in args.tokens:
        lines += stdin.read().splitlines()
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as handle:
                lines += handle.read().splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise CommandFailed(f"cannot read token file {args.token_file}: "
                                f"{getattr(error, 'strerror', None) or 'not UTF-8 text'}") from None
    return tokens + [line.strip() for line in lines if line.strip()]


def cmd_revoke(args: argparse.Namespace, config: config_module.Config, store: AnyStore, out: TextIO) -> None:
    tokens = _tokens(args, sys.stdin) if args.tokens or args.token_file else []
    chosen = sum(bool(choice) for choice in (args.tokens or args.token_file, args.instance, args.host))
    if chosen != 1:
        raise UsageError("revoke takes TOKEN..., -, --token-file F, --instance ID or --host H (exactly one)")
    if args.tokens or args.token_file:
        if not tokens:
            raise UsageError("no tokens were given")
        deleted = store.delete_connection_details(tokens)
        if deleted < len(set(tokens)):
            raise CommandFailed(f"revoked {deleted} of {len(set(tokens))} tokens; "
                                "the others are unknown or already gone")
    elif args.instance:
        deleted = store.delete_by_instance(args.instance)
    else:
        deleted = store.delete_by_host(args.host)
    out.write(f"revoked {deleted} token{'s' if deleted != 1 else ''}\n")


def cmd_touch(args: argparse.Namespace, config: config_module.Config, store: AnyStore, out: TextIO) -> None:
    tokens = _tokens(args, sys.stdin)
    if not tokens:
        raise UsageError("touch takes TOKEN..., - or --token-file F")
    touched = store.touch_connection_details(tokens)
    if touched < len(set(tokens)):
        raise CommandFailed(f"touched {touched} of {len(set(tokens))} tokens; the others are unknown")
    out.write(f"touched {touched} token{'s' if touched != 1 else ''}\n")


def cmd_purge(args: argparse.Namespace, config: config_module.Config, store: AnyStore, out: TextIO) -> None:
    deleted = store.purge()
    recordings = Recordings.from_config(config, store).purge()
    out.write(f"purged {deleted} token{'s' if deleted != 1 else ''}"
              + (f" and {recordings} recording{'s' if recordings != 1 else ''}" if recordings else "") + "\n")


def cmd_recordings(args: argparse.Namespace, config: config_module.Config, store: AnyStore, out: TextIO) -> None:
    rows = Recordings.from_config(config, store).list(instance_id=args.instance)
    if args.json:
        json.dump([minting.recording_json(row) for row in rows], out)
        out.write("\n")
        return
    write_table(out, ("SESSION", "INSTANCE", "STARTED (UTC)", "DURATION", "BYTES", "GATEWAY", "NOTE"),
                 [(row["session_id"], str(row.get("instance_id")), minting.iso(row["started_at"]),
                   "live" if row.get("duration") is None else f"{row['duration']:.0f}s", str(row.get("bytes")),
                   row.get("gateway") or "-", f"stopped: {row['stopped']}" if row.get("stopped") else "")
                  for row in rows])


def cmd_sessions(args: argparse.Namespace, config: config_module.Config, store: AnyStore, out: TextIO) -> None:
    rows = store.list_sessions(instance_id=args.instance)
    if args.json:
        json.dump([minting.session_json(row, store.clock()) for row in rows], out)
        out.write("\n")
        return
    write_table(out, ("SESSION", "INSTANCE", "TYPE", "CLIENT", "TOKEN", "GATEWAY", "STARTED (UTC)", "UP", "DOWN"),
                 [(row.session_id, row.instance_id, row.console_type, row.client, row.token_hash[:8],
                   row.gateway_id, minting.iso(row.started_at), str(row.bytes_up), str(row.bytes_down)) for row in rows])


def cmd_kill(args: argparse.Namespace, config: config_module.Config, store: AnyStore, out: TextIO) -> None:
    if bool(args.session_ids) == bool(args.instance):
        raise UsageError("kill takes SESSION... or --instance ID (exactly one)")
    if args.instance:
        marked = store.request_kill(instance_id=args.instance)
    else:
        marked = store.request_kill(session_ids=args.session_ids)
        if marked < len(set(args.session_ids)):
            raise CommandFailed(f"marked {marked} of {len(set(args.session_ids))} sessions; "
                                "the others are unknown or already ended")
    when = "at once" if store.pushes_events else f"within touch_interval ({config.touch_interval:g}s)"
    out.write(f"kill requested for {marked} session{'s' if marked != 1 else ''}; they end {when}\n")


def cmd_migrate(args: argparse.Namespace, config: config_module.Config, store: AnyStore, out: TextIO) -> None:
    config_module.check_database(args.to, "--to")
    if args.to == config.database:
        raise UsageError("--to names the database the config already uses")
    target = open_store(config, database=args.to)
    try:
        copied, skipped = store.copy_tokens_to(target)
    finally:
        target.close()
    out.write(f"copied {copied} token{'s' if copied != 1 else ''} to {_shown(args.to)}"
              f" ({skipped} garbage skipped); point database at it, then restart the gateways\n")


def cmd_api_key(args: argparse.Namespace, config: config_module.Config, _store: None, out: TextIO) -> None:
    if not config.api_keys_file:
        raise CommandFailed(f"api_keys_file is not set in [gateway] of {config.source or 'the built-in defaults'}")
    try:
        if args.key_command == "add":
            if args.max_ttl is not None:
                scope.check_ttl(args.max_ttl)
            key_scope = scope.KeyScope(args.networks or (), args.types or (), args.max_ttl or 0.0)
            out.write(api_keys.add_key(config.api_keys_file, args.name, key_scope) + "\n")
        else:
            api_keys.remove_key(config.api_keys_file, args.name)
            out.write(f"removed API key {args.name}; send SIGHUP to running gateways\n")
    except api_keys.KeyFileError as error:
        raise CommandFailed(str(error)) from None
    except scope.Invalid as error:
        raise UsageError(str(error)) from None


def cmd_follow(args: argparse.Namespace, config: config_module.Config, store: AnyStore, out: TextIO) -> None:
    try:
        scope.check_name("instance", args.instance)
        scope.check_mint(allow.BackendAllow.from_config(config), config.token_ttl, store_module.SERIAL,
                         args.host, args.port, policy_module.Policy())
    except scope.Invalid as error:
        raise UsageError(str(error)) from None
    store.add_follow(args.instance, args.host, args.port)
    where = "the store" if store.shares_consoles else config.console_log_dir
    out.write(f"following {args.instance} at {args.host}:{args.port}; one gateway attaches within a second, "
              f"logging to {where}\n")


def cmd_unfollow(args: argparse.Namespace, config: config_module.Config, store: AnyStore, out: TextIO) -> None:
    if not store.remove_follow(args.instance):
        raise CommandFailed(f"{args.instance} is not followed")
    out.write(f"no longer following {args.instance}\n")


def cmd_log(args: argparse.Namespace, config: config_module.Config, store: AnyStore, out: TextIO) -> None:
    if args.tail is not None and args.tail < 0:
        raise UsageError("--tail takes a number of lines, 0 or more")
    data = consoles.console_output(store, config.console_log_dir, args.instance, args.tail)
    if data is None:
        where = "the store" if store.shares_consoles else config.console_log_dir
        raise CommandFailed(f"no console log for {args.instance} in {where}")
    write = log_writer(out, args.raw)
    write(data)
    out.flush()
    if args.follow:
        def write_now(chunk: bytes) -> None:
            write(chunk)
            out.flush()
        consoles.follow_output(store, config.console_log_dir, args.instance, write_now, threading.Event())


COMMANDS = {"add": cmd_add, "list": cmd_list, "revoke": cmd_revoke, "touch": cmd_touch, "purge": cmd_purge,
            "sessions": cmd_sessions, "recordings": cmd_recordings, "kill": cmd_kill, "migrate": cmd_migrate,
            "follow": cmd_follow, "unfollow": cmd_unfollow, "log": cmd_log,
            "screenshot": cli_screenshot.cmd_screenshot}


def token_main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    def body() -> None:
        args = token_parser().parse_args(argv)
        config = config_module.load(args.config)
        if args.command == "api-key":  # the key file only, not the store
            cmd_api_key(args, config, None, out or sys.stdout)
            return
        store = open_store(config)
        try:
            COMMANDS[args.command](args, config, store, out or sys.stdout)
        finally:
            store.close()
    return run_reporting_errors("vncgate-token", body)


def token_main_exit() -> None:
    sys.exit(token_main())
