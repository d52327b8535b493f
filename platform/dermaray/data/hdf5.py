"""Where a plain HDF5 dataset's bytes lie, read from its object header without opening it.

ISIC 2024 keeps each JPEG as its own scalar dataset (opaque or a fixed-length string: h5py writes
`np.void` or `np.bytes_` so), contiguous and unfiltered: the image is a byte range of the file.
libhdf5 finds that range by opening the dataset (H5Dopen builds its type, space and property
lists; with the calls that ask for offset, size and type, ~36 us a key, more than a 128 px
tile's metadata checks), where the range is two fields of the object header's layout message
(~8 us to read and parse, the link lookup included). This reads them from
the header (HDF5 file format specification 3.0, section IV.A: object header versions 1 and 2;
messages 0x0001 dataspace, 0x0003 datatype, 0x0008 data layout versions 3 and 4).

Anything else (an older layout message, a shared or committed datatype, a header continued
in a second chunk, 4-byte addresses) gives None, and the caller asks libhdf5 instead.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable

DATASPACE, DATATYPE, LAYOUT, CONTINUATION = 0x0001, 0x0003, 0x0008, 0x0010
CONTIGUOUS = 1
OPAQUE, FIXED_POINT, STRING = 5, 0, 3
NULL_PAD = 1  # a fixed-length string's padding: its bytes are read as stored (null-terminated ones are cut)
UNDEFINED_ADDRESS = 0xFFFFFFFFFFFFFFFF
SHARED = 0x02  # message flag: the message is stored elsewhere (a committed datatype, a shared-message table)
FIRST_READ = 512  # bytes read at a header's address: a scalar dataset's whole header is ~200-300


def contiguous_extent(read: Callable[[int, int], bytes], address: int) -> tuple[int, int] | None:
    """(offset, size) of the dataset whose object header starts at `address` when its values are
    one contiguous range of raw bytes (opaque values, null-padded strings or single unsigned bytes);
    else None.

    `read(offset, n)` returns up to n bytes of the file from offset. Assumes 8-byte addresses
    and lengths and no user block (the caller checks the superblock)."""
    head = read(address, FIRST_READ)
    if head[:4] == b"OHDR":
        messages = _messages_v2(head, read, address)
    elif head[:1] == b"\x01":
        messages = _messages_v1(head, read, address)
    else:
        return None
    if messages is None or CONTINUATION in messages:
        return None
    found = {kind: messages.get(kind) for kind in (DATASPACE, DATATYPE, LAYOUT)}
    if any(m is None or m[0] & SHARED for m in found.values()):
        return None
    elements = _elements(found[DATASPACE][1])
    item_size = _raw_item_size(found[DATATYPE][1])
    layout = found[LAYOUT][1]
    if elements is None or item_size is None or len(layout) < 18 or layout[0] not in (3, 4) or layout[1] != CONTIGUOUS:
        return None
    offset, size = struct.unpack_from("<QQ", layout, 2)
    # An undefined address: never written (fill value) or stored in external files.
    if offset == UNDEFINED_ADDRESS or size != elements * item_size:
        return None
    return offset, size


def _messages_v1(head: bytes, read, address: int) -> dict[int, tuple[int, bytes]] | None:
    """Version 1: 16-byte prefix, then messages of type (2), size (2), flags (1), 3 reserved."""
    if len(head) < 16:
        return None
    count, chunk_size = struct.unpack_from("<H4xI", head, 2)
    end = 16 + chunk_size  # the count covers every chunk; a continued header ends this one first
    chunk = _whole(head, read, address, end)
    messages, at = {}, 16
    for _ in range(count):
        if at + 8 > min(end, len(chunk)):
            break
        kind, size, flags = struct.unpack_from("<HHB", chunk, at)
        messages.setdefault(kind, (flags, chunk[at + 8 : at + 8 + size]))  # a type may repeat (attributes)
        at += 8 + size
    return messages


def _messages_v2(head: bytes, read, address: int) -> dict[int, tuple[int, bytes]] | None:
    """Version 2: "OHDR", version, flags, optional times and attribute limits, chunk size
    (1-8 bytes), then messages of type (1), size (2), flags (1), creation order (2, if tracked)."""
    if len(head) < 7 or head[4] != 2:
        return None
    flags = head[5]
    at = 6 + (16 if flags & 0x20 else 0) + (4 if flags & 0x10 else 0)
    width = 1 << (flags & 0x03)
    chunk_size = int.from_bytes(head[at : at + width], "little")
    at += width
    end = at + chunk_size  # the 4-byte checksum follows
    chunk = _whole(head, read, address, end)
    prefix = 6 if flags & 0x04 else 4
    messages = {}
    while at + prefix <= min(end, len(chunk)):
        kind, size, message_flags = struct.unpack_from("<BHB", chunk, at)
        messages.setdefault(kind, (message_flags, chunk[at + prefix : at + prefix + size]))
        at += prefix + size
    return messages


def _whole(head: bytes, read, address: int, length: int) -> bytes:
    return head if len(head) >= length else read(address, length)


def _elements(space: bytes) -> int | None:
    """Number of values: dataspace version 1 (8-byte prefix) or 2 (4-byte prefix, type 2 = null)."""
    if len(space) < 4 or space[0] not in (1, 2) or (space[0] == 2 and space[3] == 2):
        return None
    rank, start = space[1], 8 if space[0] == 1 else 4
    if len(space) < start + 8 * rank:
        return None
    return math.prod(struct.unpack_from(f"<{rank}Q", space, start))


def _raw_item_size(datatype: bytes) -> int | None:
    """Bytes per value when the raw bytes are the value (opaque, a null-padded fixed-length string, or
    an unsigned byte); else None."""
    if len(datatype) < 8:
        return None
    kind, size = datatype[0] & 0x0F, struct.unpack_from("<I", datatype, 4)[0]
    if kind == OPAQUE or (kind == STRING and datatype[1] & 0x0F == NULL_PAD):
        return size
    if kind == FIXED_POINT and size == 1 and not datatype[1] & 0x08:  # unsigned
        return size
    return None
