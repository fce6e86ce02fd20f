"""The cost model: every threshold that chooses how a contraction runs, in one place.

Lowering (`program`, `factor`, `taps`) reads these to pick the op kinds of a Program; the eager
convolution kernels (`tnderive.structured`), the layout-aware pairwise contraction
(`tnderive.pairwise`) and the opt-in oneDNN GEMMs (`tnderive.gemm`) read them for the same
choices at run time. Each number was measured on CPU (float32, 1-2 threads, see
benchmarks/RESULTS.md); change one here and rerun benchmarks/compare_commits.py.

Sizes are entry counts unless the name ends in _BYTES.
"""
from __future__ import annotations

# --- which form of an expression to lower (`program.lower`, `factor.term_forms`) -------------

#: FLOP-equivalents per tensor entry written (CPU memory bandwidth against compute)
MEMORY_WEIGHT = 16
#: FLOP-equivalents of the fixed overhead of one torch call
OP_OVERHEAD = 20_000
#: term-wise forms of a large sum that `lower` builds and costs besides the structural form
FORMS_TRIED = 3

# --- stride-1 convolutions: one batched matmul per kernel tap (`taps`, `structured`) ---------

#: the contraction (input channels) at least this long: else one im2col GEMM is faster
TAPS_MIN_CONTRACT = 32
#: flat (padded) image positions from which per-tap matmuls beat one im2col GEMM
TAPS_MIN_POSITIONS = 1024
#: output positions from which a strided convolution's per-tap copies beat im2col
STRIDED_TAPS_MIN_POSITIONS = 196
#: images per block of the per-tap matmuls: (M + E)·length bytes each
TAP_BLOCK_BYTES = 2 << 20

# --- depthwise convolutions: per-tap multiply-adds (`structured`) ----------------------------

#: input + output bytes per row block: the block stays in cache over the kernel taps
DEPTHWISE_BLOCK_BYTES = 8 << 20
#: flat positions below which a depthwise weight VJP uses batched dot products per tap
DEPTHWISE_DOT_MAX_POSITIONS = 512

# --- input VJPs: flipped gathers vs GEMM + scatter-adds (col2im) (`structured`) --------------

#: input positions from which a flipped-kernel gather beats one GEMM plus scatter-adds ...
FLIP_MIN_IMAGE = 512
#: ... when the contraction is at least this long (a thinner one always flips)
FLIP_MIN_CONTRACT = 32

# --- pairwise contraction as matmuls (`tnderive.pairwise`) -----------------------------------

#: right-operand free size below which its batch ids fold into one large GEMM
FOLD_BATCH_MAX_COLUMNS = 256
#: matrix entries (M·N) below which tiny broadcast-batched matmuls regroup as one GEMM ...
REGROUP_MAX_ENTRIES = 4096
#: ... or when either side is below this many rows / columns
REGROUP_MIN_SIDE = 64
#: contraction length per matmul from which slices of a summed batch id accumulate in place
ACCUMULATE_MIN_CONTRACT = 512
#: right operands above this size are copied (im2col) one leading batch entry at a time
BLOCK_COPY_MIN_BYTES = 1 << 20
#: largest operand copy a thread's workspace keeps between calls (larger ones are not kept)
WORKSPACE_MAX_BYTES = 256 << 20

# --- the opt-in oneDNN GEMMs (`tnderive.gemm`) -----------------------------------------------

#: M·K·N below which MKL's GEMM wins (oneDNN's per-call setup dominates), measured on AVX-512
ONEDNN_MIN_WORK = 1 << 24
