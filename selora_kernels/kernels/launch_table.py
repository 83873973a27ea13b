"""Every launch configuration the SeLoRA Triton launchers can choose: one table, no runtime autotune.

`triton.autotune` reruns a kernel once per config on the live buffers, which corrupts accumulating kernels
and cannot run during CUDA-graph capture (docs/kernel_design.md), so block sizes come from this table,
chosen by two rules only: the dtype of the operands and whether the token count M is small. Nothing here
depends on the live rank; the capacity class `r_pad` (capacity padded to 16 or 32) is the only
rank-related compile-time value.

`all_launch_configs()` enumerates the product the launchers can reach (kernel x dtype x r_pad x block
choice x constexpr flags); `tools/static_check_triton.py` compiles each of them ahead of time for sm_80 and
sm_90 (with the signatures of `kernels/_aot.py`) and fails on spills, shared memory over the limit or a
matrix-product kernel without tensor cores.
The launchers call `blocks_for` / `r_pad_for`, so a config they can pick and a config the check compiled
are the same object.

Pure data: no triton import, cheap to import anywhere.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterator, Tuple

DTYPES = ("fp32", "fp16", "bf16")
R_PADS = (16, 32)  # capacity classes: one binary per class, the live rank is never a compile-time value
MAX_CAPACITY_SLOTS = R_PADS[-1]  # live slots + trial slot must fit the largest class
SMALL_M = 64  # M <= SMALL_M takes the "small" block table (text tokens, time embeddings)
GROUP_M = 8  # grouped tile order of the GEMM kernels (L2 reuse of W0 across row tiles)


@dataclass(frozen=True)
class Blocks:
    """Tile sizes and launch options of one kernel. Unused block fields stay 0."""

    block_m: int = 0
    block_n: int = 0
    block_k: int = 0
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class LaunchConfig:
    """One compiled variant: what `tools/static_check_triton.py` builds and a launcher may launch."""

    kernel: str  # key of KERNELS
    dtype: str  # operand dtype of the activations (and adapter)
    r_pad: int
    blocks: Blocks
    size_class: str  # "large" or "small" (M <= SMALL_M), or "any"
    flags: Tuple[Tuple[str, object], ...] = field(default=())  # extra constexprs, e.g. (("FISHER", True),)

    @property
    def name(self) -> str:
        flag_text = "".join(f",{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.flags)
        b = self.blocks
        return (f"{self.kernel}[{self.dtype},R{self.r_pad},{self.size_class},"
                f"{b.block_m}x{b.block_n}x{b.block_k},w{b.num_warps},s{b.num_stages}{flag_text}]")


# Kernel name -> (module under selora_kernels.kernels, jit function name, uses tl.dot)
KERNELS: Dict[str, Tuple[str, str, bool]] = {
    "forward": ("selora_linear_forward", "_fused_lowrank_matmul_kernel", True),
    "grad_x": ("selora_linear_backward", "_grad_x_reduce_kernel", True),
    "shrink": ("selora_linear_backward", "_shrink_kernel", True),
    "segment_reduce": ("selora_linear_backward", "_segment_reduce_kernel", True),
    "finalize": ("selora_linear_backward", "_finalize_grad_and_fisher_kernel", False),
    "fisher_collect": ("selora_linear_backward", "_fisher_collect_kernel", False),
}

# Block tables. Why these sizes (compiled numbers: bench/results/static_triton.json):
# - GEMM kernels (forward, grad_x): 8 warps with BN = 64. At 4 warps a 128 x 64 tile sits at 255
#   registers and spills at R_PAD 32 (fp16's tf32x3 epilogue is the heaviest); 128 x 128 at 8 warps
#   spills in grad_x on sm_80. BN 64 keeps the tile small; the forward's rank dot is not redone per
#   column tile (one per program, see column_group), grad_x's P = dy B still is (R_PAD / BN of its loop).
# - fp32: half-size K tiles (twice the bytes per element); IEEE dots run on the SIMT units and need more
#   registers per output, hence 8 warps for 64 x 64 and a 32-row shrink tile.
# - small (M <= 64): 8 warps for half precision and BK 16 for fp32. Compiled with the specialisation real
#   launches get (tools/static_check_triton.py), 32 x 64 x 64 on 4 warps spilled (255 registers, up to
#   184 B of stack at R_PAD 32, 8-56 B at R_PAD 16) and fp32 32 x 64 x 32 spilled 8 B at R_PAD 32 (IEEE).
# - fp32 forward: 32 rows on 4 warps. The forward computes the rank product once per program and then
#   loops over its column tiles; on 8 warps that loop kept an 8-24 B stack frame at IEEE, R_PAD 16 (sm_90,
#   128 registers, both Tritons); 64 rows with the trial slot spilled 16 B earlier.
# - large: BK 32 with 4 stages for half precision (the same bytes in flight as BK 64 with 2) and BK 16 for
#   fp32. Under Triton 3.6 (the GPU image's) 128 x 64 x 64 spilled 8 B at R_PAD 16 on sm_80 (255 registers)
#   and fp32 IEEE 64 x 64 x 32 spilled 16 B on sm_90; the smaller K tiles stay <= 219 registers on both
#   Tritons, so one table holds for the versions CI checks.
_GEMM_BLOCKS = {
    ("fp16", "large"): Blocks(128, 64, 32, 8, 4),
    ("bf16", "large"): Blocks(128, 64, 32, 8, 4),
    ("fp32", "large"): Blocks(32, 64, 16, 4, 3),
    ("fp16", "small"): Blocks(32, 64, 64, 8, 3),
    ("bf16", "small"): Blocks(32, 64, 64, 8, 3),
    ("fp32", "small"): Blocks(32, 64, 16, 4, 3),
}
# grad_x (selora_linear_backward._grad_x_reduce_kernel) also sums dA's piece (P^T x) and, in a second pass,
# dB's (U^T dy), which adds fp32 rank operands to the forward's tile: compiled on real launches, the fp32
# 64-row tile spilled (IEEE, up to 304 B at R_PAD 32), and so did the half small tile with BK 64 under Triton
# 3.6 (16 B, sm_90) and fp32 small with 3 stages (8 B); these take their own tiles. bf16 and fp16 large keep
# 128 / 64 rows (fewer pieces per row).
_GRAD_X_BLOCKS = {
    **_GEMM_BLOCKS,
    ("fp16", "large"): Blocks(64, 64, 32, 8, 4),
    ("fp16", "small"): Blocks(32, 64, 32, 8, 3),
    ("bf16", "small"): Blocks(32, 64, 32, 8, 3),
    ("fp32", "large"): Blocks(32, 64, 16, 8, 3),
    ("fp32", "small"): Blocks(32, 64, 16, 8, 2),
}
_SHRINK_BLOCKS = {  # (M x D) @ (D x R_PAD): one program per row tile loops over all of D
    "fp16": Blocks(64, 0, 32, 4, 3),  # BK 64: P's shrink with dB's partials spilled 40 B at R_PAD 32 (sm_80)
    "bf16": Blocks(64, 0, 64, 4, 3),
    "fp32": Blocks(32, 0, 32, 4, 3),
}
_SEGMENT_BLOCKS = {  # (R_PAD x tokens) @ (tokens x BN) per sample chunk; block_k = tokens per step
    "fp16": Blocks(0, 64, 64, 4, 3),
    "bf16": Blocks(0, 64, 64, 4, 3),
    "fp32": Blocks(0, 64, 32, 4, 3),
}
# per (depth tile, slot): block_m = pieces summed per load (a fixed tree), block_n = depth per program
_FINALIZE_BLOCKS = Blocks(32, 64, 0, 4, 1)
_COLLECT_BLOCKS = Blocks(0, 128, 0, 1, 1)  # one program: per-tile Fisher sums, 128 row counts per step


def keeps_trial_column(dtype: str, rows: int) -> bool:
    """Whether a measuring training forward keeps the trial column and counts non-finite rows (so the
    backward skips its pass over x): half precision above the small-M tile. The fp32 forward tiles and the
    small-M ones kept an 8 B stack frame with the count (sm_90 / sm_80); there the backward's shrink does it."""
    return dtype in ("fp16", "bf16") and rows > SMALL_M


def r_pad_for(slots: int) -> int:
    """Smallest capacity class holding `slots` slots (capacity, plus one while the trial slot is live)."""
    for r_pad in R_PADS:
        if slots <= r_pad:
            return r_pad
    raise ValueError(f"{slots} adapter slots exceed the largest fused capacity class {R_PADS[-1]}")


def size_class(rows: int) -> str:
    return "small" if rows <= SMALL_M else "large"


def blocks_for(kernel: str, dtype: str, rows: int = 0) -> Blocks:
    """The block sizes a launcher uses for `kernel` on `dtype` operands and `rows` tokens."""
    if kernel == "forward":
        return _GEMM_BLOCKS[(dtype, size_class(rows))]
    if kernel == "grad_x":
        return _GRAD_X_BLOCKS[(dtype, size_class(rows))]
    if kernel == "shrink":
        return _SHRINK_BLOCKS[dtype]
    if kernel == "segment_reduce":
        return _SEGMENT_BLOCKS[dtype]
    if kernel == "finalize":
        return _FINALIZE_BLOCKS
    if kernel == "fisher_collect":
        return _COLLECT_BLOCKS
    raise KeyError(f"unknown kernel {kernel!r}; known: {sorted(KERNELS)}")


def column_group(tiles_m: int, tiles_n: int, min_programs: int) -> int:
    """Column tiles per forward program: as many as still leave `min_programs` programs (a wave), so the
    rank product x A^T, computed once per program, is computed once per row tile wherever there are enough
    row tiles (SD level 1) and a few times, not once per column tile, elsewhere."""
    groups = min(tiles_n, max(1, -(-min_programs // tiles_m)))
    return -(-tiles_n // groups)


MIN_PIECE_ROWS = 64  # grad_x: rows per group at least (fp32 32-row tiles), see grad_x_groups


def grad_x_groups(rows: int, d_in: int, dtype: str, segment_rows: int, target_programs: int) -> Tuple[int, bool]:
    """(row tiles per group, grouped) of the grad_x launch: groups of whole row tiles, as many as keep about
    `target_programs` programs busy, so each program sums its group into one piece per gradient (fewer fp32
    pieces to write and read back than one per row tile). grouped: every group lies inside one sample; when
    a row tile crosses a sample boundary, groups are single tiles that split their pieces by sample."""
    blocks = blocks_for("grad_x", dtype, rows)
    tiles_m = -(-rows // blocks.block_m)
    # at least MIN_PIECE_ROWS rows per piece, whatever the program count: the pieces cost 8 R_PAD bytes per
    # column and group, against 2 or 4 bytes per column and row of x and dy
    group = max(tiles_m * -(-d_in // blocks.block_n) // max(1, target_programs),
                -(-MIN_PIECE_ROWS // blocks.block_m))
    group = max(1, min(tiles_m, group))
    if segment_rows >= rows:  # one sample: any grouping
        return group, True
    if segment_rows % blocks.block_m:
        return 1, False
    while (segment_rows // blocks.block_m) % group:
        group -= 1
    return group, True


def segment_chunks(segment_rows: int, segments: int, column_tiles: int, blocks: Blocks,
                   target_programs: int) -> Tuple[int, int]:
    """(chunks per sample, rows per chunk) of dA's segment reduction over `column_tiles` column tiles: about `target_programs` programs in all (two waves on a GPU), chunk boundaries on
    BLOCK_T multiples, never a chunk across samples."""
    chunks = max(1, min(-(-segment_rows // blocks.block_k), -(-target_programs // (segments * column_tiles))))
    chunk_rows = -(-(-(-segment_rows // chunks)) // blocks.block_k) * blocks.block_k
    return -(-segment_rows // chunk_rows), chunk_rows


def dot_precision(dtype: str, fp32_matmul_precision: str = "highest") -> str:
    """Triton input_precision of fp32 dots, following torch.get_float32_matmul_precision():
    "highest" -> IEEE fp32, "high"/"medium" -> TF32 (the low-rank expand then uses tf32x3, see kernels).
    Half-precision operands ignore it; they get the fixed value "tf32" so they compile to one binary."""
    if dtype == "fp32" and fp32_matmul_precision == "highest":
        return "ieee"
    return "tf32"


def _precisions(dtype: str) -> Tuple[str, ...]:
    return ("ieee", "tf32") if dtype == "fp32" else ("tf32",)


def all_launch_configs() -> Iterator[LaunchConfig]:
    """Every (kernel, dtype, r_pad, blocks, flags) a launcher can launch."""
    for dtype in DTYPES:
        for r_pad in R_PADS:
            for precision in _precisions(dtype):
                dot = (("DOT_PRECISION", precision),)
                for size in ("large", "small"):
                    for has_bias in (True, False):
                        # inference, a training forward keeping U, a measuring one keeping the trial column too
                        for keep, trial in ((False, False), (True, False), (True, True)):
                            if trial and not keeps_trial_column(dtype, SMALL_M + (size == "large")):
                                continue
                            yield LaunchConfig("forward", dtype, r_pad, _GEMM_BLOCKS[(dtype, size)], size,
                                               dot + (("HAS_BIAS", has_bias), ("KEEP", keep), ("TRIAL", trial)))
                    for grouped in (True, False):  # row-tile groups inside a sample, or pieces split by sample
                        yield LaunchConfig("grad_x", dtype, r_pad, _GRAD_X_BLOCKS[(dtype, size)], size,
                                           dot + (("GROUPED", grouped),))
                # U = x A_ext^T (trial slot live only while measuring); P = dy B when grad_x is skipped (it
                # also emits dB's partials)
                for operand, with_trial in (("A", False), ("A", True), ("B", False)):
                    yield LaunchConfig("shrink", dtype, r_pad, _SHRINK_BLOCKS[dtype], "any",
                                       dot + (("OPERAND", operand), ("HAS_TRIAL", with_trial)))
                yield LaunchConfig("segment_reduce", dtype, r_pad, _SEGMENT_BLOCKS[dtype], "any", dot)
            for fisher in (False, True):  # one launch sums dA's and dB's pieces
                yield LaunchConfig("finalize", dtype, r_pad, _FINALIZE_BLOCKS, "any", (("FISHER", fisher),))
    for r_pad in R_PADS:  # fp32 statistics whatever the operand dtype
        yield LaunchConfig("fisher_collect", "fp32", r_pad, _COLLECT_BLOCKS, "any")
