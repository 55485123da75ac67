// Per-element math of every cell, shared by the CPU and the CUDA kernels (host and device).
//
// shared/SPEC.md: gate activation σ is sigmoid (paper) or hard_sigmoid = clamp(0.2·x + 0.5, 0, 1)
// (reference code; its pieces chosen on x, see hard_sigmoid); the cell update is
// C_t = f∘C_{t−1} + i∘G, H_t = o∘tanh(C_t). Derivatives are written next to the functions they
// differentiate; `Acc` is the accumulation type (float for half/bfloat16/float, double for
// double). The numeric contract (ops/registration.py) is kept here for every kernel.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define CONVLSTM_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Always inlined on the host too: the CPU kernels call these from multiversioned loops
// (layer_common.h), and a call that is not inlined runs the baseline-ISA copy, one element at a
// time, instead of vectorising with the loop.
#define CONVLSTM_HD inline __attribute__((always_inline))
#else
#define CONVLSTM_HD inline
#endif

namespace convlstm_fast {

// Index into convlstm_fast.variants.GATE_ACTIVATIONS.
enum GateActivation : int64_t { kSigmoid = 0, kHardSigmoid = 1 };

// exp and tanh as every function below uses them. On the device: the CUDA library functions. On
// the host, float: branch-free Cephes-style exp (≤ 2 ulp, NaN propagates) and tanh from it
// that the compiler vectorises across the channel loop of the CPU kernels — std::tanh is an opaque
// library call (~8 ns a value, which alone would cost more than the whole layer's GEMMs). double
// keeps the library functions (gradcheck precision).
CONVLSTM_HD float math_exp(float x) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return expf(x);
#else
  // exp(x) = 2^n · exp(r), n = round(x / ln 2), r = x − n·ln 2 ∈ [−ln 2 / 2, ln 2 / 2].
  const float xc = x < -87.33654f ? -87.33654f : (x > 88.72283f ? 88.72283f : x);
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;            // ln 2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
#endif
}

CONVLSTM_HD double math_exp(double x) { return exp(x); }

CONVLSTM_HD float math_tanh(float x) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return tanhf(x);
#else
  // tanh|x| = (1 − e)/(1 + e), e = exp(−2|x|): absolute error ≤ 1e-7 everywhere (relative
  // error grows near 0, where 1 − e cancels; the cell only ever adds tanh to O(1) terms).
  const float a = x < 0.0f ? -x : x;
  const float e = math_exp(-2.0f * a);
  const float t = (1.0f - e) / (1.0f + e);
  return x < 0.0f ? -t : t;
#endif
}

CONVLSTM_HD double math_tanh(double x) { return tanh(x); }

template <typename Acc>
CONVLSTM_HD Acc sigmoid(Acc x) {
  return Acc(1) / (Acc(1) + math_exp(-x));
}

// The reference's hard_sigmoid (reference/cells.py, ops/registration.py): 0 for x < −2.5, 1 for
// x > 2.5, 0.2·x + 0.5 between, the pieces chosen on x itself. The middle is written
// 0.2·(x + 2.5): x + 2.5 is exact near −2.5, so hard_sigmoid(−2.5) = 0 exactly whether or not
// the compiler contracts anything into an FMA (0.2·x + 0.5 contracted gives −7.45e-9 there),
// and 0.2·5 rounds to 1. NaN fails both comparisons and stays NaN.
template <typename Acc>
CONVLSTM_HD Acc hard_sigmoid(Acc x) {
  return x < Acc(-2.5) ? Acc(0) : (x > Acc(2.5) ? Acc(1) : Acc(0.2) * (x + Acc(2.5)));
}

// σ(x) for the chosen activation.
template <typename Acc>
CONVLSTM_HD Acc gate_activation(Acc x, int64_t activation) {
  return activation == kHardSigmoid ? hard_sigmoid(x) : sigmoid(x);
}

// dσ/dx from the pre-activation x. sigmoid: s·(1 − s). hard_sigmoid: 0.2 on the closed interval
// −2.5 ≤ x ≤ 2.5, decided on x itself, else 0; NaN is in neither open piece and gets 0.2, as the
// reference's autograd gives it (torch.where's inner branch).
template <typename Acc>
CONVLSTM_HD Acc gate_activation_grad(Acc x, int64_t activation) {
  if (activation == kHardSigmoid) {
    return (x < Acc(-2.5) || x > Acc(2.5)) ? Acc(0) : Acc(0.2);
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
  *h = o * math_tanh(c);
  return c;
}

// Backward of the cell update at one element, given dH_t and the dC_t flowing back from t+1:
//   dC   = dC_t + dH_t∘o∘(1 − tanh²C_t)
//   do   = dH_t∘tanh C_t,  di = dC∘G,  df = dC∘C_{t−1},  dG = dC∘i,  dC_{t−1} = dC∘f
template <typename Acc>
CONVLSTM_HD void cell_update_backward(Acc i, Acc f, Acc o, Acc g, Acc c_prev, Acc c, Acc dh,
                                      Acc dc_next, Acc* di, Acc* df, Acc* dg, Acc* do_,
                                      Acc* dc_prev) {
  const Acc tc = math_tanh(c);
  const Acc dc = dc_next + dh * o * tanh_grad_from_output(tc);
  *do_ = dh * tc;
  *di = dc * g;
  *df = dc * c_prev;
  *dg = dc * i;
  *dc_prev = dc * f;
}

}  // namespace convlstm_fast
