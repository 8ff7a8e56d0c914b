"""PNG (ISO/IEC 15948) with the standard library alone: 8-bit RGB, no interlace, filter type 0
on every row, one zlib stream in one IDAT chunk; and a whole-factor shrink for thumbnails."""

import struct
import zlib
from typing import Optional, Union

SIGNATURE = b"\x89PNG\r\n\x1a\n"
LEVEL = 6  # zlib's default: the screens of consoles (text, flat colour) compress well at once


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack("!I", len(data)) + kind + data + struct.pack("!I", zlib.crc32(kind + data))


def encode(width: int, height: int, rgb: Union[bytes, bytearray]) -> bytes:
    """A PNG of width x height RGB triples, row by row."""
    stride = width * 3
    if len(rgb) != stride * height:
        raise ValueError(f"{len(rgb)} bytes are not {width}x{height} RGB pixels")
    compressor = zlib.compressobj(LEVEL)
    body = [compressor.compress(b"\0" + rgb[row:row + stride]) for row in range(0, len(rgb), stride)]
    body.append(compressor.flush())
    header = struct.pack("!IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, RGB, deflate, filter 0, no interlace
    return SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", b"".join(body)) + _chunk(b"IEND", b"")


def shrink(width: int, height: int, rgb: Union[bytes, bytearray], max_width: Optional[int]) -> tuple:
    """(width, height, rgb) no wider than max_width: every n-th pixel of every n-th row, n the
    smallest whole factor that fits (a thumbnail; whole factors keep text's strokes regular)."""
    if not max_width or width <= max_width:
        return width, height, rgb
    step = -(-width // max_width)
    stride = width * 3
    out_width, out_height = -(-width // step), -(-height // step)
    out = bytearray(out_width * out_height * 3)
    out_stride = out_width * 3
    for out_row, start in enumerate(range(0, height * stride, step * stride)):
        row = rgb[start:start + stride]
        target = out_row * out_stride
        for channel in range(3):
            out[target + channel:target + out_stride:3] = row[channel::3 * step]
    return out_width, out_height, out
