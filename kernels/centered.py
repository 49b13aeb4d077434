"""Centering, y = x - mean(x), over all elements or over chosen dims: kernels and launcher.

The tensor is seen as segments: ``x`` viewed as ``[A, C, I]`` is centered over its middle
axis (C elements per segment, A * I segments); the global mean is ``A = I = 1``. Paths:

* ``"persistent"`` (CUDA, global mean, x up to ``persistent_max_bytes``): one launch. A
  co-resident grid (cooperative launch, one program per SM) sums its tiles into fp32
  partials, keeping each program's first tile in registers; a grid-wide barrier; every
  program sums all partials in the same fixed order, then centers its other tiles
  newest-first (their re-read comes from L2, which holds the whole input) and the kept
  tile last: ~2N bytes of HBM traffic. Under the interpreter it runs as one program
  (programs run one after another there, so a wider grid would wait forever).
* ``"split"`` (few long segments, ``I == 1``): two launches. Each segment is split into
  chunks; pass 1 writes one fp32 partial sum per chunk, pass 2 sums its segment's partials
  in a fixed order and subtracts (3N bytes). Pass 2 walks its chunk backwards, so the tiles
  pass 1 read last may still be in L2.
* ``"segments"`` (many segments, any ``I``): one launch, one program per tile of segments;
  a segment of up to one tile is loaded once (2N bytes), longer ones are read twice.

Numerics for every path: fp32 accumulation, the mean is sum / C in fp32, the result
``x - mean`` is computed in fp32 and rounded once to x's dtype. No float atomics: a given
shape, dtype and device always sums in the same order, so results are bitwise repeatable.
Offsets are 64-bit.
"""
import torch
import triton
import triton.language as tl

from .runtime import cdiv, device_guard, interpreting, next_pow2, sm_count, to_dtype

PATHS = ("persistent", "split", "segments")

# Tiles hold 16 KiB of input on the GPU (a segment up to one tile is centered in one sweep).
# The persistent path runs one program per SM, so its tile is all that SM has in flight:
# up to persistent_tile_elems elements (64 KiB of fp32, 32 loads of 16 bytes per thread
# over persistent_num_warps warps; an H200 needs ~35 KB in flight per SM to approach its
# bandwidth), 32 elements per thread, 1024 per warp; half that when the size or the base is
# not 16-aligned (unvectorised loads: the full tile spills at the 128-register cap). persistent_programs_per_sm stays 1
# unless occupancy is checked per compiled kernel: a cooperative launch fails when the grid
# does not fit on the GPU at once (tests/sm90_compile.py reports registers and CTAs/SM).
# persistent_max_bytes keeps the persistent path's re-read in L2 (50 MiB on an H200).
# Under the interpreter, small values keep test shapes small while crossing every boundary.
GPU_CONFIG = dict(tile_bytes=16384, num_warps=8, splits_per_sm=4,
                  persistent_programs_per_sm=1, persistent_max_bytes=16 << 20,
                  persistent_tile_elems=16384, persistent_num_warps=16)
INTERPRETER_CONFIG = dict(tile=64, max_one_sweep=32, split_block=32, splits_per_sm=4)


@triton.jit
def _center_segments_kernel(
    x_ptr, y_ptr, A, C, I,
    sxa, sxc, sxi, sya, syc, syi,
    BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
    ONE_SWEEP: tl.constexpr,
):
    pid = tl.program_id(0)
    n_i = tl.cdiv(I, BLOCK_I)
    ra = ((pid // n_i).to(tl.int64) * BLOCK_A + tl.arange(0, BLOCK_A))[:, None, None]
    ri = ((pid % n_i).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I))[None, None, :]
    rc = tl.arange(0, BLOCK_C).to(tl.int64)[None, :, None]
    seg_ok = (ra < A) & (ri < I)
    x_seg = x_ptr + ra * sxa + ri * sxi
    y_seg = y_ptr + ra * sya + ri * syi
    if ONE_SWEEP:  # the whole segment fits in one tile: load once, subtract, store
        ok = seg_ok & (rc < C)
        x = tl.load(x_seg + rc * sxc, mask=ok, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / C
        tl.store(y_seg + rc * syc, to_dtype(x - mean[:, None, :], y_ptr.dtype.element_ty), mask=ok)
    else:  # sweep 1 sums, sweep 2 subtracts
        acc = tl.zeros((BLOCK_A, BLOCK_C, BLOCK_I), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = rc + c0
            acc += tl.load(x_seg + c * sxc, mask=seg_ok & (c < C), other=0.0).to(tl.float32)
        mean = (tl.sum(acc, axis=1) / C)[:, None, :]
        for c0 in range(0, C, BLOCK_C):
            c = rc + c0
            ok = seg_ok & (c < C)
            x = tl.load(x_seg + c * sxc, mask=ok, other=0.0).to(tl.float32)
            tl.store(y_seg + c * syc, to_dtype(x - mean, y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _split_partials_kernel(x_ptr, part_ptr, C, sxa, sxc, CHUNK, S, BLOCK: tl.constexpr):
    """Program a * S + s writes the fp32 sum of chunk s of segment a."""
    pid = tl.program_id(0)
    start = (pid % S).to(tl.int64) * CHUNK
    x_seg = x_ptr + (pid // S).to(tl.int64) * sxa
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for c0 in range(0, CHUNK, BLOCK):  # CHUNK is a multiple of BLOCK
        c = start + c0 + offs
        acc += tl.load(x_seg + c * sxc, mask=c < C, other=0.0).to(tl.float32)
    tl.store(part_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _split_subtract_kernel(x_ptr, y_ptr, part_ptr, C, sxa, sxc, sya, syc, CHUNK, S,
                           S_POW2: tl.constexpr, BLOCK: tl.constexpr):
    """Program a * S + s sums segment a's S partials (fixed order) and centers chunk s."""
    pid = tl.program_id(0)
    a = pid // S
    idx = tl.arange(0, S_POW2)
    parts = tl.load(part_ptr + a * S + idx, mask=idx < S, other=0.0)
    mean = tl.sum(parts, axis=0) / C
    start = (pid % S).to(tl.int64) * CHUNK
    x_seg = x_ptr + a.to(tl.int64) * sxa
    y_seg = y_ptr + a.to(tl.int64) * sya
    offs = tl.arange(0, BLOCK)
    for c0 in range(0, CHUNK, BLOCK):
        c = start + (CHUNK - BLOCK - c0) + offs  # backwards: last-read tiles first
        ok = c < C
        x = tl.load(x_seg + c * sxc, mask=ok, other=0.0).to(tl.float32)
        tl.store(y_seg + c * syc, to_dtype(x - mean, y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _grid_barrier(bar_ptr, num_programs):
    """Sense-reversing grid barrier: bar_ptr[0] counts arrivals, bar_ptr[1] is a generation
    number. The last program to arrive resets the count to 0 and bumps the generation, so
    the two ints are left ready for the next launch (no reset launch, no host state).
    Needs every program resident at once (cooperative launch, grid <= SM count)."""
    tl.debug_barrier()  # all threads' earlier writes precede this program's arrival
    gen = tl.atomic_add(bar_ptr + 1, 0, sem="relaxed")  # read before arriving
    arrived = tl.atomic_add(bar_ptr, 1, sem="acq_rel")
    if arrived == num_programs - 1:
        tl.atomic_xchg(bar_ptr, 0, sem="relaxed")
        tl.atomic_add(bar_ptr + 1, 1, sem="release")
    else:
        cur = tl.atomic_add(bar_ptr + 1, 0, sem="acquire")
        while cur == gen:
            cur = tl.atomic_add(bar_ptr + 1, 0, sem="acquire")
    tl.debug_barrier()


@triton.jit
def _center_persistent_kernel(x_ptr, y_ptr, part_ptr, bar_ptr, N, TILES,
                              BLOCK: tl.constexpr, G_POW2: tl.constexpr):
    """Global centering of a flat x in one launch. Program p owns tiles p, p + G, ...
    (TILES of them): it keeps the first in registers, sums all, meets the others at the
    barrier, then centers the rest newest-first (re-read while still in L2) and the kept
    tile last."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    first = pid.to(tl.int64) * BLOCK + offs
    keep = tl.load(x_ptr + first, mask=first < N, other=0.0).to(tl.float32)
    acc = keep
    for k in range(1, TILES):
        o = (pid + k * num_programs).to(tl.int64) * BLOCK + offs
        acc += tl.load(x_ptr + o, mask=o < N, other=0.0).to(tl.float32)
    tl.store(part_ptr + pid, tl.sum(acc, axis=0))
    _grid_barrier(bar_ptr, num_programs)
    idx = tl.arange(0, G_POW2)
    parts = tl.load(part_ptr + idx, mask=idx < num_programs, other=0.0, cache_modifier=".cg")
    mean = tl.sum(parts, axis=0) / N
    for k in range(1, TILES):
        o = (pid + (TILES - k) * num_programs).to(tl.int64) * BLOCK + offs
        ok = o < N
        x = tl.load(x_ptr + o, mask=ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + o, to_dtype(x - mean, y_ptr.dtype.element_ty), mask=ok)
    tl.store(y_ptr + first, to_dtype(keep - mean, y_ptr.dtype.element_ty), mask=first < N)


# ----------------------------------------------------------------------------- launchers
def _pow2(n: int) -> int:
    return next_pow2(max(int(n), 1))


def _tile_elems(t: torch.Tensor) -> int:
    if interpreting():
        return INTERPRETER_CONFIG["tile"]
    return GPU_CONFIG["tile_bytes"] // t.element_size()


def _one_sweep_max(t: torch.Tensor) -> int:
    return INTERPRETER_CONFIG["max_one_sweep"] if interpreting() else _tile_elems(t)


def _is_dense(t: torch.Tensor) -> bool:
    """True when t's elements fill a gap-free block of memory, each once (any dim order)."""
    if t.is_contiguous():
        return True
    order = sorted(range(t.dim()), key=lambda d: t.stride(d), reverse=True)
    return t.permute(order).is_contiguous()


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view over the memory of a dense tensor (in memory order)."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def _view3(t: torch.Tensor, A: int, C: int, I: int):
    try:
        return t.view(A, C, I)
    except RuntimeError:  # dims not mergeable without a copy
        return None


_BARRIERS = {}


def _barrier_state(device: torch.device):
    """Two zeroed int32 (arrival count, generation) per device and stream, left reset by
    every launch; fresh ones while a CUDA graph is being captured."""
    if device.type != "cuda":
        return torch.zeros(2, dtype=torch.int32, device=device)
    if torch.cuda.is_current_stream_capturing():
        return torch.zeros(2, dtype=torch.int32, device=device)
    key = (device.index, torch.cuda.current_stream(device).cuda_stream)
    buf = _BARRIERS.get(key)
    if buf is None:
        buf = _BARRIERS[key] = torch.zeros(2, dtype=torch.int32, device=device)
    return buf


def _persistent_plan(x: torch.Tensor):
    """(block, programs, tiles per program, num_warps) for the one-launch path, or None
    when x is too big for its re-read to come from L2."""
    n = x.numel()
    if interpreting():  # programs run one after another there: one program does it all
        block = INTERPRETER_CONFIG["tile"]
        return block, 1, cdiv(n, block), 4
    if n * x.element_size() > GPU_CONFIG["persistent_max_bytes"]:
        return None
    slots = GPU_CONFIG["persistent_programs_per_sm"] * sm_count(x.device.index)
    tile = GPU_CONFIG["persistent_tile_elems"]
    if n % 16 or x.data_ptr() % 16:  # unvectorised loads: a 16K tile hits 128 regs, spills
        tile //= 2
    block = min(tile, max(1024, _pow2(cdiv(n, slots))))
    return persistent_plan_for(n, block, slots)


def persistent_plan_for(n: int, block: int, slots: int):
    """(block, programs, tiles per program, num_warps) of a persistent launch over n
    elements with tiles of ``block`` on at most ``slots`` programs (32 elements a thread)."""
    programs = min(cdiv(n, block), slots)
    tiles = cdiv(cdiv(n, block), programs)
    return block, programs, tiles, max(4, min(GPU_CONFIG["persistent_num_warps"], block // 1024))


def _launch_persistent(xf, yf, plan):
    block, programs, tiles, warps = plan
    part = torch.empty(programs, dtype=torch.float32, device=xf.device)
    bar = _barrier_state(xf.device)
    _center_persistent_kernel[(programs,)](
        xf, yf, part, bar, xf.numel(), tiles, BLOCK=block, G_POW2=_pow2(programs),
        num_warps=warps, launch_cooperative_grid=True)


def _launch_split(x2, y2):
    """Two-pass centering of each row of x2 [A, C] into y2 (any strides)."""
    A, C = x2.shape
    interp = interpreting()
    cfg = INTERPRETER_CONFIG if interp else GPU_CONFIG
    block = cfg["split_block"] if interp else _tile_elems(x2)
    warps = 4 if interp else cfg["num_warps"]
    per_sm = cfg["splits_per_sm"]
    sms = sm_count(x2.device.index) if x2.device.type == "cuda" else 1
    splits = max(1, min(cdiv(C, block), (per_sm * sms) // A))
    chunk = cdiv(cdiv(C, splits), block) * block
    splits = cdiv(C, chunk)
    part = torch.empty(A * splits, dtype=torch.float32, device=x2.device)
    grid = (A * splits,)
    _split_partials_kernel[grid](x2, part, C, x2.stride(0), x2.stride(1), chunk, splits,
                                 BLOCK=block, num_warps=warps)
    _split_subtract_kernel[grid](x2, y2, part, C, x2.stride(0), x2.stride(1), y2.stride(0),
                                 y2.stride(1), chunk, splits, S_POW2=_pow2(splits),
                                 BLOCK=block, num_warps=warps)


def _segment_tile(x3):
    """(BLOCK_A, BLOCK_C, BLOCK_I, one_sweep): the reduced axis first, then a stride-1 kept
    axis gets at least 32 lanes so loads stay coalesced, the rest fills the tile."""
    A, C, I = x3.shape
    sa, sc, si = x3.stride()
    tile, pa, pc, pi = _tile_elems(x3), _pow2(A), _pow2(C), _pow2(I)
    bc = min(pc, _one_sweep_max(x3))
    if C > 1 and sc != 1:
        if I > 1 and si == 1:
            bc = min(bc, max(1, tile // min(pi, 32)))
        elif I == 1 and A > 1 and sa == 1:
            bc = min(bc, max(1, tile // min(pa, 32)))
    bi = min(pi, max(1, tile // bc))
    ba = min(pa, max(1, tile // (bc * bi)))
    return ba, bc, bi, bc >= C


def _launch_segments(x3, y3):
    A, C, I = x3.shape
    ba, bc, bi, one_sweep = _segment_tile(x3)
    warps = 4 if interpreting() else GPU_CONFIG["num_warps"]
    grid = (cdiv(A, ba) * cdiv(I, bi),)
    _center_segments_kernel[grid](x3, y3, A, C, I, *x3.stride(), *y3.stride(),
                                  BLOCK_A=ba, BLOCK_C=bc, BLOCK_I=bi, ONE_SWEEP=one_sweep,
                                  num_warps=warps)


def _segments_of(shape, dims, dims_last=False):
    """(perm, A, C, I): x (permuted by perm, if not None) viewed as [A, C, I] has the
    reduced dims in its middle axis; dims_last asks for I == 1 (reduced dims moved last)."""
    dims = sorted(dims)
    kept = [d for d in range(len(shape)) if d not in dims]
    if not dims_last and dims == list(range(dims[0], dims[-1] + 1)):
        outer = [d for d in kept if d < dims[0]]
        groups, perm = (outer, dims, [d for d in kept if d > dims[-1]]), None
    else:
        groups, perm = (kept, dims, []), kept + dims
    A, C, I = (_prod(shape[d] for d in g) for g in groups)
    return perm, A, C, I


def _prod(sizes):
    p = 1
    for s in sizes:
        p *= s
    return p


def centered(x: torch.Tensor, dims=(), path=None) -> torch.Tensor:
    """y = x - x.mean(dims, keepdim=True), or x - x.mean() when ``dims`` is empty.

    x: fp32, fp16 or bf16, any rank and strides, on CUDA (or on CPU under the interpreter).
    dims: distinct non-negative dims of x; empty (or all of them) means the global mean.
    path: None (chosen by size) or one of ``"persistent"`` (global mean only; under the
    interpreter only for tensors that fit one program), ``"split"`` or ``"segments"``.
    Returns a new tensor laid out like ``torch.empty_like(x)``. An empty x gives an empty
    result (no launch).
    """
    if path is not None and path not in PATHS:
        raise ValueError(f"centered: path must be None or one of {PATHS}, got {path!r}")
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    perm, A, C, I = _segments_of(x.shape, dims) if dims else (None, 1, x.numel(), 1)
    with device_guard(x):
        if A * I == 1:  # a single segment: the global mean
            return _centered_global(x, out, path)
        if path == "persistent":
            raise ValueError("centered: the persistent path centers over all elements only")
        if path is None:  # few long segments: split them to keep every SM busy
            sms = sm_count(x.device.index) if x.device.type == "cuda" else 1
            path = "split" if C > _one_sweep_max(x) and A * I < sms else "segments"
        if path == "split" and I != 1:
            perm, A, C, I = _segments_of(x.shape, dims, dims_last=True)
        xv = x if perm is None else x.permute(perm)
        ov = out if perm is None else out.permute(perm)
        x3 = _view3(xv, A, C, I)
        if x3 is None:
            x3 = xv.reshape(A, C, I)
        y3 = _view3(ov, A, C, I)
        tmp = y3 is None
        if tmp:
            y3 = torch.empty((A, C, I), dtype=x.dtype, device=x.device)
        if path == "split":
            _launch_split(x3[:, :, 0], y3[:, :, 0])
        else:
            _launch_segments(x3, y3)
        if tmp:
            ov.copy_(y3.view(ov.shape))
    return out


def _centered_global(x, out, path):
    """Center over all elements, on flat views of x and out (the same memory order)."""
    if _is_dense(x):
        xf, yf = _flat(x), _flat(out)
    else:  # copy into out's (dense) layout, then center in place
        out.copy_(x)
        xf = yf = _flat(out)
    n = xf.numel()
    plan = None
    if path == "persistent" or (path is None and x.device.type == "cuda" and not interpreting()):
        plan = _persistent_plan(xf)
    if path == "persistent" and plan is None:
        raise ValueError(f"centered: {n} elements of {x.dtype} are more than the persistent "
                         f"path takes ({GPU_CONFIG['persistent_max_bytes']} bytes)")
    if plan is not None:
        _launch_persistent(xf, yf, plan)
    elif path == "split" or (path is None and n > _one_sweep_max(x)):
        _launch_split(xf.view(1, n), yf.view(1, n))
    else:
        _launch_segments(xf.view(1, n, 1), yf.view(1, n, 1))
    return out
