// Shared pieces of the CUDA layer ops: argument checks against a cell's layout (csrc/cells.h),
// results of empty calls, channels-last layout helpers, and the depthwise K×K convolution kernels
// (forward, transposed, weight gradient) on channels-last rows.
//
// Layout (shared/KERNELS.md "Layout"): inside an op every map is channels-last, a tensor
// [N, H, W, Cc] whose rows are pixels; a depthwise tap reads the same channel of a neighbour
// pixel, so consecutive threads (consecutive channels) read consecutive addresses.
// All reductions here are per-block partials summed in a fixed order (no atomics), so every
// kernel is deterministic whatever at::globalContext().deterministicAlgorithms() says.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/amax.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "cell_math.h"
#include "cells.h"
#include "step_mask.h"

// The dispatch key the kernels register for (TORCH_LIBRARY_IMPL in each *_kernel.cu): CUDA; the
// test-only emulation build (-DCONVLSTM_CUDA_EMULATE, see tests/test_native_cuda.py) runs the
// same drivers and kernel bodies on the CPU and registers them for CPU.
#ifdef CONVLSTM_CUDA_EMULATE
#define CONVLSTM_CUDA_DISPATCH_KEY CPU
#else
#define CONVLSTM_CUDA_DISPATCH_KEY CUDA
#endif

#include "inference_twin.h"

namespace convlstm_fast {
namespace cuda {

#ifdef CONVLSTM_CUDA_EMULATE
// The emulation build counts the launches of our own kernels (the two launch helpers below),
// one counter for the whole library; emulation_check.py reads it through
// convlstm_fast_emulated_launches() (pooled_layer_kernel.cu) to hold every driver to the
// launches per step its kernel file declares.
inline std::atomic<int64_t>& emulated_launches() {
  static std::atomic<int64_t> count{0};
  return count;
}
#endif

namespace {

using at::Tensor;
using LayerResult = LayerOutputs;
using BackwardResult = std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>>;

// What a forward saves for backward (`shapes`, [T, ...] each), written step by step: every step
// when `save`, else (the `_inference` ops) one step buffer per tensor, rewritten each step — the
// forwards never read back what they saved (the running cell state lives in cell_state).
class SavedSteps {
 public:
  SavedSteps(const std::vector<std::vector<int64_t>>& shapes, const at::TensorOptions& options,
             bool save)
      : save_(save) {
    for (auto shape : shapes) {
      if (!save) shape[0] = std::min<int64_t>(shape[0], 1);
      tensors_.push_back(at::empty(shape, options));
    }
  }
  Tensor operator()(size_t index, int64_t t) const { return tensors_[index][save_ ? t : 0]; }
  const std::vector<Tensor>& all() const { return tensors_; }

 private:
  bool save_;
  std::vector<Tensor> tensors_;
};

constexpr int kThreads = 256;
// Reduction blocks are kTileC channels × kRows pixel rows.
constexpr int kTileC = 32;
constexpr int kRows = 8;

// Accumulation dtype of the op: float for half/bfloat16/float, double for double.
inline at::ScalarType acc_dtype(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid of a grid-stride elementwise loop over n items.
inline unsigned int elementwise_blocks(int64_t n) {
  return static_cast<unsigned int>(std::min<int64_t>(ceil_div(n, kThreads), int64_t(1) << 20));
}

// How many pixel splits a (sample × channel-tile) reduction grid uses: enough blocks to fill
// the GPU about twice, never more splits than pixel rows.
inline int64_t reduction_splits(int64_t blocks_without_split, int64_t pixels,
                                const Tensor& like) {
  const int64_t sms =
      like.is_cuda() ? at::cuda::getCurrentDeviceProperties()->multiProcessorCount : 2;
  const int64_t wanted = ceil_div(2 * sms, std::max<int64_t>(blocks_without_split, 1));
  return std::max<int64_t>(1, std::min<int64_t>({wanted, ceil_div(pixels, kRows), 1024}));
}

// Kernels are functors with __host__ __device__ bodies, launched by the two helpers below. A
// test-only build with -DCONVLSTM_CUDA_EMULATE also runs them on CPU tensors, thread by thread
// in the same order of summation, so the host drivers can be checked without a GPU.
#ifdef CONVLSTM_CUDA_EMULATE
using LayerDeviceGuard = c10::DeviceGuard;
constexpr bool kRequireCuda = false;
#else
using LayerDeviceGuard = c10::cuda::CUDAGuard;
constexpr bool kRequireCuda = true;
#endif

// Grid-stride loop: f(idx) for idx in [0, total).
template <typename F>
__global__ void elementwise_kernel(F f, int64_t total) {
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    f(idx);
  }
}

template <typename F>
void launch_elementwise(const F& f, int64_t total, const Tensor& like) {
  if (total == 0) return;
#ifdef CONVLSTM_CUDA_EMULATE
  if (!like.is_cuda()) {
    ++emulated_launches();
    for (int64_t idx = 0; idx < total; ++idx) f(idx);
    return;
  }
#endif
  elementwise_kernel<F><<<elementwise_blocks(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      f, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Tile reduction: block (kTileC, kRows); thread (tx, ty) of block (bx, by, bz) adds its rows
// into Q sums (f.accumulate), the block sums them over ty in order and f.store writes them.
template <int Q, typename acc_t, typename F>
__global__ void tile_reduce_kernel(F f) {
  __shared__ acc_t red[Q][kRows][kTileC];
  acc_t sums[Q];
  for (int q = 0; q < Q; ++q) sums[q] = acc_t(0);
  f.accumulate(blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, sums);
  for (int q = 0; q < Q; ++q) red[q][threadIdx.y][threadIdx.x] = sums[q];
  __syncthreads();
  if (threadIdx.y == 0) {
    for (int q = 0; q < Q; ++q) {
      sums[q] = acc_t(0);
      for (int k = 0; k < kRows; ++k) sums[q] += red[q][k][threadIdx.x];
    }
    f.store(blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, sums);
  }
}

template <int Q, typename acc_t, typename F>
void launch_tile_reduce(const F& f, int64_t gx, int64_t gy, int64_t gz, const Tensor& like) {
  if (gx == 0 || gy == 0 || gz == 0) return;
  TORCH_CHECK(gx < (int64_t(1) << 31) && gy <= 65535 && gz <= 65535,
              "convlstm_fast: reduction grid too large (", gx, ", ", gy, ", ", gz, ")");
#ifdef CONVLSTM_CUDA_EMULATE
  if (!like.is_cuda()) {
    ++emulated_launches();
    for (unsigned bz = 0; bz < gz; ++bz)
      for (unsigned by = 0; by < gy; ++by)
        for (unsigned bx = 0; bx < gx; ++bx)
          for (unsigned tx = 0; tx < unsigned(kTileC); ++tx) {
            acc_t total[Q];
            for (int q = 0; q < Q; ++q) total[q] = acc_t(0);
            for (unsigned ty = 0; ty < unsigned(kRows); ++ty) {
              acc_t sums[Q];
              for (int q = 0; q < Q; ++q) sums[q] = acc_t(0);
              f.accumulate(bx, by, bz, tx, ty, sums);
              for (int q = 0; q < Q; ++q) total[q] += sums[q];
            }
            f.store(bx, by, bz, tx, total);
          }
    return;
  }
#endif
  tile_reduce_kernel<Q, acc_t, F>
      <<<dim3(unsigned(gx), unsigned(gy), unsigned(gz)), dim3(kTileC, kRows), 0,
         at::cuda::getCurrentCUDAStream()>>>(f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Phased block kernel: a block of kThreads threads with a shared-memory struct F::Shared and
// per-thread registers F::Regs runs
//   init(regs); for each chunk: stage(shared, chunk) | multiply(shared, regs, chunk)
//   | finish(shared, regs) | epilogue(shared) | store(shared)
// where each "|" is a __syncthreads(). The emulation build runs every phase for all threads of
// a block before the next phase (the barrier's meaning), with one Shared per block and one Regs
// per thread, so a kernel that is correct there is correct for any interleaving of the threads
// between barriers. Launch bounds: 256 threads and at least 2 blocks per SM, which leaves ptxas
// 128 registers a thread (with the block size alone it held the fused (a) step to 64 and spilled
// 8-24 bytes in bfloat16 and float).
template <typename F>
__global__ void __launch_bounds__(kThreads, 2) phased_kernel(F f) {
  __shared__ typename F::Shared shared;
  typename F::Regs regs;
  const dim3 block = blockIdx;
  const unsigned tid = threadIdx.x;
  f.init(regs, tid);
  for (int64_t chunk = 0; chunk < f.chunks(); ++chunk) {
    f.stage(shared, block, tid, chunk);
    __syncthreads();
    f.multiply(shared, regs, block, tid, chunk);
    __syncthreads();
  }
  f.finish(shared, regs, tid);
  __syncthreads();
  f.epilogue(shared, block, tid);
  __syncthreads();
  f.store(shared, block, tid);
}

template <typename F>
void launch_phased(const F& f, int64_t gx, int64_t gy, int64_t gz, const Tensor& like) {
  if (gx == 0 || gy == 0 || gz == 0) return;
  TORCH_CHECK(gx < (int64_t(1) << 31) && gy <= 65535 && gz <= 65535,
              "convlstm_fast: step grid too large (", gx, ", ", gy, ", ", gz, ")");
#ifdef CONVLSTM_CUDA_EMULATE
  if (!like.is_cuda()) {
    ++emulated_launches();
    auto shared = std::make_unique<typename F::Shared>();
    std::vector<typename F::Regs> regs(kThreads);
    for (unsigned bz = 0; bz < gz; ++bz)
      for (unsigned by = 0; by < gy; ++by)
        for (unsigned bx = 0; bx < gx; ++bx) {
          const dim3 block(bx, by, bz);
          for (unsigned tid = 0; tid < unsigned(kThreads); ++tid) f.init(regs[tid], tid);
          for (int64_t chunk = 0; chunk < f.chunks(); ++chunk) {
            for (unsigned tid = 0; tid < unsigned(kThreads); ++tid)
              f.stage(*shared, block, tid, chunk);
            for (unsigned tid = 0; tid < unsigned(kThreads); ++tid)
              f.multiply(*shared, regs[tid], block, tid, chunk);
          }
          for (unsigned tid = 0; tid < unsigned(kThreads); ++tid)
            f.finish(*shared, regs[tid], tid);
          for (unsigned tid = 0; tid < unsigned(kThreads); ++tid) f.epilogue(*shared, block, tid);
          for (unsigned tid = 0; tid < unsigned(kThreads); ++tid) f.store(*shared, block, tid);
        }
    return;
  }
#endif
  phased_kernel<F><<<dim3(unsigned(gx), unsigned(gy), unsigned(gz)), kThreads, 0,
                     at::cuda::getCurrentCUDAStream()>>>(f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// Argument checks (messages name the argument and what was expected).

inline void check_cuda_tensor(const Tensor& t, std::string_view name, const Tensor& x) {
  TORCH_CHECK(t.defined(), name, " must be a defined tensor");
  TORCH_CHECK(t.is_cuda() || !kRequireCuda, name, " must be a CUDA tensor, got device ",
              t.device());
  TORCH_CHECK(t.device() == x.device(), name, " must be on the input's device ", x.device(),
              ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " must have the input's dtype ",
              x.scalar_type(), ", got ", t.scalar_type());
}

// x [T, B, Cin, H, W]; h0, c0 [B, C, H, W]; params: one tensor per entry of `parameters`
// (cells.h), on x's device with x's dtype and the entry's shape; gate_activation 0 or 1. K is
// read from the parameter at `kernel_index` (odd) and returned.
inline int64_t check_layer_inputs(const Tensor& x, const Tensor& h0, const Tensor& c0,
                                  at::TensorList params, cells::NamedShapes parameters,
                                  int kernel_index, int64_t activation, const std::string& op) {
  TORCH_CHECK(x.dim() == 5, op, ": x must be [T, B, Cin, H, W], got ", x.sizes());
  TORCH_CHECK(x.is_cuda() || !kRequireCuda, op, ": x must be a CUDA tensor, got device ",
              x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kDouble,
              op, ": x must be float32, float16, bfloat16 or float64, got ", x.scalar_type());
  check_cuda_tensor(h0, "h0", x);
  check_cuda_tensor(c0, "c0", x);
  TORCH_CHECK(h0.dim() == 4 && h0.size(0) == x.size(1) && h0.size(2) == x.size(3) &&
                  h0.size(3) == x.size(4),
              op, ": h0 must be [B, C, H, W] with B, H, W of x ", x.sizes(), ", got ", h0.sizes());
  TORCH_CHECK(c0.sizes() == h0.sizes(), op, ": c0 must have h0's shape ", h0.sizes(), ", got ",
              c0.sizes());
  TORCH_CHECK(params.size() == parameters.size, op, ": params must be ", parameters.size,
              " tensors, got ", params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    check_cuda_tensor(params[i], parameters[i].name, x);
  }
  TORCH_CHECK(activation == kSigmoid || activation == kHardSigmoid, op,
              ": gate_activation must be 0 (sigmoid) or 1 (hard_sigmoid), got ", activation);
  const int64_t k = params[kernel_index].size(-1);
  TORCH_CHECK(k % 2 == 1, op, ": ", parameters[kernel_index].name,
              " must have an odd kernel size, got ", k);
  const cells::Sizes sizes = cells::layer_sizes(x, h0, k);
  for (size_t i = 0; i < params.size(); ++i) {
    const std::vector<int64_t> shape = cells::shape_of(parameters[i], sizes);
    TORCH_CHECK(params[i].sizes() == at::IntArrayRef(shape), op, ": parameter ",
                parameters[i].name, " must have shape ", at::IntArrayRef(shape), ", got ",
                params[i].sizes());
  }
  return k;
}

inline void check_backward_inputs(const Tensor& grad_output, const Tensor& grad_h_n,
                                  const Tensor& grad_c_n, const Tensor& x, const Tensor& h0,
                                  const Tensor& output, const std::string& op) {
  check_cuda_tensor(grad_output, "grad_output", x);
  check_cuda_tensor(grad_h_n, "grad_h_n", x);
  check_cuda_tensor(grad_c_n, "grad_c_n", x);
  check_cuda_tensor(output, "output", x);
  const std::vector<int64_t> out_shape = {x.size(0), x.size(1), h0.size(1), x.size(3), x.size(4)};
  TORCH_CHECK(output.sizes() == at::IntArrayRef(out_shape), op, ": output must be ",
              at::IntArrayRef(out_shape), ", got ", output.sizes());
  TORCH_CHECK(grad_output.sizes() == output.sizes(), op, ": grad_output must have output's shape ",
              output.sizes(), ", got ", grad_output.sizes());
  TORCH_CHECK(grad_h_n.sizes() == h0.sizes(), op, ": grad_h_n must be ", h0.sizes(), ", got ",
              grad_h_n.sizes());
  TORCH_CHECK(grad_c_n.sizes() == h0.sizes(), op, ": grad_c_n must be ", h0.sizes(), ", got ",
              grad_c_n.sizes());
}

inline void check_saved(at::TensorList saved, const std::vector<std::vector<int64_t>>& shapes,
                        const Tensor& x, const std::string& op) {
  TORCH_CHECK(saved.size() == shapes.size(), op, ": saved must hold ", shapes.size(),
              " tensors (from the forward), got ", saved.size());
  for (size_t i = 0; i < shapes.size(); ++i) {
    check_cuda_tensor(saved[i], "saved", x);
    TORCH_CHECK(saved[i].sizes() == at::IntArrayRef(shapes[i]), op, ": saved[", i, "] must be ",
                at::IntArrayRef(shapes[i]), ", got ", saved[i].sizes());
  }
}

using cells::LayerCall;

// Nothing to compute: T, B, C or H·W is 0.
inline bool nothing_to_compute(const Tensor& x, const Tensor& h0) {
  return x.size(0) == 0 || x.size(1) == 0 || h0.size(1) == 0 || x.size(3) * x.size(4) == 0;
}

// Checks the forward inputs of `cell`'s op (check_layer_inputs) and returns the call's K, the
// shapes of what the forward saves (cells.h saved_cuda) and whether T, B, C or H·W is 0
// (nothing to compute).
inline LayerCall check_forward(const cells::Cell& cell, int kernel_index, const Tensor& x,
                               const Tensor& h0, const Tensor& c0, at::TensorList params,
                               int64_t activation) {
  const int64_t k = check_layer_inputs(x, h0, c0, params, cell.parameters, kernel_index,
                                       activation, std::string(cell.op));
  return {k, cells::shapes_of(cell.saved_cuda, cells::layer_sizes(x, h0, k)),
          nothing_to_compute(x, h0)};
}

// The same for `<op>_backward`, with its own inputs: the gradients, `output` and `saved`.
inline LayerCall check_backward(const cells::Cell& cell, int kernel_index,
                                const Tensor& grad_output, const Tensor& grad_h_n,
                                const Tensor& grad_c_n, const Tensor& x, const Tensor& h0,
                                const Tensor& c0, at::TensorList params, const Tensor& output,
                                at::TensorList saved, int64_t activation) {
  const std::string op = std::string(cell.op) + "_backward";
  const int64_t k =
      check_layer_inputs(x, h0, c0, params, cell.parameters, kernel_index, activation, op);
  check_backward_inputs(grad_output, grad_h_n, grad_c_n, x, h0, output, op);
  LayerCall call{k, cells::shapes_of(cell.saved_cuda, cells::layer_sizes(x, h0, k)),
                 nothing_to_compute(x, h0)};
  check_saved(saved, call.saved_shapes, x, op);
  return call;
}

// The result of a layer with nothing to compute (T, B, C, H or W is 0): zero output, copies of
// h0 and c0, and zero saved tensors of the given shapes.
inline LayerResult empty_layer_result(const Tensor& x, const Tensor& h0, const Tensor& c0,
                                      const std::vector<std::vector<int64_t>>& saved_shapes) {
  std::vector<Tensor> saved;
  for (const auto& s : saved_shapes) saved.push_back(at::zeros(s, x.options()));
  Tensor output = at::zeros({x.size(0), x.size(1), h0.size(1), x.size(3), x.size(4)}, x.options());
  return {output, h0.clone(), c0.clone(), saved};
}

// Its backward: the initial state's gradients are the final state's, the rest zero.
inline BackwardResult empty_backward_result(const Tensor& x, const Tensor& grad_h_n,
                                            const Tensor& grad_c_n, at::TensorList params) {
  std::vector<Tensor> grads;
  for (const Tensor& p : params) grads.push_back(at::zeros_like(p));
  return {at::zeros(x.sizes(), x.options()), grad_h_n.clone(), grad_c_n.clone(), grads};
}

// ---------------------------------------------------------------------------------------------
// The walk over the steps (cells::Walk): forward t = walk.time(0 … T − 1), backward the opposite
// order. In the drivers' and kernels' comments H_{t−1}, C_{t−1} are the state step t starts from,
// the previous step's (walk.prev(t); step t + 1's in reverse), and "step t+1" is the next one.

using cells::Walk;

// The state step t starts from: `initial` at the walk's first step, else the previous step's
// entry of `states` ([T, ...], indexed by time).
inline Tensor state_before(const Walk& walk, int64_t t, const Tensor& initial,
                           const Tensor& states) {
  return walk.is_first(t) ? initial : states[walk.prev(t)];
}

// After forward step t of a pooled cell (a–d) with lengths (step_mask.h): the samples whose step
// does not count keep the column sums of H that the next step's gates read (`hsum_next` [B,
// splits, C] back to `hsum`, what this step read) and their H carry, and output zero; the
// others' carry becomes H_t. (Their C: pooled_cell.cuh LayerCellState::carry.)
inline void mask_pooled_step(const StepMask& mask, int64_t t, const Tensor& hsum_next,
                             const Tensor& hsum, const Tensor& h_carry, const Tensor& output_t) {
  if (!mask.active()) return;
  mask.carry(t, hsum_next, hsum);
  mask.advance(t, h_carry, output_t);
  mask.zero_output(t, output_t);
}

// The T − 1 steps of `states` ([T, ...]) that some step starts from: all but the walk's last.
inline Tensor starting_steps(const Walk& walk, const Tensor& states) {
  return states.narrow(0, walk.reverse ? 1 : 0, walk.steps - 1);
}

// The state every step starts from, [T, ...] indexed by time, for the batched calls after the
// backward loop: `initial` [...] at the walk's first step, `starting` (starting_steps of the
// states, in any layout) at the others — cat(h0, output[:-1]), or cat(output[1:], h0) in reverse.
inline Tensor states_before(const Walk& walk, const Tensor& initial, const Tensor& starting) {
  return walk.reverse ? at::cat({starting, initial.unsqueeze(0)}, 0)
                      : at::cat({initial.unsqueeze(0), starting}, 0);
}

// ---------------------------------------------------------------------------------------------
// Layout helpers.

// The permutation of a [.., C, H, W] tensor of `dim` dimensions to [.., H, W, C].
inline std::vector<int64_t> channels_last_order(int64_t dim) {
  std::vector<int64_t> perm;
  for (int64_t i = 0; i < dim - 3; ++i) perm.push_back(i);
  perm.push_back(dim - 2);
  perm.push_back(dim - 1);
  perm.push_back(dim - 3);
  return perm;
}

// [.., C, H, W] (NCHW, any strides: x may be the time-first view of a batch-first tensor) -> a
// new contiguous channels-last [.., H, W, C] tensor of dtype, in one copy.
inline Tensor channels_last_copy(const Tensor& t, at::ScalarType dtype) {
  const std::vector<int64_t> perm = channels_last_order(t.dim());
  auto sizes = t.permute(perm).sizes().vec();
  Tensor out = at::empty(sizes, t.options().dtype(dtype));
  out.copy_(t.permute(perm));
  return out;
}

// H_{t−1} of every step for a backward's batched calls, channels-last [T, B, H, W, C] of dtype:
// h0 at the walk's first step (with lengths also at a reverse walk's first valid step,
// step_mask.h), else the previous step's `output` (NCHW [T, B, C, H, W]).
inline Tensor hidden_states_before(const StepMask& mask, const Walk& walk, const Tensor& h0_cl,
                                   const Tensor& output, at::ScalarType dtype) {
  return mask.states_before(
      walk,
      states_before(walk, h0_cl,
                    channels_last_copy(starting_steps(walk, output).contiguous(), dtype)),
      h0_cl);
}

// A convolution's NCHW-shaped result [.., C, H, W] as channels-last [.., H, W, C]: itself
// (a view, no copy) where its memory is already channels-last, as cuDNN writes it for a
// channels-last weight, else one copy.
inline Tensor channels_last_rows(const Tensor& t) {
  return t.permute(channels_last_order(t.dim())).contiguous();
}

// A K×K convolution weight [out, in, K, K] in channels-last memory (a copy unless it is already):
// what cuDNN takes without re-laying it per call, and writes its output channels-last for.
inline Tensor channels_last_weight(const Tensor& weight) {
  return weight.contiguous(at::MemoryFormat::ChannelsLast);
}

// Channels-last [.., H, W, C] -> a new contiguous NCHW [.., C, H, W] tensor of dtype.
inline Tensor channels_first_copy(const Tensor& t, at::ScalarType dtype) {
  std::vector<int64_t> perm;
  const int64_t d = t.dim();
  for (int64_t i = 0; i < d - 3; ++i) perm.push_back(i);
  perm.push_back(d - 1);
  perm.push_back(d - 3);
  perm.push_back(d - 2);
  auto sizes = t.permute(perm).sizes().vec();
  Tensor out = at::empty(sizes, t.options().dtype(dtype));
  out.copy_(t.permute(perm));
  return out;
}

// x [T, B, Cin, H, W] as one batch of frames [N, Cin, H, W] for a batched convolution, read in
// place: a time-first x as its T·B frames, the time-first view of a batch-first tensor (what
// ConvLSTM passes) as its B·T frames; any other strides are copied once. as_sequence() sees a
// per-frame result [N, C', H, W] as [T, B, C', H, W] again (a view), for channels_last_copy.
struct SequenceFrames {
  Tensor frames;
  int64_t steps, batch;
  bool batch_major;

  explicit SequenceFrames(const Tensor& x)
      : steps(x.size(0)), batch(x.size(1)), batch_major(!x.is_contiguous() &&
                                                        x.transpose(0, 1).is_contiguous()) {
    const auto frame = x.sizes().slice(2);
    std::vector<int64_t> shape{steps * batch};
    shape.insert(shape.end(), frame.begin(), frame.end());
    frames = batch_major ? x.transpose(0, 1).view(shape) : x.contiguous().view(shape);
  }

  Tensor as_sequence(const Tensor& per_frame) const {
    std::vector<int64_t> shape{batch_major ? batch : steps, batch_major ? steps : batch};
    const auto frame = per_frame.sizes().slice(1);
    shape.insert(shape.end(), frame.begin(), frame.end());
    const Tensor sequence = per_frame.view(shape);
    return batch_major ? sequence.transpose(0, 1) : sequence;
  }
};

// A channels-last [N, H, W, C] buffer seen as an NCHW tensor (channels_last strides), for ATen
// convolutions.
inline Tensor nchw_view(const Tensor& t, int64_t n, int64_t h, int64_t w, int64_t c) {
  return t.view({n, h, w, c}).permute({0, 3, 1, 2});
}

// ---------------------------------------------------------------------------------------------
// Depthwise K×K convolution, 'same' padding r = K // 2, on channels-last maps [N, H, W, Cc]:
//   out[n, y, x, c] = Σ_{ky,kx} w[c, ky, kx] · in[n, y + ky − r, x + kx − r, c]   (0 outside)
// One output of it, in the accumulation dtype (taps in (ky, kx) order; the fused steps,
// pooled_cell.cuh, compute their depthwise with this same sum), of one map `in` whose element
// (pixel p, channel c) is in[c · channel_stride + p · pixel_stride]: channels-last (1, Cc) or
// an NCHW plane stack (H·W, 1). With `scale` [H·W] the map is scale∘in, each product rounded to
// the dtype as an ATen mul of the two rounds it (b's X̃ = A∘X_t, never written): map_value,
// which SepconvRows' column sums of the map read too.
template <typename acc_t, typename scalar_t>
__host__ __device__ inline scalar_t map_value(const scalar_t* plane, int64_t q,
                                              int64_t pixel_stride, const scalar_t* scale) {
  return scale != nullptr ? scalar_t(acc_t(scale[q]) * acc_t(plane[q * pixel_stride]))
                          : plane[q * pixel_stride];
}

template <typename acc_t, typename scalar_t>
__host__ __device__ inline acc_t depthwise_at(const scalar_t* in, const scalar_t* weight,
                                              int64_t y, int64_t x, int64_t c, int64_t height,
                                              int64_t width, int64_t channel_stride,
                                              int64_t pixel_stride, int64_t kernel,
                                              const scalar_t* scale = nullptr) {
  const int64_t r = kernel / 2;
  const scalar_t* plane = in + c * channel_stride;
  acc_t acc = 0;
  for (int64_t ky = 0; ky < kernel; ++ky) {
    const int64_t yy = y + ky - r;
    if (yy < 0 || yy >= height) continue;
    for (int64_t kx = 0; kx < kernel; ++kx) {
      const int64_t xx = x + kx - r;
      if (xx < 0 || xx >= width) continue;
      const scalar_t v = map_value<acc_t>(plane, yy * width + xx, pixel_stride, scale);
      acc += acc_t(weight[(c * kernel + ky) * kernel + kx]) * acc_t(v);
    }
  }
  return acc;
}

template <typename scalar_t>
struct DepthwiseForward {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* in;
  const scalar_t* weight;
  scalar_t* out;
  int64_t height, width, channels, kernel;

  __host__ __device__ void operator()(int64_t idx) const {
    const int64_t c = idx % channels;
    int64_t rest = idx / channels;
    const int64_t x = rest % width;
    rest /= width;
    const int64_t y = rest % height;
    const int64_t n = rest / height;
    out[idx] = scalar_t(depthwise_at<acc_t>(in + n * height * width * channels, weight, y, x, c,
                                            height, width, 1, channels, kernel));
  }
};

// in [N, H, W, Cc] (any contiguous shape with that many elements), weight [Cc, 1, K, K]
// -> [N·H·W, Cc] rows of in's dtype.
inline Tensor depthwise_forward(const Tensor& in, const Tensor& weight, int64_t n, int64_t height,
                                int64_t width) {
  const int64_t channels = weight.size(0), kernel = weight.size(-1);
  Tensor out = at::empty({n * height * width, channels}, in.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  TORCH_INTERNAL_ASSERT(in.is_contiguous() && in.numel() == total);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "depthwise_forward",
                                  [&] {
    launch_elementwise(
        DepthwiseForward<scalar_t>{in.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
                                   out.mutable_data_ptr<scalar_t>(), height, width, channels,
                                   kernel},
        total, out);
  });
  return out;
}

// Transposed depthwise convolution (the gradient of `in` above), with optional extras:
//   out[n, y, x, c] = (add[n, y, x, c] + Σ_{ky,kx} w[c, ky, kx] · g[n, y − ky + r, x − kx + r, c]
//                      + row_scale · row_add[n, c]) · (1 − tanh_out[n, y, x, c]²)
// (each extra only when its pointer is given). `add` may alias `out`: each element is read and
// written by the same thread.
template <typename scalar_t, typename out_t>
struct DepthwiseTranspose {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* grad;
  const scalar_t* weight;
  const out_t* add;
  const acc_t* row_add;
  acc_t row_scale;
  const scalar_t* tanh_out;
  out_t* out;
  int64_t height, width, channels, kernel;

  __host__ __device__ void operator()(int64_t idx) const {
    const int64_t r = kernel / 2;
    const int64_t c = idx % channels;
    int64_t rest = idx / channels;
    const int64_t x = rest % width;
    rest /= width;
    const int64_t y = rest % height;
    const int64_t n = rest / height;
    acc_t acc = add != nullptr ? acc_t(add[idx]) : acc_t(0);
    for (int64_t ky = 0; ky < kernel; ++ky) {
      const int64_t yy = y - ky + r;
      if (yy < 0 || yy >= height) continue;
      for (int64_t kx = 0; kx < kernel; ++kx) {
        const int64_t xx = x - kx + r;
        if (xx < 0 || xx >= width) continue;
        acc += acc_t(weight[(c * kernel + ky) * kernel + kx]) *
               acc_t(grad[((n * height + yy) * width + xx) * channels + c]);
      }
    }
    if (row_add != nullptr) acc += row_scale * row_add[n * channels + c];
    if (tanh_out != nullptr) acc *= tanh_grad_from_output(acc_t(tanh_out[idx]));
    out[idx] = out_t(acc);
  }
};

// grad [N·H·W, Cc] (dtype of weight) -> out [N·H·W, Cc] (out's dtype: weight's or the
// accumulation dtype; allocated in the accumulation dtype when undefined).
// row_add [N, Cc] in the accumulation dtype; add (out's dtype) and tanh_out as in the functor.
inline Tensor depthwise_transpose(const Tensor& grad, const Tensor& weight, int64_t n,
                                  int64_t height, int64_t width, Tensor out,
                                  const Tensor& add = Tensor(), const Tensor& row_add = Tensor(),
                                  double row_scale = 0.0, const Tensor& tanh_out = Tensor()) {
  const int64_t channels = weight.size(0), kernel = weight.size(-1);
  if (!out.defined()) {
    out = at::empty({n * height * width, channels}, grad.options().dtype(acc_dtype(grad)));
  }
  const int64_t total = out.numel();
  if (total == 0) return out;
  TORCH_INTERNAL_ASSERT(grad.is_contiguous() && grad.numel() == total && out.is_contiguous());
  TORCH_INTERNAL_ASSERT(!add.defined() || (add.scalar_type() == out.scalar_type() &&
                                           add.is_contiguous() && add.numel() == total));
  TORCH_INTERNAL_ASSERT(!row_add.defined() || (row_add.is_contiguous() &&
                                               row_add.scalar_type() == acc_dtype(grad) &&
                                               row_add.numel() == n * channels));
  TORCH_INTERNAL_ASSERT(!tanh_out.defined() || (tanh_out.is_contiguous() &&
                                                tanh_out.scalar_type() == grad.scalar_type() &&
                                                tanh_out.numel() == total));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "depthwise_transpose", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* row_ptr = row_add.defined() ? row_add.const_data_ptr<acc_t>() : nullptr;
    const scalar_t* tanh_ptr = tanh_out.defined() ? tanh_out.const_data_ptr<scalar_t>() : nullptr;
    if (out.scalar_type() == grad.scalar_type()) {
      launch_elementwise(
          DepthwiseTranspose<scalar_t, scalar_t>{
              grad.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
              add.defined() ? add.const_data_ptr<scalar_t>() : nullptr, row_ptr, acc_t(row_scale),
              tanh_ptr, out.mutable_data_ptr<scalar_t>(), height, width, channels, kernel},
          total, out);
    } else {
      TORCH_INTERNAL_ASSERT(out.scalar_type() == acc_dtype(grad));
      launch_elementwise(
          DepthwiseTranspose<scalar_t, acc_t>{
              grad.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
              add.defined() ? add.const_data_ptr<acc_t>() : nullptr, row_ptr, acc_t(row_scale),
              tanh_ptr, out.mutable_data_ptr<acc_t>(), height, width, channels, kernel},
          total, out);
    }
  });
  return out;
}

// Weight gradient of the depthwise convolution, summed over all rows:
//   dw[c, ky, kx] = Σ_{n,y,x} g[n, y, x, c] · in[n, y + ky − r, x + kx − r, c]
// Block x: a tile of kTileC channels; y: the tap (ky, kx); z: a split of the rows. It writes
// partial[split, tap, c]; the host sums the splits in order.
template <typename scalar_t>
struct DepthwiseWeightGrad {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* grad;
  const scalar_t* in;
  acc_t* partial;
  int64_t rows, rows_per_split, height, width, channels, kernel;

  __host__ __device__ void accumulate(unsigned bx, unsigned by, unsigned bz, unsigned tx,
                                      unsigned ty, acc_t* sums) const {
    const int64_t c = int64_t(bx) * kTileC + tx;
    if (c >= channels) return;
    const int64_t dy = int64_t(by) / kernel - kernel / 2, dx = int64_t(by) % kernel - kernel / 2;
    const int64_t begin = int64_t(bz) * rows_per_split;
    const int64_t end = begin + rows_per_split < rows ? begin + rows_per_split : rows;
    for (int64_t row = begin + ty; row < end; row += kRows) {
      const int64_t x = row % width;
      const int64_t y = (row / width) % height;
      if (y + dy < 0 || y + dy >= height || x + dx < 0 || x + dx >= width) continue;
      const int64_t src = row + dy * width + dx;  // same sample: the tap is inside the map
      sums[0] += acc_t(grad[row * channels + c]) * acc_t(in[src * channels + c]);
    }
  }

  __host__ __device__ void store(unsigned bx, unsigned by, unsigned bz, unsigned tx,
                                 const acc_t* totals) const {
    const int64_t c = int64_t(bx) * kTileC + tx;
    if (c >= channels) return;
    partial[(int64_t(bz) * kernel * kernel + by) * channels + c] = totals[0];
  }
};

// grad, in [N·H·W, Cc] -> dw [Cc, 1, K, K] in weight's dtype, N = steps·B frames. At least one
// pixel split per step, so that no partial sum runs over more than a step's B·H·W pixels (the
// reference sums per step; one sum over all steps is less accurate in fp32, as steps_mm says).
inline Tensor depthwise_weight_grad(const Tensor& grad, const Tensor& in, const Tensor& weight,
                                    int64_t height, int64_t width, int64_t steps) {
  const int64_t channels = weight.size(0), kernel = weight.size(-1);
  if (grad.numel() == 0) return at::zeros_like(weight);
  const int64_t rows = grad.numel() / channels;
  TORCH_INTERNAL_ASSERT(grad.is_contiguous() && in.is_contiguous() && in.numel() == grad.numel());
  const int64_t tiles = ceil_div(channels, kTileC);
  const int64_t splits = std::min<int64_t>(
      std::max<int64_t>(reduction_splits(tiles * kernel * kernel, rows, grad),
                        std::min<int64_t>(steps, ceil_div(rows, kRows))),
      65535);
  const int64_t rows_per_split = ceil_div(rows, splits);
  Tensor partial = at::empty({splits, kernel * kernel, channels},
                             grad.options().dtype(acc_dtype(grad)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "depthwise_weight_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_tile_reduce<1, acc_t>(
        DepthwiseWeightGrad<scalar_t>{grad.const_data_ptr<scalar_t>(), in.const_data_ptr<scalar_t>(),
                                      partial.mutable_data_ptr<acc_t>(), rows, rows_per_split,
                                      height, width, channels, kernel},
        tiles, kernel * kernel, splits, grad);
  });
  // [K·K, Cc] -> [Cc, 1, K, K]
  return partial.sum(0).t().reshape({channels, 1, kernel, kernel}).to(weight.scalar_type());
}

// 'same' K×K convolution (cuDNN) of an NCHW-shaped tensor (any memory
// format), and its data / weight gradients.
inline Tensor same_conv(const Tensor& in, const Tensor& weight, const Tensor& bias) {
  const int64_t r = weight.size(-1) / 2;
  return at::conv2d(in, weight, bias, {1, 1}, {r, r}, {1, 1}, 1);
}

inline std::tuple<Tensor, Tensor> same_conv_backward(const Tensor& grad, const Tensor& in,
                                              const Tensor& weight, bool input_grad,
                                              bool weight_grad) {
  const int64_t r = weight.size(-1) / 2;
  auto grads = at::convolution_backward(grad, in, weight, std::nullopt, {1, 1}, {r, r}, {1, 1},
                                        false, {0, 0}, 1, {input_grad, weight_grad, false});
  return {std::get<0>(grads), std::get<1>(grads)};
}

// The weight gradient of a 'same' convolution over `steps` × B frames ([steps·B, ...],
// step-major).
// In fp32 one call per step (B frames), summed from the last step to the first: the reduction the
// reference's autograd makes. One call over all steps·B frames sums B·H·W·steps products in one
// accumulation and is measurably less accurate (benchmarks/wgrad_probe.py: 2.3× further from
// float64 on the CPU; on the H200 the batched d W_h broke STYLE.md's fp32 bound by 1.6×).
// Other dtypes: one call (16-bit results are far coarser than the order of an fp32 sum).
inline Tensor same_conv_weight_grad(const Tensor& grad, const Tensor& in, const Tensor& weight,
                                    int64_t steps) {
  if (grad.scalar_type() != at::kFloat) {
    return std::get<1>(same_conv_backward(grad, in, weight, false, true));
  }
  const int64_t batch = grad.size(0) / steps;
  Tensor total;
  for (int64_t t = steps - 1; t >= 0; --t) {
    const Tensor part = std::get<1>(same_conv_backward(
        grad.narrow(0, t * batch, batch), in.narrow(0, t * batch, batch), weight, false, true));
    total = total.defined() ? total.add_(part) : part;
  }
  return total;
}

// The weight gradient gradᵀ · in [out, in] of a product over `steps` step-major blocks of rows
// (grad [steps·R, out], in [steps·R, in]). In fp32 summed step by step — one batched product of
// the steps' blocks, then their sum — as the reference's autograd sums per-step products: one
// product over all steps·R rows is measurably less accurate at long sequences
// (tests/test_backends.py "long": ~1.6× over STYLE.md's fp32 bound). Other dtypes: one product.
inline Tensor steps_mm(const Tensor& grad, const Tensor& in, int64_t steps) {
  if (grad.scalar_type() != at::kFloat) return at::mm(grad.t(), in);
  const int64_t rows = grad.size(0) / steps;
  return at::bmm(grad.view({steps, rows, grad.size(1)}).transpose(1, 2),
                 in.reshape({steps, rows, in.size(1)}))
      .sum(0);
}

}  // namespace
}  // namespace cuda
}  // namespace convlstm_fast
