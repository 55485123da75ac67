// Variant (a), `convlstm_fast::pooled_layer` and its backward, on the CPU (shared/SPEC.md "a"):
//   x̄ = GAP(X_t), h̄ = GAP(H_{t−1});  [i f o] = σ(U_x x̄ + U_h h̄ + b_g)   (gates [B, C])
//   G = tanh(SepConv_x(X_t) + SepConv_h(H_{t−1}) + b_c)
//   C_t = f∘C_{t−1} + i∘G;  H_t = o∘tanh(C_t)
// Structure (shared/KERNELS.md): the X side (SepConv_x + b_c and U_x x̄ + b_g) is computed for all
// T steps in batched calls before the recurrence; a step is the depthwise conv of H_{t−1}, one
// GEMM, the pooled-gate FC, and one fused element loop that adds the X-side term and the bias.
// Saved for backward (native.py SAVED_SPECS["a"]): cell C_t and candidate G [T, B, H, W, C],
// gate_preact [T, B, 3C].
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

std::vector<std::vector<int64_t>> saved_shapes(const at::Tensor& x, int64_t c) {
  const int64_t t = x.size(0), b = x.size(1), h = x.size(3), w = x.size(4);
  return {{t, b, h, w, c}, {t, b, h, w, c}, {t, b, 3 * c}};
}

// The three pooled gates of a [B, 3C] block, order i, f, o.
template <typename scalar_t>
std::array<GateView<scalar_t>, 3> pooled_views(const at::Tensor& gates, int64_t c) {
  const scalar_t* g = gates.data_ptr<scalar_t>();
  return {GateView<scalar_t>{g, 3 * c, 0}, GateView<scalar_t>{g + c, 3 * c, 0},
          GateView<scalar_t>{g + 2 * c, 3 * c, 0}};
}

LayerResult pooled_layer_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                                 at::TensorList params_in, int64_t gate_activation) {
  const std::vector<at::Tensor> params = contiguous_params(params_in);
  const int64_t k = kernel_size_of(kOp, params, kCandDwX, 8);
  TORCH_CHECK(x.dim() == 5 && h0.dim() == 4, kOp, ": x must be [T, B, Cin, H, W], h0 [B, C, H, W]");
  check_layer_inputs(kOp, x, h0, c0, params, param_specs(x.size(2), h0.size(1), k),
                     gate_activation);
  const int64_t steps = x.size(0), batch = x.size(1), cin = x.size(2), height = x.size(3),
                width = x.size(4), hidden_channels = h0.size(1), pixels = height * width;
  const auto shapes = saved_shapes(x, hidden_channels);
  if (steps == 0 || batch * pixels * hidden_channels == 0 || cin == 0) {
    return empty_layer_result(x, h0, c0, shapes);
  }
  const at::Tensor cell = at::empty(shapes[0], x.options());
  const at::Tensor candidate = at::empty(shapes[1], x.options());
  const at::Tensor gate_preact = at::empty(shapes[2], x.options());
  const at::Tensor hidden = at::empty(shapes[0], x.options());

  // X side for all steps: xg = U_x·GAP(X) + b_g [T, B, 3C]; xc = SepConv_x(X) [T, B·HW, C].
  const at::Tensor x_cl = to_channels_last(x.reshape({steps * batch, cin, height, width}));
  const at::Tensor xg = at::addmm(params[kGateBias], global_average_pool(x_cl),
                                  params[kGateWx].t()).view({steps, batch, 3 * hidden_channels});
  const at::Tensor xc = sepconv_rows(x_cl, params[kCandDwX], params[kCandPwX], at::Tensor())
                            .view({steps, batch * pixels, hidden_channels});

  at::Tensor h_prev = to_channels_last(h0);
  at::Tensor c_prev = to_channels_last(c0);
  const at::Tensor gates = at::empty({batch, 3 * hidden_channels}, x.options());
  at::Tensor candidate_h = at::empty({batch * pixels, hidden_channels}, x.options());
  const at::Tensor pw_h_t = params[kCandPwH].t();
  const at::Tensor gate_wh_t = params[kGateWh].t();
  for (int64_t t = 0; t < steps; ++t) {
    // Gate pre-activations U_x x̄ + b_g + U_h h̄ (GEMM with the X-side term as the addend) and
    // the candidate's H term SepConv_h(H_{t−1}).
    at::Tensor step_preact = gate_preact[t];
    at::addmm_out(step_preact, xg[t], global_average_pool(h_prev), gate_wh_t);
    at::mm_out(candidate_h, rows(conv_same(h_prev, params[kCandDwH], hidden_channels)), pw_h_t);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), kOp, [&] {
      activate_gates(step_preact.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(),
                     gates.numel(), gate_activation);
      const auto views = pooled_views<scalar_t>(gates, hidden_channels);
      pooled_cell_forward<scalar_t>(
          batch, pixels, hidden_channels, candidate_h.data_ptr<scalar_t>(),
          xc[t].data_ptr<scalar_t>(), params[kCandBias].data_ptr<scalar_t>(), views[0],
          views[1], views[2], c_prev.data_ptr<scalar_t>(), candidate[t].data_ptr<scalar_t>(),
          cell[t].data_ptr<scalar_t>(), hidden[t].data_ptr<scalar_t>());
    });
    h_prev = hidden[t];
    c_prev = cell[t];
  }
  const at::Tensor output = from_channels_last(hidden);
  return {output, output[steps - 1].clone(), from_channels_last(c_prev),
          {cell, candidate, gate_preact}};
}

// Reverse time (KERNELS.md "One step, backward"), per step:
//   the fused loop gives dG_pre = dC∘i∘(1 − G²) (= d xc[t]), dC_{t−1}, and Σ_HW of di, df, do;
//   dgp = [Σdi, Σdf, Σdo]∘σ'(gate_preact);
//   dH_{t−1} = depthwise_hᵀ(dG_pre·P_h) + (dgp·U_h)/HW broadcast over H·W  (+ dL/dH_{t−1} of the output).
// After the loop, batched over all steps: dP_h, d dw_h, dU_h, the biases, and the X side.
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
  const int64_t rows_per_step = batch * pixels;
  const at::Tensor cell = saved[0].contiguous(), candidate = saved[1].contiguous(),
                   gate_preact = saved[2].contiguous();
  const at::Tensor x_cl = to_channels_last(x.reshape({steps * batch, cin, height, width}));
  // H_{t−1} for every step: [h0, H_0, ..., H_{T−2}] channels-last [T, B, H, W, C].
  const at::Tensor h_prev_all = at::cat(
      {to_channels_last(h0).unsqueeze(0), to_channels_last(output.narrow(0, 0, steps - 1))});
  const at::Tensor c0_cl = to_channels_last(c0);
  const at::Tensor grad_out_cl = to_channels_last(grad_output);

  const at::Tensor grad_cand_preact = at::empty({steps, rows_per_step, channels}, x.options());
  const at::Tensor grad_dw_h_out = at::empty({steps, rows_per_step, channels}, x.options());
  const at::Tensor grad_gate_preact = at::empty({steps, batch, 3 * channels}, x.options());
  const int64_t chunks = pixel_chunks(pixels);
  const at::Tensor partials = at::empty({batch, chunks, 3, channels}, x.options());
  const at::Tensor gates = at::empty({batch, 3 * channels}, x.options());
  at::Tensor grad_h = to_channels_last(grad_h_n);
  // dC_t flows back through two buffers: this step reads one and writes dC_{t−1} to the other.
  at::Tensor grad_c = to_channels_last(grad_c_n);
  at::Tensor grad_c_prev = at::empty_like(grad_c);

  for (int64_t t = steps - 1; t >= 0; --t) {
    const at::Tensor c_prev = t > 0 ? cell[t - 1] : c0_cl;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), kBackwardOp, [&] {
      activate_gates(gate_preact[t].data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(),
                     gates.numel(), gate_activation);
      const auto views = pooled_views<scalar_t>(gates, channels);
      pooled_cell_backward<-1, scalar_t>(
          batch, pixels, channels, views[0], views[1], views[2],
          candidate[t].data_ptr<scalar_t>(), c_prev.data_ptr<scalar_t>(),
          cell[t].data_ptr<scalar_t>(), grad_out_cl[t].data_ptr<scalar_t>(),
          grad_h.data_ptr<scalar_t>(), grad_c.data_ptr<scalar_t>(),
          grad_cand_preact[t].data_ptr<scalar_t>(), grad_c_prev.data_ptr<scalar_t>(), nullptr,
          partials.data_ptr<scalar_t>());
      pooled_gate_grads<scalar_t>(batch, chunks, channels, {0, 1, 2},
                                  partials.data_ptr<scalar_t>(),
                                  gate_preact[t].data_ptr<scalar_t>(), gate_activation,
                                  grad_gate_preact[t].data_ptr<scalar_t>());
    });
    std::swap(grad_c, grad_c_prev);
    at::Tensor grad_dw = grad_dw_h_out[t];
    at::mm_out(grad_dw, grad_cand_preact[t], params[kCandPwH]);
    grad_h = std::get<0>(conv_same_backward(grad_dw.view({batch, height, width, channels}),
                                            h_prev_all[t], params[kCandDwH], channels, true,
                                            false));
    // h̄ = GAP(H_{t−1}) feeds the gates: dH_{t−1} += (dgp·U_h) / HW at every pixel.
    grad_h.view({batch, pixels, channels})
        .add_(at::mm(grad_gate_preact[t], params[kGateWh]).div_(pixels).unsqueeze(1));
  }

  // Weight gradients of the H side, reduced over all steps in batched products.
  const at::Tensor h_prev_flat = h_prev_all.view({steps * batch, height, width, channels});
  const at::Tensor grad_gp_flat = grad_gate_preact.view({steps * batch, 3 * channels});
  const at::Tensor grad_cand_rows = grad_cand_preact.view({steps * rows_per_step, channels});
  const at::Tensor grad_gate_wh = at::mm(grad_gp_flat.t(), global_average_pool(h_prev_flat));
  const at::Tensor grad_cand_pw_h =
      at::mm(grad_cand_rows.t(), rows(conv_same(h_prev_flat, params[kCandDwH], channels)));
  const at::Tensor grad_cand_dw_h = std::get<1>(conv_same_backward(
      grad_dw_h_out.view({steps * batch, height, width, channels}), h_prev_flat,
      params[kCandDwH], channels, false, true));
  // X side: backpropagate d xc = dG_pre and d xg = dgp through the batched X-side ops.
  auto x_grads = sepconv_rows_backward(grad_cand_rows, x_cl, params[kCandDwX], params[kCandPwX],
                                       true);
  at::Tensor grad_x_cl = std::get<0>(x_grads);
  const at::Tensor grad_gate_wx = at::mm(grad_gp_flat.t(), global_average_pool(x_cl));
  grad_x_cl.view({steps * batch, pixels, cin})
      .add_(at::mm(grad_gp_flat, params[kGateWx]).div_(pixels).unsqueeze(1));
  std::vector<at::Tensor> grad_params{grad_gate_wx,
                                      grad_gate_wh,
                                      grad_gp_flat.sum(0),
                                      std::get<1>(x_grads),
                                      std::get<2>(x_grads),
                                      grad_cand_dw_h,
                                      grad_cand_pw_h,
                                      grad_cand_rows.sum(0)};
  return {from_channels_last(grad_x_cl).view(x.sizes()), from_channels_last(grad_h),
          from_channels_last(grad_c), grad_params};
}

}  // namespace

TORCH_LIBRARY_IMPL(convlstm_fast, CPU, m) {
  m.impl("pooled_layer", &pooled_layer_forward);
  m.impl("pooled_layer_backward", &pooled_layer_backward);
}

}  // namespace cpu
}  // namespace convlstm_fast
