"""The registered ops (``torch.ops.fastlayers.*``) called directly, past
fastlayers.functional's checks: operands that do not fit together, a threshold the loop
cannot use, an unknown fp32 mode are refused with an error naming the op, the same on both
paths (before, the kernels read past the end of the smaller tensor and returned garbage,
where the torch path raised). Valid direct calls: tests/*::test_opcheck."""
import math

import pytest
import torch

from _util import randn

ops = torch.ops.fastlayers


def _t(*shape, device, dtype=torch.float32):
    return randn(*shape, device=device).to(dtype)


CASES = {  # name: (call(device), error type, words in the message)
    "lr weight K": (lambda d: ops.linear_relu_fwd(_t(3, 5, device=d), _t(4, 2, device=d),
                                                 _t(4, device=d), "ieee"),
                    ValueError, ["linear_relu_fwd", "x [3, 5]", "weight [4, 2]"]),
    "lr bias N": (lambda d: ops.linear_relu_fwd(_t(3, 5, device=d), _t(4, 5, device=d),
                                               _t(2, device=d), "ieee"),
                  ValueError, ["linear_relu_fwd", "bias [2]"]),
    "lr 3-D x": (lambda d: ops.linear_relu_fwd(_t(2, 3, 5, device=d), _t(4, 5, device=d),
                                              None, "ieee"),
                 ValueError, ["linear_relu_fwd", "x [2, 3, 5]", "x [M, K]"]),
    "lr dtypes": (lambda d: ops.linear_relu_fwd(_t(3, 5, device=d, dtype=torch.float16),
                                               _t(4, 5, device=d), None, "ieee"),
                  TypeError, ["linear_relu_fwd", "torch.float16", "one dtype"]),
    "lr int x": (lambda d: ops.linear_relu_fwd(torch.ones(3, 5, dtype=torch.int64, device=d),
                                              torch.ones(4, 5, dtype=torch.int64, device=d),
                                              None, "ieee"),
                 TypeError, ["linear_relu_fwd", "floating-point"]),
    "lr mode": (lambda d: ops.linear_relu_fwd(_t(3, 5, device=d), _t(4, 5, device=d), None,
                                             "fast"),
                ValueError, ["linear_relu_fwd", "fp32_mode", "'fast'"]),
    "lr bwd out": (lambda d: ops.linear_relu_bwd_input(_t(3, 4, device=d), _t(2, 4, device=d),
                                                      _t(4, 5, device=d), "ieee"),
                   ValueError, ["linear_relu_bwd_input", "out [2, 4]"]),
    "lr bwd x": (lambda d: ops.linear_relu_bwd_params(_t(3, 4, device=d), _t(3, 4, device=d),
                                                     _t(7, 5, device=d), "ieee"),
                 ValueError, ["linear_relu_bwd_params", "x [7, 5]"]),
    "fh weight K": (lambda d: ops.fixed_hidden_fwd(_t(3, 5, device=d), _t(2, 4, device=d),
                                                  1.0, "ieee"),
                    ValueError, ["fixed_hidden_fwd", "weight [2, 4]"]),
    "fh bwd weight": (lambda d: ops.fixed_hidden_bwd_input(
        _t(3, 4, device=d), _t(3, 4, device=d), _t(5, 3, device=d), "ieee"),
        ValueError, ["fixed_hidden_bwd_input", "weight [5, 3]"]),
    "mlp x d": (lambda d: ops.fixed_hidden_mlp_fwd(
        _t(3, 8, device=d), _t(6, 6, device=d), _t(6, device=d), _t(6, 6, device=d), 1.0, 1.0,
        False, True, "ieee"), ValueError, ["fixed_hidden_mlp_fwd", "x [3, 8]"]),
    "mlp weight": (lambda d: ops.fixed_hidden_mlp_fwd(
        _t(3, 6, device=d), _t(6, 4, device=d), _t(6, device=d), _t(6, 6, device=d), 1.0, 1.0,
        False, True, "ieee"), ValueError, ["fixed_hidden_mlp_fwd", "weight [6, 4]"]),
    "mlp threshold 0": (lambda d: ops.fixed_hidden_mlp_fwd(
        _t(3, 6, device=d), _t(6, 6, device=d), None, _t(6, 6, device=d), 1.0, 0.0, False,
        True, "ieee"), ValueError, ["threshold must be > 0"]),
    "mlp bwd h2": (lambda d: ops.fixed_hidden_mlp_bwd(
        _t(3, 6, device=d), _t(3, 6, device=d), _t(6, 6, device=d), _t(6, 6, device=d),
        _t(0, device=d), torch.zeros((), dtype=torch.int32, device=d), False, "ieee"),
        ValueError, ["fixed_hidden_mlp_bwd", "h2 [0]"]),
    "mlp bwd k": (lambda d: ops.fixed_hidden_mlp_bwd(
        _t(3, 6, device=d), _t(3, 6, device=d), _t(6, 6, device=d), _t(6, 6, device=d),
        _t(3, 6, device=d), torch.zeros(2, dtype=torch.int32, device=d), False, "ieee"),
        ValueError, ["fixed_hidden_mlp_bwd", "k must be"]),
}
THRESHOLDS = [(0.0, "must be > 0"), (-1.0, "must be > 0"), (math.nan, "must be > 0"),
              (1e-45, "smallest normal"), (1e-300, "smallest normal")]


@pytest.mark.parametrize("case", list(CASES))
def test_mismatched_operands_are_refused_on_both_paths(backend, case):
    call, exc, words = CASES[case]
    with pytest.raises(exc) as info:
        call(backend)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize("threshold, words", THRESHOLDS)
def test_halve_until_op_refuses_thresholds_the_loop_cannot_use(backend, threshold, words):
    with pytest.raises(ValueError) as info:
        ops.halve_until(_t(3, 5, device=backend) * 100, threshold)
    assert "halve_until" in str(info.value) and words in str(info.value), str(info.value)


def test_halve_until_op_refuses_integer_input(backend):
    with pytest.raises(TypeError, match="halve_until: x must be a floating-point"):
        ops.halve_until(torch.ones(3, dtype=torch.int32, device=backend), 1.0)
