"""The RFB security handshakes of a session: the gateway's with the backend, then the client's.

SessionManager (sessions.py) mixes in SessionSecurity. With the backend the gateway is the
RFB client (rfb.secure: VeNCrypt for a backend_tls token, else VNC Authentication or None),
and the outcome is kept on the session: the version line agreed, or the RfbError to tell
the client. With the client, after its 200 or 101, the gateway offers security type None, or
tells it in RFB why there is no console, and audits a session that ends there. The RFB
messages themselves are in rfb.py; this module only ties them to a session and its audit.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from typing import TYPE_CHECKING, Any, Callable

from vncgate import refusals
from vncgate.console import rfb
from vncgate.net import tls
from vncgate.refusals import Refused

if TYPE_CHECKING:
    from vncgate.audit import Audit
    from vncgate.console.sessions import Session

log = logging.getLogger("vncgate.console.sessions")


class SessionSecurity:
    """The security handshakes of a SessionManager's sessions (a mixin: it uses the manager's
    backend_timeout, backend_tls, audit and discard)."""

    backend_timeout: float
    backend_tls: ssl.SSLContext | None
    audit: Audit
    discard: Callable[[Session], None]  # SessionManager.discard: give back a session that ends here

    def _authenticate_backend(self, session: Session, fields: dict[str, Any]) -> bytes | rfb.RfbError:
        """The gateway's RFB security handshake with the backend: VeNCrypt for a backend_tls
        token, else VNC Authentication (or None). Returns the version line agreed, or the RfbError to
        tell the client in RFB; a console whose TLS fails is refused here (502) instead."""
        details, deadline = session.details, time.monotonic() + self.backend_timeout
        # A XenServer's banner may have come with its CONNECT reply: the handshake reads it.
        leftover, session.backend_leftover = session.backend_leftover, b""
        backend = session.backend
        assert isinstance(backend, socket.socket), "a backend is wrapped in TLS only here, once"
        try:
            version, secured = rfb.secure(backend, details.backend_password, deadline, leftover,
                                          self.backend_tls if details.backend_tls else None, details.host)
            if isinstance(secured, ssl.SSLSocket):  # VeNCrypt: from here on the backend is its TLS socket
                session.backend = tls.TlsStream(secured)
            return version
        except rfb.RfbError as error:
            log.warning("session %s: RFB security with %s:%s failed: %s", session.id,
                        details.host, details.port, error)
            if error.reason != "backend-tls-failed":
                return error
            raise Refused(error.reason, error.detail, **fields) from None

    def greet(self, session: Session, read_exact: Callable[[int], bytes], write: Callable[[bytes], object]) -> bool:
        """The client's half of the RFB security handshake, after its 200 or 101. False when
        the session ends here (audited): the stored password was refused, or the client
        did not speak RFB."""
        try:
            if isinstance(session.security, rfb.RfbError):
                sentence = refusals.REASONS[session.security.reason].sentence
                told = getattr(session.security, "told", "")  # what the refusal may name (ReplayError)
                rfb.refuse_client(read_exact, write, rfb.RFB_3_8, f"vncgate: {sentence}{' ' + told if told else ''}")
                self.audit.record("attempt", **session.audit_fields(), result="rejected", status=200,
                                  reason=session.security.reason, detail=session.security.detail)
            else:
                assert session.security is not None, "greet() is for a session that needs_greeting"
                rfb.offer_no_auth(read_exact, write, session.security)
                return True
        except (rfb.RfbError, OSError) as error:
            self.audit.record("session-end", **session.audit_fields(), bytes_up=0, bytes_down=0, duration=0,
                              reason=getattr(error, "reason", "client-closed"))
        self.discard(session)
        return False
