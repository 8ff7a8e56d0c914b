"""Reaching a console's VNC server, hiding the hypervisors' differences.

qemu/libvirt/KVM: plain TCP to host:port. XenServer: the same, then
`CONNECT internal_access_path` and a 200 before any RFB byte. Either way the
backend must speak first (RFB servers send their version banner at once), so a
backend that accepts but stays silent is found here, before the client is told 200.
"""

import select
import socket
import time

from vncgate.console.allow import BackendAllow, resolve
from vncgate.net import fds, http
from vncgate.refusals import Refused
from vncgate.store.common import ConnectionDetails

XEN_REPLY_LIMIT = 4096


def open_backend(details: ConnectionDetails, timeout: float, *, allow: BackendAllow) -> tuple[socket.socket, bytes]:
    """Connect to the console of details; returns (socket, bytes already read from it).
    Raises Refused with a backend-… reason. allow: the gateway's allow.BackendAllow."""
    deadline = time.monotonic() + timeout
    sock = connect(details.host, details.port, timeout, allow=allow)
    try:
        leftover = _xen_connect(sock, details.internal_access_path, deadline) if details.internal_access_path else b""
        if not leftover:
            _wait_for_first_byte(sock, deadline)
        return sock, leftover
    except BaseException:
        sock.close()
        raise


def connect(host: str, port: int, timeout: float, *, allow: BackendAllow) -> socket.socket:
    """A TCP connection to host:port; Refused with a backend-… reason when there is none.
    The name is resolved here and only the addresses allow permits are tried (a name may
    resolve elsewhere than it did when its token was minted): backend-not-allowed when none is."""
    addresses = resolve(host, port)
    if not addresses:
        raise Refused("backend-unreachable", f"{host} does not resolve")
    permitted = [address for address in addresses if allow.refusal(address, port) is None]
    if not permitted:
        raise Refused("backend-not-allowed", f"{host}:{port}: {allow.refusal(addresses[0], port)}")
    deadline = time.monotonic() + timeout
    for address in permitted[:-1]:  # the last one's error is the one reported
        try:
            return _connect_one(address, port, max(0.001, deadline - time.monotonic()))
        except Refused:
            continue
    return _connect_one(permitted[-1], port, max(0.001, deadline - time.monotonic()))


def _connect_one(address: str, port: int, timeout: float) -> socket.socket:
    try:
        return socket.create_connection((address, port), timeout=timeout)
    except ConnectionRefusedError as error:
        raise Refused("backend-refused", str(error)) from None
    except socket.timeout:
        raise Refused("backend-timeout", f"no connection to {address}:{port} in {timeout:.3g}s") from None
    except OSError as error:
        raise Refused("no-free-fds" if fds.is_exhaustion(error) else "backend-unreachable", str(error)) from None


def _xen_connect(sock: socket.socket, path: str, deadline: float) -> bytes:
    try:
        sock.sendall(f"CONNECT {path} HTTP/1.1\r\n\r\n".encode("latin-1"))
        status, leftover = http.read_response_status(sock, deadline, XEN_REPLY_LIMIT)
    except OSError as error:
        raise Refused("backend-unreachable", str(error)) from None
    if status != 200:
        raise Refused("backend-refused-connect", f"XenServer answered {status} to CONNECT {path}")
    return leftover


def _wait_for_first_byte(sock: socket.socket, deadline: float) -> None:
    """Wait, without consuming anything, until the backend has sent its first byte."""
    poller = select.poll()  # not select.select: descriptors above 1024 are normal under load
    poller.register(sock, select.POLLIN)
    if not poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
        raise Refused("backend-silent", "the VNC server sent nothing in time")
    if not sock.recv(1, socket.MSG_PEEK):
        raise Refused("backend-closed", "the VNC server closed the connection at once")
