"""Edge cases that mutation testing (tools/mutate.py) found unguarded: io, the atomic
write, convert, and the halving's rounding ties. Each test fails on a planted bug of
tools/mutants.py (named in its docstring)."""
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


# ------------------------------------------------------------------------ convert
HOOKS = {
    "forward_pre": lambda m: m.register_forward_pre_hook(lambda mod, args: (args[0] * 2,)),
    "forward": lambda m: m.register_forward_hook(lambda mod, args, out: out * 3),
    "full_backward": lambda m: m.register_full_backward_hook(lambda mod, gi, go: None),
    "full_backward_pre": lambda m: m.register_full_backward_pre_hook(lambda mod, go: None),
    "state_dict": lambda m: m._register_state_dict_hook(lambda mod, sd, prefix, local: None),
    "load_state_dict_pre": lambda m: m._register_load_state_dict_pre_hook(
        lambda *args: None),
    "load_state_dict_post": lambda m: m.register_load_state_dict_post_hook(lambda *a: None),
}


@pytest.mark.parametrize("where", [0, 1])
@pytest.mark.parametrize("hook", list(HOOKS))
def test_fuse_leaves_every_hooked_layer_alone(hook, where):
    """A hook of any kind on the Linear or the ReLU keeps the pair unfused (the fused layer
    would not run it); the hooked model's output is unchanged (mutant cv-pre-hook)."""
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    HOOKS[hook](model[where])
    with pytest.warns(fastlayers.SkippedFusionWarning, match="hook"):
        fused = fastlayers.fuse(model)
    assert [type(m) for m in fused] == [nn.Linear, nn.ReLU], hook
    x = torch.randn(2, 4)
    assert torch.equal(fused(x), model(x))


# ------------------------------------------------------------------------ halving ties
def _seed_loop(x, threshold):
    x, k = x.clone(), 0
    while x.abs().sum() > threshold:
        x /= 2
        k += 1
    return x, k


def test_bf16_sum_rounds_ties_to_even(backend):
    """|x|-sum 2 + 2**-7 in fp32 is a tie between bf16 2.0 and 2.015625: torch's bf16 sum
    rounds it to even (2.0), so the loop halves once (mutant halve-bf16-ties-away)."""
    x = torch.tensor([1.0, 1.0, 2.0 ** -7], dtype=torch.bfloat16)
    y_ref, k_ref = _seed_loop(x, 1.0)
    assert k_ref == 1
    y, k = fastlayers.functional.halve_until(x.to(backend), return_count=True)
    assert int(k) == k_ref and torch.equal(y.cpu(), y_ref)


def test_bf16_threshold_rounds_ties_to_even(backend):
    """threshold 1 + 2**-8 is a tie between bf16 1.0 and 1.0078125; torch's comparison
    rounds it to even (1.0), so a sum of 1.0078125 halves once (mutant hu-threshold-bf16)."""
    x = torch.tensor([1.0, 2.0 ** -7], dtype=torch.bfloat16)
    t = 1.0 + 2.0 ** -8
    y_ref, k_ref = _seed_loop(x, t)
    assert k_ref == 1
    y, k = fastlayers.functional.halve_until(x.to(backend), t, return_count=True)
    assert int(k) == k_ref and torch.equal(y.cpu(), y_ref)


def test_scale_grad_reaches_two_to_minus_127_and_beyond():
    """scale_grad(g, k) = g * 2**-k exactly for k around fp32's exponent limits (mutant
    hu-scale-grad-127: 2**-127 encoded as 0)."""
    from fastlayers.ops.halve_until import scale_grad
    g = torch.tensor([1.0, -3.0, 2.0 ** 100], dtype=torch.float32)
    for k in (0, 1, 126, 127, 128, 149, 200):
        got = scale_grad(g, torch.tensor(k, dtype=torch.int32))
        assert torch.equal(got, (g.double() * 2.0 ** -k).float()), k


# ------------------------------------------------------------------------ GEMM heuristic
@pytest.mark.parametrize("elsize", [2, 4])
def test_gemm_heuristic_short_k_steps_for_unaligned_sizes(elsize):
    """heuristic_config's documented rule: N or K not a multiple of 16 gets short K steps
    (unvectorised loads spill registers otherwise); aligned sizes keep long ones (generated
    mutant of its `aligned` test)."""
    from fastlayers.kernels.gemm import heuristic_config
    for M, N, K in [(4096, 4100, 4096), (4096, 4096, 4100), (4096, 1000, 999)]:
        assert heuristic_config(M, N, K, elsize)["BLOCK_K"] <= 16, (M, N, K)
    aligned = heuristic_config(4096, 4096, 4096, elsize)
    assert aligned["BLOCK_K"] >= 32 and aligned["BLOCK_N"] >= 128


def test_gemm_autotune_pruning_keeps_the_boundary_configs():
    """_prune (FASTLAYERS_AUTOTUNE=1) drops K steps longer than K needs and row tiles over
    twice the M bucket, but keeps those exactly at the limit (generated mutants of its
    comparisons) and never returns an empty list."""
    import triton
    from fastlayers.kernels.gemm import _prune

    def cfg(bm, bk):
        return triton.Config(dict(BLOCK_M=bm, BLOCK_N=64, BLOCK_K=bk, GROUP_M=8), num_warps=4,
                             num_stages=2)
    args = {"a_ptr": torch.empty(1, dtype=torch.float16), "K": 64, "M_BUCKET": 32}
    configs = [cfg(64, 64), cfg(64, 128), cfg(128, 64), cfg(16, 32)]
    kept = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"]) for c in _prune(configs, args)]
    assert kept == [(64, 64), (16, 32)]
    assert len(_prune([cfg(256, 256)], args)) == 1  # nothing fits: the last one stays
    # shared memory exactly at the limit fits: 5 stages x (128 + 224) x 64 x 2 B = 220 KiB
    big = [triton.Config(dict(BLOCK_M=128, BLOCK_N=224, BLOCK_K=64, GROUP_M=8), num_warps=8,
                         num_stages=s) for s in (5, 6)]
    assert _prune(big + configs[:1], {**args, "M_BUCKET": 64}) == [big[0], configs[0]]


@pytest.mark.parametrize("dtype,tiny", [(torch.float32, 2.0 ** -149), (torch.float64, 2.0 ** -1074)])
def test_halving_into_subnormals_rounds_at_every_step(backend, dtype, tiny):
    """11 subnormal quanta halved 3 times: the loop rounds at each step (5.5 -> 6, 3,
    1.5 -> 2 quanta) where one multiplication by 1/8 rounds once (1.375 -> 1); the result
    must be the loop's (mutant hu-cpu-fast-path)."""
    x = torch.tensor([5.0, 11 * tiny, -11 * tiny], dtype=dtype)
    y_ref, k_ref = _seed_loop(x, 1.0)
    assert k_ref == 3 and y_ref[1] == 2 * tiny
    y, k = fastlayers.functional.halve_until(x.to(backend), return_count=True)
    assert int(k) == k_ref and torch.equal(y.cpu(), y_ref)
