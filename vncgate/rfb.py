"""The RFB security handshake, done by the gateway so that users never hold a VNC password.

With the backend the gateway is the client: it answers VNC Authentication's DES
challenge with the password sealed in the token. With the user's client it is the
server and offers security type None. After both, the rest of the stream (ClientInit
onwards) is relayed untouched.

VNC Authentication needs single DES, which the standard library lacks. It is written
here from FIPS 46-3 and checked against published vectors rather than taken from the
`cryptography` package: it encrypts one 16-byte challenge per session, so speed does
not matter, and the runtime dependencies stay the standard library and websockify.
"""

import re
import socket
import struct
import time

NONE, VNC_AUTH = 1, 2
MAX_REASON = 4096
_VERSION = re.compile(rb"RFB 003\.(\d{3})\n")


class RfbError(Exception):
    """The handshake failed; .reason is a short word for audit lines, str() says more."""

    def __init__(self, reason, detail):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# -- DES (FIPS 46-3), encryption of one 64-bit block ----------------------------------------

_IP = [58, 50, 42, 34, 26, 18, 10, 2, 60, 52, 44, 36, 28, 20, 12, 4,
       62, 54, 46, 38, 30, 22, 14, 6, 64, 56, 48, 40, 32, 24, 16, 8,
       57, 49, 41, 33, 25, 17, 9, 1, 59, 51, 43, 35, 27, 19, 11, 3,
       61, 53, 45, 37, 29, 21, 13, 5, 63, 55, 47, 39, 31, 23, 15, 7]
_FP = [_IP.index(position) + 1 for position in range(1, 65)]  # the inverse of IP
_E = [(4 * block + offset - 1) % 32 + 1 for block in range(8) for offset in range(6)]
_P = [16, 7, 20, 21, 29, 12, 28, 17, 1, 15, 23, 26, 5, 18, 31, 10,
      2, 8, 24, 14, 32, 27, 3, 9, 19, 13, 30, 6, 22, 11, 4, 25]
_PC1 = [57, 49, 41, 33, 25, 17, 9, 1, 58, 50, 42, 34, 26, 18,
        10, 2, 59, 51, 43, 35, 27, 19, 11, 3, 60, 52, 44, 36,
        63, 55, 47, 39, 31, 23, 15, 7, 62, 54, 46, 38, 30, 22,
        14, 6, 61, 53, 45, 37, 29, 21, 13, 5, 28, 20, 12, 4]
_PC2 = [14, 17, 11, 24, 1, 5, 3, 28, 15, 6, 21, 10, 23, 19, 12, 4, 26, 8, 16, 7, 27, 20, 13, 2,
        41, 52, 31, 37, 47, 55, 30, 40, 51, 45, 33, 48, 44, 49, 39, 56, 34, 53, 46, 42, 50, 36, 29, 32]
_SHIFTS = [1, 1, 2, 2, 2, 2, 2, 2, 1, 2, 2, 2, 2, 2, 2, 1]
_S = [
    [14, 4, 13, 1, 2, 15, 11, 8, 3, 10, 6, 12, 5, 9, 0, 7, 0, 15, 7, 4, 14, 2, 13, 1, 10, 6, 12, 11, 9, 5, 3, 8,
     4, 1, 14, 8, 13, 6, 2, 11, 15, 12, 9, 7, 3, 10, 5, 0, 15, 12, 8, 2, 4, 9, 1, 7, 5, 11, 3, 14, 10, 0, 6, 13],
    [15, 1, 8, 14, 6, 11, 3, 4, 9, 7, 2, 13, 12, 0, 5, 10, 3, 13, 4, 7, 15, 2, 8, 14, 12, 0, 1, 10, 6, 9, 11, 5,
     0, 14, 7, 11, 10, 4, 13, 1, 5, 8, 12, 6, 9, 3, 2, 15, 13, 8, 10, 1, 3, 15, 4, 2, 11, 6, 7, 12, 0, 5, 14, 9],
    [10, 0, 9, 14, 6, 3, 15, 5, 1, 13, 12, 7, 11, 4, 2, 8, 13, 7, 0, 9, 3, 4, 6, 10, 2, 8, 5, 14, 12, 11, 15, 1,
     13, 6, 4, 9, 8, 15, 3, 0, 11, 1, 2, 12, 5, 10, 14, 7, 1, 10, 13, 0, 6, 9, 8, 7, 4, 15, 14, 3, 11, 5, 2, 12],
    [7, 13, 14, 3, 0, 6, 9, 10, 1, 2, 8, 5, 11, 12, 4, 15, 13, 8, 11, 5, 6, 15, 0, 3, 4, 7, 2, 12, 1, 10, 14, 9,
     10, 6, 9, 0, 12, 11, 7, 13, 15, 1, 3, 14, 5, 2, 8, 4, 3, 15, 0, 6, 10, 1, 13, 8, 9, 4, 5, 11, 12, 7, 2, 14],
    [2, 12, 4, 1, 7, 10, 11, 6, 8, 5, 3, 15, 13, 0, 14, 9, 14, 11, 2, 12, 4, 7, 13, 1, 5, 0, 15, 10, 3, 9, 8, 6,
     4, 2, 1, 11, 10, 13, 7, 8, 15, 9, 12, 5, 6, 3, 0, 14, 11, 8, 12, 7, 1, 14, 2, 13, 6, 15, 0, 9, 10, 4, 5, 3],
    [12, 1, 10, 15, 9, 2, 6, 8, 0, 13, 3, 4, 14, 7, 5, 11, 10, 15, 4, 2, 7, 12, 9, 5, 6, 1, 13, 14, 0, 11, 3, 8,
     9, 14, 15, 5, 2, 8, 12, 3, 7, 0, 4, 10, 1, 13, 11, 6, 4, 3, 2, 12, 9, 5, 15, 10, 11, 14, 1, 7, 6, 0, 8, 13],
    [4, 11, 2, 14, 15, 0, 8, 13, 3, 12, 9, 7, 5, 10, 6, 1, 13, 0, 11, 7, 4, 9, 1, 10, 14, 3, 5, 12, 2, 15, 8, 6,
     1, 4, 11, 13, 12, 3, 7, 14, 10, 15, 6, 8, 0, 5, 9, 2, 6, 11, 13, 8, 1, 4, 10, 7, 9, 5, 0, 15, 14, 2, 3, 12],
    [13, 2, 8, 4, 6, 15, 11, 1, 10, 9, 3, 14, 5, 0, 12, 7, 1, 15, 13, 8, 10, 3, 7, 4, 12, 5, 6, 11, 0, 14, 9, 2,
     7, 11, 4, 1, 9, 12, 14, 2, 0, 6, 10, 13, 15, 3, 5, 8, 2, 1, 14, 7, 4, 10, 8, 13, 15, 12, 9, 0, 3, 5, 6, 11],
]


def _permute(value, table, width):
    """Bit i of the result (from the left, 1-based as in FIPS 46-3) is bit table[i] of value."""
    result = 0
    for position in table:
        result = (result << 1) | ((value >> (width - position)) & 1)
    return result


def _subkeys(key):
    both = _permute(int.from_bytes(key, "big"), _PC1, 64)
    left, right = both >> 28, both & 0xFFFFFFF
    keys = []
    for shift in _SHIFTS:
        left = ((left << shift) | (left >> (28 - shift))) & 0xFFFFFFF
        right = ((right << shift) | (right >> (28 - shift))) & 0xFFFFFFF
        keys.append(_permute((left << 28) | right, _PC2, 56))
    return keys


def _feistel(half, subkey):
    mixed = _permute(half, _E, 32) ^ subkey
    out = 0
    for box in range(8):
        six = (mixed >> (42 - 6 * box)) & 0x3F
        row, column = ((six >> 4) & 2) | (six & 1), (six >> 1) & 0xF
        out = (out << 4) | _S[box][16 * row + column]
    return _permute(out, _P, 32)


def des_encrypt_block(key, block):
    """DES-ECB of one 8-byte block under an 8-byte key (parity bits ignored)."""
    state = _permute(int.from_bytes(block, "big"), _IP, 64)
    left, right = state >> 32, state & 0xFFFFFFFF
    for subkey in _subkeys(key):
        left, right = right, left ^ _feistel(right, subkey)
    return _permute((right << 32) | left, _FP, 64).to_bytes(8, "big")


def vnc_auth_response(password, challenge):
    """VNC Authentication: DES of the 16-byte challenge under the password, whose bytes
    (cut or NUL-padded to 8) have their bits reversed: VNC's historic key quirk."""
    key = bytes(int(f"{byte:08b}"[::-1], 2) for byte in password[:8].ljust(8, b"\0"))
    return des_encrypt_block(key, challenge[:8]) + des_encrypt_block(key, challenge[8:16])


# -- the two handshakes -----------------------------------------------------------------------

def _minor(banner, side):
    match = _VERSION.fullmatch(banner)
    if not match:
        raise RfbError(f"{side}-bad-rfb", f"not an RFB 3.x version: {banner[:12]!r}")
    minor = int(match.group(1))
    return 8 if minor >= 8 else 7 if minor == 7 else 3  # as RFB clients treat unknown versions


def version_line(minor):
    return b"RFB 003.%03d\n" % minor


def _reader(sock, deadline):
    def read_exact(count):
        data = b""
        while len(data) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RfbError("backend-timeout", "the VNC server's handshake did not finish in time")
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(count - len(data))
            except socket.timeout:
                continue
            if not chunk:
                raise RfbError("backend-closed", "the VNC server closed during the handshake")
            data += chunk
        return data
    return read_exact


def _reason(read_exact):
    length = struct.unpack("!I", read_exact(4))[0]
    return read_exact(min(length, MAX_REASON)).decode("utf-8", "replace")


def authenticate_backend(sock, password, deadline):
    """Be the client of the backend's RFB security handshake; returns the minor version agreed.
    Raises RfbError: backend-bad-rfb, backend-refused, backend-no-vnc-auth,
    backend-auth-failed, backend-timeout, backend-closed."""
    read_exact = _reader(sock, deadline)
    minor = _minor(read_exact(12), "backend")
    sock.sendall(version_line(minor))
    if minor == 3:
        offered = [struct.unpack("!I", read_exact(4))[0]]
    else:
        offered = list(read_exact(read_exact(1)[0]))
    if offered in ([], [0]):
        raise RfbError("backend-refused", _reason(read_exact))
    if VNC_AUTH not in offered:
        raise RfbError("backend-no-vnc-auth", f"the VNC server offers security types {offered}, not 2")
    if minor != 3:
        sock.sendall(bytes((VNC_AUTH,)))
    sock.sendall(vnc_auth_response(password, read_exact(16)))
    if struct.unpack("!I", read_exact(4))[0] != 0:
        raise RfbError("backend-auth-failed", _reason(read_exact) if minor == 8 else "the VNC password was refused")
    return minor


def offer_no_auth(read_exact, write, minor):
    """Be the server of the client's handshake, offering security type None only."""
    write(version_line(minor))
    client_minor = min(minor, _minor(read_exact(12), "client"))
    if client_minor == 3:
        write(struct.pack("!I", NONE))
        return
    write(bytes((1, NONE)))
    choice = read_exact(1)[0]
    if choice != NONE:
        raise RfbError("client-bad-security", f"the client chose security type {choice}, not None")
    if client_minor == 8:
        write(struct.pack("!I", 0))  # SecurityResult OK; RFB 3.7 sends none for type None


def refuse_client(read_exact, write, minor, reason):
    """Tell the client, in RFB, why it cannot have the console."""
    write(version_line(minor))
    client_minor = min(minor, _minor(read_exact(12), "client"))
    text = reason.encode()
    write((struct.pack("!I", 0) if client_minor == 3 else b"\0") + struct.pack("!I", len(text)) + text)
