// CUDA kernels of variant (b), `convlstm_fast::spatial_attention_layer` and its `_backward`
// (shared/SPEC.md eqs. 17-19):
//   F = tanh(SepConv_xa(X_t) + SepConv_ha(H_{t−1}) + b_a);  Z = W_z * F  (K×K, C → 1)
//   A = softmax of Z over the H·W pixels per sample;  X̃ = A∘X_t;  then cell (a) on X̃.
// X̃ depends on H_{t−1}, so only SepConv_xa(X) is batched before the loop; per step: the
// attention features (depthwise kernel + GEMM), W_z * F (cuDNN), the softmax (ATen), X̃ and
// both candidate SepConvs, the pooled gates, and the fused epilogue of pooled_cell.cuh.
//
// Parameters (variants.parameter_shapes order): 0 gate_weight_x [3C, Cin] 1 gate_weight_h
// [3C, C] 2 gate_bias 3 cand_dw_x 4 cand_pw_x 5 cand_dw_h 6 cand_pw_h 7 cand_bias 8 att_dw_x
// 9 att_pw_x 10 att_dw_h 11 att_pw_h 12 att_bias 13 att_weight_z [1, C, K, K].
// Saved: cell, candidate [T, B, H, W, C], gate_preact [T, B, 3C], attention [T, B, H, W] (A).
#include "pooled_cell.cuh"

namespace convlstm_fast {
namespace cuda {
namespace {

const std::vector<const char*> kSpatialParamNames = {
    "gate_weight_x", "gate_weight_h", "gate_bias", "cand_dw_x", "cand_pw_x",
    "cand_dw_h",     "cand_pw_h",     "cand_bias", "att_dw_x",  "att_pw_x",
    "att_dw_h",      "att_pw_h",      "att_bias",  "att_weight_z"};

void check_spatial_params(const Tensor& x, const Tensor& h0, at::TensorList params,
                          const char* op) {
  const int64_t cin = x.size(2), hidden = h0.size(1), k = params[3].size(-1);
  TORCH_CHECK(k % 2 == 1, op, ": cand_dw_x must have an odd kernel size, got ", k);
  const std::vector<std::vector<int64_t>> shapes = {
      {3 * hidden, cin}, {3 * hidden, hidden}, {3 * hidden}, {cin, 1, k, k}, {hidden, cin},
      {hidden, 1, k, k}, {hidden, hidden}, {hidden}, {cin, 1, k, k}, {hidden, cin},
      {hidden, 1, k, k}, {hidden, hidden}, {hidden}, {1, hidden, k, k}};
  for (size_t i = 0; i < shapes.size(); ++i) {
    TORCH_CHECK(params[i].sizes() == at::IntArrayRef(shapes[i]), op, ": parameter ",
                kSpatialParamNames[i], " must have shape ", at::IntArrayRef(shapes[i]), ", got ",
                params[i].sizes());
  }
}

std::vector<std::vector<int64_t>> spatial_saved_shapes(const Tensor& x, int64_t hidden) {
  const int64_t T = x.size(0), B = x.size(1), H = x.size(3), W = x.size(4);
  return {{T, B, H, W, hidden}, {T, B, H, W, hidden}, {T, B, 3 * hidden}, {T, B, H, W}};
}

LayerResult spatial_attention_layer(const Tensor& x, const Tensor& h0, const Tensor& c0,
                                    at::TensorList params, int64_t activation, bool save) {
  const char* op = "spatial_attention_layer";
  check_layer_inputs(x, h0, c0, params, kSpatialParamNames, op);
  check_spatial_params(x, h0, params, op);
  TORCH_CHECK(activation == kSigmoid || activation == kHardSigmoid, op,
              ": gate_activation must be 0 (sigmoid) or 1 (hard_sigmoid), got ", activation);
  LayerDeviceGuard guard(x.device());
  const int64_t T = x.size(0), B = x.size(1), Cin = x.size(2), H = x.size(3), W = x.size(4);
  const int64_t C = h0.size(1), HW = H * W, rows = B * HW;
  const auto saved_shapes = spatial_saved_shapes(x, C);
  if (T == 0 || B == 0 || C == 0 || HW == 0) {
    std::vector<Tensor> saved;
    for (const auto& s : saved_shapes) saved.push_back(at::zeros(s, x.options()));
    return {at::zeros({T, B, C, H, W}, x.options()), h0.clone(), c0.clone(), saved};
  }
  const auto dtype = x.scalar_type();
  const auto acc = acc_dtype(x);
  const Tensor x_cl = channels_last_copy(x.contiguous(), dtype);  // [T, B, H, W, Cin]
  // The only input-side term that does not depend on H: SepConv_xa(X) + b_a for all steps.
  const Tensor xa = pointwise(depthwise_forward(x_cl, params[8], T * B, H, W), params[9], params[12]);
  const Tensor gate_weight_x = params[0].to(acc), gate_weight_h = params[1].to(acc);
  const Tensor gate_bias = params[2].to(acc);

  Tensor output_cl = at::empty({T, B, H, W, C}, x.options());
  const SavedSteps saved(saved_shapes, x.options(), save);
  const Tensor h0_cl = channels_last_copy(h0, dtype);
  Tensor cell_state = channels_last_copy(c0, acc).view({rows, C});
  Tensor h_mean = h0_cl.view({B, HW, C}).mean({1}, false, acc);
  for (int64_t t = 0; t < T; ++t) {
    const Tensor h_prev = t == 0 ? h0_cl : output_cl[t - 1];
    // F = tanh(SepConv_ha(H_{t−1}) + xa_t); Z = W_z * F; A = softmax_HW(Z)
    const Tensor features = at::addmm(xa.narrow(0, t * rows, rows),
                                      depthwise_forward(h_prev, params[10], B, H, W),
                                      params[11].t()).tanh_();
    const Tensor logits = same_conv(nchw_view(features, B, H, W, C), params[13], Tensor());
    saved(3, t).view({B, HW}).copy_(logits.reshape({B, HW}).softmax(1, acc));
    // X̃ = A∘X_t (A rounded to x's dtype, as saved)
    const Tensor x_att = x_cl[t].view({B, HW, Cin}).mul(saved(3, t).view({B, HW, 1})).contiguous();
    // zc = SepConv_x(X̃) + b_c + SepConv_h(H_{t−1})
    Tensor zc = pointwise(depthwise_forward(x_att, params[3], B, H, W), params[4], params[7]);
    zc.addmm_(depthwise_forward(h_prev, params[5], B, H, W), params[6].t());
    // gates U_x·GAP(X̃) + U_h·h̄ + b_g
    Tensor gate_pre = saved(2, t);
    gate_pre.copy_(at::addmm(gate_bias, x_att.mean({1}, false, acc), gate_weight_x.t())
                       .addmm_(h_mean, gate_weight_h.t()));
    h_mean = pooled_cell_forward(zc, gate_pre, Tensor(), Tensor(), kNoAttention, activation,
                                 cell_state, output_cl[t], saved(0, t), saved(1, t), Tensor(), B,
                                 HW, C);
  }
  Tensor output = channels_first_copy(output_cl, dtype);
  Tensor h_n = output[T - 1].clone();
  Tensor c_n = channels_first_copy(cell_state.view({B, H, W, C}), dtype);
  return {output, h_n, c_n, saved.all()};
}

BackwardResult spatial_attention_layer_backward(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n, const Tensor& x,
    const Tensor& h0, const Tensor& c0, at::TensorList params, const Tensor& output,
    at::TensorList saved, int64_t activation) {
  const char* op = "spatial_attention_layer_backward";
  check_layer_inputs(x, h0, c0, params, kSpatialParamNames, op);
  check_spatial_params(x, h0, params, op);
  check_backward_inputs(grad_output, grad_h_n, grad_c_n, x, h0, output, op);
  TORCH_CHECK(activation == kSigmoid || activation == kHardSigmoid, op,
              ": gate_activation must be 0 (sigmoid) or 1 (hard_sigmoid), got ", activation);
  LayerDeviceGuard guard(x.device());
  const int64_t T = x.size(0), B = x.size(1), Cin = x.size(2), H = x.size(3), W = x.size(4);
  const int64_t C = h0.size(1), HW = H * W, rows = B * HW;
  check_saved(saved, spatial_saved_shapes(x, C), x, op);
  if (T == 0 || B == 0 || C == 0 || HW == 0) {
    std::vector<Tensor> grads;
    for (const Tensor& p : params) grads.push_back(at::zeros_like(p));
    return {at::zeros_like(x), grad_h_n.clone(), grad_c_n.clone(), grads};
  }
  const auto dtype = x.scalar_type();
  const auto acc = acc_dtype(x);
  const Tensor x_cl = channels_last_copy(x.contiguous(), dtype);
  const Tensor grad_out_cl = channels_last_copy(grad_output.contiguous(), dtype);
  const Tensor c0_cl = channels_last_copy(c0, dtype);
  const Tensor h_prev_all = at::cat({channels_last_copy(h0, dtype).unsqueeze(0),
                                     channels_last_copy(output.narrow(0, 0, T - 1).contiguous(),
                                                        dtype)},
                                    0);
  const Tensor h_prev_rows = h_prev_all.view({T * rows, C});
  const Tensor x_rows = x_cl.view({T * rows, Cin});
  Tensor dh = channels_last_copy(grad_h_n, acc).view({rows, C});
  Tensor dc = channels_last_copy(grad_c_n, acc).view({rows, C});

  // Recomputed for all steps at once: the attention features F and the attended input X̃.
  const Tensor dw_xa_all = depthwise_forward(x_cl, params[8], T * B, H, W);
  const Tensor dw_ha_all = depthwise_forward(h_prev_all, params[10], T * B, H, W);
  const Tensor features_all = at::addmm(pointwise(dw_xa_all, params[9], params[12]), dw_ha_all,
                                        params[11].t()).tanh_();
  const Tensor attention = saved[3].view({T * B, HW});
  const Tensor x_att_all =
      x_cl.view({T * B, HW, Cin}).mul(attention.unsqueeze(2)).contiguous();
  const Tensor gate_weight_x = params[0].to(acc), gate_weight_h = params[1].to(acc);

  Tensor dacc_all = at::empty({T * rows, C}, x.options());
  Tensor d_dwh_all = at::empty({T * rows, C}, x.options());
  Tensor d_dwxt_all = at::empty({T * rows, Cin}, x.options());
  Tensor dgp_all = at::empty({T * B, 3 * C}, x.options().dtype(acc));
  Tensor dz_all = at::empty({T * B, 1, H, W}, x.options());
  Tensor dza_all = at::empty({T * rows, C}, x.options());
  Tensor d_dwha_all = at::empty({T * rows, C}, x.options());
  Tensor grad_x_cl = at::empty({T * rows, Cin}, x.options().dtype(acc));

  for (int64_t t = T - 1; t >= 0; --t) {
    const auto step_rows = [&](const Tensor& all) { return all.narrow(0, t * rows, rows); };
    const Tensor cell_prev = t == 0 ? c0_cl : saved[0][t - 1];
    const Tensor dacc = step_rows(dacc_all);
    const PooledCellGrads grads = pooled_cell_backward(
        grad_out_cl[t], dh, dc, saved[2][t], Tensor(), kNoAttention, activation, saved[1][t],
        saved[0][t], cell_prev, dacc, Tensor(), dgp_all.narrow(0, t * B, B), B, HW, C);
    // dh̄ = dgp·U_h, d x̃̄ = dgp·U_x (spread as /HW over the pixels)
    const Tensor dh_mean = at::mm(grads.gate_grad, gate_weight_h);
    const Tensor d_gap = at::mm(grads.gate_grad, gate_weight_x);
    Tensor d_dwh = step_rows(d_dwh_all);
    at::mm_out(d_dwh, dacc, params[6]);
    depthwise_transpose(d_dwh, params[5], B, H, W, dh, Tensor(), dh_mean, 1.0 / HW);
    // dX̃ = SepConv_xᵀ(dacc) + d x̃̄/HW
    Tensor d_dwxt = step_rows(d_dwxt_all);
    at::mm_out(d_dwxt, dacc, params[4]);
    const Tensor dx_att = depthwise_transpose(d_dwxt, params[3], B, H, W, Tensor(), Tensor(),
                                              d_gap, 1.0 / HW).view({B, HW, Cin});
    // X̃ = A∘X:  dX += dX̃∘A;  dA_p = Σ_c dX̃∘X
    const Tensor att = attention.narrow(0, t * B, B).to(acc);  // [B, HW]
    step_rows(grad_x_cl).view({B, HW, Cin}).copy_(dx_att.mul(att.unsqueeze(2)));
    const Tensor d_att = dx_att.mul(x_cl[t].view({B, HW, Cin})).sum(2);
    // softmax: dZ = A∘(dA − Σ_p A∘dA)
    const Tensor dz = att.mul(d_att.sub(att.mul(d_att).sum(1, true)));
    dz_all.narrow(0, t * B, B).view({B, HW}).copy_(dz);
    // dF = W_zᵀ ⋆ dZ (cuDNN data gradient); dza = dF∘(1 − F²); dH_{t−1} += SepConv_haᵀ(dza)
    const Tensor features = step_rows(features_all);
    const Tensor d_features = std::get<0>(same_conv_backward(
        dz_all.narrow(0, t * B, B), nchw_view(features, B, H, W, C), params[13], true, false));
    Tensor dza = step_rows(dza_all);
    dza.view({B, H, W, C}).copy_(d_features.permute({0, 2, 3, 1})
                                     .mul(features.view({B, H, W, C}).square().neg_().add_(1)));
    Tensor d_dwha = step_rows(d_dwha_all);
    at::mm_out(d_dwha, dza, params[11]);
    depthwise_transpose(d_dwha, params[10], B, H, W, dh, dh);
  }

  // Weight gradients, each one batched product over all steps.
  std::vector<Tensor> grad_params(params.size());
  const Tensor h_mean_prev = h_prev_all.view({T * B, HW, C}).mean({1}, false, acc);
  grad_params[0] = at::mm(dgp_all.t(), x_att_all.mean({1}, false, acc)).to(dtype);
  grad_params[1] = at::mm(dgp_all.t(), h_mean_prev).to(dtype);
  grad_params[2] = dgp_all.sum(0).to(dtype);
  grad_params[3] = depthwise_weight_grad(d_dwxt_all, x_att_all.view({T * rows, Cin}), params[3], H, W);
  grad_params[4] = at::mm(dacc_all.t(), depthwise_forward(x_att_all, params[3], T * B, H, W));
  grad_params[5] = depthwise_weight_grad(d_dwh_all, h_prev_rows, params[5], H, W);
  grad_params[6] = at::mm(dacc_all.t(), depthwise_forward(h_prev_all, params[5], T * B, H, W));
  grad_params[7] = dacc_all.sum({0}, false, acc).to(dtype);
  grad_params[13] = std::get<1>(same_conv_backward(dz_all, nchw_view(features_all, T * B, H, W, C),
                                                   params[13], false, true)).contiguous();
  grad_params[11] = at::mm(dza_all.t(), dw_ha_all);
  grad_params[10] = depthwise_weight_grad(d_dwha_all, h_prev_rows, params[10], H, W);
  grad_params[12] = dza_all.sum({0}, false, acc).to(dtype);
  grad_params[9] = at::mm(dza_all.t(), dw_xa_all);
  const Tensor d_dwxa = at::mm(dza_all, params[9]);
  grad_params[8] = depthwise_weight_grad(d_dwxa, x_rows, params[8], H, W);
  depthwise_transpose(d_dwxa, params[8], T * B, H, W, grad_x_cl, grad_x_cl);
  Tensor grad_x = channels_first_copy(grad_x_cl.view({T, B, H, W, Cin}), dtype);
  Tensor grad_h0 = channels_first_copy(dh.view({B, H, W, C}), dtype);
  Tensor grad_c0 = channels_first_copy(dc.view({B, H, W, C}), dtype);
  return {grad_x, grad_h0, grad_c0, grad_params};
}

}  // namespace
}  // namespace cuda
}  // namespace convlstm_fast

TORCH_LIBRARY_IMPL(convlstm_fast, CONVLSTM_CUDA_DISPATCH_KEY, m) {
  m.impl("spatial_attention_layer",
         &convlstm_fast::training_forward<convlstm_fast::cuda::spatial_attention_layer>);
  m.impl("spatial_attention_layer_inference",
         &convlstm_fast::inference_forward<convlstm_fast::cuda::spatial_attention_layer>);
  m.impl("spatial_attention_layer_backward",
         &convlstm_fast::cuda::spatial_attention_layer_backward);
}
