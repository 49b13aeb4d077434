"""Property tests (hypothesis) over damaged and edited files, both formats (issue 12):

* damage (byte flips anywhere or in the archive/header structure, truncations, edits of
  the safetensors header and of fastlayers' metadata that leave checksums stale): a load
  returns exactly what was saved or raises a fastlayers error;
* hostile edits that also fix the checksums up (a rewritten ``data.pkl`` with a fresh
  CRC-32, metadata with a fresh ``meta_crc32``, metadata removed): a load returns
  something or raises a fastlayers error, never another exception.
"""
import io
import json
import struct
import zipfile
import zlib
from collections import OrderedDict

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastlayers import io as fio

SETTINGS = settings(max_examples=120, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


def _saved():
    g = torch.Generator().manual_seed(12)
    return OrderedDict([("a.weight", torch.randn(31, 8, generator=g)),
                        ("a.bias", torch.randn(3, generator=g).to(torch.bfloat16)),
                        ("steps", torch.tensor([7, -2], dtype=torch.int32)),
                        ("mask", torch.tensor([True, False, True]))])


def _same(a, b) -> bool:
    if type(a) is not type(b) or list(a) != list(b):
        return False
    return all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
               and torch.equal(a[k], b[k]) for k in a)


class _Files(tuple):
    def __repr__(self):  # keep hypothesis' failure reports short
        return "files"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(a directory, {format: the bytes of _saved() saved in it})."""
    root = tmp_path_factory.mktemp("fuzz")
    out = {}
    for fmt in ("pt", "safetensors"):
        path = root / f"good.{fmt}"
        fio.save(_saved(), path)
        out[fmt] = path.read_bytes()
    return _Files((root, out))


def _load_outcome(path, data: bytes, exact: bool):
    """Write ``data`` to ``path`` and load it: exact=True asserts the saved data or a
    fastlayers error; False only that nothing but a fastlayers error escapes."""
    path.write_bytes(data)
    try:
        back = fio.load(path)
    except fio.FastlayersIOError as exc:
        assert str(path) in str(exc)
        return "error"
    if exact:
        assert _same(back, _saved()), back
    return "loaded"


def _regions(data: bytes, fmt: str, region: str):
    """Byte ranges of the whole file, its structure (zip headers and directory, or the
    safetensors length prefix and JSON header) or its payload (the tensors' bytes)."""
    if region == "any":
        return [(0, len(data))]
    if fmt == "safetensors":
        end = 8 + struct.unpack("<Q", data[:8])[0]
        return [(0, end)] if region == "structure" else [(end, len(data))]
    if region == "payload":
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            ranges = []
            for info in archive.infolist():
                name_len, extra_len = struct.unpack(
                    "<HH", data[info.header_offset + 26:info.header_offset + 30])
                start = info.header_offset + 30 + name_len + extra_len
                ranges.append((start, start + max(info.compress_size, 1)))
            return ranges
    ranges = []
    for sig, size in ((b"PK\x03\x04", 30), (b"PK\x01\x02", 46), (b"PK\x05\x06", 22)):
        pos = 0
        while (pos := data.find(sig, pos)) != -1:
            ranges.append((pos, min(len(data), pos + size + 40)))  # header + name
            pos += 4
    return ranges


damage = st.tuples(st.sampled_from(["any", "structure", "payload"]), st.lists(
    st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=3))


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
@SETTINGS
@given(spec=damage)
def test_byte_flips_load_the_saved_data_or_raise_a_fastlayers_error(files, fmt, spec):
    root, good = files
    data = bytearray(good[fmt])
    region, flips = spec
    ranges = _regions(bytes(data), fmt, region)
    for where, mask in flips:
        start, stop = ranges[int(where * len(ranges))]
        data[start + int(where * len(ranges) % 1 * (stop - start))] ^= mask
    _load_outcome(root / f"flip.{fmt}", bytes(data), exact=True)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
@SETTINGS
@given(cut=st.floats(0, 1, exclude_max=True), tail=st.binary(max_size=16))
def test_truncations_load_the_saved_data_or_raise_a_fastlayers_error(files, fmt, cut, tail):
    root, good = files
    data = good[fmt]
    _load_outcome(root / f"cut.{fmt}", data[:int(cut * len(data))] + tail, exact=True)


# --------------------------------------------------------------------------- safetensors edits
def _split(data: bytes):
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "XX"]
json_values = st.recursive(st.none() | st.booleans() | st.integers(-5, 2 ** 33) | st.text(max_size=6),
                           lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
META_FIELDS = ["container", "keys", "crc32", "layout", "meta_crc32", "format", "other"]
edit = st.one_of(
    st.tuples(st.just("dtype"), st.integers(0, 3), st.sampled_from(DTYPES)),
    st.tuples(st.just("shape"), st.integers(0, 3), st.lists(st.integers(0, 7), max_size=3)),
    st.tuples(st.just("offsets"), st.integers(0, 3), st.lists(st.integers(0, 80), min_size=2,
                                                                max_size=2)),
    st.tuples(st.just("rename"), st.integers(0, 3), st.text(min_size=1, max_size=8)),
    st.tuples(st.just("drop"), st.integers(0, 3), st.none()),
    st.tuples(st.just("meta"), st.sampled_from(META_FIELDS), json_values),
    st.tuples(st.just("meta-del"), st.sampled_from(META_FIELDS), st.none()),
    st.tuples(st.just("meta-list"), st.sampled_from(["keys", "crc32", "layout"]), st.integers(0, 5)),
)


def _apply(header: dict, op, target, value) -> None:
    names = sorted(k for k in header if k != "__metadata__")
    if op in ("dtype", "shape", "offsets", "rename", "drop"):
        name = names[target % len(names)]
        if op == "rename":
            header[value] = header.pop(name)
        elif op == "drop":
            del header[name]
        else:
            header[name][{"offsets": "data_offsets"}.get(op, op)] = value
        return
    meta = json.loads(header["__metadata__"]["fastlayers"])
    if op == "meta":
        meta[target] = value
    elif op == "meta-del":
        meta.pop(target, None)
    else:  # drop one entry of a list or table (the {"keys": ["bias"]} attack and its kin)
        field = meta[target]
        if isinstance(field, list) and field:
            field.pop(value % len(field))
        elif isinstance(field, dict) and field:
            field.pop(sorted(field)[value % len(field)])
    header["__metadata__"]["fastlayers"] = json.dumps(meta)


def _refresh_meta_crc(header: dict) -> None:
    meta = json.loads(header["__metadata__"]["fastlayers"])
    body = {k: meta[k] for k in ("container", "keys", "crc32", "layout") if k in meta}
    meta["meta_crc32"] = zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    header["__metadata__"]["fastlayers"] = json.dumps(meta)


def test_unedited_rewrite_loads(files):
    root, good = files
    header, body = _split(good["safetensors"])
    assert _load_outcome(root / "same.safetensors", _join(header, body), exact=True) == "loaded"


@SETTINGS
@given(edits=st.lists(edit, min_size=1, max_size=2))
def test_header_and_metadata_edits_are_detected(files, edits):
    root, good = files
    header, body = _split(good["safetensors"])
    for op, target, value in edits:
        _apply(header, op, target, value)
    _load_outcome(root / "edit.safetensors", _join(header, body), exact=True)


@SETTINGS
@given(edits=st.lists(edit.filter(lambda e: e[0].startswith("meta")), min_size=1, max_size=2),
       strip=st.booleans())
def test_hostile_metadata_with_fixed_checksums_never_escapes(files, edits, strip):
    root, good = files
    header, body = _split(good["safetensors"])
    for op, target, value in edits:
        _apply(header, op, target, value)
    if strip:
        del header["__metadata__"]  # indistinguishable from another tool's file
    elif "meta_crc32" in json.loads(header["__metadata__"]["fastlayers"]):
        _refresh_meta_crc(header)
    meta = json.loads(header.get("__metadata__", {}).get("fastlayers", "{}"))
    outcome = _load_outcome(root / "hostile.safetensors", _join(header, body), exact=False)
    keys = meta.get("keys") if isinstance(meta, dict) else None
    if isinstance(keys, list) and sorted(map(str, keys)) != sorted(_saved()):
        assert outcome == "error"  # a tensor dropped or added is never obeyed silently


# --------------------------------------------------------------------------- torch zip edits
def _rezip(good: bytes, path, edit_pickle) -> bytes:
    """The archive rewritten with data.pkl passed through ``edit_pickle`` and fresh
    CRC-32s (what a hostile editor, not a damaged disk, produces)."""
    path.write_bytes(good)
    with zipfile.ZipFile(path) as src:
        members = [(i.filename, src.read(i.filename)) for i in src.infolist()]
    with zipfile.ZipFile(path, "w") as out:
        for name, data in members:
            out.writestr(name, edit_pickle(data) if name.endswith("/data.pkl") else data)
    return path.read_bytes()


@SETTINGS
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
                      min_size=1, max_size=3))
def test_edited_pickle_with_fixed_checksums_never_escapes(files, flips):
    root, good = files

    def edit_pickle(data):
        data = bytearray(data)
        for where, mask in flips:
            data[int(where * len(data))] ^= mask
        return bytes(data)

    data = _rezip(good["pt"], root / "rezip.pt", edit_pickle)
    _load_outcome(root / "rezip.pt", data, exact=False)


def test_rezipped_unedited_archive_loads(files):
    root, good = files
    data = _rezip(good["pt"], root / "plain.pt", lambda d: d)
    assert _load_outcome(root / "plain.pt", data, exact=True) == "loaded"
