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
// Saved for backward (native.py NATIVE_SAVED_SPECS["a"]): cell C_t and candidate G [T, B, C, H, W]
// (NCHW, where the CUDA kernels save channels-last: native.py NCHW_SAVED), gate_preact [T, B, 3C].
#include <array>

#include "cpu/pooled_cell.h"

namespace convlstm_fast {
namespace cpu {
namespace {

constexpr const char* kOp = "pooled_layer";
constexpr const char* kBackwardOp = "pooled_layer_backward";

enum Param { kGateWx, kGateWh, kGateBias, kCandDwX, kCandPwX, kCandDwH, kCandPwH, kCandBias };

std::vector<ParamSpec> param_specs(int64_t cin, int64_t c, int64_t k) {
  return {{"gate_weight_x", {3 * c, cin}}, {"gate_weight_h", {3 * c, c}},
          {"gate_bias", {3 * c}},          {"cand_dw_x", {cin, 1, k, k}},
          {"cand_pw_x", {c, cin}},         {"cand_dw_h", {c, 1, k, k}},
          {"cand_pw_h", {c, c}},           {"cand_bias", {c}}};
}

// NCHW, unlike the CUDA kernels' channels-last (native.py NCHW_SAVED).
std::vector<std::vector<int64_t>> saved_shapes(const at::Tensor& x, int64_t c) {
  const int64_t t = x.size(0), b = x.size(1), h = x.size(3), w = x.size(4);
  return {{t, b, c, h, w}, {t, b, c, h, w}, {t, b, 3 * c}};
}

LayerResult pooled_layer_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                                 at::TensorList params_in, int64_t gate_activation, bool save) {
  const std::vector<at::Tensor> params = contiguous_params(params_in);
  const int64_t k = kernel_size_of(kOp, params, kCandDwX, 8);
  TORCH_CHECK(x.dim() == 5 && h0.dim() == 4, kOp, ": x must be [T, B, Cin, H, W], h0 [B, C, H, W]");
  check_layer_inputs(kOp, x, h0, c0, params, param_specs(x.size(2), h0.size(1), k),
                     gate_activation);
  const int64_t steps = x.size(0), batch = x.size(1), cin = x.size(2), height = x.size(3),
                width = x.size(4), channels = h0.size(1), pixels = height * width;
  const at::TensorOptions options = x.options();
  const auto shapes = saved_shapes(x, channels);
  if (steps == 0 || batch * pixels * channels == 0 || cin == 0) {
    return empty_layer_result(x, h0, c0, shapes);
  }
  // Without `save`, C_t in two step buffers (C_{t−1} is read while C_t is written), G in one.
  const StepBuffers cell(shapes[0], options, save, 2);
  const StepBuffers candidate(shapes[1], options, save, 1);
  const at::Tensor gate_preact = at::empty(shapes[2], options);
  const at::Tensor output = at::empty({steps, batch, channels, height, width}, options);
  const at::Tensor x_c = x.contiguous(), h0_c = h0.contiguous(), c0_c = c0.contiguous();
  // Step buffers, reused.
  const at::Tensor dw_x = at::empty({batch, cin, height, width}, options);
  const at::Tensor dw_h = at::empty({batch, channels, height, width}, options);
  const at::Tensor preact = at::empty({batch, channels, height, width}, options);
  const at::Tensor x_bar = at::empty({batch, cin}, options);
  const at::Tensor h_bar = at::empty({batch, channels}, options);
  const at::Tensor gates = at::empty({batch, 3 * channels}, options);
  plane_means(h_bar, h0_c);
  for (int64_t t = 0; t < steps; ++t) {
    const at::Tensor x_t = x_c[t];
    const at::Tensor h_prev = t > 0 ? output[t - 1] : h0_c;
    const at::Tensor c_prev = t > 0 ? cell[t - 1] : c0_c;
    // Gate pre-activations b_g + U_x x̄ + U_h h̄ (h̄ summed by the previous step's loop).
    plane_means(x_bar, x_t);
    at::Tensor step_preact = gate_preact[t];
    pooled_gate_preact(step_preact, params[kGateBias], x_bar, params[kGateWx], h_bar,
                       params[kGateWh]);
    // Candidate pre-activation (b_c is added in the fused loop).
    sepconv_planes(preact, x_t, params[kCandDwX], params[kCandPwX], dw_x, false);
    sepconv_planes(preact, h_prev, params[kCandDwH], params[kCandPwH], dw_h, true);
    gated_planes_step_forward<-1>(step_preact, gate_activation, gates, at::Tensor(), preact,
                                  params[kCandBias], c_prev, candidate[t], cell[t], output[t],
                                  h_bar);
  }
  return {output, output[steps - 1].clone(), cell[steps - 1].clone(),
          {cell.all(), candidate.all(), gate_preact}};
}

// Reverse time (KERNELS.md "One step, backward"), per step:
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
                                  at::TensorList saved, int64_t gate_activation) {
  const std::vector<at::Tensor> params = contiguous_params(params_in);
  const int64_t k = kernel_size_of(kBackwardOp, params, kCandDwX, 8);
  TORCH_CHECK(x.dim() == 5 && h0.dim() == 4, kBackwardOp,
              ": x must be [T, B, Cin, H, W], h0 [B, C, H, W]");
  check_layer_inputs(kBackwardOp, x, h0, c0, params, param_specs(x.size(2), h0.size(1), k),
                     gate_activation);
  const int64_t steps = x.size(0), batch = x.size(1), cin = x.size(2), height = x.size(3),
                width = x.size(4), channels = h0.size(1), pixels = height * width;
  check_backward_inputs(kBackwardOp, grad_output, grad_h_n, grad_c_n, x, h0, output, saved,
                        saved_shapes(x, channels));
  if (steps == 0 || batch * pixels * channels == 0 || cin == 0) {
    return empty_layer_grads(x, grad_h_n, grad_c_n, params);
  }
  const at::TensorOptions options = x.options();
  const at::Tensor cell = saved[0].contiguous(), candidate = saved[1].contiguous();
  const at::Tensor gate_preact = saved[2].contiguous();
  const at::Tensor x_c = x.contiguous(), h0_c = h0.contiguous(), c0_c = c0.contiguous();
  const at::Tensor output_c = output.contiguous(), grad_output_c = grad_output.contiguous();

  // Step buffers, reused.
  const at::Tensor grad_cand = at::empty({batch, channels, height, width}, options);
  const at::Tensor sums = at::empty({batch, channels, 4}, options);
  const at::Tensor gates = at::empty({batch, 3 * channels}, options);
  // The pooled gates' pre-activation gradients of every step (dU is reduced after the loop).
  const at::Tensor grad_gate_preact = at::empty({steps, batch, 3 * channels}, options);
  const at::Tensor grad_cand_bias = at::zeros({channels}, options);
  SepConvBranch h_side(params[kCandDwH], params[kCandPwH], params[kGateWh], h0_c, steps);
  SepConvBranch x_side(params[kCandDwX], params[kCandPwX], params[kGateWx], x_c[0], steps);

  const at::Tensor grad_x = at::empty(x.sizes(), options);
  // dL/dH and dL/dC flowing back to step t − 1, each through two buffers: this step reads one
  // and writes the other.
  std::array<at::Tensor, 2> grad_h{at::empty_like(h0_c).copy_(grad_h_n), at::empty_like(h0_c)};
  std::array<at::Tensor, 2> grad_c{at::empty_like(c0_c).copy_(grad_c_n), at::empty_like(c0_c)};

  for (int64_t t = steps - 1; t >= 0; --t) {
    const int64_t in = (steps - 1 - t) % 2, out = 1 - in;
    const at::Tensor c_prev = t > 0 ? cell[t - 1] : c0_c;
    const at::Tensor h_prev = t > 0 ? output_c[t - 1] : h0_c;
    const at::Tensor x_t = x_c[t];
    const at::Tensor dgp = grad_gate_preact[t];
    gated_planes_step_backward<-1>(gate_preact[t], gate_activation, gates, sums, at::Tensor(),
                                   candidate[t], c_prev, cell[t], grad_output_c[t], grad_h[in],
                                   grad_c[in], grad_cand, grad_c[out], at::Tensor(), dgp,
                                   grad_cand_bias);

    // dH_{t−1} and dX_t, each with the pooled gates' share as its planes' initial value.
    h_side.load(t, h_prev);
    h_side.backward(h_prev, grad_cand, dgp, grad_h[out], false);
    x_side.load(t, x_t);
    x_side.backward(x_t, grad_cand, dgp, grad_x[t], false);
  }

  const int64_t last = steps % 2;  // the buffers holding dL/dH_0 and dL/dC_0
  const at::Tensor grad_gp_flat = grad_gate_preact.view({steps * batch, 3 * channels});
  std::vector<at::Tensor> grad_params{
      at::mm(grad_gp_flat.t(), x_side.bars.view({steps * batch, cin})),
      at::mm(grad_gp_flat.t(), h_side.bars.view({steps * batch, channels})),
      grad_gp_flat.sum(0),
      x_side.grad_depthwise,
      x_side.grad_pointwise,
      h_side.grad_depthwise,
      h_side.grad_pointwise,
      grad_cand_bias};
  return {grad_x, grad_h[last], grad_c[last], grad_params};
}

}  // namespace

TORCH_LIBRARY_IMPL(convlstm_fast, CPU, m) {
  m.impl("pooled_layer", &training_forward<pooled_layer_forward>);
  m.impl("pooled_layer_inference", &inference_forward<pooled_layer_forward>);
  m.impl("pooled_layer_backward", &pooled_layer_backward);
}

}  // namespace cpu
}  // namespace convlstm_fast
