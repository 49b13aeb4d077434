"""Edge cases that mutation testing (tools/mutate.py) found unguarded in io, the atomic
write, convert and init: each test here fails on one planted bug of tools/mutants.py."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import fastlayers
from fastlayers import io as fio


# ------------------------------------------------------------------------ io
def test_safetensors_key_listed_but_missing_is_corruption(tmp_path):
    """A tensor named in the checksums (and keys) but absent from the file is corruption,
    not a KeyError and not a silent pass (mutant io-crc-missing-key)."""
    path = tmp_path / "two.safetensors"
    a, b = torch.randn(3), torch.randn(4)
    fio.save({"a": a, "b": b}, path)
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(header_len))["__metadata__"]
    save_file({"a": a}, str(path), metadata=meta)  # same metadata, "b" dropped
    with pytest.raises(fio.CorruptFileError, match="'b'"):
        fio.load(path)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_views_round_trip(tmp_path, fmt):
    """Offset views, strided views and two views of one storage save and load as their
    values only (no neighbouring storage, no lost offset)."""
    big = torch.randn(6, 8)
    obj = {"row": big[2], "col": big[:, 3], "block": big[1:4, 2:5], "t": big.t()[1:3]}
    path = tmp_path / f"views.{fmt}"
    fio.save(obj, path)
    back = fio.load(path)
    assert list(back) == list(obj)
    for k, v in obj.items():
        assert back[k].shape == v.shape and torch.equal(back[k], v), k


def test_oserror_while_loading_is_not_called_corruption(tmp_path, monkeypatch):
    """A permission error reading a torch file propagates as itself (mutant
    io-oserror-as-corrupt): it says nothing about the file's content."""
    path = tmp_path / "x.pt"
    fio.save(torch.randn(3), path)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(torch, "load", denied)
    with pytest.raises(PermissionError):
        fio.load(path, verify=False)


def test_rename_failure_leaves_no_temporary_file(tmp_path, monkeypatch):
    """When the final rename fails, the temporary file is removed (mutant aw-rename-litter)."""
    path = tmp_path / "x.pt"
    fio.save(torch.randn(3), path)
    before = sorted(os.listdir(tmp_path))

    def refuse(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="No space"):
        fio.save(torch.randn(4), path)
    assert sorted(os.listdir(tmp_path)) == before
    assert torch.load(path).shape == (3,)  # the previous file is intact
