// CUDA kernels of variant (b), `convlstm_fast::spatial_attention_layer` and its `_backward`
// (shared/SPEC.md eqs. 17-19):
//   F = tanh(SepConv_xa(X_t) + SepConv_ha(H_{t−1}) + b_a);  Z = W_z * F  (K×K, C → 1)
//   A = softmax of Z over the H·W pixels per sample;  X̃ = A∘X_t;  then cell (a) on X̃.
// X̃ depends on H_{t−1}, so only SepConv_xa(X) is batched before the loop (one sepconv_frames
// kernel, x read in place); per step: the attention features F (one fused SepConv kernel,
// sepconv_maps, with xa[t] and tanh, reading H_{t−1} in the NCHW output), W_z * F (cuDNN), the
// softmax (ATen), SepConv_x(X̃) + b_c (one fused kernel reading X_t in place and scaling it by
// A on the fly: X̃ is never written; X̃'s column sums beside), the pooled gates from those and
// H_{t−1}'s (one kernel), and (a)'s fused step (pooled_cell.cuh SepconvCellStep:
// SepConv_h(H_{t−1}) plus that, the cell, H_t into the NCHW output).
//
// Parameters and saved tensors: cells.h kSpatialAttentionLayer (saved: cell, candidate
// [T, B, H, W, C], gate_preact [T, B, 3C], the map A [T, B, H, W]).
// One more step launches, forward, 4 kernels of ours and 3 ATen calls; backward 5 and 23
// (emulation_check.py counts them, in fp32: 2 of the 23 are d W_z's per-step call and add_,
// same_conv_weight_grad; 16-bit dtypes make one d W_z call for all steps).
// LAUNCHES_PER_STEP forward=(4, 3) backward=(5, 23)
#include "pooled_cell.cuh"

namespace convlstm_fast {
namespace cuda {
namespace {

constexpr const cells::Cell& kCell = cells::kSpatialAttentionLayer;
namespace spatial = cells::spatial_attention;

LayerResult spatial_attention_layer(const Tensor& x, const Tensor& h0, const Tensor& c0,
                                    at::TensorList params, int64_t activation, bool reverse,
                                    const std::optional<at::Tensor>& lengths, bool save) {
  const LayerCall call = check_forward(kCell, pooled::kCandDwX, x, h0, c0, params, activation);
  const StepMask mask(lengths, x);
  if (call.empty) return empty_layer_result(x, h0, c0, call.saved_shapes);
  LayerDeviceGuard guard(x.device());
  const int64_t T = x.size(0), B = x.size(1), Cin = x.size(2), H = x.size(3), W = x.size(4);
  const int64_t C = h0.size(1), HW = H * W, rows = B * HW;
  const auto dtype = x.scalar_type();
  const auto acc = acc_dtype(x);
  // X_t is read in place (frame_planes): X̃ = A∘X_t is never written (sepconv_scaled_frame).
  const Tensor frames = frame_planes(x);
  // The only input-side term that does not depend on H: xa = SepConv_xa(X) + b_a (F's X-side
  // term) for all steps, x read in place (sepconv_frames).
  const Tensor xa = sepconv_frames(x, params[attention::kAttDwX], params[attention::kAttPwX],
                                   params[attention::kAttBias]);
  const Tensor gate_weight_x = params[pooled::kGateWeightX].contiguous();
  const Tensor gate_weight_h = params[pooled::kGateWeightH].contiguous();
  const Tensor gate_bias = params[pooled::kGateBias].contiguous();

  // H of every step in the op's NCHW output, where the next step reads it (as in (a)).
  Tensor output = at::empty({T, B, C, H, W}, x.options());
  const SavedSteps saved(call.saved_shapes, x.options(), save);
  const Tensor h0_c = h0.contiguous();
  const Tensor dw_h = params[pooled::kCandDwH].contiguous();
  const Tensor pw_h = params[pooled::kCandPwH].contiguous();
  // Column sums of H_{t−1} per pixel tile [B, splits, C] (batched_input_layer.cuh's).
  const int64_t splits = sepconv_cell_splits(HW, dtype);
  Tensor hsum = initial_hidden_sums(h0, splits, acc);
  Tensor hsum_next = at::empty_like(hsum);
  // X̃'s column sums per pixel tile [B, splits, Cin], which the step's X-side SepConv writes.
  const Tensor x_sums = at::empty({B, splits, Cin}, x.options().dtype(acc));
  // With lengths: the carried H_{t−1} (step_mask.h); C carries in the cell state, H's sums in
  // hsum.
  Tensor h_carry;
  if (mask.active()) h_carry = h0_c.clone();
  const Walk walk{T, reverse};
  const LayerCellState cell_state(h0, c0, saved, pooled::kSavedCell, mask, walk);
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = walk.time(s);
    const Tensor h_prev = mask.active() ? h_carry : state_before(walk, t, h0_c, output);
    const auto held = cell_state.hold(t);
    // F = tanh(SepConv_ha(H_{t−1}) + xa_t); Z = W_z * F; A = softmax_HW(Z)
    const Tensor features =
        sepconv_maps(h_prev, MapLayout::kPlanes, params[attention::kAttDwH],
                     params[attention::kAttPwH], Tensor(), xa.narrow(0, t * rows, rows), true, B,
                     H, W);
    const Tensor logits =
        same_conv(nchw_view(features, B, H, W, C), params[spatial::kAttWeightZ], Tensor());
    const Tensor map = saved(spatial::kSavedMap, t).view({B, HW});
    map.copy_(logits.reshape({B, HW}).softmax(1, acc));
    // SepConv_x(X̃) + b_c with X̃ = A∘X_t (A rounded to x's dtype, as saved; each product
    // rounded as the mul it replaces), X_t read in place: the fused step's X-side term (a's
    // xc[t]), and X̃'s column sums beside
    const Tensor cand_x =
        sepconv_scaled_frame(frames, t, map, params[pooled::kCandDwX], params[pooled::kCandPwX],
                             params[pooled::kCandBias], x_sums);
    // gates b_g + U_x·GAP(X̃) + U_h·h̄ from those sums and H_{t−1}'s (one PooledGatePreacts)
    const Tensor gate_pre = saved(pooled::kSavedGatePreact, t);
    pooled_gate_preacts(Tensor(), gate_bias, x_sums, gate_weight_x, hsum, gate_weight_h, gate_pre,
                        HW);
    // cand_preact = SepConv_h(H_{t−1}) + cand_x and the cell, in one kernel
    sepconv_cell_forward(h_prev, dw_h, pw_h, cand_x, gate_pre, Tensor(), Tensor(),
                         kCell.map_gate(), activation, cell_state.step(t), output[t],
                         saved(pooled::kSavedCandidate, t), Tensor(), hsum_next, B, H, W, C);
    cell_state.carry(t, held, B);
    mask_pooled_step(mask, t, hsum_next, hsum, h_carry, output[t]);
    std::swap(hsum, hsum_next);
  }
  const auto [h_n, c_n] = cell_state.outputs(h_carry);
  return {output, h_n, c_n, saved.all()};
}

BackwardResult spatial_attention_layer_backward(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n, const Tensor& x,
    const Tensor& h0, const Tensor& c0, at::TensorList params, const Tensor& output,
    at::TensorList saved, int64_t activation, bool reverse,
    const std::optional<at::Tensor>& lengths) {
  const LayerCall call = check_backward(kCell, pooled::kCandDwX, grad_output, grad_h_n, grad_c_n,
                                        x, h0, c0, params, output, saved, activation);
  const StepMask mask(lengths, x);
  if (call.empty) return empty_backward_result(x, grad_h_n, grad_c_n, params);
  LayerDeviceGuard guard(x.device());
  const int64_t T = x.size(0), B = x.size(1), Cin = x.size(2), H = x.size(3), W = x.size(4);
  const int64_t C = h0.size(1), HW = H * W, rows = B * HW;
  const auto dtype = x.scalar_type();
  const auto acc = acc_dtype(x);
  const Tensor x_cl = channels_last_copy(x, dtype);
  // Steps that do not count (lengths) ignore their grad_output.
  const Tensor grad_out_cl =
      channels_last_copy(mask.output_gradient(grad_output).contiguous(), dtype);
  const Tensor c0_cl = channels_last_copy(c0, dtype);
  const Walk walk{T, reverse};
  const Tensor h0_cl = channels_last_copy(h0, dtype);
  const Tensor h_prev_all = hidden_states_before(mask, walk, h0_cl, output, dtype);
  const Tensor h_prev_rows = h_prev_all.view({T * rows, C});
  const Tensor x_rows = x_cl.view({T * rows, Cin});
  Tensor dh = channels_last_copy(grad_h_n, acc).view({rows, C});
  Tensor dc = channels_last_copy(grad_c_n, acc).view({rows, C});

  // Recomputed for all steps at once: the attention features F (with the forward's two fused
  // kernels, so bit for bit the forward's F) and the attended input X̃; the depthwise outputs
  // for the weight gradients.
  const Tensor dw_xa_all = depthwise_forward(x_cl, params[attention::kAttDwX], T * B, H, W);
  const Tensor dw_ha_all = depthwise_forward(h_prev_all, params[attention::kAttDwH], T * B, H, W);
  const Tensor features_all = sepconv_maps(
      h_prev_all, MapLayout::kChannelsLast, params[attention::kAttDwH], params[attention::kAttPwH],
      Tensor(),
      sepconv_frames(x, params[attention::kAttDwX], params[attention::kAttPwX],
                     params[attention::kAttBias]),
      true, T * B, H, W);
  const Tensor maps = saved[spatial::kSavedMap].view({T * B, HW});  // A of every step
  const Tensor x_attended_all = x_cl.view({T * B, HW, Cin}).mul(maps.unsqueeze(2)).contiguous();
  const Tensor gate_weight_x = params[pooled::kGateWeightX].to(acc);
  const Tensor gate_weight_h = params[pooled::kGateWeightH].to(acc);

  Tensor dacc_all = at::empty({T * rows, C}, x.options());
  Tensor d_dwh_all = at::empty({T * rows, C}, x.options());
  Tensor d_dwxt_all = at::empty({T * rows, Cin}, x.options());
  Tensor dgp_all = at::empty({T * B, 3 * C}, x.options().dtype(acc));
  Tensor dz_all = at::empty({T * B, 1, H, W}, x.options());
  Tensor d_features_pre_all = at::empty({T * rows, C}, x.options());  // dF∘(1 − F²)
  Tensor d_dwha_all = at::empty({T * rows, C}, x.options());
  Tensor grad_x_cl = at::empty({T * rows, Cin}, x.options().dtype(acc));

  for (int64_t s = T - 1; s >= 0; --s) {
    const int64_t t = walk.time(s);
    const auto step_rows = [&](const Tensor& all) { return all.narrow(0, t * rows, rows); };
    const Tensor cell_prev = mask.state_before(walk, t, saved[pooled::kSavedCell], c0_cl);
    const Tensor dacc = step_rows(dacc_all);
    // With lengths a step that does not count runs on zero dH, dC (so forms zero gradients)
    // and passes the incoming ones through.
    Tensor held_dh, held_dc;
    if (mask.active()) {
      held_dh = mask.feed(t, dh.view({B, HW, C}));
      held_dc = mask.feed(t, dc.view({B, HW, C}));
    }
    const PooledCellGrads grads = pooled_cell_backward(
        grad_out_cl[t], dh, dc, saved[pooled::kSavedGatePreact][t], Tensor(), kCell.map_gate(),
        activation, saved[pooled::kSavedCandidate][t], saved[pooled::kSavedCell][t], cell_prev,
        dacc, Tensor(), dgp_all.narrow(0, t * B, B), B, HW, C);
    // dh̄ = dgp·U_h, d x̃̄ = dgp·U_x (spread as /HW over the pixels)
    const Tensor dh_mean = at::mm(grads.gate_grad, gate_weight_h);
    const Tensor d_gap = at::mm(grads.gate_grad, gate_weight_x);
    Tensor d_dwh = step_rows(d_dwh_all);
    at::mm_out(d_dwh, dacc, params[pooled::kCandPwH]);
    depthwise_transpose(d_dwh, params[pooled::kCandDwH], B, H, W, dh, Tensor(), dh_mean, 1.0 / HW);
    // dX̃ = SepConv_xᵀ(dacc) + d x̃̄/HW
    Tensor d_dwxt = step_rows(d_dwxt_all);
    at::mm_out(d_dwxt, dacc, params[pooled::kCandPwX]);
    const Tensor dx_attended =
        depthwise_transpose(d_dwxt, params[pooled::kCandDwX], B, H, W, Tensor(), Tensor(), d_gap,
                            1.0 / HW).view({B, HW, Cin});
    // X̃ = A∘X:  dX += dX̃∘A;  dA_p = Σ_c dX̃∘X
    const Tensor map = maps.narrow(0, t * B, B).to(acc);  // [B, HW]
    step_rows(grad_x_cl).view({B, HW, Cin}).copy_(dx_attended.mul(map.unsqueeze(2)));
    const Tensor d_map = dx_attended.mul(x_cl[t].view({B, HW, Cin})).sum(2);
    // softmax: dZ = A∘(dA − Σ_p A∘dA)
    const Tensor dz = map.mul(d_map.sub(map.mul(d_map).sum(1, true)));
    dz_all.narrow(0, t * B, B).view({B, HW}).copy_(dz);
    // dF = W_zᵀ ⋆ dZ (cuDNN data gradient); dF_pre = dF∘(1 − F²);
    // dH_{t−1} += SepConv_haᵀ(dF_pre)
    const Tensor features = step_rows(features_all);
    const Tensor d_features = std::get<0>(
        same_conv_backward(dz_all.narrow(0, t * B, B), nchw_view(features, B, H, W, C),
                           params[spatial::kAttWeightZ], true, false));
    Tensor d_features_pre = step_rows(d_features_pre_all);
    d_features_pre.view({B, H, W, C})
        .copy_(d_features.permute({0, 2, 3, 1})
                   .mul(features.view({B, H, W, C}).square().neg_().add_(1)));
    Tensor d_dwha = step_rows(d_dwha_all);
    at::mm_out(d_dwha, d_features_pre, params[attention::kAttPwH]);
    depthwise_transpose(d_dwha, params[attention::kAttDwH], B, H, W, dh, dh);
    if (mask.active()) {
      mask.pass(t, dh.view({B, HW, C}), held_dh);
      mask.pass(t, dc.view({B, HW, C}), held_dc);
    }
  }

  // Weight gradients after the loop, over all steps (steps_mm: summed per step in fp32).
  std::vector<Tensor> grad_params(params.size());
  const Tensor h_mean_prev = h_prev_all.view({T * B, HW, C}).mean({1}, false, acc);
  grad_params[pooled::kGateWeightX] =
      steps_mm(dgp_all, x_attended_all.mean({1}, false, acc), T).to(dtype);
  grad_params[pooled::kGateWeightH] = steps_mm(dgp_all, h_mean_prev, T).to(dtype);
  grad_params[pooled::kGateBias] = dgp_all.sum(0).to(dtype);
  grad_params[pooled::kCandDwX] = depthwise_weight_grad(
      d_dwxt_all, x_attended_all.view({T * rows, Cin}), params[pooled::kCandDwX], H, W, T);
  grad_params[pooled::kCandPwX] = steps_mm(
      dacc_all, depthwise_forward(x_attended_all, params[pooled::kCandDwX], T * B, H, W), T);
  grad_params[pooled::kCandDwH] =
      depthwise_weight_grad(d_dwh_all, h_prev_rows, params[pooled::kCandDwH], H, W, T);
  grad_params[pooled::kCandPwH] = steps_mm(
      dacc_all, depthwise_forward(h_prev_all, params[pooled::kCandDwH], T * B, H, W), T);
  grad_params[pooled::kCandBias] = dacc_all.sum({0}, false, acc).to(dtype);
  grad_params[spatial::kAttWeightZ] =
      same_conv_weight_grad(dz_all, nchw_view(features_all, T * B, H, W, C),
                            params[spatial::kAttWeightZ], T)
          .contiguous();
  attention_features_backward(grad_params, params, d_features_pre_all, d_dwha_all, dw_ha_all,
                              dw_xa_all, h_prev_rows, x_rows, grad_x_cl, T, B, H, W);
  Tensor grad_x = channels_first_copy(grad_x_cl.view({T, B, H, W, Cin}), dtype);
  Tensor grad_h0 = channels_first_copy(dh.view({B, H, W, C}), dtype);
  Tensor grad_c0 = channels_first_copy(dc.view({B, H, W, C}), dtype);
  return {grad_x, grad_h0, grad_c0, grad_params};
}

}  // namespace
}  // namespace cuda
}  // namespace convlstm_fast

TORCH_LIBRARY_IMPL(convlstm_fast, CONVLSTM_CUDA_DISPATCH_KEY, m) {
  convlstm_fast::register_layer_kernels<convlstm_fast::cuda::spatial_attention_layer>(
      m, convlstm_fast::cuda::kCell, &convlstm_fast::cuda::spatial_attention_layer_backward);
}
