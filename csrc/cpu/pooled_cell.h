// The fused per-step loops of the pooled cells a, b, c, d (shared/SPEC.md) on NCHW planes: gate
// activation, candidate tanh, cell update and their backward, all from cell_math.h, plus the
// SepConv branch every step's backward runs several of.
//
// The three gates i, f, o are each either a pooled gate, one value per (sample, channel)
// broadcast over H·W, or (c: i, d: o) the channel-attention map A with one value per element.
// `kMapGate` (cells.h MapGate) says which gate A replaces: kNoMapGate (a, b), kMapIsInputGate
// (c), kMapIsOutputGate (d). The pooled gates come in the op's order (cells.h Cell::gates: a, b:
// i f o; c: f o; d: i f), so one (sample, channel) plane shares its pooled gates and the
// candidate bias: scalars, and the loops below are plain vectorised streams over the plane's H·W
// values. Parameters and saved tensors are named by cells.h (cells::pooled).
#pragma once

#include <array>

#include "cpu/layer_common.h"

namespace convlstm_fast {
namespace cpu {

namespace pooled = cells::pooled;
namespace attention = cells::attention;

// How many gates are pooled, and where gate g (0 i, 1 f, 2 o) sits among them (-1: the map).
template <int kMapGate>
struct PooledGates {
  static constexpr bool has_map = kMapGate != cells::kNoMapGate;
  static constexpr int64_t count = has_map ? 2 : 3;
  static constexpr int slot(int gate) {
    return gate == kMapGate ? -1 : (has_map && gate > kMapGate ? gate - 1 : gate);
  }
};

// gates = σ(preact) on [B, n·C] (the pooled gates are few: a plain loop).
template <typename scalar_t>
void activate_gates(const scalar_t* preact, scalar_t* gates, int64_t count, int64_t activation) {
  for (int64_t k = 0; k < count; ++k) gates[k] = gate_activation(preact[k], activation);
}

// One SepConv branch (depthwise K×K, then pointwise 1×1) of a step in backward, on NCHW planes:
// its parameters, the step buffers and the parameter-sized sums its weight gradients accumulate
// into. A branch whose input also feeds the pooled gates (GAP(input) through gate_weight) records
// the GAPs and adds the gates' share to its input gradient; a branch without (gate_weight
// undefined) does neither.
struct SepConvBranch {
  at::Tensor depthwise, pointwise, gate_weight;  // [Cin, 1, K, K], [C, Cin], [nC, Cin] or none
  at::Tensor dw, grad_dw, grad_bar;              // step buffers [B, Cin, H, W] ×2, [B, Cin]
  at::Tensor grad_depthwise, grad_pointwise;     // accumulated over the steps
  at::Tensor bars;                               // [T, B, Cin]: GAP of the input, for dU

  SepConvBranch(const at::Tensor& depthwise_, const at::Tensor& pointwise_,
                const at::Tensor& gate_weight_, const at::Tensor& input_like, int64_t steps)
      : depthwise(depthwise_),
        pointwise(pointwise_),
        gate_weight(gate_weight_),
        dw(at::empty_like(input_like)),
        grad_dw(at::empty_like(input_like)),
        grad_bar(at::empty({input_like.size(0), input_like.size(1)}, input_like.options())),
        grad_depthwise(at::zeros_like(depthwise_)),
        grad_pointwise(at::zeros_like(pointwise_)),
        bars(gate_weight_.defined()
                 ? at::empty({steps, input_like.size(0), input_like.size(1)},
                             input_like.options())
                 : at::Tensor()) {}

  // Step t's input `in` [B, Cin, H, W]: recomputes dw(in) (and records GAP(in)).
  void load(int64_t t, const at::Tensor& in) {
    if (gate_weight.defined()) plane_means(bars[t], in);
    depthwise_conv_planes(dw, in, depthwise, false, at::Tensor());
  }

  // out (+)= P·dw(in), the branch's output for the loaded input.
  void output(const at::Tensor& out, bool accumulate) const {
    pointwise_planes(out, pointwise, dw, accumulate);
  }

  // With the loaded input `in`, the gradient of the branch's output `grad_out` [B, C, H, W] and
  // (gate branches) the pooled gates' pre-activation gradient dgp [B, nC]: accumulates d dw and
  // dP, and writes grad_in = dwᵀ(Pᵀ·grad_out) (+ (dgp·U)/HW on every pixel), or adds it to
  // grad_in with `accumulate`.
  void backward(const at::Tensor& in, const at::Tensor& grad_out, const at::Tensor& dgp,
                const at::Tensor& grad_in, bool accumulate) {
    if (gate_weight.defined()) {
      grad_bar.zero_();
      small_addmm_(grad_bar, dgp, gate_weight, false);
      grad_bar.div_(in.size(2) * in.size(3));
    }
    pointwise_planes_weight_grad(grad_pointwise, grad_out, dw);
    pointwise_planes(grad_dw, pointwise.t(), grad_out, false);
    depthwise_weight_grad_planes(grad_depthwise, grad_dw, in);
    depthwise_conv_planes(grad_in, grad_dw, depthwise, true,
                          gate_weight.defined() ? grad_bar : at::Tensor(), accumulate);
  }
};

// Runs fn(plane, i, f, o) over every (sample, channel) plane (plane = b·C + c) in parallel, with
// the plane's pooled gates read from gates [B, n·C] (the map gate's value is 0, unused).
template <int kMapGate, typename scalar_t, typename Fn>
void for_each_gated_plane(int64_t batch, int64_t channels, const scalar_t* gates, const Fn& fn) {
  using G = PooledGates<kMapGate>;
  parallel_over_planes(batch, channels, [&](int64_t b, int64_t c) {
    const scalar_t* g = gates + b * G::count * channels + c;
    const auto value = [&](int gate) {
      return G::slot(gate) < 0 ? scalar_t(0) : g[G::slot(gate) * channels];
    };
    fn(b * channels + c, value(0), value(1), value(2));
  });
}

// Forward, one plane: G = tanh(preact + b_c); C_t = f∘C_{t−1} + i∘G; H_t = o∘tanh(C_t), with the
// map gate read per element from `map`. Writes C_t, H_t and (kStoreCandidate: saved for
// backward) G, and returns Σ H_t (the next step's h̄ = Σ / HW).
template <int kMapGate, bool kStoreCandidate, typename scalar_t>
CONVLSTM_CPU_MULTIVERSION scalar_t gated_plane_forward(
    int64_t n, scalar_t i, scalar_t f, scalar_t o, scalar_t bias,
    const scalar_t* __restrict__ map, const scalar_t* __restrict__ preact,
    const scalar_t* __restrict__ c_prev, scalar_t* __restrict__ candidate,
    scalar_t* __restrict__ cell, scalar_t* __restrict__ hidden) {
  scalar_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t e = 0; e < n; ++e) {
    const scalar_t g = math_tanh(scalar_t(preact[e] + bias));
    scalar_t h;
    cell[e] = cell_update(kMapGate == cells::kMapIsInputGate ? map[e] : i, f,
                          kMapGate == cells::kMapIsOutputGate ? map[e] : o, g, c_prev[e], &h);
    if (kStoreCandidate) candidate[e] = g;
    hidden[e] = h;
    sum += h;
  }
  return sum;
}

// Backward, one plane, with dH_t = grad_hidden + grad_hidden_carry and dC_t = grad_cell:
//   dC = dC_t + dH_t∘o∘(1 − tanh²C_t); d(candidate preact) = dC∘i∘(1 − G²); dC_{t−1} = dC∘f;
//   di = dC∘G, df = dC∘C_{t−1}, do = dH_t∘tanh C_t;
// sums[0..3] = Σ di, Σ df, Σ do, Σ d(candidate preact) (the map gate's sum is unused). For the
// map gate A = exp(Z − max Z), grad_z gets dZ (torch.amax's rule: the gradient of the max is
// shared equally by the maxima, the elements where A = exp(0) = 1 exactly):
//   dZ_e = dA_e∘A_e − [A_e = 1] · Σ_q (dA_q∘A_q) / #{q : A_q = 1}.
template <int kMapGate, typename scalar_t>
CONVLSTM_CPU_MULTIVERSION void gated_plane_backward(
    int64_t n, scalar_t i, scalar_t f, scalar_t o, const scalar_t* __restrict__ map,
    const scalar_t* __restrict__ candidate, const scalar_t* __restrict__ c_prev,
    const scalar_t* __restrict__ cell, const scalar_t* __restrict__ grad_hidden,
    const scalar_t* __restrict__ grad_hidden_carry, const scalar_t* __restrict__ grad_cell,
    scalar_t* __restrict__ grad_candidate_preact, scalar_t* __restrict__ grad_c_prev,
    scalar_t* __restrict__ grad_z, scalar_t* __restrict__ sums) {
  scalar_t sum_i = 0, sum_f = 0, sum_o = 0, sum_g = 0, sum_z = 0, ties = 0;
#pragma omp simd reduction(+ : sum_i, sum_f, sum_o, sum_g, sum_z, ties)
  for (int64_t e = 0; e < n; ++e) {
    const scalar_t g = candidate[e];
    scalar_t di, df, dg, do_, dc_prev;
    cell_update_backward(kMapGate == cells::kMapIsInputGate ? map[e] : i, f,
                         kMapGate == cells::kMapIsOutputGate ? map[e] : o, g, c_prev[e], cell[e],
                         scalar_t(grad_hidden[e] + grad_hidden_carry[e]), grad_cell[e], &di, &df,
                         &dg, &do_, &dc_prev);
    const scalar_t dpre = dg * tanh_grad_from_output(g);
    grad_candidate_preact[e] = dpre;
    grad_c_prev[e] = dc_prev;
    sum_i += di;
    sum_f += df;
    sum_o += do_;
    sum_g += dpre;
    if (PooledGates<kMapGate>::has_map) {
      const scalar_t dz = (kMapGate == cells::kMapIsInputGate ? di : do_) * map[e];
      grad_z[e] = dz;
      sum_z += dz;
      ties += map[e] == scalar_t(1) ? scalar_t(1) : scalar_t(0);
    }
  }
  if (PooledGates<kMapGate>::has_map) {
    const scalar_t share = ties > 0 ? sum_z / ties : scalar_t(0);
#pragma omp simd
    for (int64_t e = 0; e < n; ++e) grad_z[e] -= map[e] == scalar_t(1) ? share : scalar_t(0);
  }
  sums[0] = sum_i;
  sums[1] = sum_f;
  sums[2] = sum_o;
  sums[3] = sum_g;
}

// A step's pooled-gate pre-activations: out [B, nC] = b_g + U_x x̄ + U_h h̄.
inline void pooled_gate_preact(const at::Tensor& out, const at::Tensor& bias,
                               const at::Tensor& x_bar, const at::Tensor& weight_x,
                               const at::Tensor& h_bar, const at::Tensor& weight_h) {
  out.copy_(bias.expand_as(out));
  small_addmm_(out, x_bar, weight_x, true);
  small_addmm_(out, h_bar, weight_h, true);
}

// One forward step of the cell once the gates' and the candidate's pre-activations are known:
// gates = σ(gate_preact [B, nC]) (n pooled gates, PooledGates); per plane G = tanh(preact + b_c),
// C_t = f∘C_{t−1} + i∘G, H_t = o∘tanh(C_t) into candidate, cell and hidden (each [B, C, H, W];
// candidate undefined: G is not kept), with the map gate from `map` [B, C, H, W] (c, d);
// h_bar [B, C] = GAP(H_t), the next step's h̄.
template <int kMapGate>
void gated_planes_step_forward(const at::Tensor& gate_preact, int64_t activation,
                               const at::Tensor& gates, const at::Tensor& map,
                               const at::Tensor& preact, const at::Tensor& bias,
                               const at::Tensor& c_prev, const at::Tensor& candidate,
                               const at::Tensor& cell, const at::Tensor& hidden,
                               const at::Tensor& h_bar) {
  const int64_t batch = preact.size(0), channels = preact.size(1),
                pixels = preact.size(2) * preact.size(3);
  RECORD_FUNCTION("convlstm_fast::gated_planes_step_forward", {});
  AT_DISPATCH_FLOATING_TYPES(preact.scalar_type(), "gated_planes_step_forward", [&] {
    activate_gates(gate_preact.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(), gates.numel(),
                   activation);
    const scalar_t* m = PooledGates<kMapGate>::has_map ? map.data_ptr<scalar_t>() : nullptr;
    const scalar_t* bc = bias.data_ptr<scalar_t>();
    const scalar_t* pre = preact.data_ptr<scalar_t>();
    const scalar_t* cp = c_prev.data_ptr<scalar_t>();
    scalar_t* cand = candidate.defined() ? candidate.data_ptr<scalar_t>() : nullptr;
    scalar_t* cn = cell.data_ptr<scalar_t>();
    scalar_t* hn = hidden.data_ptr<scalar_t>();
    scalar_t* hb = h_bar.data_ptr<scalar_t>();
    for_each_gated_plane<kMapGate>(
        batch, channels, gates.data_ptr<scalar_t>(),
        [&](int64_t p, scalar_t i, scalar_t f, scalar_t o) {
          const int64_t offset = p * pixels;
          const auto plane = cand ? gated_plane_forward<kMapGate, true, scalar_t>
                                  : gated_plane_forward<kMapGate, false, scalar_t>;
          hb[p] = plane(pixels, i, f, o, bc[p % channels], m ? m + offset : nullptr,
                        pre + offset, cp + offset, cand ? cand + offset : nullptr, cn + offset,
                        hn + offset) /
                  scalar_t(pixels);
        });
  });
}

// The fused loop of one backward step, with dH_t = grad_hidden + grad_hidden_carry and
// dC_t = grad_cell: writes grad_candidate_preact (dG_pre, the gradient of the candidate's
// pre-activation), grad_c_prev (dC_{t−1}), grad_z (dZ of the map gate, c, d), the
// pooled gates' pre-activation gradients grad_gate_preact [B, nC] = [Σ d(gate)]∘σ'(gate_preact),
// and adds Σ dG_pre to grad_cand_bias [C]. `gates` [B, nC] and `sums` [B, C, 4] are scratch.
template <int kMapGate>
void gated_planes_step_backward(
    const at::Tensor& gate_preact, int64_t activation, const at::Tensor& gates,
    const at::Tensor& sums, const at::Tensor& map, const at::Tensor& candidate,
    const at::Tensor& c_prev, const at::Tensor& cell, const at::Tensor& grad_hidden,
    const at::Tensor& grad_hidden_carry, const at::Tensor& grad_cell,
    const at::Tensor& grad_candidate_preact, const at::Tensor& grad_c_prev,
    const at::Tensor& grad_z, const at::Tensor& grad_gate_preact,
    const at::Tensor& grad_cand_bias) {
  using G = PooledGates<kMapGate>;
  const int64_t batch = candidate.size(0), channels = candidate.size(1),
                pixels = candidate.size(2) * candidate.size(3);
  RECORD_FUNCTION("convlstm_fast::gated_planes_step_backward", {});
  AT_DISPATCH_FLOATING_TYPES(candidate.scalar_type(), "gated_planes_step_backward", [&] {
    const scalar_t* pre = gate_preact.data_ptr<scalar_t>();
    activate_gates(pre, gates.data_ptr<scalar_t>(), gates.numel(), activation);
    const scalar_t* m = PooledGates<kMapGate>::has_map ? map.data_ptr<scalar_t>() : nullptr;
    const scalar_t* cand = candidate.data_ptr<scalar_t>();
    const scalar_t* cp = c_prev.data_ptr<scalar_t>();
    const scalar_t* ct = cell.data_ptr<scalar_t>();
    const scalar_t* gout = grad_hidden.data_ptr<scalar_t>();
    const scalar_t* gh = grad_hidden_carry.data_ptr<scalar_t>();
    const scalar_t* gc = grad_cell.data_ptr<scalar_t>();
    scalar_t* gcand = grad_candidate_preact.data_ptr<scalar_t>();
    scalar_t* gcp = grad_c_prev.data_ptr<scalar_t>();
    scalar_t* gz = PooledGates<kMapGate>::has_map ? grad_z.data_ptr<scalar_t>() : nullptr;
    scalar_t* sp = sums.data_ptr<scalar_t>();
    for_each_gated_plane<kMapGate>(
        batch, channels, gates.data_ptr<scalar_t>(),
        [&](int64_t p, scalar_t i, scalar_t f, scalar_t o) {
          const int64_t offset = p * pixels;
          gated_plane_backward<kMapGate>(pixels, i, f, o, m ? m + offset : nullptr,
                                         cand + offset, cp + offset, ct + offset,
                                         gout + offset, gh + offset, gc + offset,
                                         gcand + offset, gcp + offset,
                                         gz ? gz + offset : nullptr, sp + 4 * p);
        });
    scalar_t* dg = grad_gate_preact.data_ptr<scalar_t>();
    scalar_t* db = grad_cand_bias.data_ptr<scalar_t>();
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t c = 0; c < channels; ++c) {
        const scalar_t* s = sp + 4 * (b * channels + c);
        for (int gate = 0; gate < 3; ++gate) {
          if (G::slot(gate) < 0) continue;
          const int64_t idx = (b * G::count + G::slot(gate)) * channels + c;
          dg[idx] = s[gate] * gate_activation_grad(pre[idx], activation);
        }
        db[c] += s[3];
      }
    }
  });
}

// One plane in place: F = tanh(F + bias).
template <typename scalar_t>
CONVLSTM_CPU_MULTIVERSION void tanh_plane(int64_t n, scalar_t bias, scalar_t* __restrict__ f) {
  for (int64_t e = 0; e < n; ++e) f[e] = math_tanh(scalar_t(f[e] + bias));
}

// One plane in place: dF = dF∘(1 − F²), returning Σ of the result (the bias gradient's share).
template <typename scalar_t>
CONVLSTM_CPU_MULTIVERSION scalar_t tanh_backward_plane(int64_t n, const scalar_t* __restrict__ f,
                                                       scalar_t* __restrict__ grad) {
  scalar_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t e = 0; e < n; ++e) {
    grad[e] *= tanh_grad_from_output(f[e]);
    sum += grad[e];
  }
  return sum;
}

// The attention features of b, c, d: F = tanh(SepConv_xa(X_t) + SepConv_ha(H_{t−1}) + b_a) on
// [B, C, H, W], in place on the SepConvs' sum.
inline void attention_features(const at::Tensor& features, const at::Tensor& bias) {
  const int64_t channels = features.size(1), pixels = features.size(2) * features.size(3);
  RECORD_FUNCTION("convlstm_fast::attention_features", {});
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "attention_features", [&] {
    const scalar_t* bc = bias.data_ptr<scalar_t>();
    scalar_t* f = features.data_ptr<scalar_t>();
    parallel_over_planes(features.size(0), channels, [&](int64_t b, int64_t c) {
      tanh_plane(pixels, bc[c], f + (b * channels + c) * pixels);
    });
  });
}

// Backward of attention_features: grad [B, C, H, W] = dF∘(1 − F²) in place, and
// grad_bias [C] += its sum over samples and pixels (samples in order: deterministic).
inline void attention_features_backward(const at::Tensor& features, const at::Tensor& grad,
                                        const at::Tensor& grad_bias) {
  const int64_t batch = features.size(0), channels = features.size(1),
                pixels = features.size(2) * features.size(3);
  RECORD_FUNCTION("convlstm_fast::attention_features_backward", {});
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "attention_features_backward", [&] {
    const scalar_t* f = features.data_ptr<scalar_t>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* db = grad_bias.data_ptr<scalar_t>();
    at::parallel_for(0, channels, 8, [&](int64_t first, int64_t last) {
      for (int64_t c = first; c < last; ++c) {
        for (int64_t b = 0; b < batch; ++b) {
          const int64_t offset = (b * channels + c) * pixels;
          db[c] += tanh_backward_plane(pixels, f + offset, g + offset);
        }
      }
    });
  });
}

// What the forward of every pooled cell (a, b, c, d) shares: h0/c0 made contiguous and x as given
// (read one step's frame at a time, frame()), the output, what is saved for backward
// (cells::pooled::saved: cell C_t and candidate G, the gate pre-activations; with `save` false,
// C_t in two step buffers — C_{t−1} is read while C_t is written — and G not written), the step
// buffers of the candidate's SepConvs and of the pooled gates, and the cell step itself, in the
// order of `walk` (cells::Walk: every per-step tensor indexed by time). With `lengths`
// (step_mask.h) H_{t−1} is read from a carry buffer, and after each step C_t, the carry, h̄ and
// output[t] are masked.
template <int kMapGate>
struct PooledForward {
  const std::vector<at::Tensor>& params;
  int64_t activation;
  bool save;
  Walk walk;
  StepMask mask;
  at::Tensor x, h0, c0, output, gate_preact, h_carry;
  StepFrames frames;
  StepBuffers cell, candidate;
  // The candidate's two pointwise weights side by side [P_x | P_h] (sepconv_pair_planes), and
  // the step buffer of the two depthwise outputs it multiplies.
  at::Tensor cand_pointwise, stacked, preact, x_bar, h_bar, gates;

  PooledForward(const at::Tensor& x_, const at::Tensor& h0_, const at::Tensor& c0_,
                const std::vector<at::Tensor>& params_, int64_t activation_,
                const std::vector<std::vector<int64_t>>& saved_shapes, bool reverse,
                const std::optional<at::Tensor>& lengths, bool save_)
      : params(params_),
        activation(activation_),
        save(save_),
        walk{x_.size(0), reverse},
        mask(lengths, x_),
        x(x_),
        h0(h0_.contiguous()),
        c0(c0_.contiguous()),
        output(at::empty({x.size(0), h0.size(0), h0.size(1), h0.size(2), h0.size(3)},
                         x.options())),
        gate_preact(at::empty(saved_shapes[pooled::kSavedGatePreact], x.options())),
        frames(x_),
        cell(saved_shapes[pooled::kSavedCell], x.options(), save_, 2),
        candidate(save_ ? StepBuffers(saved_shapes[pooled::kSavedCandidate], x.options(), true, 0)
                        : StepBuffers()),
        cand_pointwise(at::cat({params[pooled::kCandPwX], params[pooled::kCandPwH]}, 1)),
        stacked(at::empty({x.size(1), x.size(2) + h0.size(1), h0.size(2), h0.size(3)},
                          x.options())),
        preact(at::empty_like(h0)),
        x_bar(at::empty({x.size(1), x.size(2)}, x.options())),
        h_bar(at::empty({h0.size(0), h0.size(1)}, x.options())),
        gates(at::empty_like(gate_preact[0])) {
    plane_means(h_bar, h0);
    if (mask.active()) h_carry = h0.clone();
  }

  at::Tensor frame(int64_t t) const { return frames(t); }
  at::Tensor h_prev(int64_t t) const {
    if (mask.active()) return h_carry;
    return walk.is_first(t) ? h0 : output[walk.prev(t)];
  }

  // features = SepConv_xa(X_t) + SepConv_ha(H_{t−1}) with the given depthwise weights and
  // pointwise pair [P_xa | P_ha]: F before its bias and tanh (attention_features).
  void sepconvs(int64_t t, const at::Tensor& features, const at::Tensor& dw_x_weight,
                const at::Tensor& dw_h_weight, const at::Tensor& pointwise_pair) const {
    sepconv_pair_planes(features, frame(t), dw_x_weight, h_prev(t), dw_h_weight, pointwise_pair,
                        stacked);
  }

  // Step t of the cell on input x_in (X_t, or b's X̃): the pooled gates from x̄ (GAP(x_in),
  // computed here unless `x_bar_ready`) and h̄ (summed by the previous step's loop), the
  // candidate's SepConvs, and the fused loop with the map gate `map` (c, d).
  void cell_step(int64_t t, const at::Tensor& x_in, bool x_bar_ready, const at::Tensor& map) {
    if (!x_bar_ready) plane_means(x_bar, x_in);
    const at::Tensor step_preact = gate_preact[t];
    pooled_gate_preact(step_preact, params[pooled::kGateBias], x_bar,
                       params[pooled::kGateWeightX], h_bar, params[pooled::kGateWeightH]);
    sepconv_pair_planes(preact, x_in, params[pooled::kCandDwX], h_prev(t),
                        params[pooled::kCandDwH], cand_pointwise, stacked);
    const at::Tensor c_prev = walk.is_first(t) ? c0 : cell[walk.prev(t)];
    gated_planes_step_forward<kMapGate>(step_preact, activation, gates, map, preact,
                                        params[pooled::kCandBias], c_prev,
                                        save ? candidate[t] : at::Tensor(), cell[t], output[t],
                                        h_bar);
    if (mask.active()) {
      mask.carry(t, cell[t], c_prev);
      mask.advance(t, h_carry, output[t]);
      plane_means(h_bar, h_carry);
      mask.zero_output(t, output[t]);
    }
  }

  // (output, h_n, c_n, saved): the saved tensors every pooled cell has, then `more`, the cell's
  // own, which follow them in its list (cells.h).
  LayerResult result(const std::vector<at::Tensor>& more) const {
    std::vector<at::Tensor> saved(pooled::kSavedCount);
    saved[pooled::kSavedCell] = cell.all();
    saved[pooled::kSavedCandidate] = candidate.all();
    saved[pooled::kSavedGatePreact] = gate_preact;
    saved.insert(saved.end(), more.begin(), more.end());
    const at::Tensor h_n = mask.active() ? h_carry : output[walk.last()].clone();
    return {output, h_n, cell[walk.last()].clone(), saved};
  }
};

// What the backward of every pooled cell (a, b, c, d) carries back along the forward's walk: h0,
// c0 and the output made contiguous, x as given (one frame per step), the saved cell, candidate
// and gate pre-activations, the state gradients dL/dH and dL/dC flowing back to the previous
// step (each through two buffers: a step reads one and writes the other), the candidate's two SepConv branches (whose inputs also feed the pooled
// gates through GAP), the fused loop's step buffers, and the gradients of the pooled gates and of
// the candidate bias. Nothing sequence-sized is allocated besides grad_x.
template <int kMapGate>
struct PooledBackward {
  // Step t's tensors: its input (the candidate's X side), H_{t−1}, C_{t−1}, the pooled gates'
  // pre-activation gradients, and the state gradients read (in) and written (out).
  struct Step {
    int64_t t;
    at::Tensor x, h_prev, c_prev, dgp, grad_h_in, grad_h_out, grad_c_in, grad_c_out;
  };

  // With lengths (step_mask.h): the state gradients a step reads, as they arrived, while the
  // step runs on them zeroed where it does not count.
  struct Held {
    at::Tensor grad_h, grad_c;
  };

  int64_t steps;
  Walk walk;
  StepMask mask;
  at::Tensor x, h0, c0, output, grad_output, cell, candidate, gate_preact;
  StepFrames frames;
  at::Tensor grad_cand, sums, gates, grad_gate_preact, grad_cand_bias, grad_x;
  std::array<at::Tensor, 2> grad_h, grad_c;
  SepConvBranch cand_x, cand_h;

  PooledBackward(const at::Tensor& grad_output_, const at::Tensor& grad_h_n,
                 const at::Tensor& grad_c_n, const at::Tensor& x_, const at::Tensor& h0_,
                 const at::Tensor& c0_, const std::vector<at::Tensor>& params,
                 const at::Tensor& output_, at::TensorList saved, bool reverse,
                 const std::optional<at::Tensor>& lengths)
      : steps(x_.size(0)),
        walk{steps, reverse},
        mask(lengths, x_),
        x(x_),
        h0(h0_.contiguous()),
        c0(c0_.contiguous()),
        output(output_.contiguous()),
        grad_output(mask.output_gradient(grad_output_.contiguous())),
        cell(saved[pooled::kSavedCell].contiguous()),
        candidate(saved[pooled::kSavedCandidate].contiguous()),
        gate_preact(saved[pooled::kSavedGatePreact].contiguous()),
        frames(x_),
        grad_cand(at::empty_like(h0)),
        sums(at::empty({h0.size(0), h0.size(1), 4}, h0.options())),
        gates(at::empty_like(gate_preact[0])),
        grad_gate_preact(at::empty_like(gate_preact)),
        grad_cand_bias(at::zeros_like(params[pooled::kCandBias])),
        grad_x(at::empty(x.sizes(), x.options())),
        grad_h{at::empty_like(h0).copy_(grad_h_n), at::empty_like(h0)},
        grad_c{at::empty_like(c0).copy_(grad_c_n), at::empty_like(c0)},
        cand_x(params[pooled::kCandDwX], params[pooled::kCandPwX],
               params[pooled::kGateWeightX], frames(0), steps),
        cand_h(params[pooled::kCandDwH], params[pooled::kCandPwH],
               params[pooled::kGateWeightH], h0, steps) {}

  // Step t's tensors; the state gradients alternate between their buffers by the number of
  // steps done (walk.time(t) is t's place in the walk).
  Step step(int64_t t) const {
    const int64_t in = (steps - 1 - walk.time(t)) % 2, out = 1 - in;
    const bool first = walk.is_first(t);
    return {t,
            frames(t),
            mask.state_before(walk, t, output, h0),
            first ? c0 : cell[walk.prev(t)],
            grad_gate_preact[t],
            grad_h[in],
            grad_h[out],
            grad_c[in],
            grad_c[out]};
  }

  // Around each step's backward: feed() before it (the incoming state gradients zeroed where the
  // step does not count), pass() after it (those samples' outgoing ones are the incoming).
  Held feed(const Step& s) const {
    return {mask.feed(s.t, s.grad_h_in), mask.feed(s.t, s.grad_c_in)};
  }
  void pass(const Step& s, const Held& held) const {
    mask.pass(s.t, s.grad_h_out, held.grad_h);
    mask.pass(s.t, s.grad_c_out, held.grad_c);
  }

  // The fused loop of step t (gated_planes_step_backward), with the map gate's A and dZ
  // (c, d).
  void cell_backward(const Step& s, int64_t activation, const at::Tensor& map,
                     const at::Tensor& grad_z) {
    gated_planes_step_backward<kMapGate>(
        gate_preact[s.t], activation, gates, sums, map, candidate[s.t], s.c_prev, cell[s.t],
        grad_output[s.t], s.grad_h_in, s.grad_c_in, grad_cand, s.grad_c_out, grad_z, s.dgp,
        grad_cand_bias);
  }

  // The layer's gradients once every step is done: grads gets those of the pooled parameters
  // (dU_x, dU_h, d b_g reduced over the steps), the rest left to the caller.
  LayerResult result(std::vector<at::Tensor> grads) const {
    const int64_t n = steps * x.size(1);
    const at::Tensor grad_gp = grad_gate_preact.view({n, -1});
    grads[pooled::kGateWeightX] = at::mm(grad_gp.t(), cand_x.bars.view({n, -1}));
    grads[pooled::kGateWeightH] = at::mm(grad_gp.t(), cand_h.bars.view({n, -1}));
    grads[pooled::kGateBias] = grad_gp.sum(0);
    grads[pooled::kCandDwX] = cand_x.grad_depthwise;
    grads[pooled::kCandPwX] = cand_x.grad_pointwise;
    grads[pooled::kCandDwH] = cand_h.grad_depthwise;
    grads[pooled::kCandPwH] = cand_h.grad_pointwise;
    grads[pooled::kCandBias] = grad_cand_bias;
    return {grad_x, grad_h[steps % 2], grad_c[steps % 2], grads};
  }
};

// The attention features of b, c, d in backward: F = tanh(SepConv_xa(X_t) + SepConv_ha(H_{t−1})
// + b_a), recomputed per step (the branches keep their depthwise outputs for the weight
// gradients), and its backward into dX_t and dH_{t−1}.
struct AttentionFeaturesBackward {
  SepConvBranch x, h;
  at::Tensor bias, grad_bias;

  AttentionFeaturesBackward(const at::Tensor& dw_x, const at::Tensor& pw_x,
                            const at::Tensor& dw_h, const at::Tensor& pw_h,
                            const at::Tensor& bias_, const at::Tensor& x_like,
                            const at::Tensor& h_like, int64_t steps)
      : x(dw_x, pw_x, at::Tensor(), x_like, steps),
        h(dw_h, pw_h, at::Tensor(), h_like, steps),
        bias(bias_),
        grad_bias(at::zeros_like(bias_)) {}

  void recompute(int64_t t, const at::Tensor& x_t, const at::Tensor& h_prev,
                 const at::Tensor& features) {
    x.load(t, x_t);
    h.load(t, h_prev);
    x.output(features, false);
    h.output(features, true);
    attention_features(features, bias);
  }

  // grad_features holds dF: becomes dF_pre in place; d b_a accumulates, and the two SepConvs'
  // input gradients are added to grad_x_t and grad_h_prev.
  void backward(const at::Tensor& x_t, const at::Tensor& h_prev, const at::Tensor& features,
                const at::Tensor& grad_features, const at::Tensor& grad_x_t,
                const at::Tensor& grad_h_prev) {
    attention_features_backward(features, grad_features, grad_bias);
    x.backward(x_t, grad_features, at::Tensor(), grad_x_t, true);
    h.backward(h_prev, grad_features, at::Tensor(), grad_h_prev, true);
  }

  // After the last step: the gradients of F's parameters into grads (cells::attention).
  void gradients(std::vector<at::Tensor>& grads) const {
    grads[attention::kAttDwX] = x.grad_depthwise;
    grads[attention::kAttPwX] = x.grad_pointwise;
    grads[attention::kAttDwH] = h.grad_depthwise;
    grads[attention::kAttPwH] = h.grad_pointwise;
    grads[attention::kAttBias] = grad_bias;
  }
};

}  // namespace cpu
}  // namespace convlstm_fast
