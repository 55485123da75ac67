// Variants (c) and (d), `convlstm_fast::input_attention_layer` and `output_attention_layer` and
// their backwards, on the CPU (shared/SPEC.md "c", "d"; eqs. 21-23):
//   F = tanh(SepConv_xa(X_t) + SepConv_ha(H_{t−1}) + b_a);  Z = SepConv_z(F)
//   A = exp(Z − max_{h,w} Z)  (per sample and channel: the overflow-free form)
//   c: i = A, [f o] = σ(U_x x̄ + U_h h̄ + b_g);  d: o = A, [i f] = σ(...)
//   G = tanh(SepConv_x(X_t) + SepConv_h(H_{t−1}) + b_c);  C_t = f∘C_{t−1} + i∘G;  H_t = o∘tanh(C_t)
// Structure (shared/KERNELS.md): the X side (both SepConvs and the pooled FC of x̄) for all T
// steps before the recurrence; a step is two depthwise convs of H_{t−1} with their GEMMs, the
// attention (tanh, SepConv_z, exp(Z − max)), the pooled-gate FC and the fused cell loop.
// Saved (native.py SAVED_SPECS["c"/"d"]): cell, candidate [T, B, H, W, C], gate_preact
// [T, B, 2C], attention A [T, B, H, W, C]; F is recomputed for all steps at once in backward.
#include <array>

#include "cpu/pooled_cell.h"

namespace convlstm_fast {
namespace cpu {
namespace {

enum Param {
  kGateWx, kGateWh, kGateBias, kCandDwX, kCandPwX, kCandDwH, kCandPwH, kCandBias,
  kAttDwX, kAttPwX, kAttDwH, kAttPwH, kAttBias, kAttDwZ, kAttPwZ, kNumParams
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
  return {{t, b, h, w, c}, {t, b, h, w, c}, {t, b, 2 * c}, {t, b, h, w, c}};
}

// The gates i, f, o of one step: the attention map A [B, HW, C] in slot kAttention, the two
// pooled gates of `gates` [B, 2C] (in order) in the others.
template <int kAttention, typename scalar_t>
std::array<GateView<scalar_t>, 3> gate_views(const at::Tensor& gates, const at::Tensor& attention,
                                             int64_t pixels, int64_t c) {
  const scalar_t* g = gates.data_ptr<scalar_t>();
  const GateView<scalar_t> map{attention.data_ptr<scalar_t>(), pixels * c, c};
  const GateView<scalar_t> first{g, 2 * c, 0}, second{g + c, 2 * c, 0};
  if (kAttention == 0) return {map, first, second};
  return {first, second, map};
}

// out = exp(z − m) on one row of C channels.
template <typename scalar_t>
CONVLSTM_CPU_MULTIVERSION void exp_shifted_row(int64_t channels, const scalar_t* __restrict__ z,
                                               const scalar_t* __restrict__ m,
                                               scalar_t* __restrict__ out) {
  for (int64_t c = 0; c < channels; ++c) out[c] = math_exp(z[c] - m[c]);
}

// A = exp(Z − max_p Z) per (sample, channel) over the pixels p of z [B, HW, C]. Per-chunk maxima
// go to partials [B, chunks, C] first.
template <typename scalar_t>
void channel_attention_forward(int64_t batch, int64_t pixels, int64_t channels,
                               const scalar_t* z, scalar_t* attention, scalar_t* partials) {
  const int64_t chunks = pixel_chunks(pixels);
  parallel_over_pixels(batch, pixels, [=](int64_t b, int64_t chunk, int64_t begin, int64_t end) {
    scalar_t* __restrict__ m = partials + (b * chunks + chunk) * channels;
    const scalar_t* __restrict__ first = z + (b * pixels + begin) * channels;
    for (int64_t c = 0; c < channels; ++c) m[c] = first[c];
    for (int64_t p = begin + 1; p < end; ++p) {
      const scalar_t* __restrict__ zp = z + (b * pixels + p) * channels;
      for (int64_t c = 0; c < channels; ++c) m[c] = zp[c] > m[c] ? zp[c] : m[c];
    }
  });
  for (int64_t b = 0; b < batch; ++b) {
    scalar_t* m = partials + b * chunks * channels;
    for (int64_t chunk = 1; chunk < chunks; ++chunk) {
      const scalar_t* other = m + chunk * channels;
      for (int64_t c = 0; c < channels; ++c) m[c] = other[c] > m[c] ? other[c] : m[c];
    }
  }
  parallel_over_pixels(batch, pixels, [=](int64_t b, int64_t, int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t row = (b * pixels + p) * channels;
      exp_shifted_row(channels, z + row, partials + b * chunks * channels, attention + row);
    }
  });
}

// Backward of A = exp(Z − m), m = max_p Z (torch.amax's rule: the gradient of m is shared
// equally by the maxima, the positions where A = exp(0) = 1 exactly):
//   dZ_p = dA_p∘A_p − [A_p = 1] · Σ_q (dA_q∘A_q) / #{q : A_q = 1}.
// partials [B, chunks, 2, C] hold per-chunk Σ dA∘A and the tie counts.
template <typename scalar_t>
void channel_attention_backward(int64_t batch, int64_t pixels, int64_t channels,
                                const scalar_t* attention, const scalar_t* grad_attention,
                                scalar_t* grad_z, scalar_t* partials) {
  const int64_t chunks = pixel_chunks(pixels);
  parallel_over_pixels(batch, pixels, [=](int64_t b, int64_t chunk, int64_t begin, int64_t end) {
    scalar_t* __restrict__ sum = partials + (b * chunks + chunk) * 2 * channels;
    scalar_t* __restrict__ ties = sum + channels;
    for (int64_t c = 0; c < channels; ++c) sum[c] = ties[c] = scalar_t(0);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t row = (b * pixels + p) * channels;
      const scalar_t* __restrict__ a = attention + row;
      const scalar_t* __restrict__ da = grad_attention + row;
      scalar_t* __restrict__ dz = grad_z + row;
      for (int64_t c = 0; c < channels; ++c) {
        dz[c] = da[c] * a[c];
        sum[c] += dz[c];
        ties[c] += a[c] == scalar_t(1) ? scalar_t(1) : scalar_t(0);
      }
    }
  });
  for (int64_t b = 0; b < batch; ++b) {
    scalar_t* first = partials + b * chunks * 2 * channels;
    for (int64_t chunk = 1; chunk < chunks; ++chunk) {
      const scalar_t* other = first + chunk * 2 * channels;
      for (int64_t c = 0; c < 2 * channels; ++c) first[c] += other[c];
    }
    for (int64_t c = 0; c < channels; ++c) {
      first[c] = first[channels + c] > 0 ? first[c] / first[channels + c] : scalar_t(0);
    }
  }
  parallel_over_pixels(batch, pixels, [=](int64_t b, int64_t, int64_t begin, int64_t end) {
    const scalar_t* __restrict__ share = partials + b * chunks * 2 * channels;
    for (int64_t p = begin; p < end; ++p) {
      const int64_t row = (b * pixels + p) * channels;
      const scalar_t* __restrict__ a = attention + row;
      scalar_t* __restrict__ dz = grad_z + row;
      for (int64_t c = 0; c < channels; ++c) {
        dz[c] -= a[c] == scalar_t(1) ? share[c] : scalar_t(0);
      }
    }
  });
}

struct Shape {
  int64_t steps, batch, cin, height, width, channels, pixels;
};

Shape shape_of(const at::Tensor& x, const at::Tensor& h0) {
  return {x.size(0), x.size(1), x.size(2), x.size(3), x.size(4), h0.size(1),
          x.size(3) * x.size(4)};
}

template <int kAttention>
LayerResult attention_layer_forward(const at::Tensor& x, const at::Tensor& h0,
                                    const at::Tensor& c0, at::TensorList params_in,
                                    int64_t gate_activation) {
  const char* op = Names<kAttention>::op;
  const std::vector<at::Tensor> params = contiguous_params(params_in);
  const int64_t k = kernel_size_of(op, params, kCandDwX, kNumParams);
  TORCH_CHECK(x.dim() == 5 && h0.dim() == 4, op, ": x must be [T, B, Cin, H, W], h0 [B, C, H, W]");
  check_layer_inputs(op, x, h0, c0, params, param_specs(x.size(2), h0.size(1), k),
                     gate_activation);
  const Shape s = shape_of(x, h0);
  const int64_t c = s.channels, rows_per_step = s.batch * s.pixels;
  const auto shapes = saved_shapes(x, c);
  if (s.steps == 0 || rows_per_step * c == 0 || s.cin == 0) {
    return empty_layer_result(x, h0, c0, shapes);
  }
  const at::Tensor cell = at::empty(shapes[0], x.options());
  const at::Tensor candidate = at::empty(shapes[1], x.options());
  const at::Tensor gate_preact = at::empty(shapes[2], x.options());
  const at::Tensor attention = at::empty(shapes[3], x.options());
  const at::Tensor hidden = at::empty(shapes[0], x.options());

  // X side for all steps: xg = U_x·GAP(X) + b_g; xc = SepConv_x(X); xa = SepConv_xa(X).
  const at::Tensor x_cl = to_channels_last(x.reshape({s.steps * s.batch, s.cin, s.height, s.width}));
  const at::Tensor xg = at::addmm(params[kGateBias], global_average_pool(x_cl),
                                  params[kGateWx].t()).view({s.steps, s.batch, 2 * c});
  const at::Tensor xc = sepconv_rows(x_cl, params[kCandDwX], params[kCandPwX], at::Tensor())
                            .view({s.steps, rows_per_step, c});
  const at::Tensor xa = sepconv_rows(x_cl, params[kAttDwX], params[kAttPwX], at::Tensor())
                            .view({s.steps, rows_per_step, c});

  at::Tensor h_prev = to_channels_last(h0);
  at::Tensor c_prev = to_channels_last(c0);
  const at::Tensor gates = at::empty({s.batch, 2 * c}, x.options());
  at::Tensor candidate_h = at::empty({rows_per_step, c}, x.options());
  at::Tensor attention_h = at::empty({rows_per_step, c}, x.options());
  at::Tensor z = at::empty({rows_per_step, c}, x.options());
  const at::Tensor features = at::empty({s.batch, s.height, s.width, c}, x.options());
  const at::Tensor max_partials = at::empty({s.batch, pixel_chunks(s.pixels), c}, x.options());
  for (int64_t t = 0; t < s.steps; ++t) {
    at::Tensor step_preact = gate_preact[t];
    at::addmm_out(step_preact, xg[t], global_average_pool(h_prev), params[kGateWh].t());
    at::mm_out(candidate_h, rows(conv_same(h_prev, params[kCandDwH], c)), params[kCandPwH].t());
    at::mm_out(attention_h, rows(conv_same(h_prev, params[kAttDwH], c)), params[kAttPwH].t());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "attention_layer", [&] {
      tanh_of_sum<scalar_t>(rows_per_step, c, attention_h.data_ptr<scalar_t>(),
                            xa[t].data_ptr<scalar_t>(), params[kAttBias].data_ptr<scalar_t>(),
                            features.data_ptr<scalar_t>());
    });
    at::mm_out(z, rows(conv_same(features, params[kAttDwZ], c)), params[kAttPwZ].t());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "attention_layer", [&] {
      channel_attention_forward<scalar_t>(s.batch, s.pixels, c, z.data_ptr<scalar_t>(),
                                          attention[t].data_ptr<scalar_t>(),
                                          max_partials.data_ptr<scalar_t>());
      activate_gates(step_preact.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(),
                     gates.numel(), gate_activation);
      const auto views = gate_views<kAttention, scalar_t>(gates, attention[t], s.pixels, c);
      pooled_cell_forward<scalar_t>(
          s.batch, s.pixels, c, candidate_h.data_ptr<scalar_t>(), xc[t].data_ptr<scalar_t>(),
          params[kCandBias].data_ptr<scalar_t>(), views[0], views[1], views[2],
          c_prev.data_ptr<scalar_t>(), candidate[t].data_ptr<scalar_t>(),
          cell[t].data_ptr<scalar_t>(), hidden[t].data_ptr<scalar_t>());
    });
    h_prev = hidden[t];
    c_prev = cell[t];
  }
  const at::Tensor output = from_channels_last(hidden);
  return {output, output[s.steps - 1].clone(), from_channels_last(c_prev),
          {cell, candidate, gate_preact, attention}};
}

// Reverse time, per step: the fused cell loop gives dG_pre (= d xc[t]), dC_{t−1}, dA and the
// pooled-gate sums; then dZ (channel_attention_backward), dF = dwᵀ_z(dZ·P_z), dU = dF∘(1 − F²)
// (= d xa[t]), and dH_{t−1} = dwᵀ_h(dG_pre·P_h) + dwᵀ_ha(dU·P_ha) + (dgp·U_h)/HW.
// F is recomputed for all steps before the loop; the weight gradients are reduced over all
// steps after it.
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
  const Shape s = shape_of(x, h0);
  const int64_t c = s.channels, rows_per_step = s.batch * s.pixels;
  check_backward_inputs(op, grad_output, grad_h_n, grad_c_n, x, h0, output, saved,
                        saved_shapes(x, c));
  if (s.steps == 0 || rows_per_step * c == 0 || s.cin == 0) {
    return empty_layer_grads(x, grad_h_n, grad_c_n, params);
  }
  const int64_t n = s.steps * s.batch;  // samples of the batched (all-steps) calls
  const at::Tensor cell = saved[0].contiguous(), candidate = saved[1].contiguous(),
                   gate_preact = saved[2].contiguous(), attention = saved[3].contiguous();
  const at::Tensor x_cl = to_channels_last(x.reshape({n, s.cin, s.height, s.width}));
  const at::Tensor h_prev_all = at::cat(
      {to_channels_last(h0).unsqueeze(0), to_channels_last(output.narrow(0, 0, s.steps - 1))});
  const at::Tensor h_prev_flat = h_prev_all.view({n, s.height, s.width, c});
  // F for all steps: tanh(SepConv_ha(H_{t−1}) + SepConv_xa(X_t) + b_a) [T, B, H, W, C].
  const at::Tensor att_dw_h_all = conv_same(h_prev_flat, params[kAttDwH], c);
  const at::Tensor attention_h_all = at::mm(rows(att_dw_h_all), params[kAttPwH].t());
  const at::Tensor xa = sepconv_rows(x_cl, params[kAttDwX], params[kAttPwX], at::Tensor());
  const at::Tensor features = at::empty({s.steps, s.batch, s.height, s.width, c}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "attention_layer", [&] {
    tanh_of_sum<scalar_t>(n * s.pixels, c, attention_h_all.data_ptr<scalar_t>(),
                          xa.data_ptr<scalar_t>(), params[kAttBias].data_ptr<scalar_t>(),
                          features.data_ptr<scalar_t>());
  });
  const at::Tensor c0_cl = to_channels_last(c0);
  const at::Tensor grad_out_cl = to_channels_last(grad_output);
  const auto options = x.options();
  const at::Tensor grad_cand_preact = at::empty({s.steps, rows_per_step, c}, options);
  const at::Tensor grad_att_preact = at::empty({s.steps, rows_per_step, c}, options);
  const at::Tensor grad_z = at::empty({s.steps, rows_per_step, c}, options);
  const at::Tensor grad_dw_cand = at::empty({s.steps, rows_per_step, c}, options);
  const at::Tensor grad_dw_att = at::empty({s.steps, rows_per_step, c}, options);
  const at::Tensor grad_dw_z = at::empty({s.steps, rows_per_step, c}, options);
  const at::Tensor grad_gate_preact = at::empty({s.steps, s.batch, 2 * c}, options);
  const at::Tensor grad_attention = at::empty({rows_per_step, c}, options);
  const int64_t chunks = pixel_chunks(s.pixels);
  const at::Tensor partials = at::empty({s.batch, chunks, 3, c}, options);
  const at::Tensor gates = at::empty({s.batch, 2 * c}, options);
  at::Tensor grad_h = to_channels_last(grad_h_n);
  at::Tensor grad_c = to_channels_last(grad_c_n);
  at::Tensor grad_c_prev = at::empty_like(grad_c);
  const std::vector<int> pooled = kAttention == 0 ? std::vector<int>{1, 2} : std::vector<int>{0, 1};
  const auto hw = [&](const at::Tensor& t) { return t.view({s.batch, s.height, s.width, c}); };

  for (int64_t t = s.steps - 1; t >= 0; --t) {
    const at::Tensor c_prev = t > 0 ? cell[t - 1] : c0_cl;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "attention_layer", [&] {
      activate_gates(gate_preact[t].data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(),
                     gates.numel(), gate_activation);
      const auto views = gate_views<kAttention, scalar_t>(gates, attention[t], s.pixels, c);
      pooled_cell_backward<kAttention, scalar_t>(
          s.batch, s.pixels, c, views[0], views[1], views[2], candidate[t].data_ptr<scalar_t>(),
          c_prev.data_ptr<scalar_t>(), cell[t].data_ptr<scalar_t>(),
          grad_out_cl[t].data_ptr<scalar_t>(), grad_h.data_ptr<scalar_t>(),
          grad_c.data_ptr<scalar_t>(), grad_cand_preact[t].data_ptr<scalar_t>(),
          grad_c_prev.data_ptr<scalar_t>(), grad_attention.data_ptr<scalar_t>(),
          partials.data_ptr<scalar_t>());
      pooled_gate_grads<scalar_t>(s.batch, chunks, c, pooled, partials.data_ptr<scalar_t>(),
                                  gate_preact[t].data_ptr<scalar_t>(), gate_activation,
                                  grad_gate_preact[t].data_ptr<scalar_t>());
      channel_attention_backward<scalar_t>(s.batch, s.pixels, c,
                                           attention[t].data_ptr<scalar_t>(),
                                           grad_attention.data_ptr<scalar_t>(),
                                           grad_z[t].data_ptr<scalar_t>(),
                                           partials.data_ptr<scalar_t>());
    });
    std::swap(grad_c, grad_c_prev);
    // Z = dw_z(F)·P_zᵀ: d dw_z(F) = dZ·P_z; dF = dw_zᵀ(·); dU = dF∘(1 − F²).
    at::Tensor grad_dw_z_t = grad_dw_z[t];
    at::mm_out(grad_dw_z_t, grad_z[t], params[kAttPwZ]);
    at::Tensor grad_att_t = grad_att_preact[t];
    grad_att_t.copy_(rows(depthwise_conv(hw(grad_dw_z_t), params[kAttDwZ], true)));
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "attention_layer", [&] {
      tanh_backward_inplace<scalar_t>(rows_per_step, c, features[t].data_ptr<scalar_t>(),
                                      grad_att_t.data_ptr<scalar_t>());
    });
    // dH_{t−1} from the candidate, the attention features and the pooled gates.
    at::Tensor grad_dw_cand_t = grad_dw_cand[t], grad_dw_att_t = grad_dw_att[t];
    at::mm_out(grad_dw_cand_t, grad_cand_preact[t], params[kCandPwH]);
    at::mm_out(grad_dw_att_t, grad_att_t, params[kAttPwH]);
    grad_h = depthwise_conv(hw(grad_dw_cand_t), params[kCandDwH], true);
    grad_h.add_(depthwise_conv(hw(grad_dw_att_t), params[kAttDwH], true));
    grad_h.view({s.batch, s.pixels, c})
        .add_(at::mm(grad_gate_preact[t], params[kGateWh]).div_(s.pixels).unsqueeze(1));
  }

  // Weight gradients, reduced over all steps in batched products.
  const auto flat = [&](const at::Tensor& t) { return t.view({n * s.pixels, c}); };
  const auto flat_hw = [&](const at::Tensor& t) { return t.view({n, s.height, s.width, c}); };
  const at::Tensor grad_gp_flat = grad_gate_preact.view({n, 2 * c});
  const at::Tensor features_flat = flat_hw(features);
  std::vector<at::Tensor> grads(kNumParams);
  grads[kGateWh] = at::mm(grad_gp_flat.t(), global_average_pool(h_prev_flat));
  grads[kGateBias] = grad_gp_flat.sum(0);
  grads[kCandPwH] = at::mm(flat(grad_cand_preact).t(),
                           rows(conv_same(h_prev_flat, params[kCandDwH], c)));
  grads[kCandDwH] = depthwise_conv_weight_grad(flat_hw(grad_dw_cand), h_prev_flat, k);
  grads[kCandBias] = flat(grad_cand_preact).sum(0);
  grads[kAttPwH] = at::mm(flat(grad_att_preact).t(), rows(att_dw_h_all));
  grads[kAttDwH] = depthwise_conv_weight_grad(flat_hw(grad_dw_att), h_prev_flat, k);
  grads[kAttBias] = flat(grad_att_preact).sum(0);
  grads[kAttPwZ] = at::mm(flat(grad_z).t(), rows(conv_same(features_flat, params[kAttDwZ], c)));
  grads[kAttDwZ] = depthwise_conv_weight_grad(flat_hw(grad_dw_z), features_flat, k);
  // X side: backpropagate d xc, d xa and d xg through the batched X-side ops.
  auto cand_x = sepconv_rows_backward(flat(grad_cand_preact), x_cl, params[kCandDwX],
                                      params[kCandPwX], true);
  auto att_x = sepconv_rows_backward(flat(grad_att_preact), x_cl, params[kAttDwX],
                                     params[kAttPwX], true);
  grads[kCandDwX] = std::get<1>(cand_x);
  grads[kCandPwX] = std::get<2>(cand_x);
  grads[kAttDwX] = std::get<1>(att_x);
  grads[kAttPwX] = std::get<2>(att_x);
  grads[kGateWx] = at::mm(grad_gp_flat.t(), global_average_pool(x_cl));
  at::Tensor grad_x_cl = std::get<0>(cand_x).add_(std::get<0>(att_x));
  grad_x_cl.view({n, s.pixels, s.cin})
      .add_(at::mm(grad_gp_flat, params[kGateWx]).div_(s.pixels).unsqueeze(1));
  return {from_channels_last(grad_x_cl).view(x.sizes()), from_channels_last(grad_h),
          from_channels_last(grad_c), grads};
}

}  // namespace

TORCH_LIBRARY_IMPL(convlstm_fast, CPU, m) {
  m.impl("input_attention_layer", &attention_layer_forward<0>);
  m.impl("input_attention_layer_backward", &attention_layer_backward<0>);
  m.impl("output_attention_layer", &attention_layer_forward<2>);
  m.impl("output_attention_layer_backward", &attention_layer_backward<2>);
}

}  // namespace cpu
}  // namespace convlstm_fast
