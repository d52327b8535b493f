"""Byte ranges read from HDF5 object headers agree with libhdf5's own answer, or defer to it."""

import os
import struct

import h5py
import numpy as np
import pytest

from dermaray.data.hdf5 import contiguous_extent
from dermaray.data.readers import _hdf5_extent, _reader_of_headers

JPEG_START = b"\xff\xd8\x00"  # a JPEG's bytes hold zeros


def _blob(i: int) -> bytes:
    return bytes(np.random.default_rng(i).integers(0, 256, 200 + 37 * i, dtype=np.uint8))


def _write(path, libver: str) -> dict[str, bool]:
    """Datasets of every kind a source may hold; each maps to whether its header gives the range."""
    with h5py.File(path, "w", libver=libver) as store:
        store.create_dataset("opaque", data=np.void(_blob(0)))  # how ISIC 2024 stores a JPEG
        store.create_dataset("bytes_1d", data=np.frombuffer(_blob(1), np.uint8))
        store.create_dataset("bytes_2d", data=np.frombuffer(_blob(2)[:240], np.uint8).reshape(12, 20))
        store.create_dataset("signed", data=np.frombuffer(_blob(3), np.int8))  # raw bytes, but not "plain"
        store.create_dataset("gzip", data=np.frombuffer(_blob(4), np.uint8), compression="gzip")
        store.create_dataset("string", data=np.bytes_(_blob(5)))  # a fixed-length string, null-padded: bytes as stored
        terminated = h5py.h5t.C_S1.copy()
        terminated.set_size(300)
        terminated.set_strpad(h5py.h5t.STR_NULLTERM)  # HDF5 cuts such a value at its first zero byte
        cut = h5py.h5d.create(store.id, b"null_terminated", terminated, h5py.h5s.create(h5py.h5s.SCALAR))
        cut.write(h5py.h5s.ALL, h5py.h5s.ALL, np.array(JPEG_START + _blob(8)[:297], "S300"))
        store.create_dataset("never_written", shape=(64,), dtype=np.uint8)  # no storage yet: the fill value
        space = h5py.h5s.create_simple((16,))
        plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        plist.set_layout(h5py.h5d.COMPACT)  # the values inside the header itself
        compact = h5py.h5d.create(store.id, b"compact", h5py.h5t.STD_U8LE, space, plist)
        compact.write(h5py.h5s.ALL, h5py.h5s.ALL, np.arange(16, dtype=np.uint8))
        store["committed_type"] = np.dtype("V300")  # a named datatype: the dataset's type message is shared
        store.create_dataset("shared_type", data=np.void(_blob(6)), dtype=store["committed_type"])
        store.create_dataset("group/nested", data=np.void(_blob(7)))
        store["soft"] = h5py.SoftLink("/opaque")
        for n in (3, 40):  # attributes: messages of one type repeated; 40 continue the header (or go dense)
            with_attributes = store.create_dataset(f"attributes_{n}", data=np.void(_blob(9 + n)))
            for i in range(n):
                with_attributes.attrs[f"a{i}"] = i
        store["empty"] = h5py.Empty("V10")  # a null dataspace: no value at all
    with h5py.File(path, "a", track_order=True) as store:
        store.create_dataset("ordered", data=np.void(_blob(60)), track_order=True)
    return {
        "opaque": True, "bytes_1d": True, "bytes_2d": True, "group/nested": True, "string": True, "signed": False,
        "gzip": False, "null_terminated": False, "never_written": False, "compact": False, "shared_type": False,
        "attributes_3": True, "ordered": True, "empty": False,
    }  # fmt: skip


@pytest.mark.parametrize("libver", ["earliest", "latest"])  # object header versions 1 and 2
def test_header_ranges_equal_libhdf5s_and_anything_else_defers_to_it(tmp_path, libver):
    path = tmp_path / "images.hdf5"
    expected = _write(path, libver)
    with open(path, "rb") as raw, h5py.File(path, "r") as store:
        read = _reader_of_headers(store, raw)
        assert read is not None
        for key, from_header in expected.items():
            address = store.id.links.get_info(key.encode()).u
            extent = contiguous_extent(read, address)
            dataset = store[key]
            if from_header:
                assert extent == (dataset.id.get_offset(), dataset.id.get_storage_size()), key
            else:
                assert extent is None, key
        continued = contiguous_extent(read, store.id.links.get_info(b"attributes_40").u)
        assert continued in (None, (store["attributes_40"].id.get_offset(), store["attributes_40"].id.get_storage_size()))
        for key in [*expected, "attributes_40"]:
            # The reader's answer is libhdf5's whichever way it was found.
            assert _hdf5_extent(store, key, read) == _hdf5_extent(store, key), key
        assert _hdf5_extent(store, "soft", read) == bytes(store["opaque"][()].tobytes())  # a soft link: read by HDF5
        assert _hdf5_extent(store, "absent", read) is None
        assert _hdf5_extent(store, "empty", read) == b"" == _hdf5_extent(store, "empty")  # an empty image, not a crash
        for key, blob in (("opaque", _blob(0)), ("string", _blob(5))):
            offset, size = _hdf5_extent(store, key, read)
            assert os.pread(raw.fileno(), size, offset) == blob
        assert _hdf5_extent(store, "null_terminated", read)[:3] == b"\xff\xd8\x00"  # HDF5's own reading, cut short:
        assert _hdf5_extent(store, "null_terminated", read) != JPEG_START + _blob(8)[:297]  # zeros after the first


def test_a_user_block_shifts_addresses_so_headers_are_left_to_libhdf5(tmp_path):
    path = tmp_path / "images.hdf5"
    with h5py.File(path, "w", userblock_size=512) as store:
        store.create_dataset("opaque", data=np.void(_blob(0)))
    with open(path, "rb") as raw, h5py.File(path, "r") as store:
        assert _reader_of_headers(store, raw) is None
        offset, size = _hdf5_extent(store, "opaque", None)
        raw.seek(offset)
        assert raw.read(size) == _blob(0)


def test_a_header_cut_short_gives_no_range():
    header = bytes([1, 0, 3, 0, 1, 0, 0, 0, 0xFF, 0xFF, 0, 0, 0, 0, 0, 0])  # 3 messages in a 65,535-byte chunk

    def read(offset, size):
        return header[offset : offset + size]

    assert contiguous_extent(read, 0) is None
    assert contiguous_extent(lambda offset, size: b"", 0) is None
    assert contiguous_extent(lambda offset, size: b"OHDR\x02", 0) is None
    chunk_beyond_the_file = b"OHDR\x02\x02" + (1 << 20).to_bytes(4, "little") + b"\x01\x04\x00\x00"
    assert contiguous_extent(lambda offset, size: chunk_beyond_the_file[offset : offset + size], 0) is None


def test_a_path_through_an_external_link_reads_the_other_files_bytes(tmp_path):
    """HDF5 follows the link and reports an offset in the other file: such a key is read through HDF5."""
    for name, i in (("main.hdf5", 70), ("other.hdf5", 71)):
        with h5py.File(tmp_path / name, "w") as store:
            store.create_dataset("g/image", data=np.void(_blob(i)))  # the same layout: the same offsets
    with h5py.File(tmp_path / "main.hdf5", "a") as store:
        store["linked"] = h5py.ExternalLink(str(tmp_path / "other.hdf5"), "/g")
    with open(tmp_path / "main.hdf5", "rb") as raw, h5py.File(tmp_path / "main.hdf5", "r") as store:
        read = _reader_of_headers(store, raw)
        assert _hdf5_extent(store, "linked/image", read) == _blob(71) == _hdf5_extent(store, "linked/image")


def test_a_version_1_header_is_read_to_its_message_count_and_no_further():
    """Messages of one type repeat (attributes): the count, not the number of types, ends the header."""

    def message(kind: int, body: bytes) -> bytes:
        body += b"\0" * (-len(body) % 8)
        return struct.pack("<HHB3x", kind, len(body), 0) + body

    space = bytes([1, 0, 0, 0, 0, 0, 0, 0])  # version 1, scalar
    opaque = bytes([0x15, 0, 0, 0]) + struct.pack("<I", 300) + b"tag\0\0\0\0\0"
    layout = bytes([3, 1]) + struct.pack("<QQ", 4096, 300)
    body = b"".join(
        [message(1, space), message(3, opaque), message(0x0C, b"attr one"), message(0x0C, b"attr two"), message(8, layout)]
    )
    after = message(0x10, struct.pack("<QQ", 8192, 64))  # the next object's bytes, read as a continuation
    header = struct.pack("<BBHII4x", 1, 0, 5, 1, len(body)) + body + after
    assert contiguous_extent(lambda offset, size: header[offset : offset + size], 0) == (4096, 300)
