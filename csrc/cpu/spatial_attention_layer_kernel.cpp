// Variant (b), `convlstm_fast::spatial_attention_layer` and its backward, on the CPU
// (shared/SPEC.md "b", eqs. 17-19):
//   F = tanh(SepConv_xa(X_t) + SepConv_ha(H_{t−1}) + b_a);  Z = W_z * F  (K×K conv, C → 1)
//   A = softmax of Z over the H·W positions of each sample;  X̃ = A∘X_t
//   then cell (a) on X̃: [i f o] = σ(U_x GAP(X̃) + U_h GAP(H_{t−1}) + b_g),
//   G = tanh(SepConv_x(X̃) + SepConv_h(H_{t−1}) + b_c), C_t = f∘C_{t−1} + i∘G, H_t = o∘tanh(C_t)
// Structure: variant a's (pooled_layer_kernel.cpp) — everything in the op's own NCHW layout, a
// step at a time through step buffers reused across steps: per-plane depthwise stencils,
// per-sample pointwise GEMMs, and the fused per-plane cell loop of pooled_cell.h. The attention
// adds two SepConvs feeding F (X_t's is computed per step like the rest: the per-step GEMM runs
// at the full matmul rate, and a sequence-sized X-side term would cost a fresh multi-MB buffer),
// Z as the per-channel stencils of W_z summed over the channels, and the softmax per sample.
// Parameters and saved tensors: cells.h kSpatialAttentionLayer (saved: cell and candidate
// [T, B, C, H, W], NCHW where the CUDA kernels save channels-last, gate_preact [T, B, 3C], the map
// A [T, B, H, W]); F and X̃ are recomputed step by step in backward.
#include <array>

#include "cpu/pooled_cell.h"

namespace convlstm_fast {
namespace cpu {
namespace {

constexpr const cells::Cell& kCell = cells::kSpatialAttentionLayer;
namespace spatial = cells::spatial_attention;

// One plane: out = a∘x, returning Σ out.
template <typename scalar_t>
CONVLSTM_CPU_MULTIVERSION scalar_t attend_plane(int64_t n, const scalar_t* __restrict__ a,
                                                const scalar_t* __restrict__ x,
                                                scalar_t* __restrict__ out) {
  scalar_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t e = 0; e < n; ++e) {
    out[e] = a[e] * x[e];
    sum += out[e];
  }
  return sum;
}

// One channel's pixels [0, n) of X̃ = A∘X in backward: grad_x = a∘grad_attended (dX = A∘dX̃),
// grad_a += grad_attended∘x (dA += dX̃∘X).
template <typename scalar_t>
CONVLSTM_CPU_MULTIVERSION void attend_plane_backward(int64_t n, const scalar_t* __restrict__ a,
                                                     const scalar_t* __restrict__ x,
                                                     const scalar_t* __restrict__ grad_attended,
                                                     scalar_t* __restrict__ grad_x,
                                                     scalar_t* __restrict__ grad_a) {
  for (int64_t e = 0; e < n; ++e) {
    grad_x[e] = a[e] * grad_attended[e];
    grad_a[e] += grad_attended[e] * x[e];
  }
}

// One step's X̃ = A∘X_t [B, Cin, H, W] (A [B, H, W]) and, when x_bar is defined, x̄ = GAP(X̃)
// [B, Cin].
void attend(const at::Tensor& x_attended, const at::Tensor& x_bar, const at::Tensor& map,
            const at::Tensor& x_t) {
  const int64_t cin = x_t.size(1), pixels = x_t.size(2) * x_t.size(3);
  AT_DISPATCH_FLOATING_TYPES(x_t.scalar_type(), "attend", [&] {
    const scalar_t* a = map.data_ptr<scalar_t>();
    const scalar_t* x = x_t.data_ptr<scalar_t>();
    scalar_t* out = x_attended.data_ptr<scalar_t>();
    scalar_t* bar = x_bar.defined() ? x_bar.data_ptr<scalar_t>() : nullptr;
    parallel_over_planes(x_t.size(0), cin, [&](int64_t b, int64_t c) {
      const int64_t offset = (b * cin + c) * pixels;
      const scalar_t sum = attend_plane(pixels, a + b * pixels, x + offset, out + offset);
      if (bar) bar[b * cin + c] = sum / scalar_t(pixels);
    });
  });
}

// Backward of X̃ = A∘X_t and A = softmax_HW(Z), one step: given dX̃ `grad_attended`
// [B, Cin, H, W], writes dX_t = A∘dX̃ into grad_x and dZ = A∘(dA − Σ_p A_p dA_p),
// dA_p = Σ_cin dX̃_p∘X_p, into grad_z [B, 1, H, W]. Parallel over pixel ranges, channels in order
// within each.
void attend_backward(const at::Tensor& grad_attended, const at::Tensor& x_t, const at::Tensor& map,
                     const at::Tensor& grad_x, const at::Tensor& grad_z) {
  const int64_t batch = x_t.size(0), cin = x_t.size(1), pixels = x_t.size(2) * x_t.size(3);
  AT_DISPATCH_FLOATING_TYPES(x_t.scalar_type(), "attend_backward", [&] {
    const scalar_t* a = map.data_ptr<scalar_t>();
    const scalar_t* x = x_t.data_ptr<scalar_t>();
    const scalar_t* gx_attended = grad_attended.data_ptr<scalar_t>();
    scalar_t* gx = grad_x.data_ptr<scalar_t>();
    scalar_t* gz = grad_z.data_ptr<scalar_t>();
    parallel_over_pixels(batch, pixels, [&](int64_t b, int64_t, int64_t begin, int64_t end) {
      scalar_t* ga = gz + b * pixels + begin;
      for (int64_t p = 0; p < end - begin; ++p) ga[p] = scalar_t(0);
      for (int64_t c = 0; c < cin; ++c) {
        const int64_t offset = (b * cin + c) * pixels + begin;
        attend_plane_backward(end - begin, a + b * pixels + begin, x + offset,
                              gx_attended + offset, gx + offset, ga);
      }
    });
    for (int64_t b = 0; b < batch; ++b) {
      const scalar_t* ab = a + b * pixels;
      scalar_t* g = gz + b * pixels;
      scalar_t dot = 0;
      for (int64_t p = 0; p < pixels; ++p) dot += ab[p] * g[p];
      for (int64_t p = 0; p < pixels; ++p) g[p] = ab[p] * (g[p] - dot);
    }
  });
}

// The map from the features: Z = W_z * F, the attention's full K×K conv from C channels to 1, as
// C depthwise stencils summed, and A = softmax_HW(Z).
struct SpatialMap {
  at::Tensor taps_z;  // W_z [1, C, K, K] as [C, 1, K, K]: one stencil per channel of F
  explicit SpatialMap(const at::Tensor& weight_z)
      : taps_z(weight_z.view({weight_z.size(1), 1, weight_z.size(2), weight_z.size(3)})) {}

  // map A [B, H, W] = softmax_HW(Z), logits Z [B, H, W] = W_z * F, with `scratch` [B, C, H, W]
  // for the per-channel stencils.
  void compute(const at::Tensor& map, const at::Tensor& features, const at::Tensor& scratch,
               const at::Tensor& logits) const {
    depthwise_conv_planes(scratch, features, taps_z, false, at::Tensor());
    at::Tensor logits_out = logits, map_out = map.view({features.size(0), -1});
    at::sum_out(logits_out, scratch, {1});
    at::_softmax_out(map_out, logits.view({features.size(0), -1}), 1, false);
  }
};

LayerResult spatial_attention_layer_forward(const at::Tensor& x, const at::Tensor& h0,
                                            const at::Tensor& c0, at::TensorList params_in,
                                            int64_t gate_activation, bool reverse,
                                      const std::optional<at::Tensor>& lengths, bool save) {
  const std::vector<at::Tensor> params = contiguous_params(params_in);
  const LayerCall call = check_forward(kCell, pooled::kCandDwX, x, h0, c0, params, gate_activation);
  const auto& shapes = call.saved_shapes;
  if (call.empty) return empty_layer_result(x, h0, c0, shapes);
  const int64_t steps = x.size(0), batch = x.size(1), cin = x.size(2), height = x.size(3),
                width = x.size(4), c = h0.size(1);
  const at::TensorOptions options = x.options();
  PooledForward<kCell.map_gate()> fwd(x, h0, c0, params, gate_activation, shapes, reverse,
                                      lengths, save);
  // Without `save`, A in one step buffer.
  const StepBuffers map(shapes[spatial::kSavedMap], options, save, 1);
  const at::Tensor attention_pointwise =
      at::cat({params[attention::kAttPwX], params[attention::kAttPwH]}, 1);
  // Step buffers, reused.
  const at::Tensor x_attended = at::empty({batch, cin, height, width}, options);
  const at::Tensor features = at::empty({batch, c, height, width}, options);
  const at::Tensor scratch = at::empty({batch, c, height, width}, options);
  const at::Tensor logits = at::empty({batch, height, width}, options);
  const SpatialMap spatial_map(params[spatial::kAttWeightZ]);
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t t = fwd.walk.time(s);
    // Attention: F, A = softmax(W_z * F), X̃ = A∘X_t and its GAP; then cell (a) on X̃.
    fwd.sepconvs(t, features, params[attention::kAttDwX], params[attention::kAttDwH],
                 attention_pointwise);
    attention_features(features, params[attention::kAttBias]);
    spatial_map.compute(map[t], features, scratch, logits);
    attend(x_attended, fwd.x_bar, map[t], fwd.frame(t));
    fwd.cell_step(t, x_attended, true, at::Tensor());
  }
  return fwd.result({map.all()});
}

// The forward's walk backwards, per step (H_{t−1} the previous step's): F and X̃ recomputed, then
//   the fused cell loop gives dG_pre, dC_{t−1} and the pooled gates' dgp (variant a's);
//   dX̃ = dw_xᵀ(P_xᵀ·dG_pre) + (dgp·U_x)/HW;  dX_t = A∘dX̃;  dA_p = Σ_cin dX̃_p∘X_p
//   dZ = A∘(dA − Σ_p A_p dA_p)  (softmax);  dF = W_zᵀ ⋆ dZ;  dF_pre = dF∘(1 − F²)
//   dX_t += dw_xaᵀ(P_xaᵀ·dF_pre)
//   dH_{t−1} = dw_hᵀ(P_hᵀ·dG_pre) + dw_haᵀ(P_haᵀ·dF_pre) + (dgp·U_h)/HW.
// Weight gradients accumulate step by step in fixed order (deterministic); nothing
// sequence-sized is allocated besides grad_x.
LayerResult spatial_attention_layer_backward(const at::Tensor& grad_output,
                                             const at::Tensor& grad_h_n,
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
  const int64_t steps = x.size(0), batch = x.size(1), cin = x.size(2), height = x.size(3),
                width = x.size(4), c = h0.size(1), k = call.kernel_size;
  const at::TensorOptions options = x.options();
  PooledBackward<kCell.map_gate()> back(grad_output, grad_h_n, grad_c_n, x, h0, c0, params,
                                        output, saved, reverse, lengths);
  const at::Tensor map = saved[spatial::kSavedMap].contiguous();
  AttentionFeaturesBackward att_f(params[attention::kAttDwX], params[attention::kAttPwX],
                                  params[attention::kAttDwH], params[attention::kAttPwH],
                                  params[attention::kAttBias], back.frames(0), back.h0,
                                  steps);
  const SpatialMap spatial_map(params[spatial::kAttWeightZ]);
  // Step buffers, reused.
  const at::Tensor x_attended = at::empty({batch, cin, height, width}, options);
  const at::Tensor grad_x_attended = at::empty({batch, cin, height, width}, options);
  const at::Tensor features = at::empty({batch, c, height, width}, options);
  const at::Tensor grad_features = at::empty({batch, c, height, width}, options);
  const at::Tensor grad_z = at::empty({batch, 1, height, width}, options);
  const at::Tensor grad_weight_z = at::zeros_like(params[spatial::kAttWeightZ]);
  const at::Tensor grad_taps_z = grad_weight_z.view({c, 1, k, k});

  for (int64_t done = steps - 1; done >= 0; --done) {
    const int64_t t = back.walk.time(done);
    const auto s = back.step(t);
    const auto held = back.feed(s);
    // Recompute F and X̃.
    att_f.recompute(t, s.x, s.h_prev, features);
    attend(x_attended, at::Tensor(), map[t], s.x);
    back.cand_x.load(t, x_attended);
    back.cand_h.load(t, s.h_prev);
    back.cell_backward(s, gate_activation, at::Tensor(), at::Tensor());
    // dX̃, then through X̃ = A∘X_t and the softmax to dZ, through Z = W_z * F to dF.
    back.cand_x.backward(x_attended, back.grad_cand, s.dgp, grad_x_attended, false);
    const at::Tensor grad_x_t = back.grad_x[t];
    attend_backward(grad_x_attended, s.x, map[t], grad_x_t, grad_z);
    depthwise_conv_planes(grad_features, grad_z, spatial_map.taps_z, true, at::Tensor());
    depthwise_weight_grad_planes(grad_taps_z, grad_z, features);
    // dH_{t−1}: the candidate's share with the pooled gates' as the planes' initial value; then
    // the attention features' shares of dX_t and dH_{t−1}.
    back.cand_h.backward(s.h_prev, back.grad_cand, s.dgp, s.grad_h_out, false);
    att_f.backward(s.x, s.h_prev, features, grad_features, grad_x_t, s.grad_h_out);
    back.pass(s, held);
  }

  std::vector<at::Tensor> grads(kCell.parameters.size);
  att_f.gradients(grads);
  grads[spatial::kAttWeightZ] = grad_weight_z;
  return back.result(std::move(grads));
}

}  // namespace

TORCH_LIBRARY_IMPL(convlstm_fast, CPU, m) {
  register_layer_kernels<spatial_attention_layer_forward>(m, kCell,
                                                          &spatial_attention_layer_backward);
}

}  // namespace cpu
}  // namespace convlstm_fast
