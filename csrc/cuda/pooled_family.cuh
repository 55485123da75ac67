// Host drivers of the layer ops whose gates are pooled FCs and whose input is not attended:
// (a) `pooled_layer`, (c) `input_attention_layer`, (d) `output_attention_layer` (shared/SPEC.md).
// (c)/(d) are (a) plus the channel attention branch; `attention_gate` says which gate it replaces.
//
// Structure (shared/KERNELS.md): everything that depends only on X is computed for all T steps
// in batched ATen calls before the loop; a step runs the H-side depthwise convolutions (custom
// kernels), the pointwise GEMMs (cuBLAS, fp32 accumulation) and one fused epilogue
// (pooled_cell.cuh). Backward runs the loop in reverse and reduces every weight gradient over
// all steps after it with one batched product each.
//
// Parameters (variants.parameter_shapes order):
//   0 gate_weight_x [nC, Cin]  1 gate_weight_h [nC, C]  2 gate_bias [nC]
//   3 cand_dw_x [Cin, 1, K, K]  4 cand_pw_x [C, Cin]  5 cand_dw_h [C, 1, K, K]  6 cand_pw_h [C, C]
//   7 cand_bias [C]
//   c/d: 8 att_dw_x  9 att_pw_x  10 att_dw_h  11 att_pw_h  12 att_bias  13 att_dw_z  14 att_pw_z
#pragma once

#include "pooled_cell.cuh"

namespace convlstm_fast {
namespace cuda {
namespace {

inline std::vector<const char*> pooled_family_param_names(int attention_gate) {
  std::vector<const char*> names = {"gate_weight_x", "gate_weight_h", "gate_bias", "cand_dw_x",
                                    "cand_pw_x", "cand_dw_h", "cand_pw_h", "cand_bias"};
  if (attention_gate != kNoAttention) {
    for (const char* n : {"att_dw_x", "att_pw_x", "att_dw_h", "att_pw_h", "att_bias", "att_dw_z",
                          "att_pw_z"}) {
      names.push_back(n);
    }
  }
  return names;
}

// Shapes of the `saved` list (must equal convlstm_fast/backends/native.py SAVED_SPECS):
// cell, candidate [T, B, H, W, C]; gate_preact [T, B, n·C]; attention [T, B, H, W, C] (c/d).
inline std::vector<std::vector<int64_t>> pooled_family_saved_shapes(const Tensor& x,
                                                                    int64_t hidden,
                                                                    int attention_gate) {
  const int64_t T = x.size(0), B = x.size(1), H = x.size(3), W = x.size(4);
  std::vector<std::vector<int64_t>> shapes = {
      {T, B, H, W, hidden}, {T, B, H, W, hidden}, {T, B, pooled_gate_count(attention_gate) * hidden}};
  if (attention_gate != kNoAttention) shapes.push_back({T, B, H, W, hidden});
  return shapes;
}

inline void check_pooled_family_params(const Tensor& x, const Tensor& h0, at::TensorList params,
                                       int attention_gate, const char* op) {
  const int64_t cin = x.size(2), hidden = h0.size(1), n = pooled_gate_count(attention_gate);
  const int64_t k = params[3].size(-1);
  TORCH_CHECK(k % 2 == 1, op, ": cand_dw_x must have an odd kernel size, got ", k);
  std::vector<std::vector<int64_t>> shapes = {{n * hidden, cin}, {n * hidden, hidden}, {n * hidden},
                                              {cin, 1, k, k}, {hidden, cin}, {hidden, 1, k, k},
                                              {hidden, hidden}, {hidden}};
  if (attention_gate != kNoAttention) {
    for (std::vector<int64_t> s : std::vector<std::vector<int64_t>>{
             {cin, 1, k, k}, {hidden, cin}, {hidden, 1, k, k}, {hidden, hidden}, {hidden},
             {hidden, 1, k, k}, {hidden, hidden}}) {
      shapes.push_back(s);
    }
  }
  const auto names = pooled_family_param_names(attention_gate);
  for (size_t i = 0; i < shapes.size(); ++i) {
    TORCH_CHECK(params[i].sizes() == at::IntArrayRef(shapes[i]), op, ": parameter ", names[i],
                " must have shape ", at::IntArrayRef(shapes[i]), ", got ", params[i].sizes());
  }
}

// The result of a layer with nothing to compute (T, B, C, H or W is 0): zero output.
inline LayerResult empty_layer_result(const Tensor& x, const Tensor& h0, const Tensor& c0,
                                      const std::vector<std::vector<int64_t>>& saved_shapes) {
  std::vector<Tensor> saved;
  for (const auto& s : saved_shapes) saved.push_back(at::zeros(s, x.options()));
  Tensor output = at::zeros({x.size(0), x.size(1), h0.size(1), x.size(3), x.size(4)}, x.options());
  return {output, h0.clone(), c0.clone(), saved};
}

inline BackwardResult empty_backward_result(const Tensor& x, const Tensor& grad_h_n,
                                            const Tensor& grad_c_n, at::TensorList params) {
  std::vector<Tensor> grads;
  for (const Tensor& p : params) grads.push_back(at::zeros_like(p));
  // T == 0: the initial state is the final state.
  return {at::zeros_like(x), grad_h_n.clone(), grad_c_n.clone(), grads};
}

inline LayerResult pooled_family_forward(const Tensor& x, const Tensor& h0, const Tensor& c0,
                                         at::TensorList params, int64_t activation, bool save,
                                         int attention_gate, const char* op) {
  check_layer_inputs(x, h0, c0, params, pooled_family_param_names(attention_gate), op);
  TORCH_CHECK(activation == kSigmoid || activation == kHardSigmoid, op,
              ": gate_activation must be 0 (sigmoid) or 1 (hard_sigmoid), got ", activation);
  check_pooled_family_params(x, h0, params, attention_gate, op);
  LayerDeviceGuard guard(x.device());
  const int64_t T = x.size(0), B = x.size(1), Cin = x.size(2), H = x.size(3), W = x.size(4);
  const int64_t C = h0.size(1), HW = H * W, n = pooled_gate_count(attention_gate);
  const auto saved_shapes = pooled_family_saved_shapes(x, C, attention_gate);
  if (T == 0 || B == 0 || C == 0 || HW == 0) return empty_layer_result(x, h0, c0, saved_shapes);
  const bool attention = attention_gate != kNoAttention;
  const auto acc = acc_dtype(x);
  const Tensor xc_ = x.contiguous();

  // Input side for all T·B samples: xc = SepConv_x(X) + b_c, xg = U_x·GAP(X) + b_g,
  // and for c/d xa = SepConv_xa(X) + b_a.
  const Tensor x_cl = channels_last_copy(xc_, x.scalar_type());           // [T, B, H, W, Cin]
  const Tensor xc = pointwise(depthwise_forward(x_cl, params[3], T * B, H, W), params[4], params[7]);
  const Tensor gap_x = x_cl.view({T * B, HW, Cin}).mean({1}, false, acc);  // [T·B, Cin]
  const Tensor xg = pointwise(gap_x, params[0].to(acc), params[2].to(acc));  // [T·B, n·C]
  Tensor xa;
  if (attention) xa = pointwise(depthwise_forward(x_cl, params[8], T * B, H, W), params[9], params[12]);
  const Tensor gate_weight_h = params[1].to(acc);

  Tensor output_cl = at::empty({T, B, H, W, C}, x.options());
  const SavedSteps saved(saved_shapes, x.options(), save);
  const Tensor h0_cl = channels_last_copy(h0, x.scalar_type());
  Tensor cell_state = channels_last_copy(c0, acc).view({B * HW, C});
  Tensor h_mean = h0_cl.view({B, HW, C}).mean({1}, false, acc);  // GAP(H_{t−1}) [B, C]

  for (int64_t t = 0; t < T; ++t) {
    const Tensor h_prev = t == 0 ? h0_cl : output_cl[t - 1];
    // zc = SepConv_h(H_{t−1}) + (SepConv_x(X_t) + b_c)
    const Tensor zc = at::addmm(xc.narrow(0, t * B * HW, B * HW),
                                depthwise_forward(h_prev, params[5], B, H, W), params[6].t());
    // gate pre-activations U_x·x̄ + U_h·h̄ + b_g, saved (rounded) and used rounded
    Tensor gate_pre = saved(2, t);
    gate_pre.copy_(at::addmm(xg.narrow(0, t * B, B), h_mean, gate_weight_h.t()));
    Tensor logits, logits_max;
    if (attention) {
      // Z = SepConv_z(tanh(SepConv_hi(H_{t−1}) + xa_t)), per-(b, c) max over the pixels
      const Tensor features = at::addmm(xa.narrow(0, t * B * HW, B * HW),
                                        depthwise_forward(h_prev, params[10], B, H, W),
                                        params[11].t()).tanh_();
      logits = pointwise(depthwise_forward(features, params[13], B, H, W), params[14]);
      logits_max = logits.view({B, HW, C}).amax({1}).to(acc);
    }
    h_mean = pooled_cell_forward(zc, gate_pre, logits, logits_max, attention_gate, activation,
                                 cell_state, output_cl[t], saved(0, t), saved(1, t),
                                 attention ? saved(3, t) : Tensor(), B, HW, C);
  }
  Tensor output = channels_first_copy(output_cl, x.scalar_type());
  Tensor h_n = output[T - 1].clone();
  Tensor c_n = channels_first_copy(cell_state.view({B, H, W, C}), x.scalar_type());
  return {output, h_n, c_n, saved.all()};
}

inline BackwardResult pooled_family_backward(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n, const Tensor& x,
    const Tensor& h0, const Tensor& c0, at::TensorList params, const Tensor& output,
    at::TensorList saved, int64_t activation, int attention_gate, const char* op) {
  check_layer_inputs(x, h0, c0, params, pooled_family_param_names(attention_gate), op);
  check_pooled_family_params(x, h0, params, attention_gate, op);
  check_backward_inputs(grad_output, grad_h_n, grad_c_n, x, h0, output, op);
  TORCH_CHECK(activation == kSigmoid || activation == kHardSigmoid, op,
              ": gate_activation must be 0 (sigmoid) or 1 (hard_sigmoid), got ", activation);
  LayerDeviceGuard guard(x.device());
  const int64_t T = x.size(0), B = x.size(1), Cin = x.size(2), H = x.size(3), W = x.size(4);
  const int64_t C = h0.size(1), HW = H * W, n = pooled_gate_count(attention_gate);
  check_saved(saved, pooled_family_saved_shapes(x, C, attention_gate), x, op);
  if (T == 0 || B == 0 || C == 0 || HW == 0) {
    return empty_backward_result(x, grad_h_n, grad_c_n, params);
  }
  const bool attention = attention_gate != kNoAttention;
  const auto acc = acc_dtype(x);
  const auto dtype = x.scalar_type();
  const int64_t rows = B * HW;  // pixel rows of one step

  const Tensor x_cl = channels_last_copy(x.contiguous(), dtype);
  const Tensor grad_out_cl = channels_last_copy(grad_output.contiguous(), dtype);
  const Tensor c0_cl = channels_last_copy(c0, dtype);
  // H_{t−1} of every step, [T, B, H, W, C]
  const Tensor h_prev_all = at::cat({channels_last_copy(h0, dtype).unsqueeze(0),
                                     channels_last_copy(output.narrow(0, 0, T - 1).contiguous(),
                                                        dtype)},
                                    0);
  Tensor dh = channels_last_copy(grad_h_n, acc).view({rows, C});
  Tensor dc = channels_last_copy(grad_c_n, acc).view({rows, C});

  // Attention branch: F = tanh(SepConv_xa(X) + SepConv_ha(H_{t−1}) + b_a) and Z = SepConv_z(F)
  // are recomputed step by step in the loop with exactly the forward's calls, so Z is bitwise
  // the forward's and so is where it attains its per-(b, c) maximum (the max's gradient goes
  // there, split evenly between ties as for torch.amax); a batched recompute could round
  // differently and move the argmax in fp16/bf16.
  Tensor dw_xa_all, xa_all, features_all;
  if (attention) {
    dw_xa_all = depthwise_forward(x_cl, params[8], T * B, H, W);
    xa_all = pointwise(dw_xa_all, params[9], params[12]);
    features_all = at::empty({T * rows, C}, x.options());
  }

  Tensor dacc_all = at::empty({T * rows, C}, x.options());      // d zc
  Tensor d_dwh_all = at::empty({T * rows, C}, x.options());     // d SepConv_h's depthwise output
  Tensor dgp_all = at::empty({T * B, n * C}, x.options().dtype(acc));
  Tensor datt, dz_all, d_dwf_all, dza_all, d_dwha_all;
  if (attention) {
    datt = at::empty({rows, C}, x.options().dtype(acc));
    dz_all = at::empty({T * rows, C}, x.options());
    d_dwf_all = at::empty({T * rows, C}, x.options());
    dza_all = at::empty({T * rows, C}, x.options());
    d_dwha_all = at::empty({T * rows, C}, x.options());
  }
  const Tensor gate_weight_h = params[1].to(acc);

  for (int64_t t = T - 1; t >= 0; --t) {
    const Tensor cell_prev = t == 0 ? c0_cl : saved[0][t - 1];
    const auto step_rows = [&](const Tensor& all) { return all.narrow(0, t * rows, rows); };
    const PooledCellGrads grads = pooled_cell_backward(
        grad_out_cl[t], dh, dc, saved[2][t], attention ? saved[3][t] : Tensor(), attention_gate,
        activation, saved[1][t], saved[0][t], cell_prev, step_rows(dacc_all), datt,
        dgp_all.narrow(0, t * B, B), B, HW, C);
    // dh̄ = dgp·U_h, spread as dh̄/HW over the pixels of H_{t−1}
    const Tensor dh_mean = at::mm(grads.gate_grad, gate_weight_h);
    // d(depthwise H) = dacc·pw_h, then the transposed depthwise conv into dH_{t−1}
    Tensor d_dwh = step_rows(d_dwh_all);
    at::mm_out(d_dwh, step_rows(dacc_all), params[6]);
    depthwise_transpose(d_dwh, params[5], B, H, W, dh, Tensor(), dh_mean, 1.0 / HW);
    if (attention) {
      // Recompute F_t and Z_t as the forward did (see above).
      Tensor features = step_rows(features_all);
      features.copy_(at::addmm(xa_all.narrow(0, t * rows, rows),
                               depthwise_forward(h_prev_all[t], params[10], B, H, W),
                               params[11].t()).tanh_());
      const Tensor logits =
          pointwise(depthwise_forward(features, params[13], B, H, W), params[14]).view({B, HW, C});
      const Tensor mask = logits.eq(logits.amax({1}, true)).to(acc);  // [B, HW, C]
      // dZ = dA∘A − [Z = max Z]·Σ_p(dA∘A)/count      (A = exp(Z − max Z))
      Tensor dz = step_rows(dz_all);
      const Tensor share = grads.att_sum.div(mask.sum({1}, false)).unsqueeze(1);
      dz.view({B, HW, C}).copy_(datt.view({B, HW, C}).sub(mask.mul(share)));
      // dF = SepConv_zᵀ(dZ); dza = dF∘(1 − F²); dH_{t−1} += SepConv_haᵀ(dza)
      Tensor d_dwf = step_rows(d_dwf_all);
      at::mm_out(d_dwf, dz, params[14]);
      Tensor dza = step_rows(dza_all);
      depthwise_transpose(d_dwf, params[13], B, H, W, dza, Tensor(), Tensor(), 0.0, features);
      Tensor d_dwha = step_rows(d_dwha_all);
      at::mm_out(d_dwha, dza, params[11]);
      depthwise_transpose(d_dwha, params[10], B, H, W, dh, dh);
    }
  }

  // Weight gradients, each one batched product over all steps.
  std::vector<Tensor> grad_params(params.size());
  const Tensor h_prev_rows = h_prev_all.view({T * rows, C});
  const Tensor h_mean_prev = h_prev_all.view({T * B, HW, C}).mean({1}, false, acc);
  const Tensor gap_x = x_cl.view({T * B, HW, Cin}).mean({1}, false, acc);
  grad_params[0] = at::mm(dgp_all.t(), gap_x).to(dtype);
  grad_params[1] = at::mm(dgp_all.t(), h_mean_prev).to(dtype);
  grad_params[2] = dgp_all.sum(0).to(dtype);
  grad_params[6] = at::mm(dacc_all.t(), depthwise_forward(h_prev_all, params[5], T * B, H, W));
  grad_params[5] = depthwise_weight_grad(d_dwh_all, h_prev_rows, params[5], H, W);
  grad_params[7] = dacc_all.sum({0}, false, acc).to(dtype);
  const Tensor x_rows = x_cl.view({T * rows, Cin});
  grad_params[4] = at::mm(dacc_all.t(), depthwise_forward(x_cl, params[3], T * B, H, W));
  const Tensor d_dwx = at::mm(dacc_all, params[4]);  // [T·rows, Cin]
  grad_params[3] = depthwise_weight_grad(d_dwx, x_rows, params[3], H, W);
  // dX = SepConv_xᵀ(dacc) + (dgp·U_x)/HW spread over the pixels
  const Tensor d_gap_x = at::mm(dgp_all, params[0].to(acc));  // [T·B, Cin]
  Tensor grad_x_cl = depthwise_transpose(d_dwx, params[3], T * B, H, W, Tensor(), Tensor(),
                                         d_gap_x, 1.0 / HW);
  if (attention) {
    const Tensor dw_f_all = depthwise_forward(features_all, params[13], T * B, H, W);
    const Tensor dw_ha_all = depthwise_forward(h_prev_all, params[10], T * B, H, W);
    grad_params[14] = at::mm(dz_all.t(), dw_f_all);
    grad_params[13] = depthwise_weight_grad(d_dwf_all, features_all, params[13], H, W);
    grad_params[11] = at::mm(dza_all.t(), dw_ha_all);
    grad_params[10] = depthwise_weight_grad(d_dwha_all, h_prev_rows, params[10], H, W);
    grad_params[12] = dza_all.sum({0}, false, acc).to(dtype);
    grad_params[9] = at::mm(dza_all.t(), dw_xa_all);
    const Tensor d_dwxa = at::mm(dza_all, params[9]);
    grad_params[8] = depthwise_weight_grad(d_dwxa, x_rows, params[8], H, W);
    depthwise_transpose(d_dwxa, params[8], T * B, H, W, grad_x_cl, grad_x_cl);
  }
  Tensor grad_x = channels_first_copy(grad_x_cl.view({T, B, H, W, Cin}), dtype);
  Tensor grad_h0 = channels_first_copy(dh.view({B, H, W, C}), dtype);
  Tensor grad_c0 = channels_first_copy(dc.view({B, H, W, C}), dtype);
  return {grad_x, grad_h0, grad_c0, grad_params};
}

}  // namespace
}  // namespace cuda
}  // namespace convlstm_fast
