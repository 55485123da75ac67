// The original ConvLSTM, `convlstm_fast::convlstm_layer` and its backward, on the CPU
// (shared/SPEC.md "convlstm", eqs. 1-6):
//   [i f g o] = W_x * X_t + W_h * H_{t−1} + b;  i, f, o = σ(·), G = tanh(g)
//   C_t = f∘C_{t−1} + i∘G;  H_t = o∘tanh(C_t)
// Structure (shared/KERNELS.md): W_x * X for all T steps in one batched convolution before the
// recurrence; a step is one K×K convolution of H_{t−1} (oneDNN, channels-last: the step is
// compute-bound) and one fused element loop adding the X term and the bias, activating the
// gates and updating the cell. Saved for backward (native.py SAVED_SPECS["convlstm"]): cell C_t
// [T, B, H, W, C] and the gate pre-activations [T, B, H, W, 4C] (order i, f, g, o).
#include "cpu/layer_common.h"

namespace convlstm_fast {
namespace cpu {
namespace {

constexpr const char* kOp = "convlstm_layer";
constexpr const char* kBackwardOp = "convlstm_layer_backward";

enum Param { kWeightX, kWeightH, kBias };

std::vector<ParamSpec> param_specs(int64_t cin, int64_t c, int64_t k) {
  return {{"weight_x", {4 * c, cin, k, k}}, {"weight_h", {4 * c, c, k, k}}, {"bias", {4 * c}}};
}

std::vector<std::vector<int64_t>> saved_shapes(const at::Tensor& x, int64_t c) {
  const int64_t t = x.size(0), b = x.size(1), h = x.size(3), w = x.size(4);
  return {{t, b, h, w, c}, {t, b, h, w, 4 * c}};
}

// The element loops work on one pixel through __restrict__ pointers (all buffers distinct), so
// the compiler vectorises them over the channels without aliasing checks.

// One pixel: z = z_h + z_x + b (written to `gates`), i, f, o = σ(z), G = tanh(z_g), cell update.
template <int64_t kActivation, typename scalar_t>
CONVLSTM_CPU_MULTIVERSION void convlstm_cell_forward_row(int64_t channels, const scalar_t* __restrict__ z_h,
                                      const scalar_t* __restrict__ z_x,
                                      const scalar_t* __restrict__ bias,
                                      const scalar_t* __restrict__ c_prev,
                                      scalar_t* __restrict__ z, scalar_t* __restrict__ cell,
                                      scalar_t* __restrict__ hidden) {
  for (int64_t k = 0; k < 4 * channels; ++k) z[k] = z_h[k] + z_x[k] + bias[k];
  for (int64_t c = 0; c < channels; ++c) {
    const scalar_t i = gate_activation(z[c], kActivation);
    const scalar_t f = gate_activation(z[channels + c], kActivation);
    const scalar_t g = math_tanh(z[2 * channels + c]);
    const scalar_t o = gate_activation(z[3 * channels + c], kActivation);
    scalar_t h;
    cell[c] = cell_update(i, f, o, g, c_prev[c], &h);
    hidden[c] = h;
  }
}

// One step over `rows` pixels. kActivation is the gate activation, a template argument so the
// element loop has no branch.
template <int64_t kActivation, typename scalar_t>
void convlstm_cell_forward(int64_t rows, int64_t channels, const scalar_t* z_h,
                           const scalar_t* z_x, const scalar_t* bias, const scalar_t* c_prev,
                           scalar_t* gates, scalar_t* cell, scalar_t* hidden) {
  at::parallel_for(0, rows, 16, [=](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      convlstm_cell_forward_row<kActivation>(channels, z_h + r * 4 * channels,
                                             z_x + r * 4 * channels, bias, c_prev + r * channels,
                                             gates + r * 4 * channels, cell + r * channels,
                                             hidden + r * channels);
    }
  });
}

// One pixel of the backward step: with dH_t = grad_hidden + grad_hidden_carry, dC_t = grad_cell,
//   dC = dC_t + dH_t∘o∘(1 − tanh²C_t); dz_i = dC∘G∘σ'(z_i); dz_f = dC∘C_{t−1}∘σ'(z_f);
//   dz_g = dC∘i∘(1 − G²); dz_o = dH_t∘tanh C_t∘σ'(z_o); dC_{t−1} = dC∘f.
template <int64_t kActivation, typename scalar_t>
CONVLSTM_CPU_MULTIVERSION void convlstm_cell_backward_row(
    int64_t channels, const scalar_t* __restrict__ z, const scalar_t* __restrict__ c_prev,
    const scalar_t* __restrict__ cell, const scalar_t* __restrict__ grad_hidden,
    const scalar_t* __restrict__ grad_hidden_carry, const scalar_t* __restrict__ grad_cell,
    scalar_t* __restrict__ grad_c_prev, scalar_t* __restrict__ dz) {
  for (int64_t c = 0; c < channels; ++c) {
    const scalar_t zi = z[c], zf = z[channels + c], zo = z[3 * channels + c];
    const scalar_t i = gate_activation(zi, kActivation);
    const scalar_t f = gate_activation(zf, kActivation);
    const scalar_t g = math_tanh(z[2 * channels + c]);
    const scalar_t o = gate_activation(zo, kActivation);
    scalar_t di, df, dg, do_, dc_prev;
    cell_update_backward(i, f, o, g, c_prev[c], cell[c],
                         scalar_t(grad_hidden[c] + grad_hidden_carry[c]), grad_cell[c], &di, &df,
                         &dg, &do_, &dc_prev);
    dz[c] = di * gate_activation_grad(zi, kActivation);
    dz[channels + c] = df * gate_activation_grad(zf, kActivation);
    dz[2 * channels + c] = dg * tanh_grad_from_output(g);
    dz[3 * channels + c] = do_ * gate_activation_grad(zo, kActivation);
    grad_c_prev[c] = dc_prev;
  }
}

template <int64_t kActivation, typename scalar_t>
void convlstm_cell_backward(int64_t rows, int64_t channels, const scalar_t* gates,
                            const scalar_t* c_prev, const scalar_t* cell,
                            const scalar_t* grad_hidden, const scalar_t* grad_hidden_carry,
                            const scalar_t* grad_cell, scalar_t* grad_c_prev,
                            scalar_t* grad_gates) {
  at::parallel_for(0, rows, 16, [=](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const int64_t row = r * channels;
      convlstm_cell_backward_row<kActivation>(
          channels, gates + 4 * row, c_prev + row, cell + row, grad_hidden + row,
          grad_hidden_carry + row, grad_cell + row, grad_c_prev + row, grad_gates + 4 * row);
    }
  });
}

// Calls fn with the gate activation as a compile-time constant.
template <typename Fn>
void with_activation(int64_t gate_activation, const Fn& fn) {
  if (gate_activation == kHardSigmoid) {
    fn(std::integral_constant<int64_t, kHardSigmoid>());
  } else {
    fn(std::integral_constant<int64_t, kSigmoid>());
  }
}

LayerResult convlstm_layer_forward(const at::Tensor& x, const at::Tensor& h0,
                                   const at::Tensor& c0, at::TensorList params_in,
                                   int64_t gate_activation) {
  const std::vector<at::Tensor> params = contiguous_params(params_in);
  const int64_t k = kernel_size_of(kOp, params, kWeightH, 3);
  TORCH_CHECK(x.dim() == 5 && h0.dim() == 4, kOp, ": x must be [T, B, Cin, H, W], h0 [B, C, H, W]");
  check_layer_inputs(kOp, x, h0, c0, params, param_specs(x.size(2), h0.size(1), k),
                     gate_activation);
  const int64_t steps = x.size(0), batch = x.size(1), cin = x.size(2), height = x.size(3),
                width = x.size(4), channels = h0.size(1), rows_per_step = batch * height * width;
  const auto shapes = saved_shapes(x, channels);
  if (steps == 0 || rows_per_step * channels == 0 || cin == 0) {
    return empty_layer_result(x, h0, c0, shapes);
  }
  const at::Tensor cell = at::empty(shapes[0], x.options());
  const at::Tensor gates = at::empty(shapes[1], x.options());
  const at::Tensor hidden = at::empty(shapes[0], x.options());
  // W_x * X for all steps: [T·B, H, W, 4C].
  const at::Tensor x_cl = to_channels_last(x.reshape({steps * batch, cin, height, width}));
  const at::Tensor z_x = conv_same(x_cl, params[kWeightX], 1).view(shapes[1]);
  at::Tensor h_prev = to_channels_last(h0);
  at::Tensor c_prev = to_channels_last(c0);
  for (int64_t t = 0; t < steps; ++t) {
    const at::Tensor z_h = conv_same(h_prev, params[kWeightH], 1);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), kOp, [&] {
      with_activation(gate_activation, [&](auto activation) {
        convlstm_cell_forward<decltype(activation)::value, scalar_t>(
            rows_per_step, channels, z_h.data_ptr<scalar_t>(), z_x[t].data_ptr<scalar_t>(),
            params[kBias].data_ptr<scalar_t>(), c_prev.data_ptr<scalar_t>(),
            gates[t].data_ptr<scalar_t>(), cell[t].data_ptr<scalar_t>(),
            hidden[t].data_ptr<scalar_t>());
      });
    });
    h_prev = hidden[t];
    c_prev = cell[t];
  }
  const at::Tensor output = from_channels_last(hidden);
  return {output, output[steps - 1].clone(), from_channels_last(c_prev), {cell, gates}};
}

// Reverse time: the fused loop gives dz_t [B, H, W, 4C] and dC_{t−1}; dH_{t−1} = W_hᵀ ⋆ dz_t (the
// convolution's input gradient). After the loop, batched over all steps: dW_h from
// (dz_t, H_{t−1}), db = Σ dz, and dW_x, dX from (dz, X) through the batched X-side convolution.
LayerResult convlstm_layer_backward(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                                    const at::Tensor& grad_c_n, const at::Tensor& x,
                                    const at::Tensor& h0, const at::Tensor& c0,
                                    at::TensorList params_in, const at::Tensor& output,
                                    at::TensorList saved, int64_t gate_activation) {
  const std::vector<at::Tensor> params = contiguous_params(params_in);
  const int64_t k = kernel_size_of(kBackwardOp, params, kWeightH, 3);
  TORCH_CHECK(x.dim() == 5 && h0.dim() == 4, kBackwardOp,
              ": x must be [T, B, Cin, H, W], h0 [B, C, H, W]");
  check_layer_inputs(kBackwardOp, x, h0, c0, params, param_specs(x.size(2), h0.size(1), k),
                     gate_activation);
  const int64_t steps = x.size(0), batch = x.size(1), cin = x.size(2), height = x.size(3),
                width = x.size(4), channels = h0.size(1), rows_per_step = batch * height * width;
  const auto shapes = saved_shapes(x, channels);
  check_backward_inputs(kBackwardOp, grad_output, grad_h_n, grad_c_n, x, h0, output, saved,
                        shapes);
  if (steps == 0 || rows_per_step * channels == 0 || cin == 0) {
    return empty_layer_grads(x, grad_h_n, grad_c_n, params);
  }
  const at::Tensor cell = saved[0].contiguous(), gates = saved[1].contiguous();
  const at::Tensor h_prev_all = at::cat(
      {to_channels_last(h0).unsqueeze(0), to_channels_last(output.narrow(0, 0, steps - 1))});
  const at::Tensor c0_cl = to_channels_last(c0);
  const at::Tensor grad_out_cl = to_channels_last(grad_output);
  const at::Tensor grad_gates = at::empty(shapes[1], x.options());
  at::Tensor grad_h = to_channels_last(grad_h_n);
  // dC_t flows back through two buffers: this step reads one and writes dC_{t−1} to the other.
  at::Tensor grad_c = to_channels_last(grad_c_n);
  at::Tensor grad_c_prev = at::empty_like(grad_c);
  for (int64_t t = steps - 1; t >= 0; --t) {
    const at::Tensor c_prev = t > 0 ? cell[t - 1] : c0_cl;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), kBackwardOp, [&] {
      with_activation(gate_activation, [&](auto activation) {
        convlstm_cell_backward<decltype(activation)::value, scalar_t>(
            rows_per_step, channels, gates[t].data_ptr<scalar_t>(), c_prev.data_ptr<scalar_t>(),
            cell[t].data_ptr<scalar_t>(), grad_out_cl[t].data_ptr<scalar_t>(),
            grad_h.data_ptr<scalar_t>(), grad_c.data_ptr<scalar_t>(),
            grad_c_prev.data_ptr<scalar_t>(), grad_gates[t].data_ptr<scalar_t>());
      });
    });
    std::swap(grad_c, grad_c_prev);
    grad_h = std::get<0>(conv_same_backward(grad_gates[t], h_prev_all[t], params[kWeightH], 1,
                                            true, false));
  }
  const at::Tensor grad_flat = grad_gates.view({steps * batch, height, width, 4 * channels});
  const at::Tensor grad_weight_h = std::get<1>(conv_same_backward(
      grad_flat, h_prev_all.view({steps * batch, height, width, channels}), params[kWeightH], 1,
      false, true));
  const at::Tensor x_cl = to_channels_last(x.reshape({steps * batch, cin, height, width}));
  auto x_grads = conv_same_backward(grad_flat, x_cl, params[kWeightX], 1, true, true);
  std::vector<at::Tensor> grad_params{std::get<1>(x_grads).contiguous(),
                                      grad_weight_h.contiguous(),
                                      grad_flat.reshape({-1, 4 * channels}).sum(0)};
  return {from_channels_last(std::get<0>(x_grads)).view(x.sizes()), from_channels_last(grad_h),
          from_channels_last(grad_c), grad_params};
}

}  // namespace

TORCH_LIBRARY_IMPL(convlstm_fast, CPU, m) {
  m.impl("convlstm_layer", &convlstm_layer_forward);
  m.impl("convlstm_layer_backward", &convlstm_layer_backward);
}

}  // namespace cpu
}  // namespace convlstm_fast
