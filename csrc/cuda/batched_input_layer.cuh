// The host driver of the pooled cells whose whole input side can be batched over the sequence:
// (a) `pooled_layer`, (c) `input_attention_layer`, (d) `output_attention_layer` (shared/SPEC.md;
// b's attended input X̃ depends on H_{t−1}: spatial_attention_layer_kernel.cu). (c)/(d) are (a)
// plus the channel attention, whose map A replaces the gate cells.h says (Cell::map_gate):
//   F = tanh(SepConv_xa(X_t) + SepConv_ha(H_{t−1}) + b_a);  Z = SepConv_z(F);
//   A = exp(Z − max_HW Z).
// The op files (pooled_layer_kernel.cu, input_attention_layer_kernel.cu,
// output_attention_layer_kernel.cu) register the two drivers below for their cell.
//
// Structure (shared/KERNELS.md): everything that depends only on X is computed for all T steps
// before the loop (fused SepConv kernels reading x in place); a step of (a) runs two kernels of
// ours, its gates and the fused step (SepconvCellStep, pooled_cell.cuh); one of c/d its gates,
// two fused SepConv kernels (F, Z and its max per pixel tile) and the same fused step with A as
// a gate.
// Every step reads H_{t−1} from and writes H_t into the op's NCHW output. Backward walks
// the steps in the forward's opposite order and reduces every weight gradient over all steps
// after it with one batched product each. Parameters and saved
// tensors are named by cells.h (cells::pooled, cells::channel_attention).
#pragma once

#include "pooled_cell.cuh"

namespace convlstm_fast {
namespace cuda {
namespace {

namespace channel = cells::channel_attention;

// c/d's Z = SepConv_z(F) of one step, F = tanh(SepConv_ha(H_{t−1}) + xa_t) (written into
// `features` [B·HW, C] when given, else a new tensor), H_{t−1} in `h_layout` (the forward's NCHW
// output, the backward's channels-last copy), and with `tile_max` Z's per-channel max per pixel
// tile (the forward's): two sepconv_maps kernels, which the backward's recompute calls as the
// forward did (so its Z, and where Z attains its max, are the forward's: sepconv_maps' rows do
// not depend on the input's layout).
inline Tensor attention_logits(const Tensor& h_prev, MapLayout h_layout, const Tensor& xa_t,
                               at::TensorList params, Tensor features, int64_t B, int64_t H,
                               int64_t W, const Tensor& tile_max = Tensor()) {
  const Tensor f = sepconv_maps(h_prev, h_layout, params[attention::kAttDwH],
                                params[attention::kAttPwH], Tensor(), xa_t, true, B, H, W,
                                features);
  return sepconv_maps(f, MapLayout::kChannelsLast, params[channel::kAttDwZ],
                      params[channel::kAttPwZ], Tensor(), Tensor(), false, B, H, W, Tensor(),
                      tile_max);
}

template <const cells::Cell& cell>
LayerResult batched_input_layer_forward(const Tensor& x, const Tensor& h0, const Tensor& c0,
                                        at::TensorList params, int64_t activation, bool reverse,
                                        const std::optional<at::Tensor>& lengths, bool save) {
  const LayerCall call = check_forward(cell, pooled::kCandDwX, x, h0, c0, params, activation);
  const StepMask mask(lengths, x);
  if (call.empty) return empty_layer_result(x, h0, c0, call.saved_shapes);
  LayerDeviceGuard guard(x.device());
  const int64_t T = x.size(0), B = x.size(1), Cin = x.size(2), H = x.size(3), W = x.size(4);
  const int64_t C = h0.size(1), HW = H * W;
  const int map_gate = cell.map_gate();
  const bool has_map = map_gate != cells::kNoMapGate;
  const auto acc = acc_dtype(x);

  // The SepConv kernels' pixel tiles per map, which split the column sums of X and of H.
  const int64_t splits = sepconv_cell_splits(HW, x.scalar_type());
  // Input side for all T·B samples, x read in place (sepconv_frames, pooled_cell.cuh): xc =
  // SepConv_x(X) + b_c and X's column sums per pixel tile beside, from which xg = U_x·GAP(X) +
  // b_g, and for c/d xa = SepConv_xa(X) + b_a (F's X-side term); rows time-first channels-last
  // [T·B·HW, ·].
  const Tensor x_sums = at::empty({T * B, splits, Cin}, x.options().dtype(acc));
  const Tensor xc = sepconv_frames(x, params[pooled::kCandDwX], params[pooled::kCandPwX],
                                   params[pooled::kCandBias], x_sums);
  const Tensor gate_weight_h = params[pooled::kGateWeightH].contiguous();
  Tensor xg = at::empty({T * B, gate_weight_h.size(0)}, x.options().dtype(acc));  // [T·B, n·C]
  pooled_gate_preacts(Tensor(), params[pooled::kGateBias].contiguous(), x_sums,
                      params[pooled::kGateWeightX].contiguous(), Tensor(), Tensor(), xg, HW);
  Tensor xa;
  if (has_map) {
    xa = sepconv_frames(x, params[attention::kAttDwX], params[attention::kAttPwX],
                        params[attention::kAttBias]);
  }
  const Tensor dw_h = params[pooled::kCandDwH].contiguous();
  const Tensor pw_h = params[pooled::kCandPwH].contiguous();

  // H of every step in the op's NCHW output itself: the fused step (SepconvCellStep) writes H_t
  // there, and it and c/d's attention SepConv read H_{t−1} there (no output copy after the loop).
  Tensor output = at::empty({T, B, C, H, W}, x.options());
  const SavedSteps saved(call.saved_shapes, x.options(), save);
  const Tensor h0_c = h0.contiguous();
  // Column sums of H_{t−1} per pixel tile [B, splits, C], which the step's gate kernel reduces
  // to h̄ (hsum) and the fused step writes for H_t (hsum_next).
  Tensor hsum = initial_hidden_sums(h0, splits, acc);
  Tensor hsum_next = at::empty_like(hsum);
  // c/d: Z's per-channel max per pixel tile, which the fused step reduces to max_p Z.
  const Tensor logits_tile_max = has_map ? at::empty({B, splits, C}, x.options()) : Tensor();
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
    const Tensor xc_t = xc.narrow(0, t * B * HW, B * HW);
    // gate pre-activations U_x·x̄ + U_h·h̄ + b_g, saved (rounded) and used rounded
    const Tensor gate_pre = saved(pooled::kSavedGatePreact, t);
    pooled_gate_preacts(xg.narrow(0, t * B, B), Tensor(), Tensor(), Tensor(), hsum, gate_weight_h,
                        gate_pre, HW);
    // c/d (sepconv_maps, one kernel each): F = tanh(SepConv_ha(H_{t−1}) + xa_t); Z =
    // SepConv_z(F) and its max per pixel tile
    Tensor logits;
    if (has_map) {
      logits = attention_logits(h_prev, MapLayout::kPlanes, xa.narrow(0, t * B * HW, B * HW),
                                params, Tensor(), B, H, W, logits_tile_max);
    }
    // The rest of the step in one kernel: cand_preact = SepConv_h(H_{t−1}) + xc_t, (c/d: A =
    // exp(Z − max Z) as a gate) and the cell
    sepconv_cell_forward(h_prev, dw_h, pw_h, xc_t, gate_pre, logits, logits_tile_max, map_gate,
                         activation, cell_state.step(t), output[t],
                         saved(pooled::kSavedCandidate, t),
                         has_map ? saved(channel::kSavedMap, t) : Tensor(), hsum_next, B, H, W,
                         C);
    cell_state.carry(t, held, B);
    mask_pooled_step(mask, t, hsum_next, hsum, h_carry, output[t]);
    std::swap(hsum, hsum_next);
  }
  const auto [h_n, c_n] = cell_state.outputs(h_carry);
  return {output, h_n, c_n, saved.all()};
}

template <const cells::Cell& cell>
BackwardResult batched_input_layer_backward(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n, const Tensor& x,
    const Tensor& h0, const Tensor& c0, at::TensorList params, const Tensor& output,
    at::TensorList saved, int64_t activation, bool reverse,
    const std::optional<at::Tensor>& lengths) {
  const LayerCall call = check_backward(cell, pooled::kCandDwX, grad_output, grad_h_n, grad_c_n,
                                        x, h0, c0, params, output, saved, activation);
  const StepMask mask(lengths, x);
  if (call.empty) return empty_backward_result(x, grad_h_n, grad_c_n, params);
  LayerDeviceGuard guard(x.device());
  const int64_t T = x.size(0), B = x.size(1), Cin = x.size(2), H = x.size(3), W = x.size(4);
  const int map_gate = cell.map_gate();
  const int64_t C = h0.size(1), HW = H * W, n = pooled_gate_count(map_gate);
  const bool has_map = map_gate != cells::kNoMapGate;
  const auto acc = acc_dtype(x);
  const auto dtype = x.scalar_type();
  const int64_t rows = B * HW;  // pixel rows of one step

  const Tensor x_cl = channels_last_copy(x, dtype);
  // Steps that do not count (lengths) ignore their grad_output.
  const Tensor grad_out_cl =
      channels_last_copy(mask.output_gradient(grad_output).contiguous(), dtype);
  const Tensor c0_cl = channels_last_copy(c0, dtype);
  const Walk walk{T, reverse};
  const Tensor h0_cl = channels_last_copy(h0, dtype);
  const Tensor h_prev_all = hidden_states_before(mask, walk, h0_cl, output, dtype);
  Tensor dh = channels_last_copy(grad_h_n, acc).view({rows, C});
  Tensor dc = channels_last_copy(grad_c_n, acc).view({rows, C});

  // Attention branch: F = tanh(SepConv_xa(X) + SepConv_ha(H_{t−1}) + b_a) and Z = SepConv_z(F)
  // are recomputed step by step in the loop with exactly the forward's calls, so Z is bitwise
  // the forward's and so is where it attains its per-(b, c) maximum (the max's gradient goes
  // there, split evenly between ties as for torch.amax); a batched recompute could round
  // differently and move the argmax in fp16/bf16.
  Tensor dw_xa_all, xa_all, features_all;
  if (has_map) {
    dw_xa_all = depthwise_forward(x_cl, params[attention::kAttDwX], T * B, H, W);
    xa_all = sepconv_frames(x, params[attention::kAttDwX], params[attention::kAttPwX],
                            params[attention::kAttBias]);  // the forward's xa, bit for bit
    features_all = at::empty({T * rows, C}, x.options());
  }

  Tensor dacc_all = at::empty({T * rows, C}, x.options());      // d cand_preact
  Tensor d_dwh_all = at::empty({T * rows, C}, x.options());     // d SepConv_h's depthwise output
  Tensor dgp_all = at::empty({T * B, n * C}, x.options().dtype(acc));
  // c/d: dA∘A of a step, and over all steps dZ, d(SepConv_z's depthwise output), dF_pre (the
  // gradient of F's pre-activation), d(SepConv_ha's depthwise output).
  Tensor da_times_a, dz_all, d_dwf_all, d_features_pre_all, d_dwha_all;
  if (has_map) {
    da_times_a = at::empty({rows, C}, x.options().dtype(acc));
    dz_all = at::empty({T * rows, C}, x.options());
    d_dwf_all = at::empty({T * rows, C}, x.options());
    d_features_pre_all = at::empty({T * rows, C}, x.options());
    d_dwha_all = at::empty({T * rows, C}, x.options());
  }
  const Tensor gate_weight_h = params[pooled::kGateWeightH].to(acc);

  for (int64_t s = T - 1; s >= 0; --s) {
    const int64_t t = walk.time(s);
    const Tensor cell_prev = mask.state_before(walk, t, saved[pooled::kSavedCell], c0_cl);
    const auto step_rows = [&](const Tensor& all) { return all.narrow(0, t * rows, rows); };
    // With lengths a step that does not count runs on zero dH, dC (so forms zero gradients)
    // and passes the incoming ones through.
    Tensor held_dh, held_dc;
    if (mask.active()) {
      held_dh = mask.feed(t, dh.view({B, HW, C}));
      held_dc = mask.feed(t, dc.view({B, HW, C}));
    }
    const PooledCellGrads grads = pooled_cell_backward(
        grad_out_cl[t], dh, dc, saved[pooled::kSavedGatePreact][t],
        has_map ? saved[channel::kSavedMap][t] : Tensor(), map_gate, activation,
        saved[pooled::kSavedCandidate][t], saved[pooled::kSavedCell][t], cell_prev,
        step_rows(dacc_all), da_times_a, dgp_all.narrow(0, t * B, B), B, HW, C);
    // dh̄ = dgp·U_h, spread as dh̄/HW over the pixels of H_{t−1}
    const Tensor dh_mean = at::mm(grads.gate_grad, gate_weight_h);
    // d(depthwise H) = dacc·pw_h, then the transposed depthwise conv into dH_{t−1}
    Tensor d_dwh = step_rows(d_dwh_all);
    at::mm_out(d_dwh, step_rows(dacc_all), params[pooled::kCandPwH]);
    depthwise_transpose(d_dwh, params[pooled::kCandDwH], B, H, W, dh, Tensor(), dh_mean, 1.0 / HW);
    if (has_map) {
      // Recompute F_t and Z_t as the forward did (see above).
      Tensor features = step_rows(features_all);
      const Tensor logits = attention_logits(h_prev_all[t], MapLayout::kChannelsLast,
                                             step_rows(xa_all), params, features, B, H, W)
                                .view({B, HW, C});
      const Tensor mask = logits.eq(logits.amax({1}, true)).to(acc);  // [B, HW, C]
      // dZ = dA∘A − [Z = max Z]·Σ_p(dA∘A)/count      (A = exp(Z − max Z))
      Tensor dz = step_rows(dz_all);
      const Tensor share = grads.da_times_a_sum.div(mask.sum({1}, false)).unsqueeze(1);
      dz.view({B, HW, C}).copy_(da_times_a.view({B, HW, C}).sub(mask.mul(share)));
      // dF = SepConv_zᵀ(dZ); dF_pre = dF∘(1 − F²); dH_{t−1} += SepConv_haᵀ(dF_pre)
      Tensor d_dwf = step_rows(d_dwf_all);
      at::mm_out(d_dwf, dz, params[channel::kAttPwZ]);
      Tensor d_features_pre = step_rows(d_features_pre_all);
      depthwise_transpose(d_dwf, params[channel::kAttDwZ], B, H, W, d_features_pre, Tensor(),
                          Tensor(), 0.0, features);
      Tensor d_dwha = step_rows(d_dwha_all);
      at::mm_out(d_dwha, d_features_pre, params[attention::kAttPwH]);
      depthwise_transpose(d_dwha, params[attention::kAttDwH], B, H, W, dh, dh);
    }
    if (mask.active()) {
      mask.pass(t, dh.view({B, HW, C}), held_dh);
      mask.pass(t, dc.view({B, HW, C}), held_dc);
    }
  }

  // Weight gradients after the loop, over all steps (steps_mm: summed per step in fp32).
  std::vector<Tensor> grad_params(params.size());
  const Tensor h_prev_rows = h_prev_all.view({T * rows, C});
  const Tensor h_mean_prev = h_prev_all.view({T * B, HW, C}).mean({1}, false, acc);
  const Tensor gap_x = x_cl.view({T * B, HW, Cin}).mean({1}, false, acc);
  grad_params[pooled::kGateWeightX] = steps_mm(dgp_all, gap_x, T).to(dtype);
  grad_params[pooled::kGateWeightH] = steps_mm(dgp_all, h_mean_prev, T).to(dtype);
  grad_params[pooled::kGateBias] = dgp_all.sum(0).to(dtype);
  grad_params[pooled::kCandPwH] = steps_mm(
      dacc_all, depthwise_forward(h_prev_all, params[pooled::kCandDwH], T * B, H, W), T);
  grad_params[pooled::kCandDwH] =
      depthwise_weight_grad(d_dwh_all, h_prev_rows, params[pooled::kCandDwH], H, W, T);
  grad_params[pooled::kCandBias] = dacc_all.sum({0}, false, acc).to(dtype);
  const Tensor x_rows = x_cl.view({T * rows, Cin});
  grad_params[pooled::kCandPwX] =
      steps_mm(dacc_all, depthwise_forward(x_cl, params[pooled::kCandDwX], T * B, H, W), T);
  const Tensor d_dwx = at::mm(dacc_all, params[pooled::kCandPwX]);  // [T·rows, Cin]
  grad_params[pooled::kCandDwX] =
      depthwise_weight_grad(d_dwx, x_rows, params[pooled::kCandDwX], H, W, T);
  // dX = SepConv_xᵀ(dacc) + (dgp·U_x)/HW spread over the pixels
  const Tensor d_gap_x = at::mm(dgp_all, params[pooled::kGateWeightX].to(acc));  // [T·B, Cin]
  Tensor grad_x_cl = depthwise_transpose(d_dwx, params[pooled::kCandDwX], T * B, H, W, Tensor(),
                                         Tensor(), d_gap_x, 1.0 / HW);
  if (has_map) {
    const Tensor dw_f_all = depthwise_forward(features_all, params[channel::kAttDwZ], T * B, H, W);
    const Tensor dw_ha_all = depthwise_forward(h_prev_all, params[attention::kAttDwH], T * B, H, W);
    grad_params[channel::kAttPwZ] = steps_mm(dz_all, dw_f_all, T);
    grad_params[channel::kAttDwZ] =
        depthwise_weight_grad(d_dwf_all, features_all, params[channel::kAttDwZ], H, W, T);
    attention_features_backward(grad_params, params, d_features_pre_all, d_dwha_all, dw_ha_all,
                                dw_xa_all, h_prev_rows, x_rows, grad_x_cl, T, B, H, W);
  }
  Tensor grad_x = channels_first_copy(grad_x_cl.view({T, B, H, W, Cin}), dtype);
  Tensor grad_h0 = channels_first_copy(dh.view({B, H, W, C}), dtype);
  Tensor grad_c0 = channels_first_copy(dc.view({B, H, W, C}), dtype);
  return {grad_x, grad_h0, grad_c0, grad_params};
}

}  // namespace
}  // namespace cuda
}  // namespace convlstm_fast
