// The channel-attention cells c and d on the CPU (shared/SPEC.md "c", "d"; eqs. 21-23), shared
// by their op files input_attention_layer_kernel.cpp (c) and output_attention_layer_kernel.cpp
// (d), which differ only in the gate the map A replaces (cells.h Cell::map_gate):
//   F = tanh(SepConv_xa(X_t) + SepConv_ha(H_{t−1}) + b_a);  Z = SepConv_z(F)
//   A = exp(Z − max_{h,w} Z)  (per sample and channel: the overflow-free form)
//   c: i = A, [f o] = σ(U_x x̄ + U_h h̄ + b_g);  d: o = A, [i f] = σ(...)
//   G = tanh(SepConv_x(X_t) + SepConv_h(H_{t−1}) + b_c);  C_t = f∘C_{t−1} + i∘G;  H_t = o∘tanh(C_t)
// Structure: variant a's (pooled_layer_kernel.cpp) — everything in the op's own NCHW layout, a
// step at a time through step buffers reused across steps: per-plane depthwise stencils,
// per-sample pointwise GEMMs, and the fused per-plane loops of pooled_cell.h, here with the
// map A as one of the gates. A is a per-(sample, channel) plane operation (a max and an exp over
// the plane), and so is its backward, which the fused backward loop does in place.
// Parameters and saved tensors: cells.h cells::channel_attention (saved: cell, candidate and the
// map A [T, B, C, H, W], NCHW where the CUDA kernels save channels-last, gate_preact [T, B, 2C]);
// F and the depthwise outputs are recomputed step by step in backward.
#pragma once

#include <array>
#include <limits>
#include <string>

#include "cpu/pooled_cell.h"

namespace convlstm_fast {
namespace cpu {

namespace channel = cells::channel_attention;

// One plane: out = exp(z − max z). The max keeps NaN, as torch.amax does, so a NaN logit makes
// the whole plane NaN: a NaN m stays (both tests fail), a NaN z[e] is taken (z[e] != z[e]);
// `z[e] > m ? z[e] : m` alone would step over every NaN but a first one.
// out = 1 exactly at the maxima z = m only: the backward (gated_plane_backward) finds them, for
// torch.amax's gradient, as the elements with A = 1. A z less than half an ulp of 1 below m
// (z − m > −2^-25 for float, as is common when the logits are tiny) would round to 1 too and
// take a share of the max's gradient; it gets the number just below 1 instead, an error under
// one ulp.
template <typename scalar_t>
CONVLSTM_CPU_MULTIVERSION void exp_minus_max_plane(int64_t n, const scalar_t* __restrict__ z,
                                                   scalar_t* __restrict__ out) {
  constexpr scalar_t below_one = scalar_t(1) - std::numeric_limits<scalar_t>::epsilon() / 2;
  scalar_t m = z[0];
  for (int64_t e = 1; e < n; ++e) m = (z[e] > m || z[e] != z[e]) ? z[e] : m;
  for (int64_t e = 0; e < n; ++e) {
    const scalar_t a = math_exp(scalar_t(z[e] - m));
    out[e] = (z[e] != m && a > below_one) ? below_one : a;
  }
}

// The map A = exp(Z − max_HW Z) for every plane of the logits Z [B, C, H, W].
inline void channel_map(const at::Tensor& map, const at::Tensor& logits) {
  const int64_t channels = logits.size(1), pixels = logits.size(2) * logits.size(3);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "channel_map", [&] {
    const scalar_t* in = logits.data_ptr<scalar_t>();
    scalar_t* a = map.data_ptr<scalar_t>();
    parallel_over_planes(logits.size(0), channels, [&](int64_t b, int64_t c) {
      const int64_t offset = (b * channels + c) * pixels;
      exp_minus_max_plane(pixels, in + offset, a + offset);
    });
  });
}

template <const cells::Cell& kCell>
LayerResult channel_attention_forward(const at::Tensor& x, const at::Tensor& h0,
                                      const at::Tensor& c0, at::TensorList params_in,
                                      int64_t gate_activation, bool reverse,
                                      const std::optional<at::Tensor>& lengths, bool save) {
  const std::vector<at::Tensor> params = contiguous_params(params_in);
  const LayerCall call = check_forward(kCell, pooled::kCandDwX, x, h0, c0, params, gate_activation);
  const auto& shapes = call.saved_shapes;
  if (call.empty) return empty_layer_result(x, h0, c0, shapes);
  const int64_t steps = x.size(0), batch = x.size(1), height = x.size(3), width = x.size(4),
                c = h0.size(1);
  const at::TensorOptions options = x.options();
  PooledForward<kCell.map_gate()> fwd(x, h0, c0, params, gate_activation, shapes, reverse,
                                      lengths, save);
  // Without `save`, A in one step buffer.
  const StepBuffers map(shapes[channel::kSavedMap], options, save, 1);
  const at::Tensor attention_pointwise =
      at::cat({params[attention::kAttPwX], params[attention::kAttPwH]}, 1);
  // Step buffers, reused.
  const at::Tensor features = at::empty({batch, c, height, width}, options);
  const at::Tensor dw_z = at::empty({batch, c, height, width}, options);
  const at::Tensor logits = at::empty({batch, c, height, width}, options);
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t t = fwd.walk.time(s);
    // Attention: F, Z = SepConv_z(F), A = exp(Z − max Z); then the cell with A as a gate.
    fwd.sepconvs(t, features, params[attention::kAttDwX], params[attention::kAttDwH],
                 attention_pointwise);
    attention_features(features, params[attention::kAttBias]);
    sepconv_planes(logits, features, params[channel::kAttDwZ], params[channel::kAttPwZ], dw_z,
                   false);
    channel_map(map[t], logits);
    fwd.cell_step(t, fwd.frame(t), false, map[t]);
  }
  return fwd.result({map.all()});
}

// The forward's walk backwards, per step (H_{t−1} the previous step's): F and the depthwise
// outputs recomputed, then
//   the fused cell loop gives dG_pre, dC_{t−1}, the pooled gates' dgp and, through
//   A = exp(Z − max Z), dZ;  dF = dw_zᵀ(P_zᵀ·dZ);  dF_pre = dF∘(1 − F²);
//   dX_t = dw_xaᵀ(P_xaᵀ·dF_pre) + dw_xᵀ(P_xᵀ·dG_pre) + (dgp·U_x)/HW;
//   dH_{t−1} = dw_hᵀ(P_hᵀ·dG_pre) + dw_haᵀ(P_haᵀ·dF_pre) + (dgp·U_h)/HW.
// Weight gradients accumulate step by step in fixed order (deterministic); nothing
// sequence-sized is allocated besides grad_x.
template <const cells::Cell& kCell>
LayerResult channel_attention_backward(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                                       const at::Tensor& grad_c_n, const at::Tensor& x,
                                       const at::Tensor& h0, const at::Tensor& c0,
                                       at::TensorList params_in, const at::Tensor& output,
                                       at::TensorList saved, int64_t gate_activation,
                                       bool reverse,
                                       const std::optional<at::Tensor>& lengths) {
  const std::vector<at::Tensor> params = contiguous_params(params_in);
  const LayerCall call = check_backward(kCell, pooled::kCandDwX, grad_output, grad_h_n, grad_c_n,
                                        x, h0, c0, params, output, saved, gate_activation);
  if (call.empty) return empty_layer_grads(x, grad_h_n, grad_c_n, params);
  const int64_t steps = x.size(0), batch = x.size(1), height = x.size(3), width = x.size(4),
                c = h0.size(1);
  const at::TensorOptions options = x.options();
  PooledBackward<kCell.map_gate()> back(grad_output, grad_h_n, grad_c_n, x, h0, c0, params,
                                        output, saved, reverse, lengths);
  const at::Tensor map = saved[channel::kSavedMap].contiguous();
  AttentionFeaturesBackward att_f(params[attention::kAttDwX], params[attention::kAttPwX],
                                  params[attention::kAttDwH], params[attention::kAttPwH],
                                  params[attention::kAttBias], back.frames(0), back.h0,
                                  steps);
  SepConvBranch sepconv_z(params[channel::kAttDwZ], params[channel::kAttPwZ], at::Tensor(),
                          back.h0, steps);
  // Step buffers, reused.
  const at::Tensor features = at::empty({batch, c, height, width}, options);
  const at::Tensor grad_features = at::empty({batch, c, height, width}, options);
  const at::Tensor grad_z = at::empty({batch, c, height, width}, options);

  for (int64_t done = steps - 1; done >= 0; --done) {
    const int64_t t = back.walk.time(done);
    const auto s = back.step(t);
    const auto held = back.feed(s);
    att_f.recompute(t, s.x, s.h_prev, features);
    sepconv_z.load(t, features);
    back.cand_x.load(t, s.x);
    back.cand_h.load(t, s.h_prev);
    back.cell_backward(s, gate_activation, map[t], grad_z);
    // Through Z = SepConv_z(F) to dF.
    sepconv_z.backward(features, grad_z, at::Tensor(), grad_features, false);
    // dX_t and dH_{t−1}: the candidate's share with the pooled gates' as the planes' initial
    // value, then the attention features'.
    const at::Tensor grad_x_t = back.grad_x[t];
    back.cand_x.backward(s.x, back.grad_cand, s.dgp, grad_x_t, false);
    back.cand_h.backward(s.h_prev, back.grad_cand, s.dgp, s.grad_h_out, false);
    att_f.backward(s.x, s.h_prev, features, grad_features, grad_x_t, s.grad_h_out);
    back.pass(s, held);
  }

  std::vector<at::Tensor> grads(kCell.parameters.size);
  att_f.gradients(grads);
  grads[channel::kAttDwZ] = sepconv_z.grad_depthwise;
  grads[channel::kAttPwZ] = sepconv_z.grad_pointwise;
  return back.result(std::move(grads));
}

}  // namespace cpu
}  // namespace convlstm_fast
