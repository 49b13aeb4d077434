"""Mutants of the numerics contract (tools/mutants.py adds them to its catalogue): 64-bit
offsets where int32 products pass 2**31, every 16-bit store rounded once (to nearest even,
under the interpreter too), dense-only kernels, and the paths an audit of the suite found
untested (split-K, the composed FixedHiddenMLP, double backward with c, backward on the
kernels)."""


def numerics(M, T, *, G, C, FM, REF, OLR, OFM):
    """The mutants, built with tools/mutants.py's M, tests folder T and file names."""
    R, P = T + "test_rounding.py", T + "test_rounding_paths.py"
    return [
        M("gemm-k-step-int32", G, "        b_ptrs += k_step * stride_bk\n",
          "        b_ptrs += BLOCK_K * stride_bk\n",
          "K steps of B in int32 (BLOCK_K * stride wraps past 2**31)",
          tests=[T + "test_far_offsets.py::test_gemm_steps_along_k_in_64_bit"]),
        M("gemm-no-slices", G, "    if M > MAX_DIM or N > MAX_DIM:\n", "    if False:\n",
          "C past MAX_DIM rows or columns in one launch",
          tests=[T + "test_far_offsets.py::test_gemm_launches_past_max_dim_in_slices"]),
        M("fhm-cols-int32", FM, "    rd = tl.arange(0, DP).to(tl.int64)",
          "    rd = tl.arange(0, DP)",
          "(d - 1) * a stride in int32", tests=[T + "test_far_offsets.py"]),
        M("ce-segments-int32", C, "ra = ((pid // n_i).to(tl.int64) * BLOCK_A",
          "ra = ((pid // n_i) * BLOCK_A",
          "segment index * BLOCK_A in int32", tests=[T + "test_far_offsets.py"]),
        M("rt-bf16-truncates", "kernels/runtime.py", "    if INTERPRETED:\n", "    if False:\n",
          "16-bit stores left to the interpreter's truncating fp32 -> bf16",
          tests=[R]),
        M("ref-fh-rounds-twice", REF,
          "    if dtype is _F16 or dtype is _BF16:  # (autocast off: it would cast the fp32 "
          "product back)\n", "    if False:\n",
          "16-bit fixed_hidden on the torch path rounds the product, then the sum",
          tests=[R]),
        M("bk-dense-only", "fastlayers/_backend.py",
          "o is None or (plain(o) and o.layout is torch.strided and not o.is_nested\n",
          "o is None or (plain(o)\n", "sparse and nested tensors sent to the kernels",
          tests=[R]),
        M("bk-neg-bit", "fastlayers/_backend.py",
          "                          and not o.is_neg() and not _legacy_batched(o))",
          "                          and not _legacy_batched(o))",
          "negative-bit views sent to the kernels, which read -x", tests=[R]),
        M("bk-legacy-batched", "fastlayers/_backend.py",
          "                          and not o.is_neg() and not _legacy_batched(o))",
          "                          and not o.is_neg())", "autograd's batched gradients sent to the kernels (no memory to read)",
          tests=[T + "test_transforms_traced.py::test_vectorized_jacobian_matches_float64"]),
        M("bk-traced-transform", "fastlayers/_backend.py",
          "    if isinstance(torch._C._functorch.peek_interpreter_stack(), _CInterpreter):\n"
          "        return True\n", "",
          "a torch.func transform that torch.compile traces reaches the custom ops",
          tests=[T + "test_transforms_traced.py::test_compiled_transform_matches_float64"]),
        M("ref-fh-autocast", REF, "        with torch.autocast(x.device.type, enabled=False):\n",
          "        if True:\n", "autocast casts the fp32 product back: two roundings",
          tests=[R]),
        M("gemm-rowsum-truncates", G, "to_dtype(rsum, rowsum_ptr.dtype.element_ty)",
          "rsum.to(rowsum_ptr.dtype.element_ty)", "row sums (the bias gradient) truncated "
          "to bf16 under the interpreter", tests=[P]),
        M("gemm-split-k-16bit", G,
          "c_out = torch.empty((split_k, M, N), device=a.device, dtype=torch.float32)",
          "c_out = torch.empty((split_k, M, N), device=a.device, dtype=a.dtype)",
          "split-K partial sums rounded to 16 bits before they are added", tests=[P]),
        M("gemm-scalar-16bit", G, "0.0 if scalar is None else float(scalar), **plan.meta)",
          "0.0 if scalar is None else float(torch.tensor(scalar, dtype=a.dtype)), **plan.meta)",
          "c rounded to x's dtype before the fp32 add", tests=[P]),
        M("ce-two-sweep-truncates", C,
          "            tl.store(y_seg + c * syc, to_dtype(x - mean, y_ptr.dtype.element_ty), "
          "mask=ok)",
          "            tl.store(y_seg + c * syc, (x - mean).to(y_ptr.dtype.element_ty), mask=ok)",
          "two-sweep centering store truncates bf16 under the interpreter", tests=[P]),
        M("fmk-z-twice", FM, "z = _round_to(tl.dot(_operand(h1, dtype, UPCAST), r, "
          "input_precision=PRECISION) + c, FMT)",
          "z = _round_to(_round_to(tl.dot(_operand(h1, dtype, UPCAST), r, "
          "input_precision=PRECISION), FMT) + c, FMT)",
          "the fused block rounds h1 @ R, then + c", tests=[P]),
        M("fm-composed-saves-h1", FM, "    return out, k, (h2 if save_h2 else h2.new_empty((0,)))",
          "    return out, k, (h1 if save_h2 else h2.new_empty((0,)))",
          "the composed block (d > 64) saves h1 for the backward",
          tests=[T + "test_kernel_paths.py"]),
        M("fm-double-backward-c", OFM,
          "_, h2 = reference.fixed_hidden_mlp_body(x, weight, bias, rand_weight, ctx.c)",
          "_, h2 = reference.fixed_hidden_mlp_body(x, weight, bias, rand_weight, 1.0)",
          "double backward recomputes h2 with c = 1", tests=[T + "test_kernel_paths.py"]),
        M("lr-backward-composite", OLR, "    differentiable = torch.is_grad_enabled()",
          "    differentiable = True", "every backward runs torch's composite, not the kernels",
          tests=[T + "test_kernel_paths.py"]),
    ]
