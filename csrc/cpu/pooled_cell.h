// The fused per-step element loops of the pooled cells a, b, c, d (shared/SPEC.md): gate
// activation, candidate tanh, cell update and their backward, all from cell_math.h.
//
// The three gates i, f, o are each either a pooled gate, one value per (sample, channel) broadcast
// over H·W, or (c: i, d: o) a channel-attention map with one value per element. `kAttention` says
// which gate is the map: -1 none (a, b), 0 the input gate (c), 2 the output gate (d).
#pragma once

#include "cpu/layer_common.h"

namespace convlstm_fast {
namespace cpu {

// Gate values of sample b at pixel p, channel c: data[b·batch_stride + p·pixel_stride + c].
template <typename scalar_t>
struct GateView {
  const scalar_t* data;
  int64_t batch_stride;
  int64_t pixel_stride;  // 0 for a pooled gate
  const scalar_t* at(int64_t b, int64_t p) const {
    return data + b * batch_stride + p * pixel_stride;
  }
};

// gates = σ(preact) on [B, n·C] (the pooled gates are few: a plain loop).
template <typename scalar_t>
void activate_gates(const scalar_t* preact, scalar_t* gates, int64_t count, int64_t activation) {
  for (int64_t k = 0; k < count; ++k) gates[k] = gate_activation(preact[k], activation);
}

// The element loops work on one pixel's channel row through __restrict__ pointers, so the
// compiler vectorises them without aliasing checks (every output buffer is distinct from every
// input buffer).

// One pixel: G = tanh(h_term + x_term + b_c); C_t = f∘C_{t−1} + i∘G; H_t = o∘tanh(C_t).
template <typename scalar_t>
CONVLSTM_CPU_MULTIVERSION void pooled_cell_forward_row(int64_t channels, const scalar_t* __restrict__ h_term,
                                    const scalar_t* __restrict__ x_term,
                                    const scalar_t* __restrict__ bias,
                                    const scalar_t* __restrict__ i, const scalar_t* __restrict__ f,
                                    const scalar_t* __restrict__ o,
                                    const scalar_t* __restrict__ c_prev,
                                    scalar_t* __restrict__ candidate, scalar_t* __restrict__ cell,
                                    scalar_t* __restrict__ hidden) {
  for (int64_t c = 0; c < channels; ++c) {
    const scalar_t g = math_tanh(h_term[c] + x_term[c] + bias[c]);
    scalar_t h;
    cell[c] = cell_update(i[c], f[c], o[c], g, c_prev[c], &h);
    candidate[c] = g;
    hidden[c] = h;
  }
}

// One forward step over [B, HW, C]: G = tanh(SepConv_h(H_{t−1}) + SepConv_x(X_t) + b_c) from its
// three terms (the step's GEMM output, the precomputed X side, the bias [C]),
// C_t = f∘C_{t−1} + i∘G, H_t = o∘tanh(C_t). Writes G (saved), C_t (saved) and H_t.
template <typename scalar_t>
void pooled_cell_forward(int64_t batch, int64_t pixels, int64_t channels,
                         const scalar_t* candidate_h, const scalar_t* candidate_x,
                         const scalar_t* candidate_bias, GateView<scalar_t> in_gate,
                         GateView<scalar_t> forget_gate, GateView<scalar_t> out_gate,
                         const scalar_t* c_prev, scalar_t* candidate, scalar_t* cell,
                         scalar_t* hidden) {
  RECORD_FUNCTION("convlstm_fast::pooled_cell_forward", {});
  parallel_over_pixels(batch, pixels, [=](int64_t b, int64_t, int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t row = (b * pixels + p) * channels;
      pooled_cell_forward_row(channels, candidate_h + row, candidate_x + row, candidate_bias,
                              in_gate.at(b, p), forget_gate.at(b, p), out_gate.at(b, p),
                              c_prev + row, candidate + row, cell + row, hidden + row);
    }
  });
}

// One pixel of the backward step (see pooled_cell_backward).
template <int kAttention, typename scalar_t>
CONVLSTM_CPU_MULTIVERSION void pooled_cell_backward_row(
    int64_t channels, const scalar_t* __restrict__ i, const scalar_t* __restrict__ f,
    const scalar_t* __restrict__ o, const scalar_t* __restrict__ candidate,
    const scalar_t* __restrict__ c_prev, const scalar_t* __restrict__ cell,
    const scalar_t* __restrict__ grad_hidden, const scalar_t* __restrict__ grad_hidden_carry,
    const scalar_t* __restrict__ grad_cell, scalar_t* __restrict__ grad_candidate_preact,
    scalar_t* __restrict__ grad_c_prev, scalar_t* __restrict__ grad_attention,
    scalar_t* __restrict__ sum_i, scalar_t* __restrict__ sum_f, scalar_t* __restrict__ sum_o) {
  for (int64_t c = 0; c < channels; ++c) {
    const scalar_t g = candidate[c];
    scalar_t di, df, dg, do_, dc_prev;
    cell_update_backward(i[c], f[c], o[c], g, c_prev[c], cell[c],
                         scalar_t(grad_hidden[c] + grad_hidden_carry[c]), grad_cell[c], &di, &df,
                         &dg, &do_, &dc_prev);
    grad_candidate_preact[c] = dg * tanh_grad_from_output(g);
    grad_c_prev[c] = dc_prev;
    if (kAttention == 0) {
      grad_attention[c] = di;
    } else {
      sum_i[c] += di;
    }
    sum_f[c] += df;
    if (kAttention == 2) {
      grad_attention[c] = do_;
    } else {
      sum_o[c] += do_;
    }
  }
}

// One backward step over [B, HW, C], with dH_t = grad_hidden + grad_hidden_carry and
// dC_t = grad_cell (flowing back from t+1):
//   dC = dC_t + dH_t∘o∘(1 − tanh²C_t);  d(candidate preact) = dC∘i∘(1 − G²);  dC_{t−1} = dC∘f
//   di = dC∘G, df = dC∘C_{t−1}, do = dH_t∘tanh C_t: per element for the attention gate (written
//   to grad_attention), summed over the pixels of each chunk for the pooled gates (written to
//   gate_partials [B, chunks, 3, C] in gate order i, f, o; the attention gate's slot is unused).
template <int kAttention, typename scalar_t>
void pooled_cell_backward(int64_t batch, int64_t pixels, int64_t channels,
                          GateView<scalar_t> in_gate, GateView<scalar_t> forget_gate,
                          GateView<scalar_t> out_gate, const scalar_t* candidate,
                          const scalar_t* c_prev, const scalar_t* cell,
                          const scalar_t* grad_hidden, const scalar_t* grad_hidden_carry,
                          const scalar_t* grad_cell, scalar_t* grad_candidate_preact,
                          scalar_t* grad_c_prev, scalar_t* grad_attention,
                          scalar_t* gate_partials) {
  RECORD_FUNCTION("convlstm_fast::pooled_cell_backward", {});
  const int64_t chunks = pixel_chunks(pixels);
  parallel_over_pixels(batch, pixels, [=](int64_t b, int64_t chunk, int64_t begin, int64_t end) {
    scalar_t* sums = gate_partials + (b * chunks + chunk) * 3 * channels;
    for (int64_t k = 0; k < 3 * channels; ++k) sums[k] = scalar_t(0);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t row = (b * pixels + p) * channels;
      pooled_cell_backward_row<kAttention>(
          channels, in_gate.at(b, p), forget_gate.at(b, p), out_gate.at(b, p), candidate + row,
          c_prev + row, cell + row, grad_hidden + row, grad_hidden_carry + row, grad_cell + row,
          grad_candidate_preact + row, grad_c_prev + row,
          grad_attention ? grad_attention + row : nullptr, sums, sums + channels,
          sums + 2 * channels);
    }
  });
}

// ---- NCHW planes (variant a) ------------------------------------------------------------------
// With only pooled gates, one (sample, channel) plane of H·W values shares its three gates and
// the candidate bias: scalars, so the loops below are plain vectorised streams.

// Runs fn(plane, i, f, o) over every (sample, channel) plane (plane = b·C + c) in parallel, with
// the plane's pooled gates read from gates [B, 3C] (order i, f, o).
template <typename scalar_t, typename Fn>
void for_each_gated_plane(int64_t batch, int64_t channels, const scalar_t* gates, const Fn& fn) {
  parallel_over_planes(batch, channels, [&](int64_t b, int64_t c) {
    const scalar_t* g = gates + b * 3 * channels;
    fn(b * channels + c, g[c], g[channels + c], g[2 * channels + c]);
  });
}

// Forward, one plane: G = tanh(preact + b_c); C_t = f∘C_{t−1} + i∘G; H_t = o∘tanh(C_t). Writes G,
// C_t, H_t and returns Σ H_t (the next step's h̄ = Σ / HW).
template <typename scalar_t>
CONVLSTM_CPU_MULTIVERSION scalar_t pooled_plane_forward(
    int64_t n, scalar_t i, scalar_t f, scalar_t o, scalar_t bias,
    const scalar_t* __restrict__ preact, const scalar_t* __restrict__ c_prev,
    scalar_t* __restrict__ candidate, scalar_t* __restrict__ cell,
    scalar_t* __restrict__ hidden) {
  scalar_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t e = 0; e < n; ++e) {
    const scalar_t g = math_tanh(scalar_t(preact[e] + bias));
    scalar_t h;
    cell[e] = cell_update(i, f, o, g, c_prev[e], &h);
    candidate[e] = g;
    hidden[e] = h;
    sum += h;
  }
  return sum;
}

// Backward, one plane, with dH_t = grad_hidden + grad_hidden_carry and dC_t = grad_cell:
//   dC = dC_t + dH_t∘o∘(1 − tanh²C_t); d(candidate preact) = dC∘i∘(1 − G²); dC_{t−1} = dC∘f;
// sums[0..3] = Σ di = Σ dC∘G, Σ df = Σ dC∘C_{t−1}, Σ do = Σ dH_t∘tanh C_t, Σ d(candidate preact).
template <typename scalar_t>
CONVLSTM_CPU_MULTIVERSION void pooled_plane_backward(
    int64_t n, scalar_t i, scalar_t f, scalar_t o, const scalar_t* __restrict__ candidate,
    const scalar_t* __restrict__ c_prev, const scalar_t* __restrict__ cell,
    const scalar_t* __restrict__ grad_hidden, const scalar_t* __restrict__ grad_hidden_carry,
    const scalar_t* __restrict__ grad_cell, scalar_t* __restrict__ grad_candidate_preact,
    scalar_t* __restrict__ grad_c_prev, scalar_t* __restrict__ sums) {
  scalar_t sum_i = 0, sum_f = 0, sum_o = 0, sum_g = 0;
#pragma omp simd reduction(+ : sum_i, sum_f, sum_o, sum_g)
  for (int64_t e = 0; e < n; ++e) {
    const scalar_t g = candidate[e];
    scalar_t di, df, dg, do_, dc_prev;
    cell_update_backward(i, f, o, g, c_prev[e], cell[e],
                         scalar_t(grad_hidden[e] + grad_hidden_carry[e]), grad_cell[e], &di, &df,
                         &dg, &do_, &dc_prev);
    const scalar_t dpre = dg * tanh_grad_from_output(g);
    grad_candidate_preact[e] = dpre;
    grad_c_prev[e] = dc_prev;
    sum_i += di;
    sum_f += df;
    sum_o += do_;
    sum_g += dpre;
  }
  sums[0] = sum_i;
  sums[1] = sum_f;
  sums[2] = sum_o;
  sums[3] = sum_g;
}

// Pooled-gate pre-activation gradients of one step: dgp[b, k·C + c] = σ'(preact) · Σ_chunks
// partial[b, chunk, gate_k, c], where gate_k runs over the pooled gates in the op's order
// (a, b: i f o; c: f o; d: i f).
template <typename scalar_t>
void pooled_gate_grads(int64_t batch, int64_t chunks, int64_t channels,
                       const std::vector<int>& gates, const scalar_t* partials,
                       const scalar_t* preact, int64_t activation, scalar_t* grad_preact) {
  const int64_t n = static_cast<int64_t>(gates.size());
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t k = 0; k < n; ++k) {
      for (int64_t c = 0; c < channels; ++c) {
        scalar_t total = 0;
        for (int64_t chunk = 0; chunk < chunks; ++chunk) {
          total += partials[((b * chunks + chunk) * 3 + gates[k]) * channels + c];
        }
        const int64_t idx = (b * n + k) * channels + c;
        grad_preact[idx] = total * gate_activation_grad(preact[idx], activation);
      }
    }
  }
}

// out = tanh(a + b + bias) on one row of C channels.
template <typename scalar_t>
CONVLSTM_CPU_MULTIVERSION void tanh_of_sum_row(int64_t channels, const scalar_t* __restrict__ a,
                                               const scalar_t* __restrict__ b,
                                               const scalar_t* __restrict__ bias,
                                               scalar_t* __restrict__ out) {
  for (int64_t c = 0; c < channels; ++c) out[c] = math_tanh(a[c] + b[c] + bias[c]);
}

// out = tanh(a + b + bias) on rows [rows, C] (the attention features F of b, c, d).
template <typename scalar_t>
void tanh_of_sum(int64_t rows, int64_t channels, const scalar_t* a, const scalar_t* b,
                 const scalar_t* bias, scalar_t* out) {
  at::parallel_for(0, rows, 64, [=](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      tanh_of_sum_row(channels, a + r * channels, b + r * channels, bias, out + r * channels);
    }
  });
}

template <typename scalar_t>
CONVLSTM_CPU_MULTIVERSION void tanh_backward_row(int64_t channels,
                                                 const scalar_t* __restrict__ out,
                                                 scalar_t* __restrict__ grad) {
  for (int64_t c = 0; c < channels; ++c) grad[c] *= tanh_grad_from_output(out[c]);
}

// grad_preact = grad_out∘(1 − out²) (through out = tanh(preact)), in place on grad_out [rows, C].
template <typename scalar_t>
void tanh_backward_inplace(int64_t rows, int64_t channels, const scalar_t* out,
                           scalar_t* grad) {
  at::parallel_for(0, rows, 64, [=](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      tanh_backward_row(channels, out + r * channels, grad + r * channels);
    }
  });
}

}  // namespace cpu
}  // namespace convlstm_fast
