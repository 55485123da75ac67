// Helpers shared by the CPU layer kernels (csrc/cpu/*_kernel.cpp): argument checks, layout
// changes, per-plane depthwise stencils and pointwise GEMMs, pooling, the pooled gates' small
// FCs, Winograd convolution, and the per-thread work split of the fused loops.
//
// Layout: every kernel keeps the op's own NCHW layout for x, the states, the output and the
// gradients, and works per (sample, channel) plane ("NCHW planes" below): a cell whose
// per-channel work is a K×K stencil, an elementwise update and per-plane sums never needs its
// channels side by side, the pointwise GEMMs take either layout at full rate, and on the CPU a
// layout change costs more than it saves. The one channels-last tensor is what the ConvLSTM
// kernel saves for backward (the layout every native backend shares for that cell), moved a
// step at a time (copy_to/from_channels_last).
#pragma once

// The fused loops call the branch-free exp/tanh of cell_math.h; GCC if-converts (and so
// vectorises) their selects only when it may ignore floating-point exception flags, which
// nothing here reads: setup.py compiles with -fno-trapping-math.

// The element loops are compiled for the baseline ISA the extension is built for (x86-64: SSE2)
// and, through GCC function multiversioning, for AVX2+FMA and AVX-512, one picked at load time
// by the CPU that runs them: the polynomial exp/tanh of cell_math.h run 3.5x (AVX2) and 7x
// (AVX-512) faster per element than with SSE2 (measured on this project's build machine).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define CONVLSTM_CPU_MULTIVERSION \
  __attribute__((noinline, target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define CONVLSTM_CPU_MULTIVERSION
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "cell_math.h"
#include "step_mask.h"
#include "cells.h"
#include "inference_twin.h"

namespace convlstm_fast {
namespace cpu {

using LayerResult = LayerOutputs;

using cells::LayerCall;
using cells::Walk;

// Checks the forward inputs of `cell`'s op and returns the call's K, the shapes of what the
// forward saves (cells.h saved_cpu) and whether T, B, C, H·W or Cin is 0 (nothing to compute): x [T, B, Cin, H, W], h0 and c0 [B, C, H, W], one CPU
// tensor of x's dtype (float32 or float64) per parameter of the cell with its shape,
// gate_activation 0 or 1; K is read from the parameter at `kernel_index` (a [*, *, K, K] weight,
// K odd).
LayerCall check_forward(const cells::Cell& cell, int kernel_index, const at::Tensor& x,
                        const at::Tensor& h0, const at::Tensor& c0, at::TensorList params,
                        int64_t gate_activation);

// The same for `<op>_backward`, with its own inputs: the gradients and `output` against the
// forward's shapes, `saved` against what the forward saves (all of x's dtype, CPU).
LayerCall check_backward(const cells::Cell& cell, int kernel_index, const at::Tensor& grad_output,
                         const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
                         const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                         at::TensorList params, const at::Tensor& output, at::TensorList saved,
                         int64_t gate_activation);

// The parameters as contiguous tensors (the kernels read them through data pointers).
inline std::vector<at::Tensor> contiguous_params(at::TensorList params) {
  std::vector<at::Tensor> out;
  for (const auto& p : params) out.push_back(p.contiguous());
  return out;
}

// The steps' frames X_t [B, Cin, H, W] of x [T, B, Cin, H, W], each contiguous. x may have any
// strides: ConvLSTM passes the time-first view of its batch-first input, whose frames' samples lie
// T frames apart. A time-first x's frames are read in place; otherwise the frame of the step asked
// for is gathered into one buffer reused by every step (a frame asked for again is not gathered
// again), so that no copy of the sequence is made or kept and no step allocates. A frame is valid
// until another step's is asked for.
class StepFrames {
 public:
  explicit StepFrames(const at::Tensor& x)
      : x_(x), in_place_(x.size(0) == 0 || x[0].is_contiguous()) {}

  at::Tensor operator()(int64_t t) const {
    if (in_place_) return x_[t];
    if (!buffer_.defined()) buffer_ = at::empty(x_[0].sizes(), x_.options());
    if (t != gathered_) buffer_.copy_(x_[t]);
    gathered_ = t;
    return buffer_;
  }

 private:
  at::Tensor x_;
  bool in_place_;
  mutable at::Tensor buffer_;
  mutable int64_t gathered_ = -1;
};

// A per-step tensor a forward writes, [T, ...]: every step kept when it is saved for backward,
// else `ring` step buffers reused in turn (step t in buffer t % ring). Default-constructed: none
// (a tensor the forward does not write without `save`; all() is undefined).
class StepBuffers {
 public:
  StepBuffers() : ring_(0) {}
  StepBuffers(std::vector<int64_t> shape, const at::TensorOptions& options, bool save,
              int64_t ring)
      : ring_(save ? 0 : ring) {
    if (ring_ > 0) shape[0] = std::min(shape[0], ring_);
    data_ = at::empty(shape, options);
  }
  at::Tensor operator[](int64_t t) const { return data_[ring_ > 0 ? t % ring_ : t]; }
  const at::Tensor& all() const { return data_; }

 private:
  int64_t ring_;
  at::Tensor data_;
};

// An empty result of the forward shapes (T = 0 or nothing to compute): zero output, copies of
// h0 and c0, and `saved` allocated with the given shapes.
LayerResult empty_layer_result(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                               const std::vector<std::vector<int64_t>>& saved_shapes);

// Zero gradients (nothing was computed) shaped like the backward's outputs.
LayerResult empty_layer_grads(const at::Tensor& x, const at::Tensor& grad_h_n,
                              const at::Tensor& grad_c_n, at::TensorList params);

// One step's slice between the op's NCHW tensors and a channels-last tensor:
// dst [B, H, W, C] (contiguous) = src [B, C, H, W], and dst [B, C, H, W] = src [B, H, W, C].
// A step at a time, so no sequence-sized temporary is ever allocated for a layout change
// (fresh pages cost more here than the copy).
void copy_to_channels_last(const at::Tensor& dst, const at::Tensor& src);
void copy_from_channels_last(const at::Tensor& dst, const at::Tensor& src);

// The pooled gates' FCs (rows = B): a few hundred thousand multiply-adds, which a plain
// vectorised loop finishes in less time than a BLAS call takes to start its threads.
//   out [rows, N] += in [rows, K] · w [K, N]       (small_matmul_accumulate)
//   out [rows, N] += in [rows, K] · w [N, K]ᵀ      (small_matmul_t_accumulate)
template <typename scalar_t>
CONVLSTM_CPU_MULTIVERSION void small_matmul_accumulate(int64_t rows, int64_t inner,
                                                       int64_t cols,
                                                       const scalar_t* __restrict__ in,
                                                       const scalar_t* __restrict__ w,
                                                       scalar_t* __restrict__ out) {
  for (int64_t r = 0; r < rows; ++r) {
    scalar_t* o = out + r * cols;
    for (int64_t k = 0; k < inner; ++k) {
      const scalar_t a = in[r * inner + k];
      const scalar_t* wk = w + k * cols;
      for (int64_t n = 0; n < cols; ++n) o[n] += a * wk[n];
    }
  }
}

template <typename scalar_t>
CONVLSTM_CPU_MULTIVERSION void small_matmul_t_accumulate(int64_t rows, int64_t inner,
                                                         int64_t cols,
                                                         const scalar_t* __restrict__ in,
                                                         const scalar_t* __restrict__ w,
                                                         scalar_t* __restrict__ out) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* a = in + r * inner;
    for (int64_t n = 0; n < cols; ++n) {
      const scalar_t* wn = w + n * inner;
      scalar_t acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < inner; ++k) acc += a[k] * wn[k];
      out[r * cols + n] += acc;
    }
  }
}

// out += in · weight (weight [K, N]), or in · weightᵀ with `transpose` (weight [N, K]); out
// [rows, N] contiguous.
void small_addmm_(const at::Tensor& out, const at::Tensor& in, const at::Tensor& weight,
                  bool transpose);

// ---- NCHW planes ----------------------------------------------------------------------------
// [N, C, H, W] contiguous, one (n, c) plane of H·W values at a time.

// out[n, c] = init[n, c] (0 when init is undefined) + depthwise 'same' conv of in[n, c] with
// weight [C, 1, K, K], flipped when `transposed` (the conv's input gradient); with `accumulate`,
// out[n, c] += the same. An input of one channel, [N, 1, H, W], is broadcast: every out[n, c]
// is then the conv of in[n, 0] with weight[c]. `out` may be a channel slice of a wider NCHW
// buffer (its planes contiguous, its samples further apart).
void depthwise_conv_planes(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                           bool transposed, const at::Tensor& init, bool accumulate = false);

// grad_weight [C, 1, K, K] += Σ_n Σ_{y, x} grad_out[n, c, y, x] · in[n, c, y + ky − K/2, x + kx − K/2]
// (parallel over channels, samples in order: deterministic). A one-channel grad_out
// [N, 1, H, W] is broadcast over the channels.
void depthwise_weight_grad_planes(const at::Tensor& grad_weight, const at::Tensor& grad_out,
                                  const at::Tensor& input);

// out[b] (+)= weight · in[b] for every sample: [C_out, C_in] × [C_in, H·W] GEMMs on NCHW planes.
void pointwise_planes(const at::Tensor& out, const at::Tensor& weight, const at::Tensor& in,
                      bool accumulate);

// grad_weight [C_out, C_in] += Σ_b grad_out[b] · in[b]ᵀ (planes [C, H·W]), samples in order.
void pointwise_planes_weight_grad(const at::Tensor& grad_weight, const at::Tensor& grad_out,
                                  const at::Tensor& in);

// out (+)= SepConv(in) = pointwise · depthwise(in) on NCHW planes, the depthwise output going to
// `dw` (a buffer shaped like `in`).
inline void sepconv_planes(const at::Tensor& out, const at::Tensor& in,
                           const at::Tensor& depthwise, const at::Tensor& pointwise,
                           const at::Tensor& dw, bool accumulate) {
  depthwise_conv_planes(dw, in, depthwise, false, at::Tensor());
  pointwise_planes(out, pointwise, dw, accumulate);
}

// out = P_x·dw_x(x) + P_h·dw_h(h) as one GEMM per sample, [P_x | P_h] × [dw_x(x); dw_h(h)]:
// the two depthwise outputs are written side by side into `stacked` [B, Cx + Ch, H, W] and
// `pointwise` is [P_x | P_h] [C_out, Cx + Ch] (at::cat of the two, made once per call). Against
// two GEMMs of which the second accumulates, the output is written once and not read back.
inline void sepconv_pair_planes(const at::Tensor& out, const at::Tensor& x,
                                const at::Tensor& depthwise_x, const at::Tensor& h,
                                const at::Tensor& depthwise_h, const at::Tensor& pointwise,
                                const at::Tensor& stacked) {
  const int64_t cx = x.size(1);
  depthwise_conv_planes(stacked.narrow(1, 0, cx), x, depthwise_x, false, at::Tensor());
  depthwise_conv_planes(stacked.narrow(1, cx, h.size(1)), h, depthwise_h, false, at::Tensor());
  pointwise_planes(out, pointwise, stacked, false);
}

// out [N, C] = mean over H·W of in [N, C, H, W].
void plane_means(const at::Tensor& out, const at::Tensor& input);

// Runs fn(b, c) over every (sample, channel) plane in parallel.
template <typename Fn>
void parallel_over_planes(int64_t batch, int64_t channels, const Fn& fn) {
  at::parallel_for(0, batch * channels, 8, [&](int64_t first, int64_t last) {
    for (int64_t p = first; p < last; ++p) fn(p / channels, p % channels);
  });
}

// Winograd F(2×2, 3×3) 'same' convolution (winograd.cpp): winograd_weight transforms a
// [Cout, Cin, 3, 3] kernel once into [16, Cout, Cin]; winograd_conv convolves an NCHW input
// [N, Cin, H, W] with it (stride 1, padding 1) -> [N, Cout, H, W], using `buffers` (of the
// input's dtype and device, resized as needed) for its transformed tiles and their products.
struct WinogradBuffers {
  at::Tensor tiles, products;
  explicit WinogradBuffers(const at::TensorOptions& options)
      : tiles(at::empty({0}, options)), products(at::empty({0}, options)) {}
};
at::Tensor winograd_weight(const at::Tensor& weight);
at::Tensor winograd_conv(const at::Tensor& input, const at::Tensor& transformed_weight,
                         WinogradBuffers& buffers);
// The pieces of the weight gradient: the input's tiles V = Bᵀ d B into tiles_out [16, Cin, P],
// the output gradient's dM = A dY Aᵀ into products_out [16, Cout, P] (both resized), so that
// dU = Σ dM·Vᵀ [16, Cout, Cin]; winograd_weight_grad(dU) = Gᵀ dU G as [Cout, Cin, 3, 3].
void winograd_input_transform(const at::Tensor& input, const at::Tensor& tiles_out);
void winograd_grad_transform(const at::Tensor& grad_out, const at::Tensor& products_out);
at::Tensor winograd_weight_grad(const at::Tensor& grad_transformed);

// How many pixel chunks per sample the fused loops use (one per thread, at most one per pixel).
inline int64_t pixel_chunks(int64_t pixels) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), pixels));
}

// Runs fn(b, chunk, begin, end) over the pixel ranges [begin, end) of every sample b < batch,
// chunk < pixel_chunks(pixels), in parallel. Reductions over pixels write one partial per
// (b, chunk) and sum the partials afterwards in a fixed order, so results are deterministic.
template <typename Fn>
void parallel_over_pixels(int64_t batch, int64_t pixels, const Fn& fn) {
  const int64_t chunks = pixel_chunks(pixels);
  const int64_t chunk = (pixels + chunks - 1) / chunks;
  at::parallel_for(0, batch * chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t b = task / chunks;
      const int64_t begin = (task % chunks) * chunk;
      const int64_t end = std::min(pixels, begin + chunk);
      if (begin < end) fn(b, task % chunks, begin, end);
    }
  });
}

}  // namespace cpu
}  // namespace convlstm_fast
