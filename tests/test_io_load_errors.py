"""fastlayers.io.load: every failure a fastlayers error naming the file with its cause
chained; a bounded checksum pre-check; GPU-saved files; safetensors metadata validated;
what safetensors cannot hold refused; views written as their own elements (issue 12)."""
import json
import os
import pickle
import struct
import zipfile
import zlib

import pytest
import torch
from torch import nn

from fastlayers import io as fio
from fastlayers import io_safetensors


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"weight": torch.randn(13, 7, generator=g), "bias": torch.randn(13, generator=g)}


def _assert_same(a, b):
    assert type(a) is type(b) and list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k])


def test_error_classes_keep_old_except_clauses_working():
    assert issubclass(fio.CorruptFileError, ValueError)
    assert issubclass(fio.UnsafeFileError, pickle.UnpicklingError)
    assert issubclass(fio.StateDictMismatchError, RuntimeError)
    assert issubclass(fio.DeviceUnavailableError, RuntimeError)
    assert issubclass(fio.UnsupportedTensorError, TypeError)
    assert issubclass(fio.SpecialFileError, OSError)
    for cls in (fio.CorruptFileError, fio.UnsafeFileError, fio.StateDictMismatchError,
                fio.DeviceUnavailableError, fio.UnsupportedTensorError, fio.FileAccessError):
        assert issubclass(cls, fio.FastlayersIOError)


# --------------------------------------------------------------------------- GPU-saved files
def _save_as_if_on(monkeypatch, obj, path, location):
    """torch.save, but every storage is tagged with ``location`` (as a GPU save tags it)."""
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: location)
        fio.save(obj, path)


def test_gpu_saved_file_raises_with_a_map_location_suggestion(tmp_path, monkeypatch):
    path = tmp_path / "gpu.pt"
    state = _state()
    _save_as_if_on(monkeypatch, state, path, "cuda:99")  # a device no machine here has
    with pytest.raises(fio.DeviceUnavailableError,
                       match=r"cannot load .*gpu\.pt: its tensors were saved on a device this "
                             r"machine does not have .*map_location='cpu'") as info:
        fio.load(path)
    assert "Attempting to deserialize object on" in str(info.value.__cause__)
    _assert_same(fio.load(path, map_location="cpu"), state)
    model = nn.Linear(7, 13)
    assert fio.load_model(model, path).ok  # load_model maps to the model's device
    assert torch.equal(model.weight, state["weight"]) and torch.equal(model.bias, state["bias"])
    st = tmp_path / "s.safetensors"
    fio.save(state, st)
    with pytest.raises(fio.DeviceUnavailableError, match=r"s\.safetensors to 'cuda:99'.*'cpu'"):
        fio.load(st, map_location="cuda:99")
    with pytest.raises(TypeError, match="must be a device or a string"):
        fio.load(st, map_location={"cuda:0": "cpu"})


# --------------------------------------------------------------------------- zip damage
def _central_entries(data: bytes):
    pos, found = 0, []
    while (pos := data.find(b"PK\x01\x02", pos)) != -1:
        found.append(pos)
        pos += 4
    return found


@pytest.mark.parametrize("verify", [True, False])
def test_zip_header_damage_is_corruption_with_the_cause_chained(tmp_path, verify):
    good = tmp_path / "good.pt"
    fio.save(_state(), good)
    data = good.read_bytes()
    first = _central_entries(data)[0]
    bad = tmp_path / "bad.pt"
    loaded = []
    edits = {
        "version needed": (first + 6, struct.pack("<H", 0xFF)),  # zipfile: NotImplementedError
        "encrypted flag": (first + 8, struct.pack("<H", 0x0001)),  # zipfile: encrypted
        "end record": (len(data) - 22, b"PK\x05\x07"),  # no end of central directory
        "bad method": (first + 10, struct.pack("<H", 99)),  # unknown compression
    }
    for what, (pos, patch) in edits.items():
        damaged = bytearray(data)
        damaged[pos:pos + len(patch)] = patch
        bad.write_bytes(bytes(damaged))
        try:
            result = fio.load(bad, verify=verify)
        except fio.CorruptFileError as exc:
            assert f"cannot load {bad}" in str(exc), what
            assert exc.__cause__ is not None or "record" in str(exc), what
        else:  # torch reads what zipfile refuses only where the data is intact
            assert not verify, what
            _assert_same(result, _state())
            loaded.append(what)
    assert len(loaded) < len(edits)


def test_checksum_check_reads_only_what_torch_reads(tmp_path, monkeypatch):
    """Members torch never reads (other names, storages nothing refers to) are neither
    read nor decompressed, even when huge or damaged; the ones it reads are all checked."""
    path = tmp_path / "extra.pt"
    state = _state()
    fio.save(state, path)
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        prefix = archive.namelist()[0].split("/")[0]
        archive.writestr(f"{prefix}/junk", b"\0" * (1 << 25))  # 32 MiB in ~32 KiB
        archive.writestr(f"{prefix}/data/99", b"\0" * (1 << 25))  # a storage nobody uses
    data = bytearray(path.read_bytes())
    for pos in _central_entries(bytes(data))[-2:]:  # break both members' CRC-32s
        data[pos + 16] ^= 0xFF
    path.write_bytes(bytes(data))
    opened = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open",
                        lambda self, name, *a, **k: opened.append(getattr(name, "filename", name))
                        or real_open(self, name, *a, **k))
    _assert_same(fio.load(path), state)
    names = {n.split("/", 1)[1] for n in opened}
    assert names >= {"data.pkl", "byteorder", "data/0", "data/1"}, names
    assert not names & {"junk", "data/99"}, names


def test_referenced_record_missing_or_damaged_fails_verification(tmp_path):
    path = tmp_path / "x.pt"
    fio.save(_state(), path)
    src = zipfile.ZipFile(path)
    prefix = src.namelist()[0].split("/")[0]
    without = tmp_path / "without.pt"
    with zipfile.ZipFile(without, "w") as out:
        for info in src.infolist():
            if info.filename != f"{prefix}/data/1":
                out.writestr(info.filename, src.read(info.filename))
    with pytest.raises(fio.CorruptFileError, match=rf"without\.pt: record {prefix}/data/1, which "
                                                   rf"the file refers to, is missing"):
        fio.load(without)
    with pytest.raises(fio.CorruptFileError, match=r"without\.pt"):
        fio.load(without, verify=False)  # torch's own error, as a CorruptFileError
    info = src.getinfo(f"{prefix}/data/0")
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + 5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(fio.CorruptFileError, match=rf"record '{prefix}/data/0' fails its CRC-32") \
            as exc_info:
        fio.load(path)
    assert isinstance(exc_info.value.__cause__, zipfile.BadZipFile)


@pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")
def test_a_record_torch_reads_may_not_appear_twice(tmp_path):
    """Which of two same-named records torch's reader picks is unspecified: refused."""
    path = tmp_path / "twice.pt"
    fio.save(_state(), path)
    with zipfile.ZipFile(path) as archive:
        prefix = archive.namelist()[0].split("/")[0]
        data = archive.read(f"{prefix}/data/0")
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(f"{prefix}/data/0", bytes(reversed(data)))  # intact CRC, other data
        archive.writestr(f"{prefix}/unread", b"x")
        archive.writestr(f"{prefix}/unread", b"y")
    with pytest.raises(fio.CorruptFileError, match=rf"twice\.pt: record {prefix}/data/0 appears "
                                                   rf"twice"):
        fio.load(path)


def test_unsafe_pickle_is_chained(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "f": os.system}, path)
    with pytest.raises(fio.UnsafeFileError, match=r"evil\.pt.*posix\.system|evil\.pt.*os\.system") \
            as info:
        fio.load(path)
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)


# --------------------------------------------------------------------------- safetensors metadata
def _rewrite_meta(path, tensors, meta):
    from safetensors.torch import save_file
    save_file(tensors, str(path), metadata=meta)


def test_hostile_or_damaged_safetensors_metadata_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    state = _state()
    fio.save(state, path)
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        good_meta = json.loads(f.metadata()["fastlayers"])
    crc = good_meta["crc32"]
    old_style = {"container": "dict", "keys": ["weight", "bias"], "crc32": crc}  # format 1
    _rewrite_meta(path, state, {"fastlayers": json.dumps(old_style)})
    _assert_same(fio.load(path), state)  # files written before format 2 still load
    cases = [
        ({"container": "dict", "keys": ["bias"], "crc32": {"bias": crc["bias"]}},
         "does not list tensor 'weight', which the file holds"),
        (dict(old_style, crc32=dict(crc, ghost=1)), "lists tensor 'ghost', which the file does not"),
        (dict(old_style, keys=["weight", "bias", "ghost"]), "lists tensor 'ghost'"),
        (dict(old_style, container="set"), "unknown container 'set'"),
        (dict(old_style, keys="weight"), "no list of distinct tensor names"),
        (dict(old_style, keys=["weight", "weight", "bias"]), "no list of distinct tensor names"),
        (dict(old_style, crc32={"weight": "x", "bias": 1}), "no valid table of CRC-32s"),
        (dict(old_style, crc32=dict(crc, bias=crc["bias"] ^ 1)), "tensor 'bias' fails its CRC-32"),
        (dict(old_style, container="list"), r"gives names \['weight', 'bias'\] for a list"),
        (dict(good_meta, container="OrderedDict"), "fails its CRC-32 check"),  # format 2
        (dict(good_meta, meta_crc32=None), "fails its CRC-32 check"),
        ({k: v for k, v in good_meta.items() if k != "meta_crc32"}, "lacks its CRC-32"),
        ([1, 2], "is a JSON list, not an object"),
    ]
    for meta, message in cases:
        _rewrite_meta(path, state, {"fastlayers": json.dumps(meta)})
        with pytest.raises(fio.CorruptFileError, match=rf"cannot load .*m\.safetensors: .*{message}"):
            fio.load(path)
    _rewrite_meta(path, state, {"fastlayers": "{not json"})
    with pytest.raises(fio.CorruptFileError, match="not valid JSON") as info:
        fio.load(path)
    assert isinstance(info.value.__cause__, ValueError)
    _rewrite_meta(path, state, {"fastlayerz": json.dumps(good_meta)})  # a damaged key name
    with pytest.raises(fio.CorruptFileError, match="metadata found under the key 'fastlayerz'"):
        fio.load(path)
    # same bytes, another dtype: the CRC of the bytes matches, the saved layout does not
    _rewrite_meta(path, {"weight": state["weight"].view(torch.int32), "bias": state["bias"]},
                  {"fastlayers": json.dumps(good_meta)})
    with pytest.raises(fio.CorruptFileError, match=r"tensor 'weight' is torch\.int32 \[13, 7\] in "
                                                   r"the file but was saved as float32"):
        fio.load(path)


# --------------------------------------------------------------------------- what safetensors holds
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning",
                            "ignore:Sparse CSR tensor support:UserWarning",
                            "ignore:TypedStorage is deprecated:UserWarning")  # torch's qtensor load
def test_tensors_safetensors_cannot_hold_are_refused(tmp_path):
    cases = {
        "complex128": (torch.randn(3, dtype=torch.complex128), "torch.complex128 tensor"),
        "qint8": (torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8), "quantized"),
        "sparse": (torch.randn(3, 3).to_sparse(), "torch.sparse_coo tensor"),
        "csr": (torch.randn(3, 3).to_sparse_csr(), "torch.sparse_csr tensor"),
        "meta": (torch.empty(3, device="meta"), "meta tensor"),
    }
    for name, (t, message) in cases.items():
        with pytest.raises(fio.UnsupportedTensorError,
                           match=rf"entry '{name}' is .*{message}.*'\.pt'"):
            fio.save({"ok": torch.ones(2), name: t}, tmp_path / "x.safetensors")
    assert os.listdir(tmp_path) == []
    for name in ("complex128", "qint8", "sparse"):  # the torch format holds them
        t = cases[name][0]
        fio.save({name: t}, tmp_path / "x.pt")
        back = fio.load(tmp_path / "x.pt")[name]
        assert back.dtype == t.dtype and torch.equal(
            back.to_dense() if back.is_sparse else back.dequantize() if back.is_quantized else back,
            t.to_dense() if t.is_sparse else t.dequantize() if t.is_quantized else t)
    c64 = torch.randn(5, dtype=torch.complex64)
    fio.save(c64, tmp_path / "c.safetensors")
    assert torch.equal(fio.load(tmp_path / "c.safetensors"), c64)


def _data_bytes(path):
    """{name: raw bytes of that tensor} straight from a safetensors file's header."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    return {k: raw[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]]
            for k, v in header.items()}, len(raw) - 8 - n


def test_views_are_written_as_their_own_elements(tmp_path):
    base = torch.randn(1009, dtype=torch.float64)
    grid = base[:1000].view(40, 25)
    views = {"middle": base[101:211], "tail": base[1000:], "rows": grid[3:7],
             "column": grid[:, 4], "step": base[::97], "scalar": base[5], "empty": base[7:7]}
    st = tmp_path / "v.safetensors"
    fio.save(views, st)
    raw, total = _data_bytes(st)
    assert total == sum(v.numel() for v in views.values()) * 8  # nothing but the views
    for k, v in views.items():
        assert raw[k] == v.contiguous().numpy().tobytes(), k
    _assert_same(fio.load(st), {k: v.contiguous() for k, v in views.items()})
    pt = tmp_path / "v.pt"
    fio.save(views, pt)
    back = fio.load(pt)  # torch's format keeps views of one storage, offsets and strides
    _assert_same(back, views)
    assert back["middle"].untyped_storage().data_ptr() == back["tail"].untyped_storage().data_ptr()
    assert back["middle"].storage_offset() == 101 and back["column"].stride() == (25,)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_two_tensors_sharing_storage_round_trip(tmp_path, fmt):
    base = torch.randn(64)
    shared = {"all": base, "same": base, "lo": base[:31], "hi": base[31:]}
    path = tmp_path / f"s.{fmt}"
    fio.save(shared, path)
    back = fio.load(path)
    _assert_same(back, {k: v.contiguous() for k, v in shared.items()})
    ptr = {k: v.untyped_storage().data_ptr() for k, v in back.items()}
    if fmt == "pt":
        assert len(set(ptr.values())) == 1  # one storage, as saved
    else:
        raw, total = _data_bytes(path)
        assert total == (64 + 64 + 31 + 33) * 4 and raw["hi"] == base[31:].numpy().tobytes()
        back["all"][0] += 1  # independent tensors: no aliasing after the load
        assert back["same"][0] == base[0]


def test_crc_helper_covers_every_byte():
    t = torch.randn(17, dtype=torch.bfloat16)
    assert io_safetensors.crc32(t) == zlib.crc32(t.view(torch.int16).numpy().tobytes())
    assert io_safetensors.crc32(torch.empty(0)) == 0


def test_file_tagged_with_an_unknown_device_is_not_called_corrupt(tmp_path, monkeypatch):
    """A file saved on a device torch here does not know (an Apple GPU: 'mps') is intact:
    DeviceUnavailableError with the map_location hint, and map_location='cpu' loads it."""
    path = tmp_path / "mps.pt"
    state = _state()
    _save_as_if_on(monkeypatch, state, path, "mps")
    with pytest.raises(fio.DeviceUnavailableError, match=r"mps\.pt: .*map_location='cpu'"):
        fio.load(path)
    _assert_same(fio.load(path, map_location="cpu"), state)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
@pytest.mark.parametrize("bad", ["gpu", "cuda:x"])
def test_a_map_location_naming_no_device_is_an_argument_error(tmp_path, fmt, bad):
    path = tmp_path / f"ok.{fmt}"
    fio.save(_state(), path)
    with pytest.raises(ValueError, match=rf"map_location='{bad}' is not a device") as info:
        fio.load(path, map_location=bad)
    assert not isinstance(info.value, fio.CorruptFileError)
    _assert_same(fio.load(path, map_location="cpu"), _state())


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_a_save_replacing_the_file_mid_load_cannot_swap_what_was_verified(tmp_path,
                                                                          monkeypatch, fmt):
    """Another process's atomic save replaces the path between load's checksum pass and its
    read: load returns the file it verified (one open file, or one read), not the other."""
    path = tmp_path / f"weights.{fmt}"
    old, new = _state(0), _state(1)
    fio.save(old, path)
    if fmt == "pt":
        real, module, name = fio.verify_torch_zip, fio, "verify_torch_zip"
    else:
        real, module, name = io_safetensors.crc32, io_safetensors, "crc32"
    swapped = []

    def verify_then_replace(*args, **kwargs):
        out = real(*args, **kwargs)
        if not swapped:
            swapped.append(True)
            fio.save(new, path)  # atomic: a new file renamed over the path
        return out

    monkeypatch.setattr(module, name, verify_then_replace)
    _assert_same(fio.load(path), old)
    assert swapped
    monkeypatch.undo()
    _assert_same(fio.load(path), new)  # the replacement did land, for the next load
