// Per-element math of every cell, shared by the CPU and the CUDA kernels (host and device).
//
// shared/SPEC.md: gate activation σ is sigmoid (paper) or hard_sigmoid = clamp(0.2·x + 0.5, 0, 1)
// (reference code); the cell update is C_t = f∘C_{t−1} + i∘G, H_t = o∘tanh(C_t). Derivatives are
// written next to the functions they differentiate; `Acc` is the accumulation type (float for
// half/bfloat16/float, double for double).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define CONVLSTM_HD __host__ __device__ __forceinline__
#else
#define CONVLSTM_HD inline
#endif

namespace convlstm_fast {

// Index into convlstm_fast.variants.GATE_ACTIVATIONS.
enum GateActivation : int64_t { kSigmoid = 0, kHardSigmoid = 1 };

template <typename Acc>
CONVLSTM_HD Acc sigmoid(Acc x) {
  return Acc(1) / (Acc(1) + exp(-x));
}

template <typename Acc>
CONVLSTM_HD Acc hard_sigmoid(Acc x) {
  const Acc y = Acc(0.2) * x + Acc(0.5);
  return y < Acc(0) ? Acc(0) : (y > Acc(1) ? Acc(1) : y);
}

// σ(x) for the chosen activation.
template <typename Acc>
CONVLSTM_HD Acc gate_activation(Acc x, int64_t activation) {
  return activation == kHardSigmoid ? hard_sigmoid(x) : sigmoid(x);
}

// dσ/dx from the pre-activation x. sigmoid: s·(1 − s). hard_sigmoid: 0.2 where
// 0 ≤ 0.2·x + 0.5 ≤ 1 (both kinks inclusive, as torch.clamp's backward), else 0.
template <typename Acc>
CONVLSTM_HD Acc gate_activation_grad(Acc x, int64_t activation) {
  if (activation == kHardSigmoid) {
    const Acc y = Acc(0.2) * x + Acc(0.5);
    return (y >= Acc(0) && y <= Acc(1)) ? Acc(0.2) : Acc(0);
  }
  const Acc s = sigmoid(x);
  return s * (Acc(1) - s);
}

// tanh' from the output: 1 − tanh².
template <typename Acc>
CONVLSTM_HD Acc tanh_grad_from_output(Acc t) {
  return Acc(1) - t * t;
}

// Forward cell update: C_t = f∘C_{t−1} + i∘G; H_t = o∘tanh(C_t). Returns C_t; writes H_t.
template <typename Acc>
CONVLSTM_HD Acc cell_update(Acc i, Acc f, Acc o, Acc g, Acc c_prev, Acc* h) {
  const Acc c = f * c_prev + i * g;
  *h = o * tanh(c);
  return c;
}

// Backward of the cell update at one element, given dH_t and the dC_t flowing back from t+1:
//   dC   = dC_t + dH_t∘o∘(1 − tanh²C_t)
//   do   = dH_t∘tanh C_t,  di = dC∘G,  df = dC∘C_{t−1},  dG = dC∘i,  dC_{t−1} = dC∘f
template <typename Acc>
CONVLSTM_HD void cell_update_backward(Acc i, Acc f, Acc o, Acc g, Acc c_prev, Acc c, Acc dh,
                                      Acc dc_next, Acc* di, Acc* df, Acc* dg, Acc* do_,
                                      Acc* dc_prev) {
  const Acc tc = tanh(c);
  const Acc dc = dc_next + dh * o * tanh_grad_from_output(tc);
  *do_ = dh * tc;
  *di = dc * g;
  *df = dc * c_prev;
  *dg = dc * i;
  *dc_prev = dc * f;
}

}  // namespace convlstm_fast
