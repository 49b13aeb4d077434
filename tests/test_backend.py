"""Backend selection: FASTLAYERS_BACKEND, backend_info(), and life without triton."""
import os
import subprocess
import sys

import pytest
import torch

import fastlayers
from fastlayers import _backend
from fastlayers import functional as F


def run_python(code: str, **env):
    """Run ``code`` in a fresh interpreter (so import-time settings apply)."""
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full_env, timeout=120)


def test_import_and_layers_work_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` fail
        "import torch, fastlayers\n"
        "info = fastlayers.backend_info()\n"
        "assert info['triton'] is None and info['devices']['cpu']['path'] == 'torch', info\n"
        "assert 'triton unavailable' in info['devices']['cpu']['reason'], info\n"
        "layer = fastlayers.LinearReLU(5, 3)\n"
        "x = torch.randn(4, 5, requires_grad=True)\n"
        "y = layer(x); y.sum().backward()\n"
        "ref = torch.relu(torch.nn.functional.linear(x, layer.weight, layer.bias))\n"
        "assert torch.equal(y, ref) and x.grad is not None\n"
        "print('ok')\n"
    )
    out = run_python(code, FASTLAYERS_BACKEND="auto")
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_environment_variable_sets_the_backend():
    code = "import fastlayers; print(fastlayers.get_backend())"
    out = run_python(code, FASTLAYERS_BACKEND="torch")
    assert out.stdout.strip() == "torch", out.stderr


def test_invalid_backend_is_a_clear_error():
    out = run_python("import fastlayers", FASTLAYERS_BACKEND="cuda-please")
    assert out.returncode != 0
    assert "FASTLAYERS_BACKEND must be one of" in out.stderr and "cuda-please" in out.stderr
    with pytest.raises(ValueError, match="FASTLAYERS_BACKEND must be one of"):
        fastlayers.set_backend("fast")


def test_use_backend_restores_the_previous_backend():
    before = fastlayers.get_backend()
    with fastlayers.use_backend("torch"):
        assert fastlayers.get_backend() == "torch"
        with pytest.raises(RuntimeError):
            with fastlayers.use_backend("auto"):
                raise RuntimeError("boom")
        assert fastlayers.get_backend() == "torch"
    assert fastlayers.get_backend() == before


def test_backend_info_explains_each_device():
    info = fastlayers.backend_info()
    assert set(info) >= {"backend", "torch", "triton", "interpreter", "devices"}
    assert info["torch"] == torch.__version__
    cpu = info["devices"]["cpu"]
    assert cpu["path"] in ("torch", "triton") and cpu["reason"]
    with fastlayers.use_backend("torch"):
        assert fastlayers.backend_info()["devices"]["cpu"] == {
            "path": "torch", "reason": "FASTLAYERS_BACKEND=torch"}
    if _backend.TRITON_ERROR is None and _backend.interpreting():
        with fastlayers.use_backend("triton"):
            assert fastlayers.backend_info()["devices"]["cpu"]["path"] == "triton"


def test_kernel_dtypes_only():
    x = torch.randn(2, 3, dtype=torch.float64)
    with fastlayers.use_backend("triton"):
        assert not _backend.use_triton(x)  # float64 always falls back to torch


@pytest.mark.skipif(_backend.TRITON_ERROR is not None, reason="triton is not installed here")
@pytest.mark.parametrize("call", [
    lambda: F.linear_relu(torch.randn(2, 3), torch.randn(4, 3)),
    lambda: F.centered(torch.randn(2, 3)),
    lambda: F.fixed_hidden(torch.randn(2, 3), torch.rand(3, 4)),
    lambda: F.halve_until(torch.randn(2, 3) * 10),
], ids=["linear_relu", "centered", "fixed_hidden", "halve_until"])
def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch, call):
    monkeypatch.setattr(_backend, "interpreting", lambda: False)
    with fastlayers.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        call()
