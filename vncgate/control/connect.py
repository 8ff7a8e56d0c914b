"""vncgate-connect: a native VNC client (TigerVNC, Remmina, RealVNC) through an XVP console URL.

Such clients speak plain RFB to a host and port and cannot send XVP's CONNECT. This
command listens for the viewer where only its user can connect: by default a Unix socket
in a folder of its own (mode 0700) under $XDG_RUNTIME_DIR (TigerVNC's vncviewer takes the
socket's path), or with --listen a TCP port on loopback that accepts only connections
from processes of the same uid (the peer's socket owner, read from /proc/net/tcp). It
serves one viewer at a time unless --viewers says more; a --listen address that is not
loopback needs --allow-remote, and is warned about. For each viewer it opens the gateway URL
(TLS for https://, checked against the system's trust store or --cacert), sends
`CONNECT /console?token=T`, and relays once the gateway answers 200. When the console
cannot be had (the link is refused, expired or revoked, the gateway is unreachable),
the user reads why twice: one line on the terminal, and the same sentence as an RFB
failure reason in the viewer's own dialog. Standard library only, like the gateway.
"""

import argparse
import ipaddress
import os
import signal
import socket
import ssl
import sys
import tempfile
import threading
import time
import urllib.parse
from typing import NoReturn, Optional, TextIO

from vncgate.console import relay, rfb, streams
from vncgate.net import http, peercred
from vncgate.refusals import Refused

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
TIMEOUT = 15.0  # seconds to reach the gateway and read its answer
MAX_REPLY = 8192  # a refusal's head and body are a few hundred bytes


class ConnectError(Exception):
    """The console cannot be had through this URL; str() is one line for the terminal,
    .viewer the shorter sentence a viewer's dialog shows."""

    def __init__(self, message: str, viewer: Optional[str] = None) -> None:
        super().__init__(message)
        self.viewer = viewer or message


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConnectError(f"{message} (see {self.prog} --help)")


def parser() -> argparse.ArgumentParser:
    commands = _Parser(prog="vncgate-connect", description="Serve a vncgate console URL (xvp-vnc) to your native "
                       "VNC viewer, on a Unix socket only you can reach (or --listen: a TCP port that serves your "
                       "uid only).")
    commands.add_argument("url", metavar="URL", help="the console URL: http(s)://GATEWAY/console?token=T; "
                          "- reads it from standard input (a command line is visible to every local user)")
    commands.add_argument("--listen", metavar="ADDR:PORT", type=_address,
                          help="a TCP port for the viewer instead of the Unix socket (port 0: a free one); "
                          "only processes of your uid may connect")
    commands.add_argument("--allow-remote", action="store_true",
                          help="let --listen name an address that is not loopback: any host that reaches "
                          "it may connect (a warning says so)")
    commands.add_argument("--viewers", metavar="N", type=_count, default=1,
                          help="viewers served at once (default 1); more are refused with a reason")
    commands.add_argument("--once", action="store_true", help="serve one viewer, then exit")
    commands.add_argument("--cacert", metavar="F", help="trust this CA file for an https URL "
                          "(default: the system's trust store)")
    return commands


def console_url(text: str) -> urllib.parse.SplitResult:
    """The URL's parts, checked; ConnectError (a usage error) when it is not a console URL.
    The URL itself is never repeated: it holds the token."""
    parts = urllib.parse.urlsplit(text.strip())
    try:
        _ = parts.port  # raises ValueError for a bad port
    except ValueError:
        raise ConnectError("not a console URL: bad port") from None
    if (parts.scheme not in ("http", "https") or not parts.hostname
            or not urllib.parse.parse_qs(parts.query).get("token")):
        raise ConnectError("not a console URL: expected http(s)://GATEWAY/console?token=…")
    return parts


def _address(text: str) -> tuple:
    host, colon, port = text.rpartition(":")
    if not colon or not port.isascii() or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"invalid address {text!r}: must be ADDR:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def _count(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 1000:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: must be from 1 to 1000")
    return int(text)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return host == "localhost"


class Target:
    """The gateway and the CONNECT request of a console URL."""

    def __init__(self, parts: urllib.parse.SplitResult, cacert: Optional[str] = None) -> None:
        """parts: the URL as urllib.parse.urlsplit gives it, checked by the parser."""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.host = parts.hostname
        self.netloc = parts.netloc
        self.request = (f"CONNECT {parts.path or '/'}?{parts.query} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n"
                        ).encode("latin-1")
        self.context = None
        if parts.scheme == "https":
            try:
                self.context = ssl.create_default_context(cafile=cacert)
            except (OSError, ssl.SSLError) as error:
                raise ConnectError(f"cannot load CA file {cacert}: {getattr(error, 'strerror', None) or error}"
                                   ) from None

    def open(self) -> tuple[socket.socket, bytes]:
        """A connection to the gateway that has answered 200; returns (socket, bytes after the head)."""
        deadline = time.monotonic() + TIMEOUT
        try:
            sock = socket.create_connection((self.host, self.port), timeout=TIMEOUT)
        except OSError as error:
            raise ConnectError(f"cannot reach the gateway {self.netloc}: {error.strerror or error}") from None
        try:
            if self.context is not None:
                sock = self.context.wrap_socket(sock, server_hostname=self.host)
            sock.sendall(self.request)
            status, leftover = http.read_response_status(sock, deadline, MAX_REPLY)
        except ssl.SSLCertVerificationError as error:
            sock.close()
            raise ConnectError(f"the gateway {self.netloc} has a certificate that does not verify: "
                               f"{error.verify_message}") from None
        except (OSError, Refused) as error:
            sock.close()
            raise ConnectError(f"the gateway {self.netloc} did not answer the console request: "
                               f"{getattr(error, 'detail', None) or error}") from None
        if status != 200:
            sentence = _refusal_sentence(sock, leftover, deadline) or str(status)
            sock.close()
            # "401 Unauthorized: This console link is not valid: …": the viewer gets the sentence.
            raise ConnectError(f"the gateway refused the console link: {sentence}", sentence.partition(": ")[2])
        return sock, leftover


def _refusal_sentence(sock: socket.socket, body: bytes, deadline: float) -> str:
    """The gateway's one-line refusal ("401 Unauthorized: This console link is not valid…")."""
    try:
        while b"\n" not in body and len(body) < MAX_REPLY and time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(MAX_REPLY)
            if not chunk:
                break
            body += chunk
    except OSError:
        pass  # what arrived is what there is
    return body.split(b"\n")[0].decode("utf-8", "replace").strip()


class Connector:
    """Accepts viewers where only this user can connect (a Unix socket in a 0700 folder, or a
    TCP port that checks the peer's uid) and relays each through its own gateway connection."""

    def __init__(self, target: Target, listen: Optional[tuple] = None, once: bool = False, err: TextIO = sys.stderr,
                 viewers: int = 1, runtime_dir: Optional[str] = None) -> None:
        """listen: (host, port) for TCP; None for a Unix socket in a new folder under runtime_dir
        (default $XDG_RUNTIME_DIR, else the temporary folder). viewers: served at once."""
        self.target = target
        self.once = once
        self.err = err
        self.failure: Optional[ConnectError] = None  # the first ConnectError: the URL is done for, and so is this command
        self._stopping = threading.Event()
        self._slots = threading.BoundedSemaphore(viewers)
        self.folder = None
        if listen is None:
            self.folder = tempfile.mkdtemp(prefix="vncgate-connect-", dir=runtime_dir or _runtime_dir())  # 0700
            self.address = os.path.join(self.folder, "viewer.sock")
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(self.address)
            os.chmod(self.address, 0o600)  # the folder alone keeps others out; the socket says so too
            self.listener.listen()
            self.port = None
            return
        family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
        try:
            self.listener = socket.create_server(listen, family=family)
        except OSError as error:
            why = os.strerror(error.errno) if error.errno else error  # create_server adds the address
            raise ConnectError(f"cannot listen on {listen[0]}:{listen[1]}: {why}") from None
        self.port = self.listener.getsockname()[1]
        host = self.listener.getsockname()[0]
        self.address = f"[{host}]::{self.port}" if ":" in host else f"{host}::{self.port}"

    def serve(self) -> int:
        """Until a failure, --once's session ends, or stop(); returns the exit status. Sessions
        still running when another viewer's connection fails are let finish first."""
        sessions = []
        try:
            while not self._stopping.is_set():
                try:
                    viewer, _ = self.listener.accept()
                except OSError:
                    break  # stop() closed the listener
                if not self._admitted(viewer):
                    continue
                if self.once:
                    self._session(viewer)
                    break
                thread = threading.Thread(target=self._session, args=(viewer,), name="viewer", daemon=True)
                thread.start()
                sessions.append(thread)
        finally:
            self.listener.close()
            self.remove_folder()
        for thread in sessions:
            thread.join()
        return EXIT_FAILURE if self.failure else EXIT_OK

    def _admitted(self, viewer: socket.socket) -> bool:
        """A viewer of this user's, with a free slot; anyone else is closed (and told why, when
        it is this user's viewer and only the slots are taken)."""
        try:
            peer = viewer.getpeername() if viewer.family != socket.AF_UNIX else None
        except OSError:  # gone already
            viewer.close()
            return False
        if peer is None or is_loopback(peer[0]):
            uid = peercred.peer_uid(viewer)
            if uid != os.getuid():
                who = f"uid {uid}" if uid is not None else "an unknown user"
                print(f"vncgate-connect: refused a connection from {who}: only uid {os.getuid()} may use this "
                      "console", file=self.err, flush=True)
                viewer.close()
                return False
        if not self._slots.acquire(blocking=False):
            threading.Thread(target=_tell_viewer, args=(viewer, "vncgate: another viewer is using this console "
                             "(vncgate-connect --viewers N serves more)"), daemon=True).start()
            return False
        return True

    def _session(self, viewer: socket.socket) -> None:
        try:
            try:
                gateway, leftover = self.target.open()
            except ConnectError as error:
                self._fail(error)
                _tell_viewer(viewer, f"vncgate: {error.viewer}")
                return
            relay.Relay.raw(viewer, gateway, backend_leftover=leftover).run()
        finally:
            self._slots.release()

    def remove_folder(self) -> None:
        """The Unix socket and its folder, gone (once; again is harmless)."""
        if self.folder is not None:
            try:
                os.unlink(self.address)
                os.rmdir(self.folder)
            except OSError:
                pass

    def _fail(self, error: ConnectError) -> None:
        if self.failure is None:
            self.failure = error
            print(f"vncgate-connect: error: {error}", file=self.err, flush=True)
        self.stop()

    def stop(self) -> None:
        self._stopping.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        except OSError:
            pass
        self.listener.close()


def _runtime_dir() -> str:
    """$XDG_RUNTIME_DIR (the user's own, mode 0700) when it is usable, else the temporary folder."""
    folder = os.environ.get("XDG_RUNTIME_DIR", "")
    return folder if folder and os.path.isdir(folder) and os.access(folder, os.W_OK) else tempfile.gettempdir()


def _tell_viewer(viewer: socket.socket, reason: str) -> None:
    """Be the viewer's RFB server just long enough to refuse it with reason, which it shows."""
    viewer.settimeout(5)
    try:
        reader = streams.ChunkReader(streams.SocketSource(viewer))
        rfb.refuse_client(reader.read_exact, viewer.sendall, rfb.RFB_3_8, reason)
    except rfb.RfbError:
        pass  # not an RFB viewer, or gone: the terminal line is the message
    finally:
        viewer.close()


def main(argv: Optional[list[str]] = None, out: Optional[TextIO] = None, err: Optional[TextIO] = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    try:
        args = parser().parse_args(argv)
        url = console_url(sys.stdin.readline() if args.url == "-" else args.url)
    except ConnectError as error:
        print(f"vncgate-connect: error: {error}", file=err)
        return EXIT_USAGE
    if args.listen and not is_loopback(args.listen[0]):
        if not args.allow_remote:
            print(f"vncgate-connect: error: --listen {args.listen[0]} is not a loopback address: any host could "
                  "connect to the console; add --allow-remote if that is meant", file=err)
            return EXIT_USAGE
        print(f"vncgate-connect: warning: listening on {args.listen[0]}, not loopback: any host that reaches it "
              "can use this console", file=err, flush=True)
    try:
        connector = Connector(Target(url, args.cacert), args.listen, once=args.once, err=err, viewers=args.viewers)
    except ConnectError as error:
        print(f"vncgate-connect: error: {error}", file=err)
        return EXIT_FAILURE
    try:
        print(f"vncviewer {connector.address}", file=out, flush=True)
        return connector.serve()
    except KeyboardInterrupt:
        return 130
    finally:
        connector.remove_folder()  # also when a signal came before serve() began


def main_exit() -> None:
    # SIGTERM ends it as Ctrl-C does: the Unix socket's folder is removed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
