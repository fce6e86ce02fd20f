"""The cost model: every threshold that chooses how a contraction runs, in one place.

Lowering (`program`, `factor`, `taps`, `convolution`) reads these to pick the op kinds of a
Program, which both backends (the emitter and the interpreter) then run as they are. Each
number was measured on CPU (float32, 1-2 threads, see benchmarks/RESULTS.md); change one here
and rerun benchmarks/compare_commits.py.

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
#: ... when the structural form costs at least this much: below it, running the structural
#: form takes less time than lowering the other forms (about 10 ms each) would save
FORMS_MIN_COST = 20_000_000

# --- convolutions (`convolution`) -----------------------------------------------------------

#: a product shaped like a convolution, its weight VJP or its input VJP (two tensors and
#: pattern constants with numeric geometry) becomes one call of torch's convolution kernels;
#: False lowers it to views, kernel taps and col2im folds instead (tests pin those paths)
CONVOLUTION_KERNELS = True
#: an input VJP with at most this many input channels (per group, groups = 1) ...
INPUT_VJP_TAPS_MAX_CHANNELS = 4
#: ... and at least this many kernel taps runs per group of images: one matmul to the taps'
#: columns, then each tap added into its stride phase (ResNet-18's 7×7/2 stem: 32 ms against
#: 97 ms for torch's input-VJP kernel; with 3×3 kernels or more channels torch's is faster)
INPUT_VJP_TAPS_MIN_TAPS = 25
#: ... with the columns of at most this many entries (at least one image) per matmul: larger
#: groups make fewer, larger calls; the stem's 4 images (7.4 MB each in float32) run about
#: 10 % faster than one at a time
INPUT_VJP_TAPS_BLOCK = 8 << 20
#: an input VJP whose windows do not overlap (a placement: dense K = S patches, 1×1 strided
#: layers) with at least this many output positions per image is one matmul per image and
#: one copy into the input's layout (ConvNeXt's 4×4/4 stem: 4.5 ms against 8.3 ms for the
#: views' einsum and reshape); with fewer (ResNet-18's last 1×1/2 shortcut, 7×7 positions)
#: the views' one GEMM over all images is faster, so it stays a placement by views
PLACE_MIN_POSITIONS = 128
#: a stride-1 forward in float64 with at least this many input channels per group, no fewer
#: input than output channels per group ...
FLIPPED_FORWARD_MIN_CHANNELS = 16
#: ... and at least this many output positions over the batch runs torch's input-VJP kernel
#: on the flipped kernel: 16 → 16 channels at 32², batch 64: 12.6 ms against 66 ms for
#: torch's float64 convolution (which slows down more than linearly with the batch), 64 → 16
#: at 28², batch 8: 3 against 14 ms, 32 → 32 at 16², batch 4: 0.6 against 0.8-1.8 ms; near
#: this threshold the two are within ±15 %; with more output than input channels torch's
#: convolution is faster (2-5x for 3 → 64)
FLIPPED_FORWARD_MIN_POSITIONS = 1024

# --- stride-1 convolutions without kernels: one batched matmul per kernel tap (`taps`) -------

#: the contraction (input channels) at least this long: else one im2col GEMM is faster
TAPS_MIN_CONTRACT = 32
#: flat (padded) image positions from which per-tap matmuls beat one im2col GEMM
TAPS_MIN_POSITIONS = 1024

# --- depthwise convolutions without kernels: per-tap multiply-adds (`taps`) ----------------

#: input + output bytes per row block: the block stays in cache over the kernel taps
DEPTHWISE_BLOCK_BYTES = 8 << 20
