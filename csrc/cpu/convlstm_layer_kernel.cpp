// The original ConvLSTM, `convlstm_fast::convlstm_layer` and its backward, on the CPU
// (shared/SPEC.md "convlstm", eqs. 1-6):
//   [i f g o] = W_x * X_t + W_h * H_{t−1} + b;  i, f, o = σ(·), G = tanh(g)
//   C_t = f∘C_{t−1} + i∘G;  H_t = o∘tanh(C_t)
// Structure: the cell is compute-bound in its K×K convolutions (3.7 GMAC per sample-step at 256
// channels), which oneDNN runs at this machine's full matmul rate; so wide 3×3 convolutions go
// through Winograd F(2×2, 3×3) (winograd.cpp, 2.25× fewer multiply-adds), and everything else is
// kept off the critical path. A step is one convolution of [X_t | H_{t−1}] with [W_x | W_h]
// (a layer of one step, whose weights' copy nothing would amortise, convolves the two apart)
// (NCHW, as the op's tensors are: no layout change of x or of the output) and one fused element
// loop per (sample, channel) plane adding the bias, activating the gates and updating the cell. The X
// side is not batched over T: at B = 2 the convolution already runs at full rate, and a
// sequence-sized X-side term costs a fresh multi-MB allocation (page faults). Parameters and
// saved tensors: cells.h kConvLSTMLayer (saved, in the layout every native backend shares: cell
// C_t [T, B, H, W, C] and the gate pre-activations [T, B, H, W, 4C], order i, f, g, o).
#include <array>

#include "cpu/layer_common.h"

namespace convlstm_fast {
namespace cpu {
namespace {

constexpr const cells::Cell& kCell = cells::kConvLSTMLayer;
namespace convlstm = cells::convlstm;

// The element loops work on one (sample, channel) plane of H·W values through __restrict__
// pointers (all buffers distinct), so the compiler vectorises them without aliasing checks.

// One plane: z_k += b_k for the four gate pre-activations (in place: they are what backward
// needs), i, f, o = σ(z), G = tanh(z_g), C_t = f∘C_{t−1} + i∘G, H_t = o∘tanh(C_t).
template <int64_t kActivation, typename scalar_t>
CONVLSTM_CPU_MULTIVERSION void convlstm_plane_forward(
    int64_t n, scalar_t bi, scalar_t bf, scalar_t bg, scalar_t bo, scalar_t* __restrict__ zi,
    scalar_t* __restrict__ zf, scalar_t* __restrict__ zg, scalar_t* __restrict__ zo,
    const scalar_t* __restrict__ c_prev, scalar_t* __restrict__ cell,
    scalar_t* __restrict__ hidden) {
  for (int64_t e = 0; e < n; ++e) {
    zi[e] += bi;
    zf[e] += bf;
    zg[e] += bg;
    zo[e] += bo;
    const scalar_t i = gate_activation(zi[e], kActivation);
    const scalar_t f = gate_activation(zf[e], kActivation);
    const scalar_t g = math_tanh(zg[e]);
    const scalar_t o = gate_activation(zo[e], kActivation);
    scalar_t h;
    cell[e] = cell_update(i, f, o, g, c_prev[e], &h);
    hidden[e] = h;
  }
}

// One plane of the backward step: with dH_t = grad_hidden + grad_hidden_carry, dC_t = grad_cell,
//   dC = dC_t + dH_t∘o∘(1 − tanh²C_t); dz_i = dC∘G∘σ'(z_i); dz_f = dC∘C_{t−1}∘σ'(z_f);
//   dz_g = dC∘i∘(1 − G²); dz_o = dH_t∘tanh C_t∘σ'(z_o); dC_{t−1} = dC∘f.
template <int64_t kActivation, typename scalar_t>
CONVLSTM_CPU_MULTIVERSION void convlstm_plane_backward(
    int64_t n, const scalar_t* __restrict__ zi, const scalar_t* __restrict__ zf,
    const scalar_t* __restrict__ zg, const scalar_t* __restrict__ zo,
    const scalar_t* __restrict__ c_prev, const scalar_t* __restrict__ cell,
    const scalar_t* __restrict__ grad_hidden, const scalar_t* __restrict__ grad_hidden_carry,
    const scalar_t* __restrict__ grad_cell, scalar_t* __restrict__ grad_c_prev,
    scalar_t* __restrict__ dzi, scalar_t* __restrict__ dzf, scalar_t* __restrict__ dzg,
    scalar_t* __restrict__ dzo) {
  for (int64_t e = 0; e < n; ++e) {
    const scalar_t i = gate_activation(zi[e], kActivation);
    const scalar_t f = gate_activation(zf[e], kActivation);
    const scalar_t g = math_tanh(zg[e]);
    const scalar_t o = gate_activation(zo[e], kActivation);
    scalar_t di, df, dg, do_, dc_prev;
    cell_update_backward(i, f, o, g, c_prev[e], cell[e],
                         scalar_t(grad_hidden[e] + grad_hidden_carry[e]), grad_cell[e], &di, &df,
                         &dg, &do_, &dc_prev);
    dzi[e] = di * gate_activation_grad(zi[e], kActivation);
    dzf[e] = df * gate_activation_grad(zf[e], kActivation);
    dzg[e] = dg * tanh_grad_from_output(g);
    dzo[e] = do_ * gate_activation_grad(zo[e], kActivation);
    grad_c_prev[e] = dc_prev;
  }
}

// Calls fn with the gate activation as a compile-time constant (no branch in the element loop).
template <typename Fn>
void with_activation(int64_t gate_activation, const Fn& fn) {
  if (gate_activation == kHardSigmoid) {
    fn(std::integral_constant<int64_t, kHardSigmoid>());
  } else {
    fn(std::integral_constant<int64_t, kSigmoid>());
  }
}

// The step's input [X_t | H_{t−1}] as one NCHW tensor [B, Cin + C, H, W]: one convolution with
// [W_x | W_h] then does both products (measured: one conv at 512 input channels is ~10% faster
// than two at 256 plus the sum).
void fill_step_input(const at::Tensor& xh, const at::Tensor& x_t, const at::Tensor& h_prev) {
  const int64_t cin = x_t.size(1);
  xh.narrow(1, 0, cin).copy_(x_t);
  xh.narrow(1, cin, h_prev.size(1)).copy_(h_prev);
}

// Pointers of plane (b, c) of the four gate blocks of a [B, 4C, H·W] tensor.
template <typename scalar_t>
std::array<scalar_t*, 4> gate_planes(scalar_t* z, int64_t b, int64_t c, int64_t channels,
                                     int64_t pixels) {
  scalar_t* zi = z + (b * 4 * channels + c) * pixels;
  return {zi, zi + channels * pixels, zi + 2 * channels * pixels, zi + 3 * channels * pixels};
}

// Whether a K×K convolution from `in` to `out` channels goes through Winograd F(2×2, 3×3)
// (winograd.cpp) rather than oneDNN: 3×3 kernels with both channel counts at least 256. Its
// transforms cost O(channels) per tile against the GEMMs' O(in·out), so it pays only on wide
// layers (measured here, B=2 T=8 28×28: at 256 channels forward 1.4× and forward+backward 1.26×
// eager; at 128 channels Winograd's backward was slower than oneDNN's). And only over two steps
// or more: the weights' transform (16/9 of the weights, a fresh buffer) is made once per layer
// call, which one step does not pay back — a cell driven one step at a time (ConvLSTMCell, or
// one step of a reverse or ragged walk) ran at 0.44× the eager reference with it (256 channels,
// 16×16, B = 2).
constexpr int64_t kWinogradMinChannels = 256;
bool use_winograd(int64_t k, int64_t in, int64_t out, int64_t steps) {
  return steps > 1 && k == 3 && std::min(in, out) >= kWinogradMinChannels;
}

// One side (X or H) of the step convolution in backward: z = W ⋆ input, W [4C, Cin, K, K].
struct ConvSide {
  const at::Tensor& weight;
  bool winograd;
  at::Tensor input_weight;      // Winograd: the transform of Wᵀ flipped (dinput = dz ⋆ that)
  at::Tensor grad_transformed;  // Winograd: Σ_t dM·Vᵀ [16, 4C, Cin]
  at::Tensor grad_weight;       // oneDNN: Σ_t dW (the last step's own dW until a second comes)

  ConvSide(const at::Tensor& weight_, int64_t channels, int64_t k, int64_t steps)
      : weight(weight_), winograd(use_winograd(k, weight_.size(1), 4 * channels, steps)) {
    if (winograd) {
      input_weight = winograd_weight(weight.transpose(0, 1).flip({2, 3}));
      grad_transformed = at::zeros({16, weight.size(0), weight.size(1)}, weight.options());
    }
  }

  // Accumulates this step's dW and returns dinput. grad_products holds dz's Winograd transform
  // (winograd_grad_transform) when this side uses Winograd.
  at::Tensor backward_step(const at::Tensor& grad_z, const at::Tensor& input,
                           const std::vector<int64_t>& padding, const at::Tensor& grad_products,
                           WinogradBuffers& buffers) {
    if (!winograd) {
      auto grads = at::convolution_backward(grad_z, input, weight, std::nullopt, {1, 1}, padding,
                                            {1, 1}, false, {0, 0}, 1, {true, true, false});
      // The first step's dW is the sum so far: no weight-sized zeros to add it to (a fresh
      // buffer, and a pass, per call: what a cell driven one step at a time pays each step).
      if (grad_weight.defined()) {
        grad_weight.add_(std::get<1>(grads));
      } else {
        grad_weight = std::get<1>(grads);
      }
      return std::get<0>(grads);
    }
    at::Tensor grad_input = winograd_conv(grad_z, input_weight, buffers);
    winograd_input_transform(input, buffers.tiles);
    grad_transformed.baddbmm_(grad_products, buffers.tiles.transpose(1, 2));
    return grad_input;
  }

  at::Tensor weight_grad() const {
    if (winograd) return winograd_weight_grad(grad_transformed);
    return grad_weight.defined() ? grad_weight : at::zeros_like(weight);
  }
};

LayerResult convlstm_layer_forward(const at::Tensor& x, const at::Tensor& h0,
                                   const at::Tensor& c0, at::TensorList params_in,
                                   int64_t gate_activation, bool reverse,
                                   const std::optional<at::Tensor>& lengths, bool save) {
  const std::vector<at::Tensor> params = contiguous_params(params_in);
  const LayerCall call =
      check_forward(kCell, convlstm::kWeightH, x, h0, c0, params, gate_activation);
  const auto& shapes = call.saved_shapes;
  if (call.empty) return empty_layer_result(x, h0, c0, shapes);
  const int64_t steps = x.size(0), batch = x.size(1), cin = x.size(2), height = x.size(3),
                width = x.size(4), channels = h0.size(1), pixels = height * width,
                k = call.kernel_size;
  const at::TensorOptions options = x.options();
  // Saved (only with `save`): written a step at a time, in the shared channels-last layout.
  const at::Tensor cell =
      at::empty(save ? shapes[convlstm::kSavedCell] : std::vector<int64_t>{0}, options);
  const at::Tensor gates =
      at::empty(save ? shapes[convlstm::kSavedGatePreact] : std::vector<int64_t>{0}, options);
  const at::Tensor output = at::empty({steps, batch, channels, height, width}, options);
  // Over two steps or more, one convolution of [X_t | H_{t−1}] with [W_x | W_h] per step; a
  // single step convolves X_t and H_{t−1} apart instead, as [W_x | W_h] would be a fresh copy of
  // the weights per call (19 MB at 256 channels, more than the step's own work at small maps).
  const bool joined = steps > 1;
  const at::Tensor weight =
      joined ? at::cat({params[convlstm::kWeightX], params[convlstm::kWeightH]}, 1) : at::Tensor();
  const at::Tensor xh =
      joined ? at::empty({batch, cin + channels, height, width}, options) : at::Tensor();
  const bool winograd = use_winograd(k, cin + channels, 4 * channels, steps);
  const at::Tensor weight_w = winograd ? winograd_weight(weight) : at::Tensor();
  WinogradBuffers buffers(options);
  // C in NCHW, ping-ponging between two step buffers.
  std::array<at::Tensor, 2> cell_step{c0.contiguous().clone(), at::empty(c0.sizes(), options)};
  const Walk walk{steps, reverse};
  // With lengths (step_mask.h), H_{t−1} from a carry buffer; C carries in cell_step.
  const StepMask mask(lengths, x);
  const at::Tensor h_carry = mask.active() ? h0.contiguous().clone() : at::Tensor();
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t t = walk.time(s);
    const at::Tensor& h_prev =
        mask.active() ? h_carry : walk.is_first(t) ? h0 : output[walk.prev(t)];
    at::Tensor z;  // [B, 4C, H, W]
    if (joined) {
      fill_step_input(xh, x[t], h_prev);
      z = winograd ? winograd_conv(xh, weight_w, buffers) : at::conv2d(xh, weight, {}, 1, k / 2);
    } else {
      z = at::conv2d(x[t], params[convlstm::kWeightX], {}, 1, k / 2).contiguous();
      z.add_(at::conv2d(h_prev, params[convlstm::kWeightH], {}, 1, k / 2));
    }
    const at::Tensor& c_prev = cell_step[s % 2];
    const at::Tensor& c_next = cell_step[(s + 1) % 2];
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "convlstm_layer", [&] {
      with_activation(gate_activation, [&](auto activation) {
        scalar_t* zp = z.data_ptr<scalar_t>();
        const scalar_t* bias = params[convlstm::kBias].data_ptr<scalar_t>();
        const scalar_t* cp = c_prev.data_ptr<scalar_t>();
        scalar_t* cn = c_next.data_ptr<scalar_t>();
        scalar_t* hp = output[t].data_ptr<scalar_t>();
        parallel_over_planes(batch, channels, [&](int64_t b, int64_t c) {
          const auto zs = gate_planes(zp, b, c, channels, pixels);
          const int64_t plane = (b * channels + c) * pixels;
          convlstm_plane_forward<decltype(activation)::value>(
              pixels, bias[c], bias[channels + c], bias[2 * channels + c],
              bias[3 * channels + c], zs[0], zs[1], zs[2], zs[3], cp + plane, cn + plane,
              hp + plane);
        });
      });
    });
    if (mask.active()) {
      mask.carry(t, c_next, c_prev);
      mask.advance(t, h_carry, output[t]);
      mask.zero_output(t, output[t]);
    }
    if (save) {
      copy_to_channels_last(gates[t], z);
      copy_to_channels_last(cell[t], c_next);
    }
  }
  const at::Tensor& c_n = cell_step[steps % 2];
  std::vector<at::Tensor> saved(kCell.saved_cpu.size);
  saved[convlstm::kSavedCell] = cell;
  saved[convlstm::kSavedGatePreact] = gates;
  return {output, mask.active() ? h_carry : output[walk.last()].clone(), c_n.clone(), saved};
}

// The forward's walk backwards, per step: the fused loop gives dz_t [B, 4C, H, W] and the
// previous step's dC; the two convolutions' backward give dX_t, the previous step's dH (carried
// to it) and this step's share of dW_x and dW_h, accumulated in fixed order; db = Σ dz. NCHW throughout (oneDNN's
// backward runs ~12% faster on NCHW than on channels-last here), one step's buffers reused.
LayerResult convlstm_layer_backward(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                                    const at::Tensor& grad_c_n, const at::Tensor& x,
                                    const at::Tensor& h0, const at::Tensor& c0,
                                    at::TensorList params_in, const at::Tensor& output,
                                    at::TensorList saved, int64_t gate_activation,
                                    bool reverse, const std::optional<at::Tensor>& lengths) {
  const std::vector<at::Tensor> params = contiguous_params(params_in);
  const LayerCall call = check_backward(kCell, convlstm::kWeightH, grad_output, grad_h_n, grad_c_n,
                                        x, h0, c0, params, output, saved, gate_activation);
  if (call.empty) return empty_layer_grads(x, grad_h_n, grad_c_n, params);
  const int64_t steps = x.size(0), batch = x.size(1), height = x.size(3), width = x.size(4),
                channels = h0.size(1), pixels = height * width, k = call.kernel_size;
  const at::TensorOptions options = x.options();
  const at::Tensor cell = saved[convlstm::kSavedCell].contiguous();
  const at::Tensor gates = saved[convlstm::kSavedGatePreact].contiguous();
  const at::Tensor z = at::empty({batch, 4 * channels, height, width}, options);
  const at::Tensor grad_z = at::empty({batch, 4 * channels, height, width}, options);
  // Step t's C and its previous step's in NCHW: the previous step's C_t is this step's C_{t−1},
  // so the two buffers swap and each saved cell state is converted once.
  const Walk walk{steps, reverse};
  const StepMask mask(lengths, x);
  at::Tensor cell_t = at::empty(c0.sizes(), options), c_prev = at::empty(c0.sizes(), options);
  copy_from_channels_last(cell_t, cell[walk.last()]);
  const at::Tensor grad_output_c = mask.output_gradient(grad_output.contiguous());
  const at::Tensor grad_bias = at::zeros({4 * channels}, options);
  const at::Tensor grad_x = at::empty(x.sizes(), options);
  const StepFrames frames(x);
  // dL/dH flowing back to the previous step: grad_h_n, then the H part of the conv's input gradient.
  // (A copy with lengths, which zero it in place where a step does not count.)
  at::Tensor grad_h = mask.active() ? grad_h_n.contiguous().clone() : grad_h_n.contiguous();
  // dC_t flows back through two buffers: this step reads one and writes dC_{t−1} to the other.
  at::Tensor grad_c = grad_c_n.contiguous().clone();
  at::Tensor grad_c_prev = at::empty_like(grad_c);
  const std::vector<int64_t> padding{k / 2, k / 2};
  ConvSide x_side(params[convlstm::kWeightX], channels, k, steps);
  ConvSide h_side(params[convlstm::kWeightH], channels, k, steps);
  WinogradBuffers buffers(options);
  const at::Tensor grad_products = at::empty({0}, options);
  for (int64_t s = steps - 1; s >= 0; --s) {
    const int64_t t = walk.time(s);
    copy_from_channels_last(z, gates[t]);
    if (s < steps - 1) std::swap(cell_t, c_prev);
    if (walk.is_first(t)) {
      c_prev.copy_(c0);
    } else {
      copy_from_channels_last(c_prev, cell[walk.prev(t)]);
    }
    const at::Tensor held_h = mask.feed(t, grad_h), held_c = mask.feed(t, grad_c);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "convlstm_layer_backward", [&] {
      with_activation(gate_activation, [&](auto activation) {
        scalar_t* zp = z.data_ptr<scalar_t>();
        scalar_t* dzp = grad_z.data_ptr<scalar_t>();
        const scalar_t* cp = c_prev.data_ptr<scalar_t>();
        const scalar_t* ct = cell_t.data_ptr<scalar_t>();
        const scalar_t* gout = grad_output_c[t].data_ptr<scalar_t>();
        const scalar_t* gh = grad_h.data_ptr<scalar_t>();
        const int64_t gh_batch_stride = grad_h.stride(0);
        const scalar_t* gc = grad_c.data_ptr<scalar_t>();
        scalar_t* gcp = grad_c_prev.data_ptr<scalar_t>();
        parallel_over_planes(batch, channels, [&](int64_t b, int64_t c) {
          const auto zs = gate_planes(zp, b, c, channels, pixels);
          const auto dzs = gate_planes(dzp, b, c, channels, pixels);
          const int64_t plane = (b * channels + c) * pixels;
          convlstm_plane_backward<decltype(activation)::value>(
              pixels, zs[0], zs[1], zs[2], zs[3], cp + plane, ct + plane, gout + plane,
              gh + b * gh_batch_stride + c * pixels, gc + plane, gcp + plane, dzs[0], dzs[1],
              dzs[2], dzs[3]);
        });
      });
    });
    std::swap(grad_c, grad_c_prev);
    mask.pass(t, grad_c, held_c);
    grad_bias.add_(grad_z.sum({0, 2, 3}));
    if (x_side.winograd || h_side.winograd) winograd_grad_transform(grad_z, grad_products);
    grad_x[t].copy_(
        x_side.backward_step(grad_z, frames(t), padding, grad_products, buffers));
    grad_h = h_side.backward_step(grad_z, mask.state_before(walk, t, output, h0.contiguous()),
                                  padding, grad_products, buffers);
    mask.pass(t, grad_h, held_h);
  }
  std::vector<at::Tensor> grad_params(kCell.parameters.size);
  grad_params[convlstm::kWeightX] = x_side.weight_grad();
  grad_params[convlstm::kWeightH] = h_side.weight_grad();
  grad_params[convlstm::kBias] = grad_bias;
  return {grad_x, grad_h.contiguous(), grad_c, grad_params};
}

}  // namespace

TORCH_LIBRARY_IMPL(convlstm_fast, CPU, m) {
  register_layer_kernels<convlstm_layer_forward>(m, kCell, &convlstm_layer_backward);
}

}  // namespace cpu
}  // namespace convlstm_fast
