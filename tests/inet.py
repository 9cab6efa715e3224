"""The Internet checksum (RFC 1071) the plain way: the oracle the tests hold rsttrace's
reconstructed packets to, and what the packet lab's injected segments carry."""

from __future__ import annotations

import struct


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return int(~s & 0xFFFF)
