// Variant (a), `convlstm_fast::pooled_layer` and its backward, on the CPU (shared/SPEC.md "a"):
//   x̄ = GAP(X_t), h̄ = GAP(H_{t−1});  [i f o] = σ(U_x x̄ + U_h h̄ + b_g)   (gates [B, C])
//   G = tanh(SepConv_x(X_t) + SepConv_h(H_{t−1}) + b_c)
//   C_t = f∘C_{t−1} + i∘G;  H_t = o∘tanh(C_t)
// Structure: a step is the depthwise convs of X_t and H_{t−1}, two GEMMs into one pre-activation
// buffer (b_c as the addend), the pooled-gate FCs, and one fused element loop. Unlike
// shared/KERNELS.md's GPU design, the X side is not batched over T before the loop: on the CPU the
// step's GEMM (M = B·H·W) already runs at the full matmul rate, and what a sequence-sized X-side
// term costs is memory — every fresh multi-MB buffer is paid in page faults (measured: a 6.4 MB
// depthwise output took 4.6 ms freshly allocated vs 0.9 ms in reused memory).
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
  const at::Tensor output =
      at::empty({steps, batch, hidden_channels, height, width}, x.options());

  // Everything runs a step at a time through buffers reused across steps: X_t channels-last, the
  // candidate pre-activation, and H ping-ponging between two channels-last buffers. Per step the
  // candidate pre-activation is b_c + dw_x(X_t)·P_xᵀ + dw_h(H_{t−1})·P_hᵀ, two GEMMs into one
  // buffer (the X side is not batched over T: at M = B·H·W rows the GEMM already runs at the
  // machine's matmul rate, and a sequence-sized X-side term would cost a fresh allocation).
  const at::Tensor x_step = at::empty({batch, height, width, cin}, x.options());
  const at::Tensor dw_x = at::empty({batch, height, width, cin}, x.options());
  const at::Tensor dw_h = at::empty({batch, height, width, hidden_channels}, x.options());
  at::Tensor preact = at::empty({batch * pixels, hidden_channels}, x.options());
  std::array<at::Tensor, 2> hidden{at::empty({batch, height, width, hidden_channels}, x.options()),
                                   at::empty({batch, height, width, hidden_channels}, x.options())};
  copy_to_channels_last(hidden[1], h0);
  at::Tensor c_prev = to_channels_last(c0);
  const at::Tensor gates = at::empty({batch, 3 * hidden_channels}, x.options());
  const at::Tensor pw_x_t = params[kCandPwX].t(), pw_h_t = params[kCandPwH].t();
  for (int64_t t = 0; t < steps; ++t) {
    const at::Tensor& h_prev = hidden[(t + 1) % 2];
    const at::Tensor& h_next = hidden[t % 2];
    copy_to_channels_last(x_step, x[t]);
    // Gate pre-activations b_g + U_x x̄ + U_h h̄.
    at::Tensor step_preact = gate_preact[t];
    step_preact.copy_(params[kGateBias].expand({batch, 3 * hidden_channels}));
    small_addmm_(step_preact, global_average_pool(x_step), params[kGateWx], true);
    small_addmm_(step_preact, global_average_pool(h_prev), params[kGateWh], true);
    depthwise_conv_out(dw_x, x_step, params[kCandDwX], false, false);
    depthwise_conv_out(dw_h, h_prev, params[kCandDwH], false, false);
    at::addmm_out(preact, params[kCandBias], rows(dw_x), pw_x_t);
    preact.addmm_(rows(dw_h), pw_h_t);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), kOp, [&] {
      activate_gates(step_preact.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(),
                     gates.numel(), gate_activation);
      const auto views = pooled_views<scalar_t>(gates, hidden_channels);
      pooled_cell_forward<scalar_t>(
          batch, pixels, hidden_channels, preact.data_ptr<scalar_t>(), nullptr, nullptr,
          views[0], views[1], views[2], c_prev.data_ptr<scalar_t>(),
          candidate[t].data_ptr<scalar_t>(), cell[t].data_ptr<scalar_t>(),
          h_next.data_ptr<scalar_t>(), output[t].data_ptr<scalar_t>());
    });
    c_prev = cell[t];
  }
  return {output, output[steps - 1].clone(), from_channels_last(c_prev),
          {cell, candidate, gate_preact}};
}

// Reverse time (KERNELS.md "One step, backward"), per step:
//   the fused loop gives dG_pre = dC∘i∘(1 − G²) (= the gradient of both SepConvs' sum), dC_{t−1},
//   and Σ_HW of di, df, do; dgp = [Σdi, Σdf, Σdo]∘σ'(gate_preact);
//   dH_{t−1} = depthwise_hᵀ(dG_pre·P_h) + (dgp·U_h)/HW broadcast over H·W  (+ dL/dH_{t−1} of the
//   output); dX_t = depthwise_xᵀ(dG_pre·P_x) + (dgp·U_x)/HW.
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
  const int64_t rows_per_step = batch * pixels;
  const at::Tensor cell = saved[0].contiguous(), candidate = saved[1].contiguous(),
                   gate_preact = saved[2].contiguous();
  const at::TensorOptions options = x.options();
  const at::Tensor c0_cl = to_channels_last(c0);

  // Step buffers, reused.
  const at::Tensor grad_out_step = at::empty({batch, height, width, channels}, options);
  const at::Tensor h_prev = at::empty({batch, height, width, channels}, options);
  const at::Tensor x_step = at::empty({batch, height, width, cin}, options);
  const at::Tensor dw_h = at::empty({batch, height, width, channels}, options);
  const at::Tensor dw_x = at::empty({batch, height, width, cin}, options);
  const at::Tensor grad_x_step = at::empty({batch, height, width, cin}, options);
  const at::Tensor grad_cand = at::empty({rows_per_step, channels}, options);
  at::Tensor grad_dw_h = at::empty({rows_per_step, channels}, options);
  at::Tensor grad_dw_x = at::empty({rows_per_step, cin}, options);
  const int64_t chunks = pixel_chunks(pixels);
  const at::Tensor partials = at::empty({batch, chunks, 3, channels}, options);
  const at::Tensor gates = at::empty({batch, 3 * channels}, options);
  const at::Tensor grad_h_bar = at::empty({batch, channels}, options);
  const at::Tensor grad_x_bar = at::empty({batch, cin}, options);
  // Per-step vectors for the pooled gates' weight gradients (reduced after the loop).
  const at::Tensor grad_gate_preact = at::empty({steps, batch, 3 * channels}, options);
  const at::Tensor h_bar = at::empty({steps, batch, channels}, options);
  const at::Tensor x_bar = at::empty({steps, batch, cin}, options);
  // Parameter-sized accumulators.
  const at::Tensor grad_cand_pw_h = at::zeros({channels, channels}, options);
  const at::Tensor grad_cand_pw_x = at::zeros({channels, cin}, options);
  const at::Tensor grad_cand_dw_h = at::zeros({channels, 1, k, k}, options);
  const at::Tensor grad_cand_dw_x = at::zeros({cin, 1, k, k}, options);
  const at::Tensor grad_cand_bias = at::zeros({channels}, options);

  const at::Tensor grad_x = at::empty(x.sizes(), options);
  // dL/dH flowing back to step t−1 (written by this step's transposed depthwise conv).
  at::Tensor grad_h = to_channels_last(grad_h_n);
  // dC_t flows back through two buffers: this step reads one and writes dC_{t−1} to the other.
  at::Tensor grad_c = to_channels_last(grad_c_n);
  at::Tensor grad_c_prev = at::empty_like(grad_c);

  for (int64_t t = steps - 1; t >= 0; --t) {
    const at::Tensor c_prev = t > 0 ? cell[t - 1] : c0_cl;
    copy_to_channels_last(grad_out_step, grad_output[t]);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), kBackwardOp, [&] {
      activate_gates(gate_preact[t].data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(),
                     gates.numel(), gate_activation);
      const auto views = pooled_views<scalar_t>(gates, channels);
      pooled_cell_backward<-1, scalar_t>(
          batch, pixels, channels, views[0], views[1], views[2],
          candidate[t].data_ptr<scalar_t>(), c_prev.data_ptr<scalar_t>(),
          cell[t].data_ptr<scalar_t>(), grad_out_step.data_ptr<scalar_t>(),
          grad_h.data_ptr<scalar_t>(), grad_c.data_ptr<scalar_t>(),
          grad_cand.data_ptr<scalar_t>(), grad_c_prev.data_ptr<scalar_t>(), nullptr,
          partials.data_ptr<scalar_t>());
      pooled_gate_grads<scalar_t>(batch, chunks, channels, {0, 1, 2},
                                  partials.data_ptr<scalar_t>(),
                                  gate_preact[t].data_ptr<scalar_t>(), gate_activation,
                                  grad_gate_preact[t].data_ptr<scalar_t>());
    });
    std::swap(grad_c, grad_c_prev);
    grad_cand_bias.add_(grad_cand.sum(0));

    // H side: dH_{t−1}, and this step's share of dP_h and d dw_h.
    copy_to_channels_last(h_prev, t > 0 ? output[t - 1] : h0);
    h_bar[t].copy_(global_average_pool(h_prev));
    const at::Tensor grad_cand_t = grad_cand.t();
    depthwise_conv_out(dw_h, h_prev, params[kCandDwH], false, false);
    grad_cand_pw_h.addmm_(grad_cand_t, rows(dw_h));
    at::mm_out(grad_dw_h, grad_cand, params[kCandPwH]);
    const at::Tensor grad_dw_h_map = grad_dw_h.view({batch, height, width, channels});
    grad_cand_dw_h.add_(depthwise_conv_weight_grad(grad_dw_h_map, h_prev, k));
    depthwise_conv_out(grad_h, grad_dw_h_map, params[kCandDwH], true, false);
    // h̄ = GAP(H_{t−1}) feeds the gates: dH_{t−1} += (dgp·U_h) / HW at every pixel.
    grad_h_bar.zero_();
    small_addmm_(grad_h_bar, grad_gate_preact[t], params[kGateWh], false);
    grad_h.view({batch, pixels, channels}).add_(grad_h_bar.div_(pixels).unsqueeze(1));

    // X side: dX_t, and this step's share of dP_x and d dw_x.
    copy_to_channels_last(x_step, x[t]);
    x_bar[t].copy_(global_average_pool(x_step));
    depthwise_conv_out(dw_x, x_step, params[kCandDwX], false, false);
    grad_cand_pw_x.addmm_(grad_cand_t, rows(dw_x));
    at::mm_out(grad_dw_x, grad_cand, params[kCandPwX]);
    const at::Tensor grad_dw_x_map = grad_dw_x.view({batch, height, width, cin});
    grad_cand_dw_x.add_(depthwise_conv_weight_grad(grad_dw_x_map, x_step, k));
    depthwise_conv_out(grad_x_step, grad_dw_x_map, params[kCandDwX], true, false);
    grad_x_bar.zero_();
    small_addmm_(grad_x_bar, grad_gate_preact[t], params[kGateWx], false);
    grad_x_step.view({batch, pixels, cin}).add_(grad_x_bar.div_(pixels).unsqueeze(1));
    copy_from_channels_last(grad_x[t], grad_x_step);
  }

  const at::Tensor grad_gp_flat = grad_gate_preact.view({steps * batch, 3 * channels});
  std::vector<at::Tensor> grad_params{
      at::mm(grad_gp_flat.t(), x_bar.view({steps * batch, cin})),
      at::mm(grad_gp_flat.t(), h_bar.view({steps * batch, channels})),
      grad_gp_flat.sum(0),
      grad_cand_dw_x,
      grad_cand_pw_x,
      grad_cand_dw_h,
      grad_cand_pw_h,
      grad_cand_bias};
  return {grad_x, from_channels_last(grad_h), from_channels_last(grad_c), grad_params};
}

}  // namespace

TORCH_LIBRARY_IMPL(convlstm_fast, CPU, m) {
  m.impl("pooled_layer", &pooled_layer_forward);
  m.impl("pooled_layer_backward", &pooled_layer_backward);
}

}  // namespace cpu
}  // namespace convlstm_fast
