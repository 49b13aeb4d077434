"""fastlayers.io: the seed's File I/O examples, both formats, atomic saves (exceptions and
SIGKILL), weights-only loads, corrupted files, and save_model/load_model reports."""
import os
import signal
import subprocess
import sys
import textwrap
from collections import OrderedDict, namedtuple

import pytest
import torch
from torch import nn

import fastlayers
from fastlayers import _atomic_write
from fastlayers import io as fio
from fastlayers.tour import seed as _seed

FORMATS = ["pt", "safetensors"]


def _equal(a, b):
    """Same container types, keys, and bitwise-equal tensors (dtype and shape included)."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _equal(x, y)
    else:
        assert a == b


# --------------------------------------------------------------------------- the seed's examples
def test_seed_file_io_examples(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    x = torch.arange(4)
    fio.save(x, "x-file")
    x2 = fio.load("x-file")
    _equal(x2, x)
    y = torch.zeros(4)
    fio.save([x, y], "x-files")
    x2, y2 = fio.load("x-files")
    _equal((x2, y2), (x, y))
    fio.save([x, y], "xy.pth")
    _equal(fio.load("xy.pth"), [x, y])
    mydict = {"x": x, "y": y}
    fio.save(mydict, "mydict")
    _equal(fio.load("mydict"), mydict)
    assert sorted(os.listdir()) == ["mydict", "x-file", "x-files", "xy.pth"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("fused", [False, True])
def test_seed_mlp_params_round_trip(tmp_path, fmt, fused):
    """net = MLP(); save its state_dict; clone = MLP(); clone.load_state_dict(load(...))."""
    make = (lambda: fastlayers.fuse(_seed.IoMLP())) if fused else _seed.IoMLP
    net = make()
    X = torch.randn(size=(2, 20))
    Y = net(X)
    path = tmp_path / ("mlp.pth" if fmt == "pt" else "mlp.safetensors")
    fio.save(net.state_dict(), path)
    clone = make()  # lazy: materialised by load_state_dict
    clone.load_state_dict(fio.load(path))
    clone.eval()
    assert torch.equal(clone(X), Y)
    clone2 = make()
    report = fio.load_model(clone2, path)
    assert report.ok and "every key matched" in str(report)
    assert torch.equal(clone2(X), Y)
    # state_dicts move strictly between fused and plain models
    other = _seed.IoMLP() if fused else fastlayers.fuse(_seed.IoMLP())
    fio.load_model(other, path)
    assert torch.equal(other(X), Y)


def test_single_layer_state_dict(tmp_path):
    net = _seed.IoMLP()
    net(torch.randn(3, 20))
    fio.save(net.hidden.state_dict(), tmp_path / "hidden.pth")
    for layer in (nn.Linear(20, 256), fastlayers.LinearReLU(20, 256)):
        layer.load_state_dict(fio.load(tmp_path / "hidden.pth"))
        assert torch.equal(layer.weight, net.hidden.weight) and torch.equal(layer.bias, net.hidden.bias)
    fio.save_model(net.hidden, tmp_path / "hidden.safetensors")
    layer = fastlayers.LinearReLU(20, 256)
    fio.load_model(layer, tmp_path / "hidden.safetensors")
    assert torch.equal(layer.weight, net.hidden.weight)


# --------------------------------------------------------------------------- contents and formats
TENSORS = {
    "f32": torch.randn(3, 5), "f16": torch.randn(7, dtype=torch.float16),
    "bf16": torch.randn(2, 3, dtype=torch.bfloat16), "i64": torch.arange(-3, 4),
    "bool": torch.tensor([True, False, True]), "empty": torch.empty(0, 4),
    "scalar": torch.tensor(2.5), "strided": torch.randn(6, 4).t()[::2],
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_containers_and_dtypes_round_trip(tmp_path, fmt):
    values = list(TENSORS.values())
    for obj in (TENSORS["bf16"], values, tuple(values), dict(TENSORS), OrderedDict(TENSORS),
                nn.Sequential(nn.Linear(3, 2), nn.ReLU()).state_dict()):
        path = tmp_path / f"obj.{fmt}"
        fio.save(obj, path)
        _equal(fio.load(path), obj)


def test_torch_format_keeps_plain_values(tmp_path):
    obj = {"epoch": 3, "lr": 0.1, "name": "mlp", "flags": {True, None}, "shape": torch.Size([2, 3]),
           "dtype": torch.bfloat16, "device": torch.device("cpu"), "nested": [(1, torch.ones(2))],
           "param": nn.Parameter(torch.randn(2))}
    fio.save(obj, tmp_path / "ckpt.pt")
    back = fio.load(tmp_path / "ckpt.pt")
    _equal(back, obj)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["epoch"] == 3  # plain torch reads it


def test_safetensors_tied_weights_and_foreign_files(tmp_path):
    net = _seed.tied_net()
    net(torch.rand(2, 4))
    sd = net.state_dict()
    assert sd["2.weight"].data_ptr() == sd["4.weight"].data_ptr()
    fio.save(sd, tmp_path / "tied.safetensors")
    _equal(fio.load(tmp_path / "tied.safetensors"), sd)
    from safetensors.torch import save_file
    save_file({"b": torch.ones(2), "a": torch.zeros(3)}, str(tmp_path / "foreign.safetensors"))
    back = fio.load(tmp_path / "foreign.safetensors")
    assert type(back) is dict and set(back) == {"a", "b"} and torch.equal(back["b"], torch.ones(2))


def test_map_location(tmp_path):
    for fmt in FORMATS:
        fio.save({"w": torch.randn(2, 2)}, tmp_path / f"m.{fmt}")
        back = fio.load(tmp_path / f"m.{fmt}", map_location="meta")
        assert back["w"].device.type == "meta" and back["w"].shape == (2, 2)


def test_save_refuses_what_cannot_be_loaded_safely(tmp_path):
    Point = namedtuple("Point", "x y")
    cases = [
        (nn.Linear(2, 2), r"obj is a torch\.nn\.modules\.linear\.Linear.*Save its state_dict"),
        ({"a": [1, lambda: 0]}, r"obj\['a'\]\[1\] is a .*function"),
        ({"p": Point(torch.ones(1), 2)}, r"obj\['p'\] is a .*Point"),
        ({"lazy": nn.LazyLinear(3).weight}, r"obj\['lazy'\] is an uninitialised lazy parameter"),
    ]
    for obj, message in cases:
        with pytest.raises(TypeError, match=message):
            fio.save(obj, tmp_path / "bad.pt")
    for obj, message in [({"a": [torch.ones(1)]}, r"entry 'a' is a list"),
                         ({1: torch.ones(1)}, "keys must be strings"),
                         ("text", "holds a tensor, a list/tuple of tensors or a flat dict")]:
        with pytest.raises(TypeError, match=message):
            fio.save(obj, tmp_path / "bad.safetensors")
    assert os.listdir(tmp_path) == []


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt: no such file"):
        fio.load(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="directory .*missing does not exist"):
        fio.save(torch.ones(1), tmp_path / "missing" / "x.pt")
    with pytest.raises(IsADirectoryError, match="it is a directory"):
        fio.save(torch.ones(1), tmp_path)


# --------------------------------------------------------------------------- unsafe and corrupted
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return (open, (self.marker, "w"))


def test_code_running_pickle_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "payload": _Payload(str(marker))}, path)
    with pytest.raises(fio.UnsafeFileError, match=r"refusing to load .*evil\.pt.*\(io\.open\)"):
        fio.load(path)
    with pytest.raises(fio.UnsafeFileError):
        fio.load_model(nn.Linear(2, 2), path)
    assert not marker.exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_and_corrupted_files_raise_naming_the_file(tmp_path, fmt):
    good = tmp_path / f"good.{fmt}"
    fio.save({"w": torch.randn(64, 32), "b": torch.randn(32)}, good)
    data = good.read_bytes()
    bad = tmp_path / f"bad.{fmt}"
    for cut in (0, 1, 8, len(data) // 3, len(data) // 2, len(data) - 100, len(data) - 1):
        bad.write_bytes(data[:cut])
        with pytest.raises(fio.CorruptFileError, match=rf"cannot load .*bad\.{fmt}"):
            fio.load(bad)
    for pos in (len(data) // 2, len(data) // 2 + 4099, len(data) - 600):  # inside the tensor data
        flipped = bytearray(data)
        flipped[pos] ^= 0x10
        bad.write_bytes(bytes(flipped))
        with pytest.raises(fio.CorruptFileError, match=rf"bad\.{fmt}.*(CRC-32|corrupt)"):
            fio.load(bad)
    bad.write_bytes(os.urandom(1000))
    with pytest.raises(fio.CorruptFileError, match=rf"bad\.{fmt}"):
        fio.load(bad)


def test_legacy_format_truncation(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save(torch.randn(100), path, _use_new_zipfile_serialization=False)
    assert torch.equal(fio.load(path), torch.load(path, weights_only=True))
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(fio.CorruptFileError, match="legacy.pt"):
        fio.load(path)


# --------------------------------------------------------------------------- atomic saves
def _listing(directory):
    return sorted(os.listdir(directory))


@pytest.mark.parametrize("route", ["anonymous", "named", "link_refused"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_exception_mid_save_keeps_previous_file_and_leaves_no_litter(tmp_path, monkeypatch,
                                                                     route, fmt):
    if route == "named":
        monkeypatch.setattr(_atomic_write, "_anonymous_works", False)
    path = tmp_path / f"model.{fmt}"
    old = {"w": torch.randn(4, 4)}
    fio.save(old, path)
    before = _listing(tmp_path)
    if route == "link_refused":  # the copy-to-named-file fallback, then a clean save
        monkeypatch.setattr(_atomic_write, "_link_anonymous", lambda fd, dest: False)
        monkeypatch.setattr(_atomic_write, "_anonymous_works", True)
        new = {"w": torch.randn(4, 4)}
        fio.save(new, path)
        _equal(fio.load(path), new)
        assert _listing(tmp_path) == before
        old = new

    def half_then_fail(f):
        f.write(b"PK\x03\x04 half of a file")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        _atomic_write.atomic_write(path, half_then_fail)
    real_save = torch.save

    def failing_save(obj, f, *a, **k):  # serialise for real, then fail at the end
        real_save(obj, f, *a, **k)
        raise OSError("no space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    if fmt == "pt":
        with pytest.raises(OSError, match="no space left"):
            fio.save({"w": torch.randn(100, 100)}, path)
    _equal(fio.load(path), old)
    assert _listing(tmp_path) == before


_CHILD = textwrap.dedent("""
    import os, sys, time, torch
    from fastlayers import _atomic_write, io as fio
    path, stage = sys.argv[1], sys.argv[2]
    def pause(*args):
        print("READY", flush=True)
        time.sleep(120)
    if stage == "mid-write":  # half of a big file written, then the kill
        def write(f):
            f.write(os.urandom(1 << 20) * 64)
            f.flush()
            pause()
        _atomic_write.atomic_write(path, write)
    else:  # a real save of a big tensor, killed when it reaches fsync
        _atomic_write.os.fsync = pause
        fio.save({"w": torch.randn(1 << 24)}, path)
""")


@pytest.mark.parametrize("stage", ["mid-write", "before-rename"])
def test_sigkill_during_save_keeps_previous_file_and_leaves_no_litter(tmp_path, stage):
    path = tmp_path / "weights.pt"
    old = {"w": torch.randn(8, 8)}
    fio.save(old, path)
    before = _listing(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), stage],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "READY"
        fds = [os.readlink(f"/proc/{child.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{child.pid}/fd")]
        assert any(str(tmp_path) in target for target in fds), fds  # the file being written
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    _equal(fio.load(path), old)
    assert _listing(tmp_path) == before


def test_saved_file_mode_follows_umask(tmp_path):
    fio.save(torch.ones(1), tmp_path / "a.pt")
    (tmp_path / "b").write_bytes(b"")
    assert (tmp_path / "a.pt").stat().st_mode == (tmp_path / "b").stat().st_mode


# --------------------------------------------------------------------------- save_model / load_model
def _net(out=2, extra=False):
    layers = [nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, out)]
    return nn.Sequential(*layers, nn.Linear(out, 1)) if extra else nn.Sequential(*layers)


def test_load_model_reports_every_problem_and_leaves_model_unchanged(tmp_path):
    path = tmp_path / "net.pth"
    fio.save_model(_net(), path)
    target = _net(out=3, extra=True)
    target.register_buffer("extra_buffer", torch.ones(2))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(fio.StateDictMismatchError) as info:
        fio.load_model(target, path)
    message = str(info.value)
    assert "net.pth does not match Sequential" in message
    assert "shape mismatch for 2.weight: file has [2, 4], model has [3, 4]" in message
    assert "2.bias: file has [2], model has [3]" in message
    assert "3 missing key(s) (in the model, not in the file): " in message  # all at once
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())

    target = _net(extra=True)
    target.register_buffer("extra_buffer", torch.ones(2))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(fio.StateDictMismatchError,
                       match=r"3 missing key\(s\) \(in the model, not in the file\): "):
        fio.load_model(target, path)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())

    report = fio.load_model(target, path, strict=False)
    assert sorted(report.missing_keys) == ["3.bias", "3.weight", "extra_buffer"] and not report.ok
    assert torch.equal(target[0].weight, fio.load(path)["0.weight"])

    with pytest.raises(fio.StateDictMismatchError, match=r"1 unexpected key\(s\) .*: 2\.bias"):
        fio.load_model(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2, bias=False)), path)
    small = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3))
    report = fio.load_model(small, path, strict=False)
    assert report.mismatched == [("2.weight", (2, 4), (3, 4)), ("2.bias", (2,), (3,))]
    assert report.missing_keys == [] and report.unexpected_keys == []


def test_fixed_hidden_mlp_round_trips_and_loads_the_seeds_state_dict(tmp_path):
    ours = fastlayers.FixedHiddenMLP(reduce="sum")
    fio.save_model(ours, tmp_path / "fixed.pt")
    clone = fastlayers.FixedHiddenMLP(reduce="sum")
    assert fio.load_model(clone, tmp_path / "fixed.pt").ok
    x = torch.rand(3, 20)
    assert torch.equal(clone.rand_weight, ours.rand_weight) and torch.equal(clone(x), ours(x))
    # the seed's module has no rand_weight in its state_dict: FixedHiddenMLP keeps its own
    seed = _seed.FixedHiddenMLP()
    seed(x)
    fio.save(seed.state_dict(), tmp_path / "seed.pt")
    kept = clone.rand_weight.clone()
    report = fio.load_model(clone, tmp_path / "seed.pt")
    assert report.ok and torch.equal(clone.rand_weight, kept)
    assert torch.equal(clone.linear.weight, seed.linear.weight)


def test_load_model_hints_and_wrong_content(tmp_path):
    net = _net()
    fio.save({f"module.{k}": v for k, v in net.state_dict().items()}, tmp_path / "ddp.pt")
    with pytest.raises(fio.StateDictMismatchError, match="saved from a DataParallel/DDP wrapper"):
        fio.load_model(_net(), tmp_path / "ddp.pt")
    fio.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(fio.StateDictMismatchError, match="does not hold a state_dict"):
        fio.load_model(_net(), tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"uninitialised lazy parameters \(hidden.weight"):
        fio.save_model(_seed.IoMLP(), tmp_path / "lazy.pt")


def test_load_model_defaults_to_the_model_device(tmp_path, monkeypatch):
    """The file is loaded onto the model's device (a meta model, which holds no data to
    load into, is refused: tests/test_io_rollback.py)."""
    fio.save_model(_net(), tmp_path / "net.pt")
    seen, real = [], fio.load
    monkeypatch.setattr(fio, "load", lambda p, m=None, **kw: seen.append(m) or real(p, m, **kw))
    assert fio.load_model(_net(), tmp_path / "net.pt").ok
    assert seen == [torch.device("cpu")]

