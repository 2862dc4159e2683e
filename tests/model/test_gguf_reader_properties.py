"""Property tests of the GGUF header reader: arbitrary bytes, truncated real files, huge declared counts and
lengths and random byte flips give a GGUFFormatError (a ValueError naming the file) or a parsed file, never
another exception, a hang or an allocation larger than the file."""

from __future__ import annotations

import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenmill.model.gguf_reader import GGUFFormatError, read_gguf

PROPS = settings(max_examples=80, derandomize=True, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def real_gguf(tmp_path_factory) -> bytes:
    """A small GGUF written by gguf's own writer: scalars, strings, arrays of numbers and strings, two tensors."""
    import gguf

    path = tmp_path_factory.mktemp("gguf_props") / "small.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("t.u32", 7)
    w.add_string("t.s", "h\u00e9llo")
    w.add_array("t.arr_s", ["a", "bc", ""])
    w.add_array("t.arr_i", [1, 2, 3])
    w.add_float32("t.f", 1.5)
    w.add_bool("t.b", True)
    w.add_tensor("w1", np.arange(64, dtype=np.float32).reshape(4, 16))
    w.add_tensor("w2", np.ones(32, dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def _read(tmp_path: Path, data: bytes, name: str = "case.gguf"):
    """read_gguf on `data`: the parsed file, or the GGUFFormatError it raised (checked to name the file)."""
    path = tmp_path / name
    path.write_bytes(data)
    try:
        return read_gguf(path)
    except GGUFFormatError as e:
        assert str(path) in str(e)
        return e


def test_the_real_file_parses(tmp_path, real_gguf):
    f = _read(tmp_path, real_gguf)
    assert f.metadata["t.arr_s"] == ["a", "bc", ""] and f.metadata["t.s"] == "h\u00e9llo"
    assert f.tensors["w1"].shape == (4, 16)
    assert np.array_equal(np.asarray(f.tensors["w1"].data).view(np.float32), np.arange(64, dtype=np.float32))


@PROPS
@given(st.binary(max_size=300), st.booleans())
def test_arbitrary_bytes(tmp_path, data, with_magic):
    if with_magic:  # get past the magic and the version check most of the time
        data = b"GGUF" + struct.pack("<I", 3) + data
    _read(tmp_path, data)


@PROPS
@given(st.data())
def test_every_truncation_of_a_real_file_is_a_clear_error(tmp_path, real_gguf, data):
    cut = data.draw(st.integers(0, len(real_gguf) - 1))
    result = _read(tmp_path, real_gguf[:cut])
    assert isinstance(result, GGUFFormatError), f"a file cut at byte {cut} of {len(real_gguf)} parsed"


def _u64_fields(real: bytes) -> list[int]:
    """Offsets of the u64 counts and lengths in the real file's header: tensor / kv counts, every string
    length (keys, values, tensor names) and array count, found by walking the header as the format defines."""
    offsets = [8, 16]
    pos = 24
    n_tensors, n_kv = struct.unpack_from("<QQ", real, 8)

    def string() -> None:
        nonlocal pos
        offsets.append(pos)
        pos += 8 + struct.unpack_from("<Q", real, pos)[0]

    for _ in range(n_kv):
        string()
        (vtype,) = struct.unpack_from("<I", real, pos)
        pos += 4
        if vtype == 8:
            string()
        elif vtype == 9:
            etype, count = struct.unpack_from("<IQ", real, pos)
            offsets.append(pos + 4)
            pos += 12
            for _ in range(count):
                if etype == 8:
                    string()
                else:
                    pos += {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}[etype]
        else:
            pos += {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}[vtype]
    for _ in range(n_tensors):
        string()
        (n_dims,) = struct.unpack_from("<I", real, pos)
        offsets.extend(pos + 4 + 8 * d for d in range(n_dims))  # dims: a huge shape must not wrap or allocate
        pos += 4 + 8 * n_dims + 4
        offsets.append(pos)  # the data offset
        pos += 8
    return offsets


@PROPS
@given(st.data())
def test_huge_declared_counts_and_lengths_fail_fast_without_allocating(tmp_path, real_gguf, data):
    fields = _u64_fields(real_gguf)
    assert len(fields) > 15
    at = data.draw(st.sampled_from(fields))
    value = data.draw(st.one_of(st.integers(2**20, 2**64 - 1), st.sampled_from([2**63, 2**64 - 1, 2**32, 2**61])))
    bad = bytearray(real_gguf)
    struct.pack_into("<Q", bad, at, value)
    tracemalloc.start()
    try:
        result = _read(tmp_path, bytes(bad))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(result, GGUFFormatError), f"u64 at byte {at} set to {value} parsed"
    assert peak < 1 << 20, f"{peak} bytes allocated reading a {len(bad)}-byte file"


@PROPS
@given(st.data())
def test_random_byte_flips_parse_or_fail_clearly(tmp_path, real_gguf, data):
    bad = bytearray(real_gguf)
    for _ in range(data.draw(st.integers(1, 4))):
        bad[data.draw(st.integers(4, len(bad) - 1))] = data.draw(st.integers(0, 255))
    _read(tmp_path, bytes(bad))


def test_regressions(tmp_path, real_gguf):
    """Inputs that crashed (struct.error, RecursionError, ZeroDivisionError, a ValueError without the file name)
    or silently parsed garbage before the reader bounded every length by the file size."""
    head = b"GGUF" + struct.pack("<I", 3)
    cases = {
        "empty": b"",
        "cut_in_counts": head + b"\x01\x00",  # struct.error
        "string_past_end": head + struct.pack("<QQQ", 0, 1, 2**40) + b"k",  # key length past the end
        "nested_arrays": head + struct.pack("<QQ", 0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<I", 9)
        + struct.pack("<IQ", 9, 1) * 5000,  # RecursionError
        "unknown_tensor_type": head + struct.pack("<QQ", 1, 0) + struct.pack("<Q", 1) + b"t"
        + struct.pack("<IQIQ", 1, 32, 9999, 0),  # ValueError from the enum, no file named
        "zero_alignment": head + struct.pack("<QQ", 0, 1) + struct.pack("<Q", 17) + b"general.alignment"
        + struct.pack("<II", 4, 0),  # ZeroDivisionError
    }
    for name, data in cases.items():
        assert isinstance(_read(tmp_path, data, f"{name}.gguf"), GGUFFormatError), name
