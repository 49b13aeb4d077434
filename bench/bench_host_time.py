"""Host time of fastlayers' side of a GPU call, measured on a CPU with the launch stubbed.

What is included: the module call, argument checks, dispatch (``use_triton`` asks the
same questions a CUDA tensor gets, answered "triton"), the autograd Function where grad is
on, the launcher's Python (configs, grids, output allocations: CPU ``torch.empty`` here,
the CUDA caching allocator there), up to ``kernel[grid](...)``. What is NOT included: the
Triton launch itself (``JITFunction.run`` is replaced by a no-op: its argument binding,
cache lookup and driver call cost Triton's few microseconds on the GPU machine, see
shared/gpu-anchors.json "one tiny triton kernel"), and CUDA-only host calls
(``torch.cuda.current_device`` in device_guard). Launches are counted per call.

Paths: the launchers pick their GPU path from the device type, so two GPU choices are
forced the way a CUDA tensor would get them: centered's one-launch persistent path (with
its barrier buffer cached, as on a GPU), and the SM count of an H200 (132).

The baseline, timed in the same run as a paired ratio, is the torch eager call that the
module replaces, on this CPU at the same size (nn.Linear + nn.ReLU; ``x - x.mean()``; the
seed's eager FixedHiddenMLP), whose time is mostly host time too at these sizes.

    python -m pytest bench/bench_host_time.py --benchmark-only -p no:cacheprovider
"""
import contextlib
import importlib
import sys

import pytest
import torch

import fastlayers
from bench.bench_module_overhead import one_thread, paired_ratio
from fastlayers import _backend

KERNEL_MODULES = ("centered", "fixed_hidden", "fixed_hidden_mlp", "gemm", "gemm_tma",
                  "halve_until", "linear_relu")
LAUNCHES = [0]


@contextlib.contextmanager
def stubbed_gpu_path():
    """CPU tensors take the Triton path as CUDA tensors would; every launch is a no-op
    that counts itself in LAUNCHES."""
    from triton.runtime.jit import JITFunction

    mods = [importlib.import_module(f"fastlayers.kernels.{m}") for m in KERNEL_MODULES]
    if mods[0].interpreting():
        pytest.skip("host time is measured without TRITON_INTERPRET")
    saved = []

    def no_launch(*args, grid, warmup, **kwargs):
        LAUNCHES[0] += 1

    for mod in mods:
        for name, fn in vars(mod).items():
            if isinstance(fn, JITFunction) and name.endswith("_kernel"):
                saved.append((fn, fn.__dict__.get("run")))
                fn.run = no_launch
    centered = mods[0]
    bar = torch.zeros(2, dtype=torch.int32)
    patches = [(centered, "_barrier_state", lambda device: bar),
               (centered, "sm_count", lambda *_: 132),
               (importlib.import_module("fastlayers.kernels.gemm"), "sm_count", lambda *_: 132)]
    orig_centered = centered.centered

    def centered_gpu_path(x, dims=(), path=None):  # a CUDA tensor's default path
        if path is None and not dims and x.numel() * x.element_size() <= \
                centered.GPU_CONFIG["persistent_max_bytes"]:
            path = "persistent"
        return orig_centered(x, dims, path)

    patches.append((centered, "centered", centered_gpu_path))
    old = [(m, n, getattr(m, n)) for m, n, _ in patches]
    for m, n, v in patches:
        setattr(m, n, v)
    choice = _backend._device_choice
    previous = _backend.set_backend("auto")
    use_triton = _backend.use_triton

    def use_triton_as_cuda(t, *others):  # _backend.use_triton's questions, CUDA tensors
        if t.dtype not in _backend.KERNEL_DTYPES or (_backend.get_backend() == "auto"
                                                     and not t.is_cpu):
            return False
        path, reason = choice("cuda")
        if path == "error":
            raise RuntimeError(reason)
        return path == "triton"

    ops = [m for name, m in list(sys.modules.items())
           if name.startswith("fastlayers") and getattr(m, "use_triton", None) is use_triton]
    for op in ops:
        if hasattr(op, "use_triton"):
            op.use_triton = use_triton_as_cuda
    try:
        yield
    finally:
        for op in ops:
            op.use_triton = use_triton
        _backend.set_backend(previous)
        for m, n, v in old:
            setattr(m, n, v)
        for fn, run in saved:
            if run is None:
                del fn.run
            else:
                fn.run = run


def _linear_relu():
    ours = fastlayers.LinearReLU(64, 8)
    lin, act = torch.nn.Linear(64, 8), torch.nn.ReLU()
    x = torch.randn(2, 64)
    return (lambda: ours(x)), (lambda: act(lin(x)))


def _centered():
    ours = fastlayers.CenteredLayer()
    x = torch.randn(1 << 16)
    return (lambda: ours(x)), (lambda: x - x.mean())


def _fixed_hidden_mlp():
    from fastlayers.tour.seed import FixedHiddenMLP as SeedMLP
    torch.manual_seed(0)
    ours = fastlayers.FixedHiddenMLP()
    seed = SeedMLP()
    x = torch.rand(2, 20)
    return (lambda: ours(x)), (lambda: seed(x))


CASES = {"LinearReLU 2x64x8": _linear_relu, "CenteredLayer 2^16": _centered,
         "FixedHiddenMLP B=2": _fixed_hidden_mlp}


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("name", list(CASES))
def test_host_time(benchmark, name, grad):
    ours, baseline = CASES[name]()
    with torch.set_grad_enabled(grad), one_thread():
        with stubbed_gpu_path():
            LAUNCHES[0] = 0
            ours()
            launches = LAUNCHES[0]
            pair = paired_ratio(ours, baseline, rounds=11)
            benchmark.pedantic(ours, rounds=5, iterations=pair["inner_calls"], warmup_rounds=1)
    benchmark.extra_info.update(case=name, grad=grad, device="cpu (launch stubbed)",
                                triton_launches_per_call=launches,
                                host_us=pair["ours_us"], baseline="torch eager on this CPU",
                                baseline_us=pair["theirs_us"], ratio_vs_baseline=pair["ratio"],
                                ratio_min=pair["ratio_min"], ratio_max=pair["ratio_max"])
    print(f"\n{name} grad={grad}: {launches} Triton launch(es) per call; host side "
          f"{pair['ours_us']:.1f} us (this CPU) = {pair['ratio']:.2f}x torch eager's whole "
          f"CPU call ({pair['theirs_us']:.1f} us)")
