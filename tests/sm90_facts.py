"""What one sm_90 compile says about how a kernel will run on an H200, read off the
compiler's outputs (no GPU): the ptxas report, the PTX, the SASS, and an occupancy model.

Used by tests/sm90_compile.py (the gate) and bench/static_report.py.
"""
import os
import re
import subprocess
import tempfile

# An H200 (and H100 SXM): per SM 64K 32-bit registers, 228 KB shared memory of which a
# block may take 227 KB and each resident block costs 1 KB reserved, 64 resident warps,
# 32 resident blocks; registers are allocated per warp in units of 256.
SMS = 132
REGS_PER_SM = 64 * 1024
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_CTA = 1024
MAX_WARPS_PER_SM = 64
MAX_CTAS_PER_SM = 32
REG_ALLOC_UNIT = 256
C7515 = "C7515"  # ptxas: "wgmma.mma_async instructions are serialized"


def ptxas_facts(log: str) -> dict:
    """Registers, spill bytes (stores, loads) and ptxas warnings from its ``-v`` log."""
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    warnings = sorted(set(re.findall(r"\((C\d{4})\)", log)))
    why = re.search(r"C7515\)[^\n]*?serialized (due to [^\n]*?)(?: in the function|\.?$)", log,
                    re.MULTILINE)
    return dict(regs=int(regs.group(1)) if regs else None,
                spill_stores=int(spill.group(1)) if spill else 0,
                spill_loads=int(spill.group(2)) if spill else 0,
                warnings=warnings,
                serialized=C7515 in log,
                serialized_why=why.group(1) if why else "")


def mma_kind(ptx: str) -> str:
    """The tensor-core instruction family the PTX uses for its dots: "wgmma" (Hopper's
    warpgroup MMA), "mma" (Ampere-style mma.sync), or "-" (no matrix instruction)."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma"
    return "-"


def sass_counts(cubin: bytes):
    """{"HGMMA": n, "HMMA": n, "LDL": n, "STL": n} counted in the SASS of ``cubin``, or None
    when no disassembler (triton's nvdisasm / cuobjdump) can be found."""
    tool = _disassembler()
    if tool is None or not cubin:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        args = [tool, path] if tool.endswith("nvdisasm") else [tool, "--dump-sass", path]
        text = subprocess.run(args, capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        os.remove(path)
    return {op: len(re.findall(rf"\b{op}\b", text)) for op in ("HGMMA", "HMMA", "LDL", "STL")}


def _disassembler():
    try:
        from triton.backends.nvidia import compiler
    except ImportError:
        return None
    bin_dir = os.path.join(os.path.dirname(compiler.__file__), "bin")
    for name in ("nvdisasm", "cuobjdump"):
        path = os.path.join(bin_dir, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def ctas_per_sm(regs: int, smem: int, num_warps: int) -> dict:
    """Resident blocks per SM and what limits them: registers, shared memory or warps.

    regs: registers per thread (ptxas); smem: shared memory bytes per block (static and
    dynamic, Triton's ``metadata.shared``); num_warps: warps per block. A model of the
    CUDA occupancy calculator for compute capability 9.0; 0 means it cannot launch."""
    per_warp = -(-max(regs, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = (REGS_PER_SM // per_warp) // num_warps
    by_smem = SMEM_PER_SM // (smem + SMEM_RESERVED_PER_CTA) if smem else MAX_CTAS_PER_SM
    if smem > 227 * 1024:
        by_smem = 0
    by_warps = MAX_WARPS_PER_SM // num_warps
    n = min(by_regs, by_smem, by_warps, MAX_CTAS_PER_SM)
    limit = "regs" if n == by_regs else "smem" if n == by_smem else "warps"
    return dict(ctas=n, limit=limit)


def waves(programs: int, ctas: int, sms: int = SMS) -> float:
    """Programs of a launch over the blocks resident at once on ``sms`` SMs."""
    return programs / (ctas * sms) if ctas else float("inf")


def wgmma_expected(source: str, constexprs: dict, num_warps: int) -> bool:
    """Whether a kernel's tl.dot should lower to wgmma on sm_90: it has a dot, a warpgroup
    multiple of warps, a dot M tile (BLOCK_M) of at least 64 rows, and 16-bit or tf32
    operands (a plain fp32 "ieee" dot runs on FMA units)."""
    if "tl.dot(" not in source or num_warps % 4:
        return False
    bm = constexprs.get("BLOCK_M")
    if not isinstance(bm, int) or bm < 64:
        return False
    return constexprs.get("PRECISION", "tf32") != "ieee"
