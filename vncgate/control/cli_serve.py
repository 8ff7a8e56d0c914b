"""The vncgate console script: run the gateway (serve_main) until SIGINT or SIGTERM, with
SIGHUP reloading it; its parser, and the process made ready for many sessions (fd limit,
thread stacks). Its entry point stays importable as vncgate.control.cli:serve_main_exit.
"""

import dataclasses
import logging
import resource
import signal
import sys
import threading

from vncgate import config as config_module
from vncgate import logs
from vncgate import store as store_module
from vncgate.control import api
from vncgate.control.cli_common import CommandFailed, _Parser, _port_in, open_store, run_reporting_errors


def serve_parser():
    parser = _Parser(prog="vncgate", description="Run the VNC console gateway until SIGINT or SIGTERM.")
    parser.add_argument("-c", "--config", metavar="FILE", help="config file (default: $VNCGATE_CONFIG, "
                        "else ./vncgate.ini, else built-in defaults)")
    parser.add_argument("--listen", metavar="ADDR", help="address to bind (overrides listen)")
    parser.add_argument("--port", type=_port_in(0), help="port to bind, 0 for any free one (overrides port)")
    parser.add_argument("--log-level", default="INFO", type=str.upper,
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser


def _prepare_process_for_many_sessions():
    """Each session holds two sockets (and two splice pipes) and two threads: lift the fd soft
    limit to the hard one, and give threads a small stack (relay loops are shallow)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    threading.stack_size(512 * 1024)


def serve_main(argv=None):
    from vncgate import audit as audit_module
    from vncgate.front import server
    from vncgate.net import tls  # the token CLI does not need these

    def body():
        args = serve_parser().parse_args(argv)
        logs.setup(args.log_level)
        _prepare_process_for_many_sessions()
        config = config_module.load(args.config)
        overrides = {key: value for key, value in (("listen", args.listen), ("port", args.port))
                     if value is not None}
        config = dataclasses.replace(config, **overrides)
        # A handshake waits for a locked database no longer than it may take as a whole.
        # Checkpoints are the housekeeper's (sessions.Housekeeper), never a handshake's commit.
        # Redis retries a timed-out call twice: each attempt gets under a third of that, so that a hung
        # Redis still lets the handshake be answered within handshake_timeout.
        wait = min(5.0, config.handshake_timeout)
        store = open_store(config, busy_timeout=wait * 0.3 if store_module.is_redis_url(config.database) else wait,
                           checkpoint_on_commit=False)
        try:
            audit = audit_module.Audit.open(config.audit_log, config.audit_max_bytes, config.audit_keep)
        except OSError as error:
            raise CommandFailed(f"cannot open audit log {config.audit_log}: {error.strerror}") from None
        try:
            gateway = server.Gateway(config, store, audit,
                                     control_plane=api.ControlPlane if config.api_keys_file else None)
        except OSError as error:
            raise CommandFailed(f"cannot listen on {config.listen}:{config.port}: {error.strerror}") from None
        except (tls.TlsConfigError, api.KeyFileError) as error:
            raise CommandFailed(str(error)) from None

        def on_signal(signum, _frame):
            logging.getLogger("vncgate").info("%s: stopping", signal.Signals(signum).name)
            # shutdown() waits for serve_forever, which runs in this (the main) thread.
            threading.Thread(target=gateway.shutdown, name="stopper").start()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGHUP, lambda _signum, _frame: threading.Thread(
            target=gateway.reload, name="reload").start())
        host, port = gateway.server_address[:2]
        print(f"vncgate listening on {host}:{port}", file=sys.stderr, flush=True)
        try:
            gateway.serve_forever()
        finally:
            gateway.stop()
            store.close()
            audit.close()
    return run_reporting_errors("vncgate", body)


def serve_main_exit():
    sys.exit(serve_main())
