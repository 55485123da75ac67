// Variants (c) and (d), `convlstm_fast::input_attention_layer` and `output_attention_layer` and
// their backwards, on the CPU (shared/SPEC.md "c", "d"; eqs. 21-23):
//   F = tanh(SepConv_xa(X_t) + SepConv_ha(H_{t−1}) + b_a);  Z = SepConv_z(F)
//   A = exp(Z − max_{h,w} Z)  (per sample and channel: the overflow-free form)
//   c: i = A, [f o] = σ(U_x x̄ + U_h h̄ + b_g);  d: o = A, [i f] = σ(...)
//   G = tanh(SepConv_x(X_t) + SepConv_h(H_{t−1}) + b_c);  C_t = f∘C_{t−1} + i∘G;  H_t = o∘tanh(C_t)
// Structure: variant a's (pooled_layer_kernel.cpp) — everything in the op's own NCHW layout, a
// step at a time through step buffers reused across steps: per-plane depthwise stencils,
// per-sample pointwise GEMMs, and the fused per-plane loops of pooled_cell.h, here with the
// attention map as one of the gates. A is a per-(sample, channel) plane operation (a max and an
// exp over the plane), and so is its backward, which the fused backward loop does in place.
// Saved (native.py NATIVE_SAVED_SPECS["c"/"d"]): cell, candidate and attention A
// [T, B, C, H, W] (NCHW: native.py NCHW_SAVED), gate_preact [T, B, 2C]; F and the depthwise
// outputs are recomputed step by step in backward.
#include <array>
#include <limits>

#include "cpu/pooled_cell.h"

namespace convlstm_fast {
namespace cpu {
namespace {

enum Param {
  kAttDwX = kPooledParams, kAttPwX, kAttDwH, kAttPwH, kAttBias, kAttDwZ, kAttPwZ, kNumParams
};

// kAttention: which gate is the attention map (0: input gate, variant c; 2: output gate, d).
template <int kAttention>
struct Names {
  static constexpr const char* op =
      kAttention == 0 ? "input_attention_layer" : "output_attention_layer";
  static constexpr const char* backward =
      kAttention == 0 ? "input_attention_layer_backward" : "output_attention_layer_backward";
};

std::vector<ParamSpec> param_specs(int64_t cin, int64_t c, int64_t k) {
  return {{"gate_weight_x", {2 * c, cin}}, {"gate_weight_h", {2 * c, c}},
          {"gate_bias", {2 * c}},          {"cand_dw_x", {cin, 1, k, k}},
          {"cand_pw_x", {c, cin}},         {"cand_dw_h", {c, 1, k, k}},
          {"cand_pw_h", {c, c}},           {"cand_bias", {c}},
          {"att_dw_x", {cin, 1, k, k}},    {"att_pw_x", {c, cin}},
          {"att_dw_h", {c, 1, k, k}},      {"att_pw_h", {c, c}},
          {"att_bias", {c}},               {"att_dw_z", {c, 1, k, k}},
          {"att_pw_z", {c, c}}};
}

std::vector<std::vector<int64_t>> saved_shapes(const at::Tensor& x, int64_t c) {
  const int64_t t = x.size(0), b = x.size(1), h = x.size(3), w = x.size(4);
  return {{t, b, c, h, w}, {t, b, c, h, w}, {t, b, 2 * c}, {t, b, c, h, w}};
}

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

// A = exp(Z − max_HW Z) for every plane of z [B, C, H, W].
void channel_attention(const at::Tensor& out, const at::Tensor& z) {
  const int64_t channels = z.size(1), pixels = z.size(2) * z.size(3);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "channel_attention", [&] {
    const scalar_t* in = z.data_ptr<scalar_t>();
    scalar_t* a = out.data_ptr<scalar_t>();
    parallel_over_planes(z.size(0), channels, [&](int64_t b, int64_t c) {
      const int64_t offset = (b * channels + c) * pixels;
      exp_minus_max_plane(pixels, in + offset, a + offset);
    });
  });
}

template <int kAttention>
LayerResult attention_layer_forward(const at::Tensor& x, const at::Tensor& h0,
                                    const at::Tensor& c0, at::TensorList params_in,
                                    int64_t gate_activation, bool save) {
  const char* op = Names<kAttention>::op;
  const std::vector<at::Tensor> params = contiguous_params(params_in);
  const int64_t k = kernel_size_of(op, params, kCandDwX, kNumParams);
  TORCH_CHECK(x.dim() == 5 && h0.dim() == 4, op, ": x must be [T, B, Cin, H, W], h0 [B, C, H, W]");
  check_layer_inputs(op, x, h0, c0, params, param_specs(x.size(2), h0.size(1), k),
                     gate_activation);
  const int64_t steps = x.size(0), batch = x.size(1), cin = x.size(2), height = x.size(3),
                width = x.size(4), c = h0.size(1);
  const auto shapes = saved_shapes(x, c);
  if (steps == 0 || batch * height * width * c == 0 || cin == 0) {
    return empty_layer_result(x, h0, c0, shapes);
  }
  const at::TensorOptions options = x.options();
  PooledForward<kAttention> fwd(x, h0, c0, params, gate_activation, shapes, save);
  // Without `save`, A in one step buffer.
  const StepBuffers attention(shapes[3], options, save, 1);
  // Step buffers, reused.
  const at::Tensor features = at::empty({batch, c, height, width}, options);
  const at::Tensor dw_z = at::empty({batch, c, height, width}, options);
  const at::Tensor z = at::empty({batch, c, height, width}, options);
  for (int64_t t = 0; t < steps; ++t) {
    // Attention: F, Z = SepConv_z(F), A = exp(Z − max Z); then the cell with A as a gate.
    fwd.sepconvs(t, features, params[kAttDwX], params[kAttPwX], params[kAttDwH],
                 params[kAttPwH]);
    attention_features(features, params[kAttBias]);
    sepconv_planes(z, features, params[kAttDwZ], params[kAttPwZ], dw_z, false);
    channel_attention(attention[t], z);
    fwd.cell_step(t, fwd.x[t], false, attention[t]);
  }
  return fwd.result({attention.all()});
}

// Reverse time, per step: F and the depthwise outputs recomputed, then
//   the fused cell loop gives dG_pre, dC_{t−1}, the pooled gates' dgp and, through
//   A = exp(Z − max Z), dZ;  dF = dw_zᵀ(P_zᵀ·dZ);  dF_pre = dF∘(1 − F²);
//   dX_t = dw_xaᵀ(P_xaᵀ·dF_pre) + dw_xᵀ(P_xᵀ·dG_pre) + (dgp·U_x)/HW;
//   dH_{t−1} = dw_hᵀ(P_hᵀ·dG_pre) + dw_haᵀ(P_haᵀ·dF_pre) + (dgp·U_h)/HW.
// Weight gradients accumulate step by step in fixed order (deterministic); nothing
// sequence-sized is allocated besides grad_x.
template <int kAttention>
LayerResult attention_layer_backward(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                                     const at::Tensor& grad_c_n, const at::Tensor& x,
                                     const at::Tensor& h0, const at::Tensor& c0,
                                     at::TensorList params_in, const at::Tensor& output,
                                     at::TensorList saved, int64_t gate_activation) {
  const char* op = Names<kAttention>::backward;
  const std::vector<at::Tensor> params = contiguous_params(params_in);
  const int64_t k = kernel_size_of(op, params, kCandDwX, kNumParams);
  TORCH_CHECK(x.dim() == 5 && h0.dim() == 4, op, ": x must be [T, B, Cin, H, W], h0 [B, C, H, W]");
  check_layer_inputs(op, x, h0, c0, params, param_specs(x.size(2), h0.size(1), k),
                     gate_activation);
  const int64_t steps = x.size(0), batch = x.size(1), cin = x.size(2), height = x.size(3),
                width = x.size(4), c = h0.size(1);
  check_backward_inputs(op, grad_output, grad_h_n, grad_c_n, x, h0, output, saved,
                        saved_shapes(x, c));
  if (steps == 0 || batch * height * width * c == 0 || cin == 0) {
    return empty_layer_grads(x, grad_h_n, grad_c_n, params);
  }
  const at::TensorOptions options = x.options();
  PooledBackward<kAttention> back(grad_output, grad_h_n, grad_c_n, x, h0, c0, params, output,
                                  saved);
  const at::Tensor attention = saved[3].contiguous();
  AttentionFeaturesBackward att_f(params[kAttDwX], params[kAttPwX], params[kAttDwH],
                                  params[kAttPwH], params[kAttBias], back.x[0], back.h0, steps);
  SepConvBranch att_z(params[kAttDwZ], params[kAttPwZ], at::Tensor(), back.h0, steps);
  // Step buffers, reused.
  const at::Tensor features = at::empty({batch, c, height, width}, options);
  const at::Tensor grad_features = at::empty({batch, c, height, width}, options);
  const at::Tensor grad_z = at::empty({batch, c, height, width}, options);

  for (int64_t t = steps - 1; t >= 0; --t) {
    const auto s = back.step(t);
    att_f.recompute(t, s.x, s.h_prev, features);
    att_z.load(t, features);
    back.cand_x.load(t, s.x);
    back.cand_h.load(t, s.h_prev);
    back.cell_backward(s, gate_activation, attention[t], grad_z);
    // Through Z = SepConv_z(F) to dF.
    att_z.backward(features, grad_z, at::Tensor(), grad_features, false);
    // dX_t and dH_{t−1}: the candidate's share with the pooled gates' as the planes' initial
    // value, then the attention features'.
    const at::Tensor grad_x_t = back.grad_x[t];
    back.cand_x.backward(s.x, back.grad_cand, s.dgp, grad_x_t, false);
    back.cand_h.backward(s.h_prev, back.grad_cand, s.dgp, s.grad_h_out, false);
    att_f.backward(s.x, s.h_prev, features, grad_features, grad_x_t, s.grad_h_out);
  }

  std::vector<at::Tensor> grads(kNumParams);
  grads[kAttDwX] = att_f.x.grad_depthwise;
  grads[kAttPwX] = att_f.x.grad_pointwise;
  grads[kAttDwH] = att_f.h.grad_depthwise;
  grads[kAttPwH] = att_f.h.grad_pointwise;
  grads[kAttBias] = att_f.grad_bias;
  grads[kAttDwZ] = att_z.grad_depthwise;
  grads[kAttPwZ] = att_z.grad_pointwise;
  return back.result(std::move(grads));
}

}  // namespace

TORCH_LIBRARY_IMPL(convlstm_fast, CPU, m) {
  m.impl("input_attention_layer", &training_forward<attention_layer_forward<0>>);
  m.impl("input_attention_layer_inference", &inference_forward<attention_layer_forward<0>>);
  m.impl("input_attention_layer_backward", &attention_layer_backward<0>);
  m.impl("output_attention_layer", &training_forward<attention_layer_forward<2>>);
  m.impl("output_attention_layer_inference", &inference_forward<attention_layer_forward<2>>);
  m.impl("output_attention_layer_backward", &attention_layer_backward<2>);
}

}  // namespace cpu
}  // namespace convlstm_fast
