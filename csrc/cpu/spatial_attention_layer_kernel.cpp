// Variant (b), `convlstm_fast::spatial_attention_layer` and its backward, on the CPU
// (shared/SPEC.md "b", eqs. 17-19):
//   F = tanh(SepConv_xa(X_t) + SepConv_ha(H_{t−1}) + b_a);  Z = W_z * F  (K×K conv, C → 1)
//   A = softmax of Z over the H·W positions of each sample;  X̃ = A∘X_t
//   then cell (a) on X̃: [i f o] = σ(U_x GAP(X̃) + U_h GAP(H_{t−1}) + b_g),
//   G = tanh(SepConv_x(X̃) + SepConv_h(H_{t−1}) + b_c), C_t = f∘C_{t−1} + i∘G, H_t = o∘tanh(C_t)
// X̃ depends on H_{t−1}, so only SepConv_xa(X) is computed for all steps before the recurrence
// (KERNELS.md "b"); the candidate's X-side SepConv and GAP(X̃) run inside each step.
// Saved (native.py SAVED_SPECS["b"]): cell, candidate [T, B, H, W, C], gate_preact [T, B, 3C],
// attention A [T, B, H, W]; F and X̃ are recomputed for all steps at once in backward.
#include <array>

#include "cpu/pooled_cell.h"

namespace convlstm_fast {
namespace cpu {
namespace {

constexpr const char* kOp = "spatial_attention_layer";
constexpr const char* kBackwardOp = "spatial_attention_layer_backward";

enum Param {
  kGateWx, kGateWh, kGateBias, kCandDwX, kCandPwX, kCandDwH, kCandPwH, kCandBias,
  kAttDwX, kAttPwX, kAttDwH, kAttPwH, kAttBias, kAttWz, kNumParams
};

std::vector<ParamSpec> param_specs(int64_t cin, int64_t c, int64_t k) {
  return {{"gate_weight_x", {3 * c, cin}}, {"gate_weight_h", {3 * c, c}},
          {"gate_bias", {3 * c}},          {"cand_dw_x", {cin, 1, k, k}},
          {"cand_pw_x", {c, cin}},         {"cand_dw_h", {c, 1, k, k}},
          {"cand_pw_h", {c, c}},           {"cand_bias", {c}},
          {"att_dw_x", {cin, 1, k, k}},    {"att_pw_x", {c, cin}},
          {"att_dw_h", {c, 1, k, k}},      {"att_pw_h", {c, c}},
          {"att_bias", {c}},               {"att_weight_z", {1, c, k, k}}};
}

std::vector<std::vector<int64_t>> saved_shapes(const at::Tensor& x, int64_t c) {
  const int64_t t = x.size(0), b = x.size(1), h = x.size(3), w = x.size(4);
  return {{t, b, h, w, c}, {t, b, h, w, c}, {t, b, 3 * c}, {t, b, h, w}};
}

template <typename scalar_t>
std::array<GateView<scalar_t>, 3> pooled_views(const at::Tensor& gates, int64_t c) {
  const scalar_t* g = gates.data_ptr<scalar_t>();
  return {GateView<scalar_t>{g, 3 * c, 0}, GateView<scalar_t>{g + c, 3 * c, 0},
          GateView<scalar_t>{g + 2 * c, 3 * c, 0}};
}

LayerResult spatial_attention_layer_forward(const at::Tensor& x, const at::Tensor& h0,
                                            const at::Tensor& c0, at::TensorList params_in,
                                            int64_t gate_activation) {
  const std::vector<at::Tensor> params = contiguous_params(params_in);
  const int64_t k = kernel_size_of(kOp, params, kCandDwX, kNumParams);
  TORCH_CHECK(x.dim() == 5 && h0.dim() == 4, kOp, ": x must be [T, B, Cin, H, W], h0 [B, C, H, W]");
  check_layer_inputs(kOp, x, h0, c0, params, param_specs(x.size(2), h0.size(1), k),
                     gate_activation);
  const int64_t steps = x.size(0), batch = x.size(1), cin = x.size(2), height = x.size(3),
                width = x.size(4), c = h0.size(1), pixels = height * width;
  const int64_t rows_per_step = batch * pixels;
  const auto shapes = saved_shapes(x, c);
  if (steps == 0 || rows_per_step * c == 0 || cin == 0) {
    return empty_layer_result(x, h0, c0, shapes);
  }
  const at::Tensor cell = at::empty(shapes[0], x.options());
  const at::Tensor candidate = at::empty(shapes[1], x.options());
  const at::Tensor gate_preact = at::empty(shapes[2], x.options());
  const at::Tensor attention = at::empty(shapes[3], x.options());
  const at::Tensor hidden = at::empty(shapes[0], x.options());

  // X side for all steps: xa = SepConv_xa(X) [T, B·HW, C] (the rest sees X̃, known per step).
  const at::Tensor x_cl = to_channels_last(x.reshape({steps * batch, cin, height, width}))
                              .view({steps, batch, height, width, cin});
  const at::Tensor xa = sepconv_rows(x_cl.view({steps * batch, height, width, cin}),
                                     params[kAttDwX], params[kAttPwX], at::Tensor())
                            .view({steps, rows_per_step, c});

  at::Tensor h_prev = to_channels_last(h0);
  at::Tensor c_prev = to_channels_last(c0);
  const at::Tensor gates = at::empty({batch, 3 * c}, x.options());
  at::Tensor candidate_h = at::empty({rows_per_step, c}, x.options());
  at::Tensor attention_h = at::empty({rows_per_step, c}, x.options());
  const at::Tensor features = at::empty({batch, height, width, c}, x.options());
  for (int64_t t = 0; t < steps; ++t) {
    // Attention: F, Z = W_z * F, A = softmax_HW(Z), X̃ = A∘X_t.
    at::mm_out(attention_h, rows(conv_same(h_prev, params[kAttDwH], c)), params[kAttPwH].t());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), kOp, [&] {
      tanh_of_sum<scalar_t>(rows_per_step, c, attention_h.data_ptr<scalar_t>(),
                            xa[t].data_ptr<scalar_t>(), params[kAttBias].data_ptr<scalar_t>(),
                            features.data_ptr<scalar_t>());
    });
    const at::Tensor z = conv_same(features, params[kAttWz], 1).view({batch, pixels});
    at::Tensor step_attention = attention[t].view({batch, pixels});
    at::_softmax_out(step_attention, z, 1, false);
    const at::Tensor x_att = x_cl[t] * attention[t].unsqueeze(-1);
    // Gates σ(U_x GAP(X̃) + b_g + U_h GAP(H_{t−1})) and the candidate's two SepConv terms.
    at::Tensor step_preact = gate_preact[t];
    at::addmm_out(step_preact, params[kGateBias], global_average_pool(x_att),
                  params[kGateWx].t());
    step_preact.addmm_(global_average_pool(h_prev), params[kGateWh].t());
    const at::Tensor candidate_x =
        sepconv_rows(x_att, params[kCandDwX], params[kCandPwX], at::Tensor());
    at::mm_out(candidate_h, rows(conv_same(h_prev, params[kCandDwH], c)), params[kCandPwH].t());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), kOp, [&] {
      activate_gates(step_preact.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(),
                     gates.numel(), gate_activation);
      const auto views = pooled_views<scalar_t>(gates, c);
      pooled_cell_forward<scalar_t>(
          batch, pixels, c, candidate_h.data_ptr<scalar_t>(), candidate_x.data_ptr<scalar_t>(),
          params[kCandBias].data_ptr<scalar_t>(), views[0], views[1], views[2],
          c_prev.data_ptr<scalar_t>(), candidate[t].data_ptr<scalar_t>(),
          cell[t].data_ptr<scalar_t>(), hidden[t].data_ptr<scalar_t>());
    });
    h_prev = hidden[t];
    c_prev = cell[t];
  }
  const at::Tensor output = from_channels_last(hidden);
  return {output, output[steps - 1].clone(), from_channels_last(c_prev),
          {cell, candidate, gate_preact, attention}};
}

// Reverse time, per step: the fused cell loop gives dG_pre and the pooled-gate sums (dgp); then
//   dX̃ = dw_xᵀ(dG_pre·P_x) + (dgp·U_x)/HW;  dX_t = A∘dX̃;  dA_p = Σ_cin dX̃_p∘X_p
//   dZ = A∘(dA − Σ_p A_p dA_p)  (softmax);  dF = W_zᵀ ⋆ dZ;  dU = dF∘(1 − F²)
//   dH_{t−1} = dw_hᵀ(dG_pre·P_h) + dw_haᵀ(dU·P_ha) + (dgp·U_h)/HW.
// F and X̃ are recomputed for all steps before the loop; weight gradients are reduced over all
// steps after it.
LayerResult spatial_attention_layer_backward(const at::Tensor& grad_output,
                                             const at::Tensor& grad_h_n,
                                             const at::Tensor& grad_c_n, const at::Tensor& x,
                                             const at::Tensor& h0, const at::Tensor& c0,
                                             at::TensorList params_in, const at::Tensor& output,
                                             at::TensorList saved, int64_t gate_activation) {
  const std::vector<at::Tensor> params = contiguous_params(params_in);
  const int64_t k = kernel_size_of(kBackwardOp, params, kCandDwX, kNumParams);
  TORCH_CHECK(x.dim() == 5 && h0.dim() == 4, kBackwardOp,
              ": x must be [T, B, Cin, H, W], h0 [B, C, H, W]");
  check_layer_inputs(kBackwardOp, x, h0, c0, params, param_specs(x.size(2), h0.size(1), k),
                     gate_activation);
  const int64_t steps = x.size(0), batch = x.size(1), cin = x.size(2), height = x.size(3),
                width = x.size(4), c = h0.size(1), pixels = height * width;
  const int64_t rows_per_step = batch * pixels, n = steps * batch;
  check_backward_inputs(kBackwardOp, grad_output, grad_h_n, grad_c_n, x, h0, output, saved,
                        saved_shapes(x, c));
  if (steps == 0 || rows_per_step * c == 0 || cin == 0) {
    return empty_layer_grads(x, grad_h_n, grad_c_n, params);
  }
  const auto options = x.options();
  const at::Tensor cell = saved[0].contiguous(), candidate = saved[1].contiguous(),
                   gate_preact = saved[2].contiguous(), attention = saved[3].contiguous();
  const at::Tensor x_flat = to_channels_last(x.reshape({n, cin, height, width}));
  const at::Tensor x_cl = x_flat.view({steps, batch, height, width, cin});
  const at::Tensor h_prev_all = at::cat(
      {to_channels_last(h0).unsqueeze(0), to_channels_last(output.narrow(0, 0, steps - 1))});
  const at::Tensor h_prev_flat = h_prev_all.view({n, height, width, c});
  // Recomputed for all steps: F [T, B, H, W, C] and X̃ = A∘X [T·B, H, W, Cin].
  const at::Tensor att_dw_h_all = conv_same(h_prev_flat, params[kAttDwH], c);
  const at::Tensor attention_h_all = at::mm(rows(att_dw_h_all), params[kAttPwH].t());
  const at::Tensor xa = sepconv_rows(x_flat, params[kAttDwX], params[kAttPwX], at::Tensor());
  const at::Tensor features = at::empty({steps, batch, height, width, c}, options);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), kBackwardOp, [&] {
    tanh_of_sum<scalar_t>(n * pixels, c, attention_h_all.data_ptr<scalar_t>(),
                          xa.data_ptr<scalar_t>(), params[kAttBias].data_ptr<scalar_t>(),
                          features.data_ptr<scalar_t>());
  });
  const at::Tensor x_att_flat = x_flat * attention.view({n, height, width, 1});

  const at::Tensor c0_cl = to_channels_last(c0);
  const at::Tensor grad_out_cl = to_channels_last(grad_output);
  const at::Tensor grad_cand_preact = at::empty({steps, rows_per_step, c}, options);
  const at::Tensor grad_att_preact = at::empty({steps, rows_per_step, c}, options);
  const at::Tensor grad_dw_cand_h = at::empty({steps, rows_per_step, c}, options);
  const at::Tensor grad_dw_att_h = at::empty({steps, rows_per_step, c}, options);
  const at::Tensor grad_dw_cand_x = at::empty({steps, rows_per_step, cin}, options);
  const at::Tensor grad_z = at::empty({steps, batch, height, width, 1}, options);
  const at::Tensor grad_gate_preact = at::empty({steps, batch, 3 * c}, options);
  const at::Tensor grad_x_cl = at::empty({steps, batch, height, width, cin}, options);
  const int64_t chunks = pixel_chunks(pixels);
  const at::Tensor partials = at::empty({batch, chunks, 3, c}, options);
  const at::Tensor gates = at::empty({batch, 3 * c}, options);
  at::Tensor grad_h = to_channels_last(grad_h_n);
  at::Tensor grad_c = to_channels_last(grad_c_n);
  at::Tensor grad_c_prev = at::empty_like(grad_c);
  const auto hw = [&](const at::Tensor& t, int64_t channels) {
    return t.view({batch, height, width, channels});
  };

  for (int64_t t = steps - 1; t >= 0; --t) {
    const at::Tensor c_prev = t > 0 ? cell[t - 1] : c0_cl;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), kBackwardOp, [&] {
      activate_gates(gate_preact[t].data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(),
                     gates.numel(), gate_activation);
      const auto views = pooled_views<scalar_t>(gates, c);
      pooled_cell_backward<-1, scalar_t>(
          batch, pixels, c, views[0], views[1], views[2], candidate[t].data_ptr<scalar_t>(),
          c_prev.data_ptr<scalar_t>(), cell[t].data_ptr<scalar_t>(),
          grad_out_cl[t].data_ptr<scalar_t>(), grad_h.data_ptr<scalar_t>(),
          grad_c.data_ptr<scalar_t>(), grad_cand_preact[t].data_ptr<scalar_t>(),
          grad_c_prev.data_ptr<scalar_t>(), nullptr, partials.data_ptr<scalar_t>());
      pooled_gate_grads<scalar_t>(batch, chunks, c, {0, 1, 2}, partials.data_ptr<scalar_t>(),
                                  gate_preact[t].data_ptr<scalar_t>(), gate_activation,
                                  grad_gate_preact[t].data_ptr<scalar_t>());
    });
    std::swap(grad_c, grad_c_prev);
    // dX̃ from the candidate's SepConv_x and from GAP(X̃) in the gates.
    at::Tensor grad_dw_x = grad_dw_cand_x[t];
    at::mm_out(grad_dw_x, grad_cand_preact[t], params[kCandPwX]);
    at::Tensor grad_x_att = depthwise_conv(hw(grad_dw_x, cin), params[kCandDwX], true);
    grad_x_att.view({batch, pixels, cin})
        .add_(at::mm(grad_gate_preact[t], params[kGateWx]).div_(pixels).unsqueeze(1));
    // X̃ = A∘X: dX = A∘dX̃, dA = Σ_cin dX̃∘X; softmax: dZ = A∘(dA − Σ A∘dA).
    const at::Tensor step_attention = attention[t].unsqueeze(-1);  // [B, H, W, 1]
    at::Tensor grad_x_t = grad_x_cl[t];
    at::mul_out(grad_x_t, grad_x_att, step_attention);
    const at::Tensor grad_a = (grad_x_att * x_cl[t]).sum(-1, true);
    const at::Tensor weighted = grad_a * step_attention;
    at::Tensor grad_z_t = grad_z[t];
    at::sub_out(grad_z_t, weighted,
                step_attention * weighted.sum({1, 2, 3}, true));
    // Z = W_z * F: dF = W_zᵀ ⋆ dZ; dU = dF∘(1 − F²).
    at::Tensor grad_att_t = grad_att_preact[t];
    grad_att_t.copy_(rows(std::get<0>(
        conv_same_backward(grad_z_t, features[t], params[kAttWz], 1, true, false))));
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), kBackwardOp, [&] {
      tanh_backward_inplace<scalar_t>(rows_per_step, c, features[t].data_ptr<scalar_t>(),
                                      grad_att_t.data_ptr<scalar_t>());
    });
    // dH_{t−1} from the candidate, the attention features and the pooled gates.
    at::Tensor grad_dw_cand_t = grad_dw_cand_h[t], grad_dw_att_t = grad_dw_att_h[t];
    at::mm_out(grad_dw_cand_t, grad_cand_preact[t], params[kCandPwH]);
    at::mm_out(grad_dw_att_t, grad_att_t, params[kAttPwH]);
    grad_h = depthwise_conv(hw(grad_dw_cand_t, c), params[kCandDwH], true);
    grad_h.add_(depthwise_conv(hw(grad_dw_att_t, c), params[kAttDwH], true));
    grad_h.view({batch, pixels, c})
        .add_(at::mm(grad_gate_preact[t], params[kGateWh]).div_(pixels).unsqueeze(1));
  }

  // Weight gradients, reduced over all steps in batched products.
  const auto flat = [&](const at::Tensor& t) { return t.view({-1, t.size(-1)}); };
  const auto flat_hw = [&](const at::Tensor& t) {
    return t.view({n, height, width, t.size(-1)});
  };
  const at::Tensor grad_gp_flat = grad_gate_preact.view({n, 3 * c});
  std::vector<at::Tensor> grads(kNumParams);
  grads[kGateWx] = at::mm(grad_gp_flat.t(), global_average_pool(x_att_flat));
  grads[kGateWh] = at::mm(grad_gp_flat.t(), global_average_pool(h_prev_flat));
  grads[kGateBias] = grad_gp_flat.sum(0);
  grads[kCandPwX] = at::mm(flat(grad_cand_preact).t(),
                           rows(conv_same(x_att_flat, params[kCandDwX], cin)));
  grads[kCandDwX] = depthwise_conv_weight_grad(flat_hw(grad_dw_cand_x), x_att_flat, k);
  grads[kCandPwH] = at::mm(flat(grad_cand_preact).t(),
                           rows(conv_same(h_prev_flat, params[kCandDwH], c)));
  grads[kCandDwH] = depthwise_conv_weight_grad(flat_hw(grad_dw_cand_h), h_prev_flat, k);
  grads[kCandBias] = flat(grad_cand_preact).sum(0);
  grads[kAttPwH] = at::mm(flat(grad_att_preact).t(), rows(att_dw_h_all));
  grads[kAttDwH] = depthwise_conv_weight_grad(flat_hw(grad_dw_att_h), h_prev_flat, k);
  grads[kAttBias] = flat(grad_att_preact).sum(0);
  grads[kAttWz] = std::get<1>(conv_same_backward(flat_hw(grad_z), flat_hw(features),
                                                 params[kAttWz], 1, false, true))
                      .contiguous();
  // X side of the attention: backpropagate d xa = dU through the batched SepConv_xa.
  auto att_x = sepconv_rows_backward(flat(grad_att_preact), x_flat, params[kAttDwX],
                                     params[kAttPwX], true);
  grads[kAttDwX] = std::get<1>(att_x);
  grads[kAttPwX] = std::get<2>(att_x);
  const at::Tensor grad_x_total = grad_x_cl.view({n, height, width, cin}).add_(std::get<0>(att_x));
  return {from_channels_last(grad_x_total).view(x.sizes()), from_channels_last(grad_h),
          from_channels_last(grad_c), grads};
}

}  // namespace

TORCH_LIBRARY_IMPL(convlstm_fast, CPU, m) {
  m.impl("spatial_attention_layer", &spatial_attention_layer_forward);
  m.impl("spatial_attention_layer_backward", &spatial_attention_layer_backward);
}

}  // namespace cpu
}  // namespace convlstm_fast
