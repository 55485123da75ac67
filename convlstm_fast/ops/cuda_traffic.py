"""Traffic models of the CUDA C++ layer ops (csrc/cuda/*_kernel.cu): the HBM bytes and FLOPs of
every launch their host drivers issue, in convlstm_fast.bench.roofline's conventions (which this
package cannot read from csrc/, so the models live here; each function cites the driver it
models, and tests/test_roofline.py holds the launches one more step adds to the
``LAUNCHES_PER_STEP`` line of the op's .cu file).

The drivers' own kernels (layer_common.cuh): ``launch_elementwise`` (one thread per element: a
depthwise tap is a load of its own, served by L1/L2, ``loaded``) and ``launch_tile_reduce``
(kTileC = 32 channels × kRows = 8 pixel rows per block, per-split partials ``[splits, B, ·]``
summed by the host in ATen), ``launch_phased`` (pooled_cell.cuh's fused SepConv kernels:
SepconvCellStep, SepconvRows). Other GEMMs are cuBLAS, K×K convolutions cuDNN.
"""

from __future__ import annotations

from ..bench.roofline import BACKWARD, H200_SMS, Recorder, Sizes, cell_state_steps

TILE_C, ROWS = 32, 8  # layer_common.cuh kTileC, kRows


def _splits(z, blocks: int, pixels: int) -> int:
    """layer_common.cuh ``reduction_splits`` on an H200 (132 SMs)."""
    wanted = -(-2 * H200_SMS // max(blocks, 1))
    return max(1, min(wanted, -(-pixels // ROWS), 1024))


def _channels_last_copy(r, z, read: int, written: int, what: str, count: int = 1) -> None:
    r.aten(f"copy_ (channels_last_copy {what})", read, written, count=count)


def _depthwise(r, z, channels: int, maps: int, what: str, out_itemsize: int | None = None,
               extra_read: int = 0) -> None:
    """``depthwise_forward`` / ``depthwise_transpose`` (layer_common.cuh): an elementwise kernel
    reading every tap (K² loads per output) and writing one map."""
    size = maps * z.state(channels)
    r.kernel(f"depthwise ({what})", size + extra_read,
             maps * z.state(channels, out_itemsize), z.depthwise_flops(channels, maps),
             loaded=z.K * z.K * size + extra_read)


def _depthwise_weight_grad(r, z, channels: int, maps: int, what: str) -> None:
    """``depthwise_weight_grad``: a tile reduction over the rows reading the gradient and the
    input (each tap a load), then the host's sum of the per-split partials."""
    size = maps * z.state(channels)
    r.kernel(f"depthwise_weight_grad ({what})", 2 * size, 0, z.depthwise_flops(channels, maps),
             loaded=(1 + z.K * z.K) * size)
    r.aten("sum (depthwise_weight_grad partials)", 0, 0)


# pooled_cell.cuh SepconvCellTile: pixels × channels per block, input channels per chunk, for
# half/bfloat16/float (double: 32, 32, 16).
STEP_M, STEP_N, STEP_K = 64, 64, 32


def _hidden_sum_splits(z) -> int:
    """The pixel splits of H's column sums: pooled_cell.cuh ``sepconv_cell_splits``, the fused
    step's pixel tiles per sample."""
    return -(-z.HW // STEP_M)


def _pooled_gate_preacts(r, z, gates: int, base: bool = True, x_sums: bool = False,
                         h_sums: bool = True, all_steps: bool = False) -> None:
    """pooled_cell.cuh ``pooled_gate_preacts`` (PooledGatePreacts): per step, B samples × gates·C
    rows, each from a base (xg[t], fp32) or else b_g, plus the means from X's (X̃'s) column sums
    per pixel tile against U_x and from H_{t−1}'s against U_h, where given (weights and bias in
    the dtype), into the saved gate_pre; with ``all_steps``, one launch for all T·B samples
    into a/c/d's xg (fp32). Every (b, j) thread reads all of its sample's sums and its weight
    rows (``loaded``, from L2)."""
    maps, count = (z.T * z.B, 1) if all_steps else (z.B, z.T)
    splits, rows = _hidden_sum_splits(z), gates * z.C
    read = maps * rows * 4 if base else z.weight(rows)
    loaded, flops = read, 0
    for given, channels in ((x_sums, z.cin), (h_sums, z.C)):
        if given:
            read += maps * splits * channels * 4 + z.weight(rows * channels)
            loaded += maps * rows * channels * (splits * 4 + z.s)
            flops += 2 * maps * rows * channels + maps * rows * splits * channels
    written = maps * rows * (4 if all_steps else z.s)
    r.kernel("PooledGatePreacts" + (" (xg = U_x·x̄ + b_g, all steps)" if all_steps else ""),
             read, written, flops, count=count, loaded=loaded)


def _initial_hidden_sums(r, z) -> None:
    """pooled_cell.cuh ``initial_hidden_sums``: H_0's column sums into split 0 of a zeroed
    [B, splits, C] buffer (zeros, the sum, its copy into place)."""
    sums = _hidden_sum_splits(z) * z.vec(z.C)
    r.aten("zeros (H sums)", 0, sums)
    r.aten("sum (H_0 column sums)", z.state(), z.vec(z.C))
    r.aten("copy_ (into split 0)", z.vec(z.C), z.vec(z.C))


def _sepconv_cell_step(r, z, has_map: bool) -> None:
    """pooled_cell.cuh ``SepconvCellStep``, the fused step of a-d: H_{t−1}, xc[t] (b:
    SepConv_x(X̃) + b_c), gate_pre, the H-side weights (and for c/d Z with its per-tile maxima)
    and the cell state in; H_t, G (and A), the column sums of H_t and the cell state out (the
    saved C_t part of it in bf16, StepCellState; the first step reads c0, the last writes h_n
    and c_n: roofline.cell_state_steps). Every one of the C/STEP_N channel tiles redoes the
    depthwise of its pixel tile over all C input channels (K² taps per output, from L1/L2) and
    reads all of pw_h's columns it needs (``loaded``)."""
    splits = _hidden_sum_splits(z)
    channel_tiles = -(-z.C // STEP_N)
    blocks = z.B * splits * channel_tiles
    gate_pre = z.vec((2 if has_map else 3) * z.C, z.s)
    logits = z.state() + splits * z.vec(z.C, z.s) if has_map else 0  # Z, its per-tile maxima
    read = 2 * z.state() + gate_pre + logits + z.weight(z.K * z.K * z.C + z.C * z.C)
    written = (3 if has_map else 2) * z.state() + splits * z.vec(z.C)
    loaded_extra = (channel_tiles * z.K * z.K - 1) * z.state() + blocks * STEP_N * z.C * z.s
    cell_state_steps(r, z, "SepconvCellStep (phased)", read, written,
                     channel_tiles * z.depthwise_flops(z.C) + z.gemm_flops(z.rows, z.C, z.C)
                     + z.cell_flops(), loaded_extra)


def _sepconv_rows(r, z, name: str, cin: int, maps: int, count: int = 1,
                  addend: bool = False, tile_max: bool = False, scaled: bool = False,
                  in_sums: bool = False) -> None:
    """pooled_cell.cuh ``SepconvRows`` (sepconv_frames, sepconv_maps, sepconv_scaled_frame): the
    SepConv of ``maps`` maps of cin channels, each read once from HBM, as rows of C channels
    (with ``addend``, rows of that shape read beside; with ``tile_max``, the per-channel max of
    every pixel tile written beside; ``scaled``, each map multiplied by a per-pixel map read
    beside, at every tap; ``in_sums``, the first channel tile's blocks write the (scaled) maps'
    column sums per pixel tile, fp32, from one more read of their pixels in L1); each of the
    C/STEP_N channel tiles redoes the depthwise of its maps (K² taps per output) and every
    block reads its pw columns (``loaded``, L1/L2)."""
    channel_tiles = -(-z.C // STEP_N)
    pixel_tiles = -(-z.HW // STEP_M)
    blocks = maps * pixel_tiles * channel_tiles
    inputs, out = maps * z.HW * cin * z.s, maps * z.HW * z.C * z.s
    extra = out if addend else 0
    maxima = maps * pixel_tiles * z.C * z.s if tile_max else 0
    scale = maps * z.HW * z.s if scaled else 0
    sums = maps * pixel_tiles * cin * 4 if in_sums else 0
    taps = channel_tiles * z.K * z.K + (1 if in_sums else 0)
    r.kernel(f"SepconvRows ({name})",
             inputs + extra + scale + z.weight(z.K * z.K * cin + z.C * cin + z.C),
             out + maxima + sums,
             2 * maps * z.HW * cin * (channel_tiles * z.K * z.K + z.C)
             + (maps * z.HW * cin if in_sums else 0), count=count,
             loaded=(taps * (inputs + scale) + blocks * STEP_N * cin * z.s + extra))


def _attention_logits(r, z, what: str, tile_max: bool = False) -> None:
    """batched_input_layer.cuh ``attention_logits``: F = tanh(SepConv_ha(H_{t−1}) + xa[t]) and
    Z = SepConv_z(F) (the forward's with its per-tile maxima), one SepconvRows kernel each per
    step."""
    _sepconv_rows(r, z, f"F = tanh(SepConv_ha(H_{{t-1}}) + xa[t]){what}", z.C, z.B, z.T,
                  addend=True)
    _sepconv_rows(r, z, f"Z = SepConv_z(F){what}", z.C, z.B, z.T, tile_max=tile_max)


def _pooled_cell_backward(r, z, gates: int, has_map: bool) -> None:
    """pooled_cell.cuh ``pooled_cell_backward``: the cell backward (dO[t], the fp32 dH carry and
    dC, C_t, C_{t−1}, G (and A) in; dC, dacc (and dA∘A) out; gate partials), the host's sum of
    the partials and the ``PooledGateGrad`` elementwise kernel."""
    splits = _splits(z, z.B * -(-z.C // TILE_C), z.HW)
    maps = 1 if has_map else 0
    r.kernel("PooledCellBackward (tile reduce)",
             (4 + maps) * z.state() + 2 * z.state32() + z.vec(gates * z.C, z.s),
             z.state32() + z.state() + maps * z.state32()
             + splits * z.vec((gates + maps) * z.C), z.cell_backward_flops(), count=z.T)
    r.aten("sum (gate partials)", splits * z.vec(gates * z.C), z.vec(gates * z.C), count=z.T)
    r.kernel("PooledGateGrad", 2 * z.vec(gates * z.C), z.vec(gates * z.C), count=z.T)
    if has_map:
        r.aten("sum (dA∘A partials)", splits * z.vec(z.C), z.vec(z.C), count=z.T)


def _layer_end(r, z) -> None:
    """The ConvLSTM forward's end: output to NCHW, h_n's clone, c_n from the fp32 state."""
    r.aten("copy_ (channels_first_copy output)", z.seq(), z.seq())
    r.aten("clone (h_n)", z.state(), z.state())
    r.aten("copy_ (channels_first_copy c_n)", z.state32(), z.state())


def _backward_start(r, z) -> None:
    """Every pooled driver's backward start: x, grad_output, c0 and H_{t−1} of all steps to
    channels-last, the fp32 dH and dC."""
    _channels_last_copy(r, z, z.xseq(), z.xseq(), "x")
    _channels_last_copy(r, z, z.seq(), z.seq(), "grad_output")
    _channels_last_copy(r, z, z.state(), z.state(), "c0")
    _channels_last_copy(r, z, z.state(), z.state(), "h0")
    _channels_last_copy(r, z, z.seq() - z.state(), z.seq() - z.state(), "output[:T-1]")
    r.aten("cat (H_{t-1} of all steps)", z.seq(), z.seq())
    _channels_last_copy(r, z, z.state(), z.state32(), "grad_h_n fp32")
    _channels_last_copy(r, z, z.state(), z.state32(), "grad_c_n fp32")


def _backward_end(r, z) -> None:
    r.aten("copy_ (channels_first_copy grad_x)", z.xseq(4), z.xseq())
    r.aten("copy_ (channels_first_copy grad_h0)", z.state32(), z.state())
    r.aten("copy_ (channels_first_copy grad_c0)", z.state32(), z.state())


def _candidate_weight_grads(r, z) -> None:
    """After the reverse loop of a, c, d (batched_input_layer.cuh): d U_x, d U_h, d b_g (small),
    d pw_h, d dw_h, d b_c, d pw_x, d dw_x and SepConv_xᵀ(dacc) into dX (fp32)."""
    C, cin = z.C, z.cin
    r.aten("mean (GAP(H_{t-1}))", z.seq(), z.T * z.vec(C))
    r.aten("mean (GAP(X))", z.xseq(), z.T * z.vec(cin))
    _depthwise(r, z, C, z.T, "dw_h(H_{t-1}), recomputed")
    r.aten("mm (d pw_h)", 2 * z.seq(), z.weight(C * C), z.gemm_flops(C, C, z.T * z.rows))
    _depthwise_weight_grad(r, z, C, z.T, "d dw_h")
    r.aten("sum (d b_c)", z.seq(), C * 4)
    _depthwise(r, z, cin, z.T, "dw_x(X), recomputed")
    r.aten("mm (d pw_x)", z.seq() + z.xseq(), z.weight(C * cin), z.gemm_flops(C, cin, z.T * z.rows))
    r.aten("mm (d dw_x output)", z.seq() + z.weight(C * cin), z.xseq(),
           z.gemm_flops(z.T * z.rows, cin, C))
    _depthwise_weight_grad(r, z, cin, z.T, "d dw_x")
    _depthwise(r, z, cin, z.T, "SepConv_x transposed into dX (fp32)", out_itemsize=4)


def pooled_layer(shape, itemsize: int) -> list:
    """Variant (a): csrc/cuda/pooled_layer_kernel.cu, whose drivers are batched_input_layer.cuh
    ``batched_input_layer_forward`` / ``_backward`` (cell kPooledLayer)."""
    return _batched_input_layer(shape, itemsize, has_map=False)


def input_attention_layer(shape, itemsize: int) -> list:
    """Variant (c): csrc/cuda/input_attention_layer_kernel.cu (batched_input_layer.cuh,
    cell kInputAttentionLayer)."""
    return _batched_input_layer(shape, itemsize, has_map=True)


def output_attention_layer(shape, itemsize: int) -> list:
    """Variant (d): csrc/cuda/output_attention_layer_kernel.cu (batched_input_layer.cuh,
    cell kOutputAttentionLayer): the same launches as (c)."""
    return _batched_input_layer(shape, itemsize, has_map=True)


def _batched_input_layer(shape, itemsize: int, has_map: bool) -> list:
    """batched_input_layer.cuh: the X side batched (one SepconvRows kernel each for xc with X's
    tile sums (and xa), then GAP(X)'s FC), then per step the gate kernel, for c/d two SepconvRows kernels (F,
    Z = SepConv_z(F) with its per-tile maxima), and the fused step (H_{t−1} read from and H_t
    written to the NCHW output, with c/d's A as a gate).
    Backward: the cell backward, the GEMMs and transposed depthwise convs per step (c/d recompute
    F and Z as the forward did), the weight gradients batched after the loop."""
    z, r = Sizes(shape, itemsize), Recorder()
    C, cin, T = z.C, z.cin, z.T
    gates = 2 if has_map else 3
    _sepconv_rows(r, z, "xc = SepConv(X) + b and X's tile sums, x in place", cin, T * z.B,
                  in_sums=True)
    if has_map:
        _sepconv_rows(r, z, "xa = SepConv(X) + b, x in place", cin, T * z.B)
    _pooled_gate_preacts(r, z, gates, base=False, x_sums=True, h_sums=False, all_steps=True)
    _initial_hidden_sums(r, z)
    # The step (batched_input_layer_forward's loop).
    _pooled_gate_preacts(r, z, gates)
    if has_map:
        _attention_logits(r, z, "", tile_max=True)
    _sepconv_cell_step(r, z, has_map)  # it writes the NCHW output, h_n and c_n itself

    r.phase = BACKWARD
    _backward_start(r, z)
    if has_map:
        _depthwise(r, z, cin, T, "dw_xa(X), recomputed")
        _sepconv_rows(r, z, "xa = SepConv(X) + b, recomputed", cin, T * z.B)
    _pooled_cell_backward(r, z, gates, has_map)
    r.aten("mm (dh̄ = dgp · U_h)", z.vec(gates * C), z.vec(C), z.gemm_flops(z.B, C, gates * C),
           count=T)
    r.aten("mm_out (d dw_h = dacc · pw_h)", z.state() + z.weight(C * C), z.state(),
           z.gemm_flops(z.rows, C, C), count=T)
    r.kernel("depthwise_transpose (dH_{t-1} = dw_hᵀ(d dw_h) + dh̄/HW, fp32)",
             z.state() + z.vec(C), z.state32(), z.depthwise_flops(C), count=T,
             loaded=z.K * z.K * z.state() + z.vec(C))
    if has_map:
        # The recompute of F_t and Z_t, then dZ, dF_pre and SepConv_haᵀ into dH_{t−1}.
        _attention_logits(r, z, ", recomputed")
        r.aten("amax (max_HW Z)", z.state(), z.vec(C, z.s), count=T)
        # eq, then the bool mask .to(fp32): the launch counter does not see the conversion as
        # a call of its own, its bytes are the eq's here.
        r.aten("eq (Z = max Z, as an fp32 mask)", z.state() + z.vec(C, z.s) + z.state(itemsize=1),
               z.state(itemsize=1) + z.state32(), count=T)
        r.aten("sum (ties)", z.state32(), z.vec(C), count=T)
        r.aten("div (share)", 2 * z.vec(C), z.vec(C), count=T)
        r.aten("mul (mask · share)", z.state32() + z.vec(C), z.state32(), count=T)
        r.aten("sub (dA∘A − mask · share)", 2 * z.state32(), z.state32(), count=T)
        r.aten("copy_ (dZ)", z.state32(), z.state(), count=T)
        r.aten("mm_out (d dw_z = dZ · pw_z)", z.state() + z.weight(C * C), z.state(),
               z.gemm_flops(z.rows, C, C), count=T)
        r.kernel("depthwise_transpose (dF_pre = dw_zᵀ(d dw_z)∘(1 − F²))", 2 * z.state(),
                 z.state(), z.depthwise_flops(C), count=T, loaded=(z.K * z.K + 1) * z.state())
        r.aten("mm_out (d dw_ha = dF_pre · pw_ha)", z.state() + z.weight(C * C), z.state(),
               z.gemm_flops(z.rows, C, C), count=T)
        r.kernel("depthwise_transpose (dH_{t-1} += dw_haᵀ(d dw_ha), fp32)",
                 z.state() + z.state32(), z.state32(), z.depthwise_flops(C), count=T,
                 loaded=z.K * z.K * z.state() + z.state32())
    _candidate_weight_grads(r, z)
    if has_map:
        _depthwise(r, z, C, T, "dw_z(F), recomputed")
        _depthwise(r, z, C, T, "dw_ha(H_{t-1}), recomputed")
        r.aten("mm (d pw_z)", 2 * z.seq(), z.weight(C * C), z.gemm_flops(C, C, T * z.rows))
        _depthwise_weight_grad(r, z, C, T, "d dw_z")
        _attention_features_backward(r, z)
    _backward_end(r, z)
    return r.launches


def _attention_features_backward(r, z) -> None:
    """pooled_cell.cuh ``attention_features_backward`` (b, c, d, after the loop): d pw_ha,
    d dw_ha, d b_a, d pw_xa, SepConv_xaᵀ into dX (fp32, in place) and d dw_xa."""
    C, cin, T = z.C, z.cin, z.T
    r.aten("mm (d pw_ha)", 2 * z.seq(), z.weight(C * C), z.gemm_flops(C, C, T * z.rows))
    _depthwise_weight_grad(r, z, C, T, "d dw_ha")
    r.aten("sum (d b_a)", z.seq(), C * 4)
    r.aten("mm (d pw_xa)", z.seq() + z.xseq(), z.weight(C * cin), z.gemm_flops(C, cin, T * z.rows))
    r.aten("mm (d dw_xa output)", z.seq() + z.weight(C * cin), z.xseq(),
           z.gemm_flops(T * z.rows, cin, C))
    _depthwise_weight_grad(r, z, cin, T, "d dw_xa")
    _depthwise(r, z, cin, T, "SepConv_xa transposed into dX (fp32, in place)", out_itemsize=4,
               extra_read=z.xseq(4))


def convlstm_layer(shape, itemsize: int) -> list:
    """The original ConvLSTM: csrc/cuda/convlstm_layer_kernel.cu ``convlstm_layer`` /
    ``convlstm_layer_backward``. Both weights are laid out channels-last once per call, so cuDNN
    convolves channels-last H_{t−1} without re-laying W_h and writes xz and hz as the rows the
    fused elementwise epilogue reads (no copies); it makes X's frames channels-last itself (a
    copy of X inside the W_x call), and the first step's NCHW h0 likewise. A time-first x
    (a batch-first one's B·T order costs one more copy of xz). The backward's data gradient
    keeps the NCHW W_h (re-laid each step)."""
    z, r = Sizes(shape, itemsize), Recorder()
    C, cin, T, k2 = z.C, z.cin, z.T, z.K * z.K
    weight_h, weight_x = z.weight(4 * C * C * k2), z.weight(4 * C * cin * k2)
    r.aten("contiguous (W_x channels-last)", weight_x, weight_x)
    r.aten("convolution (W_x * X + b; X made channels-last inside)", 2 * z.xseq() + weight_x,
           z.xseq() + z.seq(4 * C), z.gemm_flops(T * z.rows, 4 * C, cin * k2))
    r.aten("contiguous (W_h channels-last)", weight_h, weight_h)
    _channels_last_copy(r, z, z.state(), z.state32(), "c0 fp32")
    conv = z.gemm_flops(z.rows, 4 * C, C * k2)
    r.aten("copy_ (h0 made channels-last inside the first step's convolution)", z.state(),
           z.state())
    r.aten("convolution (W_h * H_{t-1})", z.state() + weight_h, z.state(4 * C), conv, count=T)
    r.kernel("ConvLSTMCellForward", 2 * z.state(4 * C) + z.state32(),
             z.state(4 * C) + z.state32() + 2 * z.state(), z.cell_flops(), count=T)
    _layer_end(r, z)

    r.phase = BACKWARD
    _channels_last_copy(r, z, z.seq(), z.seq(), "grad_output")
    _channels_last_copy(r, z, z.state(), z.state(), "c0")
    _channels_last_copy(r, z, z.state(), z.state32(), "grad_h_n fp32")
    _channels_last_copy(r, z, z.state(), z.state32(), "grad_c_n fp32")
    r.kernel("ConvLSTMCellBackward", 3 * z.state() + 2 * z.state32() + z.state(4 * C),
             z.state32() + z.state(4 * C), z.cell_backward_flops(), count=T)
    r.aten("convolution_backward (dH_{t-1} = W_hᵀ ⋆ dZ_t; NCHW W_h re-laid)",
           z.state(4 * C) + 2 * weight_h, z.state() + weight_h, conv, count=T)
    r.aten("copy_ (dH_{t-1} to the fp32 rows)", z.state(), z.state32(), count=T)
    r.aten("cat (H_{t-1} of all steps)", z.seq(), z.seq())
    if itemsize == 4:  # fp32: d W_h and d W_x one call per step, summed (same_conv_weight_grad)
        r.per_step_weight_grad("d W_h", z.state(4 * C) + z.state(), weight_h,
                               z.gemm_flops(4 * C, C * k2, z.rows), T)
    else:
        r.aten("convolution_backward (d W_h)", z.seq(4 * C) + z.seq(), weight_h,
               z.gemm_flops(4 * C, C * k2, T * z.rows))
    if itemsize == 4:
        r.aten("convolution_backward (dX)", z.seq(4 * C) + z.weight(4 * C * cin * k2), z.xseq(),
               z.gemm_flops(T * z.rows, 4 * C, cin * k2))
        r.per_step_weight_grad("d W_x", z.state(4 * C) + z.xstep(), z.weight(4 * C * cin * k2),
                               z.gemm_flops(4 * C, cin * k2, z.rows), T)
    else:
        r.aten("convolution_backward (dX, d W_x)", z.seq(4 * C) + z.xseq(), z.xseq(),
               2 * z.gemm_flops(T * z.rows, 4 * C, cin * k2))
    r.aten("sum (d bias)", z.seq(4 * C), 4 * C * 4)
    r.aten("copy_ (channels_first_copy grad_h0)", z.state32(), z.state())
    r.aten("copy_ (channels_first_copy grad_c0)", z.state32(), z.state())
    return r.launches


def spatial_attention_layer(shape, itemsize: int) -> list:
    """Variant (b): csrc/cuda/spatial_attention_layer_kernel.cu ``spatial_attention_layer`` /
    ``spatial_attention_layer_backward``. Only xa is batched (SepconvRows, x in place); per
    step F (SepconvRows with xa[t] and tanh), Z = W_z * F (cuDNN), the softmax, SepConv_x(X̃) +
    b_c (SepconvRows reading X_t in place, scaled by A: X̃ never written) with X̃'s tile sums
    beside, the gate FCs and (a)'s fused step (H_{t−1} read from and H_t written to the NCHW output).
    Backward: the cell backward, per-step GEMMs and transposed depthwise convs, the softmax and
    W_z backward in ATen; F and X̃ recomputed for all steps before the loop."""
    z, r = Sizes(shape, itemsize), Recorder()
    C, cin, T, k2 = z.C, z.cin, z.T, z.K * z.K
    amap = z.B * z.HW * z.s  # A [B, H·W]
    amap32 = z.B * z.HW * 4
    _sepconv_rows(r, z, "xa = SepConv(X) + b, x in place", cin, T * z.B)
    _initial_hidden_sums(r, z)
    _sepconv_rows(r, z, "F = tanh(SepConv_ha(H_{t-1}) + xa[t])", C, z.B, T, addend=True)
    r.aten("conv2d (Z = W_z * F)", z.state() + z.weight(C * k2), amap,
           z.gemm_flops(z.rows, 1, C * k2), count=T)
    r.aten("softmax (A)", amap, amap32, count=T)
    r.aten("copy_ (A, saved)", amap32, amap, count=T)
    _sepconv_rows(r, z, "SepConv_x(A∘X_t) + b_c and X̃'s tile sums, x in place", cin, z.B, T,
                  scaled=True, in_sums=True)
    _pooled_gate_preacts(r, z, 3, base=False, x_sums=True)
    _sepconv_cell_step(r, z, has_map=False)

    r.phase = BACKWARD
    _backward_start(r, z)
    _depthwise(r, z, cin, T, "dw_xa(X), recomputed")
    _depthwise(r, z, C, T, "dw_ha(H_{t-1}), recomputed")
    _sepconv_rows(r, z, "xa = SepConv(X) + b, recomputed", cin, T * z.B)
    _sepconv_rows(r, z, "F of all steps, recomputed", C, T * z.B, addend=True)
    r.aten("mul (X̃ of all steps, recomputed)", z.xseq() + T * amap, z.xseq())
    _pooled_cell_backward(r, z, 3, has_map=False)
    r.aten("mm (dh̄ = dgp · U_h)", z.vec(3 * C), z.vec(C), z.gemm_flops(z.B, C, 3 * C), count=T)
    r.aten("mm (d GAP(X̃) = dgp · U_x)", z.vec(3 * C), z.vec(cin),
           z.gemm_flops(z.B, cin, 3 * C), count=T)
    r.aten("mm_out (d dw_h = dacc · pw_h)", z.state() + z.weight(C * C), z.state(),
           z.gemm_flops(z.rows, C, C), count=T)
    r.kernel("depthwise_transpose (dH_{t-1} = dw_hᵀ(d dw_h) + dh̄/HW, fp32)",
             z.state() + z.vec(C), z.state32(), z.depthwise_flops(C), count=T,
             loaded=k2 * z.state() + z.vec(C))
    r.aten("mm_out (d dw_x = dacc · pw_x)", z.state() + z.weight(C * cin), z.xstep(),
           z.gemm_flops(z.rows, cin, C), count=T)
    r.kernel("depthwise_transpose (dX̃ = dw_xᵀ(d dw_x) + d GAP/HW, fp32)", z.xstep() + z.vec(cin),
             z.xstep(4), z.depthwise_flops(cin), count=T, loaded=k2 * z.xstep() + z.vec(cin))
    r.aten("mul (dX̃∘A)", z.xstep(4) + amap32, z.xstep(4), count=T)
    r.aten("copy_ (into grad_x)", z.xstep(4), z.xstep(4), count=T)
    r.aten("mul (dX̃∘X_t)", z.xstep(4) + z.xstep(), z.xstep(4), count=T)
    r.aten("sum (dA = Σ_c dX̃∘X)", z.xstep(4), amap32, count=T)
    r.aten("mul (A∘dA)", 2 * amap32, amap32, count=T)
    r.aten("sum (Σ_p A∘dA)", amap32, z.vec(1), count=T)
    r.aten("sub (dA − Σ)", amap32 + z.vec(1), amap32, count=T)
    r.aten("mul (dZ = A∘(dA − Σ))", 2 * amap32, amap32, count=T)
    r.aten("copy_ (dZ)", amap32, amap, count=T)
    r.aten("convolution_backward (dF = W_zᵀ ⋆ dZ)", amap + z.weight(C * k2), z.state(),
           z.gemm_flops(z.rows, C, k2), count=T)
    r.aten("square (F²)", z.state(), z.state(), count=T)
    r.aten("neg_", z.state(), z.state(), count=T)
    r.aten("add_ (1 − F²)", z.state(), z.state(), count=T)
    r.aten("mul (dF∘(1 − F²))", 2 * z.state(), z.state(), count=T)
    r.aten("copy_ (dF_pre)", z.state(), z.state(), count=T)
    r.aten("mm_out (d dw_ha = dF_pre · pw_ha)", z.state() + z.weight(C * C), z.state(),
           z.gemm_flops(z.rows, C, C), count=T)
    r.kernel("depthwise_transpose (dH_{t-1} += dw_haᵀ(d dw_ha), fp32)",
             z.state() + z.state32(), z.state32(), z.depthwise_flops(C), count=T,
             loaded=k2 * z.state() + z.state32())
    r.aten("mean (GAP(H_{t-1}))", z.seq(), T * z.vec(C))
    r.aten("mean (GAP(X̃))", z.xseq(), T * z.vec(cin))
    _depthwise_weight_grad(r, z, cin, T, "d dw_x")
    _depthwise(r, z, cin, T, "dw_x(X̃), recomputed")
    r.aten("mm (d pw_x)", z.seq() + z.xseq(), z.weight(C * cin), z.gemm_flops(C, cin, T * z.rows))
    _depthwise_weight_grad(r, z, C, T, "d dw_h")
    _depthwise(r, z, C, T, "dw_h(H_{t-1}), recomputed")
    r.aten("mm (d pw_h)", 2 * z.seq(), z.weight(C * C), z.gemm_flops(C, C, T * z.rows))
    r.aten("sum (d b_c)", z.seq(), C * 4)
    if itemsize == 4:  # fp32: one call per step, summed (same_conv_weight_grad)
        r.per_step_weight_grad("d W_z", amap + z.state(), z.weight(C * k2),
                               z.gemm_flops(1, C * k2, z.rows), T)
    else:
        r.aten("convolution_backward (d W_z)", T * amap + z.seq(), z.weight(C * k2),
               z.gemm_flops(1, C * k2, T * z.rows))
    _attention_features_backward(r, z)
    _backward_end(r, z)
    return r.launches
