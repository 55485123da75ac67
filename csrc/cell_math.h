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

// Index into convlstm_fast.registry.GATE_ACTIVATIONS (the ops' gate_activation argument).
enum GateActivation : int64_t { kSigmoid = 0, kHardSigmoid = 1 };

// exp and tanh as every function below uses them. On the device: the CUDA library functions
// (accurate to 2 ulp; nothing here relies on --use_fast_math, whose approximate expf/tanhf
// would break the relative accuracy below). On the host, float: a branch-free Cephes-style exp
// and a tanh from it that the compiler vectorises across the channel loops of the CPU kernels —
// std::tanh is an opaque library call (~8 ns a value, which alone would cost more than the whole
// layer's GEMMs). double keeps the library functions (gradcheck precision). exp, tanh, σ and
// σ' below are accurate to a few ulps relative at every magnitude (host float, measured at 7.2M
// points of ±[1e-30, 20]: tanh ≤ 2.1 ulp, σ ≤ 2.3, σ' ≤ 4.3; tests/test_numerics.py sweeps
// them through the ops) and keep NaN.
#if !defined(__CUDA_ARCH__) && !defined(__HIP_DEVICE_COMPILE__)
// The host float exp in two parts: exp(x) = 2^n·(1 + q), n = round(x / ln 2), q = expm1(r) =
// r + r²·P(r), r = x − n·ln 2 ∈ [−ln 2 / 2, ln 2 / 2] (Cephes' P, ≤ 2 ulp). Kept apart, 2^n·(1 + q)
// gives exp(x) and 2^n·q + (2^n − 1) gives expm1(x) without the cancellation of exp(x) − 1
// near 0 (for n ≠ 0, |expm1(x)| > 0.29: nothing cancels either). x is clamped to [−88, 88.72283]:
// from x < −87.68 on n = −127, whose 2^n bits are those of +0 (exp(−inf) = 0, the subnormal
// results there flush to 0, expm1 = −1), and n = 128 gives +inf. NaN passes the clamps and
// stays NaN through q.
struct ExpParts {
  float scale;  // 2^n
  float q;      // expm1(r)
};

CONVLSTM_HD ExpParts exp_parts(float x) {
  const float xc = x < -88.0f ? -88.0f : (x > 88.72283f ? 88.72283f : x);
  // Round to nearest: 1.5·2^23 + x/ln 2 lies in [2^23, 2^24), where floats are the integers, so
  // n is also read, exactly, from the sum's low mantissa bits (no float→int conversion, which
  // NaN would make undefined).
  const float shifted = xc * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;  // ln 2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  uint32_t shifted_bits;
  std::memcpy(&shifted_bits, &shifted, sizeof(shifted_bits));
  const uint32_t bits = (shifted_bits - 0x4B400000u + 127u) << 23;  // 0x4B400000 = 1.5·2^23
  ExpParts parts;
  std::memcpy(&parts.scale, &bits, sizeof(parts.scale));
  parts.q = p * r * r + r;
  return parts;
}
#endif

CONVLSTM_HD float math_exp(float x) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return expf(x);
#else
  const ExpParts e = exp_parts(x);
  return (1.0f + e.q) * e.scale;  // not scale·q + scale: inf·q − inf would be NaN for n = 128
#endif
}

CONVLSTM_HD double math_exp(double x) { return exp(x); }

CONVLSTM_HD float math_tanh(float x) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return tanhf(x);
#else
  // tanh|x| = (1 − e)/(1 + e), e = exp(−2|x|), with the numerator 1 − e = −expm1(−2|x|) taken
  // from exp_parts, which does not cancel near 0 as 1 − e itself does (relative error 1e-7/|x|
  // there, all digits gone below |x| ≈ 3e-8); the denominator 1 + e ∈ (1, 2] never cancels.
  // tanh(±inf) = ±1 (e = 0); NaN stays NaN.
  const float a = x < 0.0f ? -x : x;
  const ExpParts e = exp_parts(-2.0f * a);
  const float scaled_q = e.scale * e.q;
  const float t = -(scaled_q + (e.scale - 1.0f)) / ((scaled_q + e.scale) + 1.0f);
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

// dσ/dx from the pre-activation x. sigmoid: s·(1 − s), s = σ(x), written for x ≥ 0 as
// s·s·e, e = exp(−x) (1 − s = e·s exactly; 1 − s itself cancels for x ≫ 0), so it is accurate
// relative at every magnitude and shares e and s with σ(x) in loops that need both.
// hard_sigmoid: 0.2 on the closed interval −2.5 ≤ x ≤ 2.5, decided on x itself, else 0; NaN is
// in neither open piece and gets 0.2, as the reference's autograd gives it (torch.where's inner
// branch).
template <typename Acc>
CONVLSTM_HD Acc gate_activation_grad(Acc x, int64_t activation) {
  if (activation == kHardSigmoid) {
    return (x < Acc(-2.5) || x > Acc(2.5)) ? Acc(0) : Acc(0.2);
  }
  const Acc e = math_exp(-x);
  const Acc s = Acc(1) / (Acc(1) + e);
  return x < Acc(0) ? s * (Acc(1) - s) : s * s * e;
}

// tanh' from the output t: 1 − t², as the reference's autograd computes it (torch's
// tanh_backward); the kernels keep G and F, not their pre-activations. It is accurate relative
// while t is not close to 1; as |x| grows its absolute error stays about an ulp of 1, as the
// reference's does.
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
