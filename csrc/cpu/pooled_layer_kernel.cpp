// Variant (a), `convlstm_fast::pooled_layer` and its backward, on the CPU (shared/SPEC.md "a"):
//   x̄ = GAP(X_t), h̄ = GAP(H_{t−1});  [i f o] = σ(U_x x̄ + U_h h̄ + b_g)   (gates [B, C])
//   G = tanh(SepConv_x(X_t) + SepConv_h(H_{t−1}) + b_c)
//   C_t = f∘C_{t−1} + i∘G;  H_t = o∘tanh(C_t)
// Structure: everything stays in the op's own NCHW layout — no layout change of x, the states,
// the output or the gradients (on this CPU a transpose of one step's state costs a quarter of
// the step's GEMM time, and a layer would need several per step). A step is the depthwise convs
// of X_t and H_{t−1} (per-plane stencils, layer_common.h), the two pointwise GEMMs per sample
// (P·dw(·) on [C, H·W] planes, which BLAS runs at the same rate as the channels-last form), the
// pooled-gate FCs, and one fused loop per (sample, channel) plane that adds b_c, applies tanh,
// updates the cell, writes H_t straight into the output and sums it for the next step's h̄.
// Unlike shared/KERNELS.md's GPU design, the X side is not batched over T before the loop: the
// per-step GEMM already runs at the full matmul rate, and a sequence-sized X-side term costs a
// fresh multi-MB allocation, paid in page faults (measured: a 6.4 MB depthwise output took
// 4.6 ms freshly allocated vs 0.9 ms in reused memory). Everything else lives in step buffers
// reused across steps.
// Saved for backward (native.py SAVED_SPECS["a"]): cell C_t and candidate G [T, B, C, H, W] (NCHW,
// where the other native kernels save channels-last: native.py NCHW_SAVED), gate_preact [T, B, 3C].
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

// NCHW, unlike the other native kernels' channels-last (native.py NCHW_SAVED).
std::vector<std::vector<int64_t>> saved_shapes(const at::Tensor& x, int64_t c) {
  const int64_t t = x.size(0), b = x.size(1), h = x.size(3), w = x.size(4);
  return {{t, b, c, h, w}, {t, b, c, h, w}, {t, b, 3 * c}};
}

// out[b] (+)= weight · in[b] for every sample: [C_out, C_in] × [C_in, H·W] GEMMs on NCHW planes.
void pointwise_planes(const at::Tensor& out, const at::Tensor& weight, const at::Tensor& in,
                      bool accumulate) {
  const int64_t batch = in.size(0), planes_in = in.size(1), planes_out = out.size(1);
  for (int64_t b = 0; b < batch; ++b) {
    at::Tensor out_b = out[b].view({planes_out, -1});
    const at::Tensor in_b = in[b].view({planes_in, -1});
    if (accumulate) {
      out_b.addmm_(weight, in_b);
    } else {
      at::mm_out(out_b, weight, in_b);
    }
  }
}

// grad_weight [C_out, C_in] += Σ_b grad_out[b] · in[b]ᵀ (planes [C, H·W]), samples in order.
void pointwise_planes_weight_grad(const at::Tensor& grad_weight, const at::Tensor& grad_out,
                                  const at::Tensor& in) {
  const int64_t batch = in.size(0);
  for (int64_t b = 0; b < batch; ++b) {
    grad_weight.addmm_(grad_out[b].view({grad_out.size(1), -1}),
                       in[b].view({in.size(1), -1}).t());
  }
}

// One SepConv branch of the candidate (X side or H side) in backward: its parameters, the step
// buffers and the parameter-sized sums its weight gradients accumulate into.
struct SepConvBranch {
  at::Tensor depthwise, pointwise, gate_weight;  // [Cin, 1, K, K], [C, Cin], [3C, Cin]
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
        bars(at::empty({steps, input_like.size(0), input_like.size(1)}, input_like.options())) {}

  // Step t with branch input `in` [B, Cin, H, W], dG_pre `grad_cand` [B, C, H, W] and the pooled
  // gates' pre-activation gradient dgp [B, 3C]: accumulates d dw and dP (recomputing dw(in)),
  // records GAP(in), and writes grad_in = dwᵀ(Pᵀ·dG_pre) + (dgp·U)/HW on every pixel.
  void backward_step(int64_t t, const at::Tensor& in, const at::Tensor& grad_cand,
                     const at::Tensor& dgp, const at::Tensor& grad_in) {
    plane_means(bars[t], in);
    grad_bar.zero_();
    small_addmm_(grad_bar, dgp, gate_weight, false);
    grad_bar.div_(in.size(2) * in.size(3));
    depthwise_conv_planes(dw, in, depthwise, false, at::Tensor());
    pointwise_planes_weight_grad(grad_pointwise, grad_cand, dw);
    pointwise_planes(grad_dw, pointwise.t(), grad_cand, false);
    depthwise_weight_grad_planes(grad_depthwise, grad_dw, in);
    depthwise_conv_planes(grad_in, grad_dw, depthwise, true, grad_bar);
  }
};

LayerResult pooled_layer_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                                 at::TensorList params_in, int64_t gate_activation) {
  const std::vector<at::Tensor> params = contiguous_params(params_in);
  const int64_t k = kernel_size_of(kOp, params, kCandDwX, 8);
  TORCH_CHECK(x.dim() == 5 && h0.dim() == 4, kOp, ": x must be [T, B, Cin, H, W], h0 [B, C, H, W]");
  check_layer_inputs(kOp, x, h0, c0, params, param_specs(x.size(2), h0.size(1), k),
                     gate_activation);
  const int64_t steps = x.size(0), batch = x.size(1), cin = x.size(2), height = x.size(3),
                width = x.size(4), channels = h0.size(1), pixels = height * width;
  const at::TensorOptions options = x.options();
  const at::Tensor cell = at::empty({steps, batch, channels, height, width}, options);
  const at::Tensor candidate = at::empty({steps, batch, channels, height, width}, options);
  const at::Tensor gate_preact = at::empty({steps, batch, 3 * channels}, options);
  if (steps == 0 || batch * pixels * channels == 0 || cin == 0) {
    return empty_layer_result(x, h0, c0, saved_shapes(x, channels));
  }
  const at::Tensor output = at::empty({steps, batch, channels, height, width}, options);
  const at::Tensor x_c = x.contiguous(), h0_c = h0.contiguous(), c0_c = c0.contiguous();
  // Step buffers, reused.
  const at::Tensor dw_x = at::empty({batch, cin, height, width}, options);
  const at::Tensor dw_h = at::empty({batch, channels, height, width}, options);
  const at::Tensor preact = at::empty({batch, channels, height, width}, options);
  const at::Tensor x_bar = at::empty({batch, cin}, options);
  const at::Tensor h_bar = at::empty({batch, channels}, options);
  const at::Tensor gates = at::empty({batch, 3 * channels}, options);
  plane_means(h_bar, h0_c);
  for (int64_t t = 0; t < steps; ++t) {
    const at::Tensor x_t = x_c[t];
    const at::Tensor h_prev = t > 0 ? output[t - 1] : h0_c;
    const at::Tensor c_prev = t > 0 ? cell[t - 1] : c0_c;
    // Gate pre-activations b_g + U_x x̄ + U_h h̄ (h̄ summed by the previous step's loop).
    plane_means(x_bar, x_t);
    at::Tensor step_preact = gate_preact[t];
    step_preact.copy_(params[kGateBias].expand({batch, 3 * channels}));
    small_addmm_(step_preact, x_bar, params[kGateWx], true);
    small_addmm_(step_preact, h_bar, params[kGateWh], true);
    // Candidate pre-activation (b_c is added in the fused loop).
    depthwise_conv_planes(dw_x, x_t, params[kCandDwX], false, at::Tensor());
    depthwise_conv_planes(dw_h, h_prev, params[kCandDwH], false, at::Tensor());
    pointwise_planes(preact, params[kCandPwX], dw_x, false);
    pointwise_planes(preact, params[kCandPwH], dw_h, true);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), kOp, [&] {
      activate_gates(step_preact.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(),
                     gates.numel(), gate_activation);
      const scalar_t* gp = gates.data_ptr<scalar_t>();
      const scalar_t* bias = params[kCandBias].data_ptr<scalar_t>();
      const scalar_t* pre = preact.data_ptr<scalar_t>();
      const scalar_t* cp = c_prev.data_ptr<scalar_t>();
      scalar_t* cand = candidate[t].data_ptr<scalar_t>();
      scalar_t* cn = cell[t].data_ptr<scalar_t>();
      scalar_t* hn = output[t].data_ptr<scalar_t>();
      scalar_t* hb = h_bar.data_ptr<scalar_t>();
      for_each_gated_plane(batch, channels, gp, [&](int64_t p, scalar_t i, scalar_t f,
                                                    scalar_t o) {
        const int64_t offset = p * pixels;
        hb[p] = pooled_plane_forward(pixels, i, f, o, bias[p % channels], pre + offset,
                                     cp + offset, cand + offset, cn + offset, hn + offset) /
                scalar_t(pixels);
      });
    });
  }
  return {output, output[steps - 1].clone(), cell[steps - 1].clone(),
          {cell, candidate, gate_preact}};
}

// Reverse time (KERNELS.md "One step, backward"), per step:
//   the fused loop gives dG_pre = dC∘i∘(1 − G²) (the gradient of both SepConvs' sum), dC_{t−1},
//   and per plane Σ di, Σ df, Σ do, Σ dG_pre; dgp = [Σdi, Σdf, Σdo]∘σ'(gate_preact);
//   dH_{t−1} = depthwise_hᵀ(P_hᵀ·dG_pre) + (dgp·U_h)/HW on every pixel (+ dL/dH_{t−1} of the
//   output); dX_t = depthwise_xᵀ(P_xᵀ·dG_pre) + (dgp·U_x)/HW, written straight into grad_x.
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
  const at::TensorOptions options = x.options();
  const at::Tensor cell = saved[0].contiguous(), candidate = saved[1].contiguous();
  const at::Tensor gate_preact = saved[2].contiguous();
  const at::Tensor x_c = x.contiguous(), h0_c = h0.contiguous(), c0_c = c0.contiguous();
  const at::Tensor output_c = output.contiguous(), grad_output_c = grad_output.contiguous();

  // Step buffers, reused.
  const at::Tensor grad_cand = at::empty({batch, channels, height, width}, options);
  const at::Tensor sums = at::empty({batch, channels, 4}, options);
  const at::Tensor gates = at::empty({batch, 3 * channels}, options);
  // The pooled gates' pre-activation gradients of every step (dU is reduced after the loop).
  const at::Tensor grad_gate_preact = at::empty({steps, batch, 3 * channels}, options);
  const at::Tensor grad_cand_bias = at::zeros({channels}, options);
  SepConvBranch h_side(params[kCandDwH], params[kCandPwH], params[kGateWh], h0_c, steps);
  SepConvBranch x_side(params[kCandDwX], params[kCandPwX], params[kGateWx], x_c[0], steps);

  const at::Tensor grad_x = at::empty(x.sizes(), options);
  // dL/dH and dL/dC flowing back to step t − 1, each through two buffers: this step reads one
  // and writes the other.
  std::array<at::Tensor, 2> grad_h{at::empty_like(h0_c).copy_(grad_h_n), at::empty_like(h0_c)};
  std::array<at::Tensor, 2> grad_c{at::empty_like(c0_c).copy_(grad_c_n), at::empty_like(c0_c)};

  for (int64_t t = steps - 1; t >= 0; --t) {
    const int64_t in = (steps - 1 - t) % 2, out = 1 - in;
    const at::Tensor c_prev = t > 0 ? cell[t - 1] : c0_c;
    const at::Tensor h_prev = t > 0 ? output_c[t - 1] : h0_c;
    const at::Tensor x_t = x_c[t];
    const at::Tensor dgp = grad_gate_preact[t];
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), kBackwardOp, [&] {
      const scalar_t* pre = gate_preact[t].data_ptr<scalar_t>();
      activate_gates(pre, gates.data_ptr<scalar_t>(), gates.numel(), gate_activation);
      const scalar_t* gp = gates.data_ptr<scalar_t>();
      const scalar_t* cand = candidate[t].data_ptr<scalar_t>();
      const scalar_t* cp = c_prev.data_ptr<scalar_t>();
      const scalar_t* ct = cell[t].data_ptr<scalar_t>();
      const scalar_t* gout = grad_output_c[t].data_ptr<scalar_t>();
      const scalar_t* gh = grad_h[in].data_ptr<scalar_t>();
      const scalar_t* gc = grad_c[in].data_ptr<scalar_t>();
      scalar_t* gcand = grad_cand.data_ptr<scalar_t>();
      scalar_t* gcp = grad_c[out].data_ptr<scalar_t>();
      scalar_t* sp = sums.data_ptr<scalar_t>();
      for_each_gated_plane(batch, channels, gp, [&](int64_t p, scalar_t i, scalar_t f,
                                                    scalar_t o) {
        const int64_t offset = p * pixels;
        pooled_plane_backward(pixels, i, f, o, cand + offset, cp + offset, ct + offset,
                              gout + offset, gh + offset, gc + offset, gcand + offset,
                              gcp + offset, sp + 4 * p);
      });
      // dgp = Σ_HW [di, df, do] ∘ σ'(gate pre-activation); d b_c += Σ dG_pre.
      scalar_t* dg = dgp.data_ptr<scalar_t>();
      scalar_t* db = grad_cand_bias.data_ptr<scalar_t>();
      for (int64_t b = 0; b < batch; ++b) {
        for (int64_t c = 0; c < channels; ++c) {
          const scalar_t* s = sp + 4 * (b * channels + c);
          for (int64_t gate = 0; gate < 3; ++gate) {
            const int64_t idx = b * 3 * channels + gate * channels + c;
            dg[idx] = s[gate] * convlstm_fast::gate_activation_grad(pre[idx], gate_activation);
          }
          db[c] += s[3];
        }
      }
    });

    // dH_{t−1} and dX_t, each with the pooled gates' share as its planes' initial value.
    h_side.backward_step(t, h_prev, grad_cand, dgp, grad_h[out]);
    x_side.backward_step(t, x_t, grad_cand, dgp, grad_x[t]);
  }

  const int64_t last = steps % 2;  // the buffers holding dL/dH_0 and dL/dC_0
  const at::Tensor grad_gp_flat = grad_gate_preact.view({steps * batch, 3 * channels});
  std::vector<at::Tensor> grad_params{
      at::mm(grad_gp_flat.t(), x_side.bars.view({steps * batch, cin})),
      at::mm(grad_gp_flat.t(), h_side.bars.view({steps * batch, channels})),
      grad_gp_flat.sum(0),
      x_side.grad_depthwise,
      x_side.grad_pointwise,
      h_side.grad_depthwise,
      h_side.grad_pointwise,
      grad_cand_bias};
  return {grad_x, grad_h[last], grad_c[last], grad_params};
}

}  // namespace

TORCH_LIBRARY_IMPL(convlstm_fast, CPU, m) {
  m.impl("pooled_layer", &pooled_layer_forward);
  m.impl("pooled_layer_backward", &pooled_layer_backward);
}

}  // namespace cpu
}  // namespace convlstm_fast
