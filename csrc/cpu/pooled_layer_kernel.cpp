// Variant (a), `convlstm_fast::pooled_layer` and its backward, on the CPU (shared/SPEC.md "a"):
//   x̄ = GAP(X_t), h̄ = GAP(H_{t−1});  [i f o] = σ(U_x x̄ + U_h h̄ + b_g)   (gates [B, C])
//   G = tanh(SepConv_x(X_t) + SepConv_h(H_{t−1}) + b_c)
//   C_t = f∘C_{t−1} + i∘G;  H_t = o∘tanh(C_t)
// Structure: everything stays in the op's own NCHW layout — no layout change of x, the states,
// the output or the gradients (on this CPU a transpose of one step's state costs a quarter of
// the step's GEMM time, and a layer would need several per step). A step is the depthwise convs
// of X_t and H_{t−1} (per-plane stencils, layer_common.h), the two pointwise GEMMs per sample
// (P·dw(·) on [C, H·W] planes, which BLAS runs at the same rate as a channels-last form), the
// pooled-gate FCs, and one fused loop per (sample, channel) plane that adds b_c, applies tanh,
// updates the cell, writes H_t straight into the output and sums it for the next step's h̄.
// Unlike shared/KERNELS.md's GPU design, the X side is not batched over T before the loop: the
// per-step GEMM already runs at the full matmul rate, and a sequence-sized X-side term costs a
// fresh multi-MB allocation, paid in page faults (measured: a 6.4 MB depthwise output took
// 4.6 ms freshly allocated vs 0.9 ms in reused memory). Everything else lives in step buffers
// reused across steps.
// Parameters and saved tensors: cells.h kPooledLayer (saved: cell C_t and candidate G
// [T, B, C, H, W], NCHW where the CUDA kernels save channels-last, gate_preact [T, B, 3C]).
#include <array>

#include "cpu/pooled_cell.h"

namespace convlstm_fast {
namespace cpu {
namespace {

constexpr const cells::Cell& kCell = cells::kPooledLayer;

LayerResult pooled_layer_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                                 at::TensorList params_in, int64_t gate_activation, bool reverse,
                                 const std::optional<at::Tensor>& lengths, bool save) {
  const std::vector<at::Tensor> params = contiguous_params(params_in);
  const LayerCall call = check_forward(kCell, pooled::kCandDwX, x, h0, c0, params, gate_activation);
  if (call.empty) return empty_layer_result(x, h0, c0, call.saved_shapes);
  const int64_t steps = x.size(0);
  PooledForward<kCell.map_gate()> fwd(x, h0, c0, params, gate_activation, call.saved_shapes,
                                      reverse, lengths, save);
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t t = fwd.walk.time(s);
    fwd.cell_step(t, fwd.frame(t), false, at::Tensor());
  }
  return fwd.result({});
}

// The forward's walk backwards (KERNELS.md "One step, backward"), per step, H_{t−1} and C_{t−1}
// being the previous step's states (step t + 1's in reverse):
//   the fused loop gives dG_pre = dC∘i∘(1 − G²) (the gradient of both SepConvs' sum), dC_{t−1},
//   and per plane Σ di, Σ df, Σ do, Σ dG_pre; dgp = [Σdi, Σdf, Σdo]∘σ'(gate_preact);
//   dH_{t−1} = depthwise_hᵀ(P_hᵀ·dG_pre) + (dgp·U_h)/HW on every pixel (+ dL/dH_{t−1} of the
//   output); dX_t = depthwise_xᵀ(P_xᵀ·dG_pre) + (dgp·U_x)/HW, written straight into grad_x.
// The weight gradients are accumulated step by step in fixed order (deterministic) into
// parameter-sized sums; the depthwise outputs dw_h(H_{t−1}) and dw_x(X_t) are recomputed.
// Nothing sequence-sized is allocated besides grad_x itself.
LayerResult pooled_layer_backward(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                                  const at::Tensor& grad_c_n, const at::Tensor& x,
                                  const at::Tensor& h0, const at::Tensor& c0,
                                  at::TensorList params_in, const at::Tensor& output,
                                  at::TensorList saved, int64_t gate_activation, bool reverse,
                                  const std::optional<at::Tensor>& lengths) {
  const std::vector<at::Tensor> params = contiguous_params(params_in);
  const LayerCall call = check_backward(kCell, pooled::kCandDwX, grad_output, grad_h_n, grad_c_n,
                                        x, h0, c0, params, output, saved, gate_activation);
  if (call.empty) return empty_layer_grads(x, grad_h_n, grad_c_n, params);
  const int64_t steps = x.size(0);
  PooledBackward<kCell.map_gate()> back(grad_output, grad_h_n, grad_c_n, x, h0, c0, params,
                                        output, saved, reverse, lengths);
  for (int64_t done = steps - 1; done >= 0; --done) {
    const int64_t t = back.walk.time(done);
    const auto s = back.step(t);
    const auto held = back.feed(s);
    back.cell_backward(s, gate_activation, at::Tensor(), at::Tensor());
    // dH_{t−1} and dX_t, each with the pooled gates' share as its planes' initial value.
    back.cand_h.load(t, s.h_prev);
    back.cand_h.backward(s.h_prev, back.grad_cand, s.dgp, s.grad_h_out, false);
    back.cand_x.load(t, s.x);
    back.cand_x.backward(s.x, back.grad_cand, s.dgp, back.grad_x[t], false);
    back.pass(s, held);
  }
  return back.result(std::vector<at::Tensor>(kCell.parameters.size));
}

}  // namespace

TORCH_LIBRARY_IMPL(convlstm_fast, CPU, m) {
  register_layer_kernels<pooled_layer_forward>(m, kCell, &pooled_layer_backward);
}

}  // namespace cpu
}  // namespace convlstm_fast
