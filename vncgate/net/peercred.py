"""Which local user is at the other end of a connection: SO_PEERCRED for a Unix socket, and for
TCP on this host the owner of the peer's socket in /proc/net/tcp (Linux; the kernel writes the
owning uid on each socket's line). None when it cannot be told: callers refuse then.
"""

import ipaddress
import socket
import struct
from typing import Optional

_PROC_FILES = ("/proc/net/tcp", "/proc/net/tcp6")
_UCRED = struct.Struct("3i")  # pid, uid, gid


def peer_uid(conn: socket.socket) -> Optional[int]:
    """The uid of the process at the other end of conn, or None when that is not known."""
    if conn.family == socket.AF_UNIX:
        try:
            _, uid, _ = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        except OSError:
            return None
        return uid
    try:
        peer, ours = conn.getpeername()[:2], conn.getsockname()[:2]
    except OSError:
        return None
    # The peer's own socket is the line whose local end is its address and remote end is ours.
    wanted = {(_proc_address(peer[0], peer[1], six), _proc_address(ours[0], ours[1], six)) for six in (False, True)}
    wanted.discard((None, None))
    for name in _PROC_FILES:
        try:
            with open(name) as table:
                next(table, None)  # the header line
                for line in table:
                    fields = line.split()
                    if len(fields) > 7 and (fields[1], fields[2]) in wanted:
                        return int(fields[7])
        except (OSError, ValueError):
            continue
    return None


def _proc_address(host: str, port: int, six: bool) -> Optional[str]:
    """host:port as /proc/net/tcp{,6} writes it: the address's 32-bit words in host byte order,
    then the port, in upper-case hex. six: as tcp6 writes it (an IPv4 address IPv4-mapped)."""
    address = ipaddress.ip_address(host.split("%")[0])
    if six and address.version == 4:
        address = ipaddress.IPv6Address("::ffff:" + str(address))
    elif not six and address.version == 6:
        mapped = address.ipv4_mapped
        if mapped is None:
            return None
        address = mapped
    packed = address.packed
    words = "".join(f"{struct.unpack('=I', packed[i:i + 4])[0]:08X}" for i in range(0, len(packed), 4))
    return f"{words}:{port:04X}"
