"""fastlayers.io.save / load on tensors whose memory is not simply their values (lazy
conjugate and negative views, dtype views of odd-sized storages), containers that hold
themselves, and the safetensors header's reserved key: each saves what load gives back,
or is refused at save naming the fix."""
import pytest
import torch

from fastlayers import io as fio


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_conjugate_and_negative_views_keep_their_values(tmp_path, fmt):
    """x.conj() and torch._neg_view(x) are lazy views (a flag over un-negated memory);
    both formats write their values."""
    z = torch.randn(3, 2, dtype=torch.complex64)
    data = {"conj": z.conj(), "conj_t": z.t().conj(), "neg": torch._neg_view(z.conj())}
    assert data["conj"].is_conj() and data["neg"].is_neg()
    path = tmp_path / f"c.{fmt}"
    fio.save(data, path)
    back = fio.load(path)
    for key, value in data.items():
        assert torch.equal(back[key], value.resolve_conj().resolve_neg()), key


def test_safetensors_refuses_the_header_key(tmp_path):
    """'__metadata__' is the safetensors header's own key: a file holding an entry of that
    name would be written but could never be read; save refuses it and keeps no file."""
    path = tmp_path / "m.safetensors"
    with pytest.raises(TypeError, match="__metadata__"):
        fio.save({"__metadata__": torch.ones(2), "w": torch.ones(2)}, path)
    assert not path.exists()


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_a_dtype_view_that_cannot_be_read_back_is_refused(tmp_path, fmt):
    """One float32 over a 6-byte storage (a dtype view of a uint8 slice): torch.save would
    write it and no load could read it; save refuses it, and a copy saves."""
    y = torch.arange(6, dtype=torch.uint8)[:4].view(torch.float32)
    path = tmp_path / f"v.{fmt}"
    with pytest.raises(TypeError, match=r"view of a storage of 6 bytes.*\.clone\(\)"):
        fio.save({"y": y}, path)
    assert not path.exists()
    fio.save({"y": y.clone()}, path)
    assert torch.equal(fio.load(path)["y"].view(torch.uint8), y.clone().view(torch.uint8))


def test_a_container_holding_itself_saves_like_torch(tmp_path):
    """pickle keeps references, so torch.save writes a list that holds itself; save's
    check walks it once (it used to recurse until RecursionError)."""
    data = [torch.ones(2)]
    data.append(data)
    fio.save(data, tmp_path / "c.pt")
    back = fio.load(tmp_path / "c.pt")
    assert torch.equal(back[0], torch.ones(2)) and back[1] is back


def test_two_dtype_views_of_one_memory_get_a_clear_error(tmp_path):
    """torch.save cannot store them; the error names both entries (was torch's bare
    RuntimeError). Distinct empty tensors of other dtypes are fine."""
    a = torch.arange(4, dtype=torch.float32)
    with pytest.raises(TypeError, match=r"obj\['i'\] \(torch.int32\) and obj\['f'\] "
                                        r"\(torch.float32\) view the same memory"):
        fio.save({"f": a, "i": a.view(torch.int32)}, tmp_path / "v.pt")
    assert not list(tmp_path.iterdir())
    fio.save({"f": a, "f2": a[1:], "e": torch.empty(0), "ei": torch.empty(0, dtype=torch.int64)},
             tmp_path / "ok.pt")
    back = fio.load(tmp_path / "ok.pt")
    assert torch.equal(back["f2"], a[1:]) and back["ei"].dtype == torch.int64


def test_paths_bytes_work_and_file_objects_are_refused_clearly(tmp_path):
    import io as pyio
    t = torch.randn(3)
    for name in ("b.pt", "b.safetensors"):
        path = bytes(tmp_path / name)
        fio.save(t, path)
        assert torch.equal(fio.load(path), t)
    for bad in (pyio.BytesIO(), 3):
        with pytest.raises(TypeError, match="path must be a str, bytes or os.PathLike"):
            fio.save(t, bad)
        with pytest.raises(TypeError, match="path must be a str, bytes or os.PathLike"):
            fio.load(bad)
