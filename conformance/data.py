"""Test data: patterns in which every 8-byte word says where it belongs and who wrote it.

A misplaced, stale or torn block then shows up as a wrong word at a known
offset instead of "some bytes differ".
"""

from __future__ import annotations

import struct
from array import array


def pattern(offset: int, length: int, tag: int = 1) -> bytes:
    """LENGTH bytes for export offset OFFSET: word i holds (TAG << 48) | its own offset.

    Words are aligned on the export (not on OFFSET), so two writes of the same
    tag that overlap agree on the bytes they share.
    """
    if length <= 0:
        return b""
    first = offset - offset % 8
    words = array("Q", range((tag << 48) | first, (tag << 48) | (offset + length + 7), 8))
    if struct.pack("=H", 1) != struct.pack("<H", 1):
        words.byteswap()  # little-endian on every host
    start = offset - first
    return words.tobytes()[start : start + length]
