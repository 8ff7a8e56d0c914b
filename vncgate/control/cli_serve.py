"""The vncgate console script: run the gateway (serve_main) until SIGINT or SIGTERM (a drain:
vncgate.control.service), with SIGHUP reloading it and the audit log reopened; its parser, and the process made ready for many sessions (fd limit,
thread stacks). Its entry point stays importable as vncgate.control.cli:serve_main_exit.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import resource
import signal
import sys
import threading
from typing import TYPE_CHECKING

from vncgate import config as config_module
from vncgate import logs
from vncgate import store as store_module
from vncgate.control import api, api_keys, service, systemd
from vncgate.control.cli_common import CommandFailed, _Parser, _port_in, open_store, run_reporting_errors

if TYPE_CHECKING:
    from vncgate.audit import Audit
    from vncgate.front.server import Gateway


def serve_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vncgate", description="Run the VNC console gateway until SIGINT or SIGTERM.")
    parser.add_argument("-c", "--config", metavar="FILE", help="config file (default: $VNCGATE_CONFIG, "
                        "else ./vncgate.ini, else built-in defaults)")
    parser.add_argument("--listen", metavar="ADDR", help="address to bind (overrides listen)")
    parser.add_argument("--port", type=_port_in(0), help="port to bind, 0 for any free one (overrides port)")
    parser.add_argument("--log-level", default="INFO", type=str.upper,
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser


def _prepare_process_for_many_sessions() -> None:
    """Each session holds two sockets (and two splice pipes) and two threads: lift the fd soft
    limit to the hard one, and give threads a small stack (relay loops are shallow)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    threading.stack_size(512 * 1024)


def serve_main(argv: list[str] | None = None) -> int:
    from vncgate import audit as audit_module
    from vncgate.front import server
    from vncgate.net import tls  # the token CLI does not need these

    def body() -> None:
        args = serve_parser().parse_args(argv)
        logs.setup(args.log_level, journal=systemd.journal_reads_stderr())
        _prepare_process_for_many_sessions()
        config = config_module.load(args.config)
        overrides = {key: value for key, value in (("listen", args.listen), ("port", args.port))
                     if value is not None}
        config = dataclasses.replace(config, **overrides)
        # A handshake waits for a locked database no longer than it may take as a whole.
        # Checkpoints are the housekeeper's (housekeeping.Housekeeper), never a handshake's commit.
        # Redis retries a timed-out call twice: each attempt gets under a third of that, so that a hung
        # Redis still lets the handshake be answered within handshake_timeout.
        wait = min(5.0, config.handshake_timeout)
        store = open_store(config, busy_timeout=wait * 0.3 if store_module.is_redis_url(config.database) else wait,
                           checkpoint_on_commit=False)
        try:
            audit = audit_module.Audit.open(config.audit_log, config.audit_max_bytes, config.audit_keep)
        except OSError as error:
            raise CommandFailed(f"cannot open audit log {config.audit_log}: {error.strerror}") from None
        inherited = systemd.listen_sockets()  # socket activation: serve systemd's socket, bind none
        try:
            gateway = server.Gateway(config, store, audit,
                                     control_plane=api.ControlPlane if config.api_keys_file else None,
                                     listen_socket=inherited[0] if inherited else None)
        except OSError as error:
            raise CommandFailed(f"cannot listen on {config.listen}:{config.port}: {error.strerror}") from None
        except (tls.TlsConfigError, api_keys.KeyFileError) as error:
            raise CommandFailed(str(error)) from None

        lifecycle = service.Service(gateway, systemd.Notifier.from_environment(), systemd.watchdog_interval())
        # The drain thread stops the accept loop (serve_forever, in this main thread) when it is time.
        signal.signal(signal.SIGTERM, lambda _signum, _frame: lifecycle.on_signal("SIGTERM"))
        signal.signal(signal.SIGINT, lambda _signum, _frame: lifecycle.on_signal("SIGINT", hurry=True))
        signal.signal(signal.SIGHUP, lambda _signum, _frame: threading.Thread(
            target=_reload, args=(gateway, audit), name="reload").start())
        host, port = gateway.server_address[:2]
        print(f"vncgate listening on {host}:{port}", file=sys.stderr, flush=True)
        lifecycle.ready()
        try:
            gateway.serve_forever()
            lifecycle.wait_drained()
        finally:
            gateway.stop()
            lifecycle.close()
            store.close()
            audit.close()
    return run_reporting_errors("vncgate", body)


def _reload(gateway: Gateway, audit: Audit) -> None:
    """SIGHUP: the audit log reopened (logrotate moved it), the certificate and API keys read again."""
    try:
        audit.reopen()
    except OSError as error:
        logging.getLogger("vncgate").error("cannot reopen audit log %s: %s; writing to the old file",
                                           audit.path, error.strerror)
    gateway.reload()


def serve_main_exit() -> None:
    sys.exit(serve_main())
