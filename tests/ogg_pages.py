"""Minimal Ogg page reader/writer for tests: repage an Ogg-Opus stream like Kyutai's web client does."""

from __future__ import annotations

import struct


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else (r << 1)
        table.append(r & 0xFFFFFFFF)
    return table


_TABLE = _crc_table()


def crc(data: bytes) -> int:
    value = 0
    for byte in data:
        value = ((value << 8) & 0xFFFFFFFF) ^ _TABLE[((value >> 24) & 0xFF) ^ byte]
    return value


def read_packets(stream: bytes) -> list[tuple[bytes, int]]:
    """(packet, granule position of the page that ends it) for every packet of an Ogg stream."""
    packets, partial, pos = [], b"", 0
    while pos + 27 <= len(stream):
        if stream[pos:pos + 4] != b"OggS":
            raise ValueError(f"no Ogg page at byte {pos}")
        granule = struct.unpack_from("<q", stream, pos + 6)[0]
        count = stream[pos + 26]
        lacing = stream[pos + 27:pos + 27 + count]
        body = pos + 27 + count
        for size in lacing:
            partial += stream[body:body + size]
            body += size
            if size < 255:
                packets.append((partial, granule))
                partial = b""
        pos = body
    return packets


def write_page(packets: list[bytes], granule: int, serial: int, sequence: int, flags: int = 0) -> bytes:
    lacing = b""
    for packet in packets:
        lacing += b"\xff" * (len(packet) // 255) + bytes([len(packet) % 255])
    header = struct.pack("<4sBBqIIIB", b"OggS", 0, flags, granule, serial, sequence, 0, len(lacing))
    page = bytearray(header + lacing + b"".join(packets))
    struct.pack_into("<I", page, 22, crc(bytes(page)))
    return bytes(page)


def repage(stream: bytes, packets_per_page: int = 2, serial: int = 0x5EED) -> list[bytes]:
    """OpusHead page, OpusTags page, then pages of `packets_per_page` audio packets (one message each)."""
    packets = read_packets(stream)
    pages = [write_page([packets[0][0]], 0, serial, 0, flags=0x02), write_page([packets[1][0]], 0, serial, 1)]
    audio = packets[2:]
    granule = 0
    for i in range(0, len(audio), packets_per_page):
        group = audio[i:i + packets_per_page]
        granule = group[-1][1] if group[-1][1] >= 0 else granule
        pages.append(write_page([p for p, _ in group], granule, serial, len(pages)))
    return pages
