"""The RFB security handshake, done by the gateway so that users never hold a VNC password.

With the backend the gateway is the client: it answers VNC Authentication's DES
challenge with the password sealed in the token, or chooses security type None for a
token with a console policy and no password (authenticate_backend), or does VeNCrypt
first (vencrypt_backend: TLS checked against the operator's CA, then VNC Authentication
inside it when the token holds a password). With the user's client it is the server and
offers security type None (offer_no_auth), or tells it in RFB why there is no console
(refuse_client). After both, the rest of the stream (ClientInit onwards) is relayed
untouched, or through the policy's filter (policy.py).

VNC Authentication's DES answer to the challenge (vnc_auth_response, a pure-Python DES)
is in vncauth.py.
"""

from __future__ import annotations

import re
import socket
import ssl
import struct
import time
from collections.abc import Callable
from typing import Any, TypeVar

from vncgate.console.vncauth import vnc_auth_response

T = TypeVar("T")

NONE, VNC_AUTH, VENCRYPT = 1, 2, 19  # RFB security types
X509_NONE, X509_VNC = 260, 261  # VeNCrypt sub-types
RFB_3_3, RFB_3_7, RFB_3_8 = b"RFB 003.003\n", b"RFB 003.007\n", b"RFB 003.008\n"
MAX_REASON = 4096  # longer failure reasons are cut: they only go to a log line and a client's dialog
_VERSION = re.compile(rb"RFB (\d{3})\.(\d{3})\n")
_U32 = struct.Struct("!I")
ReadExact = Callable[[int], bytes]  # n bytes (short or raising at the end)
Write = Callable[[bytes], Any]  # all of the bytes


class RfbError(Exception):
    """The handshake failed; .reason is a short word for audit lines, .detail says more."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# -- versions ----------------------------------------------------------------------------

def _minor(line: bytes, side: str) -> int:
    """The minor version (3, 7 or 8) a ProtocolVersion line stands for. Unofficial minors are
    read the way RFB clients read them: 8 and above (Apple's 3.889) as 3.8, 4 to 6 as 3.3.
    A backend may announce a later major version (RealVNC's 4.1, 5.0), which speaks 3.8 to a
    3.8 client; a client must answer with major version 3, as it cannot exceed the server's."""
    match = _VERSION.fullmatch(line)
    if match:
        major, minor = int(match.group(1)), int(match.group(2))
        if major > 3 and side == "backend":
            return 8
        if major == 3 and minor >= 3:
            return 8 if minor >= 8 else 7 if minor == 7 else 3
    raise RfbError(f"{side}-bad-rfb", f"not an RFB 3.3, 3.7 or 3.8 version: {line[:12]!r}")


def version_line(minor: int) -> bytes:
    """The ProtocolVersion line of RFB 3.minor."""
    return b"RFB 003.%03d\n" % minor


def _offered_minor(version: bytes) -> int:
    """The minor version of a line authenticate_backend returned: what the gateway offers a client."""
    minor = {RFB_3_3: 3, RFB_3_7: 7, RFB_3_8: 8}.get(bytes(version))
    if minor not in (3, 7, 8):
        raise ValueError(f"the gateway speaks RFB 3.3, 3.7 and 3.8, not {version!r}")
    return minor


# -- with the backend: the gateway is the RFB client ------------------------------------------

class BackendIO:
    """Exact reads and whole writes on a blocking socket, each bounded by one monotonic deadline.
    stage names what is under way, for the errors (the security handshake, a screenshot)."""

    def __init__(self, sock: socket.socket, deadline: float, initial: bytes = b"",
                 stage: str = "security handshake") -> None:
        self.sock = sock
        self.deadline = deadline
        self.pending = bytes(initial)
        self.stage = stage

    def budget(self) -> None:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise RfbError("backend-timeout", f"the VNC server's {self.stage} did not finish in time")
        self.sock.settimeout(remaining)

    def read_exact(self, count: int) -> bytes:
        while len(self.pending) < count:
            self.budget()
            try:  # never more than asked: what follows the handshake belongs to the relay
                chunk = self.sock.recv(count - len(self.pending))
            except socket.timeout:
                continue  # budget() raises on the next turn
            if not chunk:
                raise RfbError("backend-closed", f"the VNC server closed the connection during the {self.stage}")
            self.pending += chunk
        data, self.pending = self.pending[:count], self.pending[count:]
        return data

    def read_into(self, view: memoryview) -> None:
        """Fill view exactly (pixels straight into a framebuffer, no copy through bytes)."""
        done = min(len(self.pending), len(view))
        view[:done], self.pending = self.pending[:done], self.pending[done:]
        while done < len(view):
            self.budget()
            try:
                count = self.sock.recv_into(view[done:])
            except socket.timeout:
                continue
            if not count:
                raise RfbError("backend-closed", f"the VNC server closed the connection during the {self.stage}")
            done += count

    def write(self, data: bytes) -> None:
        self.budget()
        try:
            self.sock.sendall(data)
        except socket.timeout:
            raise RfbError("backend-timeout", f"the VNC server did not take the {self.stage}'s bytes in time") from None


def _failure_reason(read_exact: Callable[[int], bytes], fallback: str) -> str:
    """The reason string that follows a failure; fallback when the server sends none."""
    try:
        length = _U32.unpack(read_exact(4))[0]
        # rstrip: qemu counts its C string's terminating NUL in the length.
        text = read_exact(min(length, MAX_REASON)).decode("utf-8", "replace").rstrip("\0")
    except RfbError:
        return fallback
    return text or fallback


def authenticate_backend(sock: socket.socket, password: bytes | None, deadline: float, initial: bytes = b"") -> bytes:
    """Be the client of the backend's RFB security handshake, answering VNC Authentication
    with password, or choosing security type None when password is None (the tokens with a
    console policy, whose stream the gateway must read from ClientInit on); returns the
    ProtocolVersion line agreed (b"RFB 003.008\n", ...7 or ...3).

    sock is a blocking socket whose timeout is restored on return; every read and write ends
    by the time.monotonic() deadline. initial: bytes already read from sock (a XenServer
    CONNECT's leftover). Only the handshake's bytes are read, so on return the backend waits
    for the client's ClientInit and nothing of the stream is held here. Raises RfbError with
    reason backend-bad-rfb (not RFB), backend-refused (the server refused the connection,
    its reason in detail), backend-no-vnc-auth (security type 2 not offered),
    backend-needs-password (no password, and type None not offered),
    backend-auth-failed (password refused, the server's reason in detail), backend-timeout
    or backend-closed."""
    def handshake(backend: BackendIO) -> bytes:
        minor, offered = _security_types(backend)
        if password is not None:
            _choose(backend, minor, offered, VNC_AUTH, "backend-no-vnc-auth", "2 (VNC Authentication)")
            _vnc_authentication(backend, minor, password)
            return version_line(minor)
        _choose(backend, minor, offered, NONE, "backend-needs-password", "1 (None), and the token holds no password")
        if minor == 8:  # RFC 6143: before 3.8 there is no SecurityResult for type None
            _security_result(backend, minor, "backend-auth-failed", "the VNC server refused the password")
        return version_line(minor)
    return _as_client(sock, deadline, initial, handshake)


def vencrypt_backend(sock: socket.socket, context: ssl.SSLContext, hostname: str, password: bytes | None,
                     deadline: float, initial: bytes = b"") -> tuple[bytes, ssl.SSLSocket]:
    """Be the client of the backend's VeNCrypt handshake (security type 19): TLS with the
    console's x509 certificate checked by context for hostname, then, inside the TLS,
    nothing more (X509None) or VNC Authentication with password (X509Vnc, when the gateway
    holds one). Returns (ProtocolVersion line agreed, the TLS socket, blocking): from here
    on the backend is only reached through it; sock must not be used again. On failure
    the TLS socket, if there was one yet, is closed.

    Raises RfbError as authenticate_backend does, plus backend-tls-failed: no VeNCrypt,
    no sub-type the gateway can do (anonymous TLS is not one: it proves nothing), or a
    TLS handshake that failed (the console's certificate did not verify, say)."""
    def handshake(backend: BackendIO) -> tuple[bytes, ssl.SSLSocket]:
        minor, offered = _security_types(backend)
        if minor == 3:  # 3.3 cannot name VeNCrypt: the server picks a type, and only 1 or 2
            raise RfbError("backend-tls-failed", "the VNC server speaks RFB 3.3, which has no VeNCrypt")
        _choose(backend, minor, offered, VENCRYPT, "backend-tls-failed", "19 (VeNCrypt)")
        subtype = _vencrypt_subtype(backend, password is not None)
        if backend.pending:  # the server waits for our ClientHello: it cannot have said more
            raise RfbError("backend-bad-rfb", f"{len(backend.pending)} unexpected bytes before TLS")
        backend.sock = _tls_handshake(backend, context, hostname)
        try:
            if subtype == X509_VNC:
                assert password is not None  # X509Vnc is chosen only when the gateway holds one
                _vnc_authentication(backend, minor, password)
            else:
                _security_result(backend, minor, "backend-refused", "the VNC server refused the connection")
        except ssl.SSLError as error:
            raise RfbError("backend-tls-failed", f"TLS with the VNC server failed: {error}") from None
        except RfbError as error:
            if error.reason != "backend-closed":
                raise
            # TLS 1.3: the server checks the gateway's certificate after the client's handshake is done.
            raise RfbError("backend-tls-failed", "the VNC server closed the TLS connection at once: it may not "
                                                 "accept the gateway's certificate (backend_cert)") from None
        if backend.sock.pending():
            raise RfbError("backend-bad-rfb", "unexpected bytes after SecurityResult")
        return version_line(minor), backend.sock
    return _as_client(sock, deadline, initial, handshake)


def secure(sock: socket.socket, password: bytes | None, deadline: float, initial: bytes = b"",
           context: ssl.SSLContext | None = None, hostname: str = "") -> tuple[bytes, socket.socket]:
    """The backend's security handshake as the gateway does it for a token: VeNCrypt checked by
    context for hostname when context is given (a backend_tls token), else VNC Authentication
    with password (or None without one). Returns (version line, the socket to go on with: the
    TLS one after VeNCrypt, else sock). Raises RfbError as those two do."""
    if context is None:
        return authenticate_backend(sock, password, deadline, initial=initial), sock
    return vencrypt_backend(sock, context, hostname, password, deadline, initial=initial)


def _as_client(sock: socket.socket, deadline: float, initial: bytes, handshake: Callable[[BackendIO], T]) -> T:
    """Run handshake(BackendIO) on sock; OSError becomes backend-closed, the timeout is restored."""
    backend = BackendIO(sock, deadline, initial)
    saved_timeout = sock.gettimeout()
    try:
        result = handshake(backend)
        if backend.pending:  # the server must wait for ClientInit: it cannot have said more
            raise RfbError("backend-bad-rfb", f"{len(backend.pending)} unexpected bytes after SecurityResult")
        return result
    except (RfbError, OSError) as error:
        if backend.sock is not sock:  # a TLS wrapper owns the descriptor now: sock cannot close it
            backend.sock.close()
        if isinstance(error, RfbError):
            raise
        raise RfbError("backend-closed", f"the VNC server's connection failed during the handshake: {error}") from None
    finally:
        try:
            backend.sock.settimeout(saved_timeout)
        except OSError:
            pass  # closed meanwhile: nothing to restore


def _security_types(backend: BackendIO) -> tuple[int, list[int]]:
    """The versions, then the security types the server offers: (minor, [types])."""
    minor = _minor(backend.read_exact(12), "backend")
    backend.write(version_line(minor))
    if minor == 3:
        offered = [_U32.unpack(backend.read_exact(4))[0]]  # 3.3: the server decides, one u32
    else:
        offered = list(backend.read_exact(backend.read_exact(1)[0]))  # 3.7/3.8: a counted list
    if offered in ([], [0]):  # no types: a reason string follows and the server hangs up
        reason = _failure_reason(backend.read_exact, "no reason given")
        raise RfbError("backend-refused", f"the VNC server refused the connection: {reason}")
    return minor, offered


def _choose(backend: BackendIO, minor: int, offered: list[int], wanted: int, reason: str, name: str) -> None:
    if wanted not in offered:
        raise RfbError(reason, f"the VNC server offers security types {offered}, not {name}")
    if minor != 3:
        backend.write(bytes((wanted,)))


def _vnc_authentication(backend: BackendIO, minor: int, password: bytes) -> None:
    backend.write(vnc_auth_response(password, backend.read_exact(16)))
    _security_result(backend, minor, "backend-auth-failed", "the VNC server refused the password")


def _security_result(backend: BackendIO, minor: int, reason: str, fallback: str) -> None:
    """SecurityResult: sent for VNC Authentication and VeNCrypt in every version, for None in
    3.8; only 3.8 adds a reason to a failure."""
    if _U32.unpack(backend.read_exact(4))[0] != 0:
        raise RfbError(reason, _failure_reason(backend.read_exact, fallback) if minor == 8 else fallback)


def _vencrypt_subtype(backend: BackendIO, have_password: bool) -> int:
    """VeNCrypt 0.2's version and sub-type negotiation; returns the sub-type chosen, which the
    server has accepted: the TLS handshake comes next."""
    major, minor = backend.read_exact(2)
    if (major, minor) < (0, 2):
        raise RfbError("backend-tls-failed", f"the VNC server speaks VeNCrypt {major}.{minor}, not 0.2")
    backend.write(b"\0\2")
    if backend.read_exact(1) != b"\0":
        raise RfbError("backend-tls-failed", "the VNC server refused VeNCrypt 0.2")
    count = backend.read_exact(1)[0]
    offered = [_U32.unpack(backend.read_exact(4))[0] for _ in range(count)]
    wanted = (X509_VNC, X509_NONE) if have_password else (X509_NONE,)
    subtype = next((choice for choice in wanted if choice in offered), None)
    if subtype is None:
        raise RfbError("backend-tls-failed", f"the VNC server offers VeNCrypt sub-types {offered}; the gateway "
                                             f"does {list(wanted)}" + ("" if have_password else
                                                                       " (it holds no VNC password)"))
    backend.write(_U32.pack(subtype))
    if backend.read_exact(1) != b"\1":
        raise RfbError("backend-tls-failed", f"the VNC server refused VeNCrypt sub-type {subtype}")
    return subtype


def _tls_handshake(backend: BackendIO, context: ssl.SSLContext, hostname: str) -> ssl.SSLSocket:
    """The client side of TLS on the backend's socket, by the deadline; returns the SSLSocket."""
    wrapped = context.wrap_socket(backend.sock, server_hostname=hostname, do_handshake_on_connect=False)
    backend.sock = wrapped  # from here on only the wrapper may be used, and restored
    backend.budget()
    try:
        wrapped.do_handshake()
    except socket.timeout:
        raise RfbError("backend-timeout", "the VNC server's TLS handshake did not finish in time") from None
    except ssl.SSLCertVerificationError as error:
        raise RfbError("backend-tls-failed", f"the VNC server's certificate does not verify: {error.verify_message}") from None
    except ssl.SSLError as error:
        raise RfbError("backend-tls-failed", f"TLS with the VNC server failed: {error}") from None
    return wrapped


# -- with the client: the gateway is the RFB server, sans-IO ----------------------------------

def _client_io(read_exact: Callable[[int], bytes],
               write: Callable[[bytes], object]) -> tuple[Callable[[int], bytes], Callable[[bytes], object]]:
    """The caller's read_exact and write, turning EOF, short reads and socket errors into
    RfbError, so that a client's misbehaviour surfaces as one exception type."""
    def guarded(call: Callable[[Any], Any], argument: Any) -> Any:
        try:
            return call(argument)
        except socket.timeout:
            raise RfbError("handshake-timeout", "the client did not finish the RFB handshake in time") from None
        except (OSError, EOFError) as error:
            raise RfbError("client-closed", f"the client left during the RFB handshake: {error}") from None

    def read(count: int) -> bytes:
        data = guarded(read_exact, count)
        if len(data) != count:
            raise RfbError("client-closed", "the client left during the RFB handshake")
        return data
    return read, lambda data: guarded(write, data)


def _client_version(read: Callable[[int], bytes], send: Callable[[bytes], object], version: bytes) -> int:
    """Send the gateway's version, read the client's; returns the minor both will use."""
    offered = _offered_minor(version)
    send(version_line(offered))
    # A client may not ask for more than it was offered; one that does gets the offer.
    return min(offered, _minor(read(12), "client"))


ONLY_NONE = "Only the security type 1 (NONE) is supported"


def offer_no_auth(read_exact: ReadExact, write: Write, version: bytes) -> None:
    """Be the server of the client's RFB security handshake, offering type None only.

    version: the line authenticate_backend returned; the client is offered that version.
    read_exact(n) returns n bytes (short or raising at EOF); write(data) sends all of data.
    On return the client's next bytes are its ClientInit, for the backend. Raises RfbError
    with reason client-bad-rfb (not an RFB 3.x version), client-bad-security (chose a type
    other than None), client-closed or handshake-timeout; nothing else escapes, save a
    ValueError for a version the gateway does not speak (a caller's mistake)."""
    read, send = _client_io(read_exact, write)
    minor = _client_version(read, send, version)
    if minor == 3:
        send(_U32.pack(NONE))  # 3.3: the server decides
        return
    send(bytes((1, NONE)))
    choice = read(1)[0]
    if choice != NONE:
        # As Nova's proxy does: SecurityResult failed, and in 3.8 the reason the client shows
        # (RFC 6143 7.1.3; 3.7 has no reason string).
        reason = _U32.pack(len(ONLY_NONE)) + ONLY_NONE.encode() if minor == 8 else b""
        send(_U32.pack(1) + reason)
        raise RfbError("client-bad-security", f"the client chose security type {choice}, not 1 (None)")
    if minor == 8:
        send(_U32.pack(0))  # SecurityResult OK; RFC 6143: 3.7 sends none for type None


def refuse_client(read_exact: Callable[[int], bytes], write: Callable[[bytes], object], version: bytes,
                  reason: str) -> None:
    """Tell the client in RFB why it cannot have the console: after the versions, no security
    types (3.7/3.8: count 0; 3.3: type 0) and the reason string, which RFB clients show.
    The caller closes the connection afterwards. Raises RfbError as offer_no_auth does."""
    read, send = _client_io(read_exact, write)
    minor = _client_version(read, send, version)
    text = reason.encode("utf-8")[:MAX_REASON]
    send((_U32.pack(0) if minor == 3 else b"\0") + _U32.pack(len(text)) + text)
