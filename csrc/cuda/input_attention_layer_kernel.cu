// CUDA kernels of variant (c), `convlstm_fast::input_attention_layer` and its `_backward`: the
// input gate i becomes the channel-wise max-normalised attention map A = exp(Z − max_HW Z), with
// Z = SepConv_z(F), F = tanh(SepConv_xa(X_t) + SepConv_ha(H_{t−1}) + b_a) (shared/SPEC.md
// eqs. 21-23); the gates f, o are pooled FCs as in (a). Host driver: batched_input_layer.cuh.
//
// Per forward step: the pooled gates from the previous step's column sums of H (one kernel, no
// GEMM call); two fused SepConv kernels (pooled_cell.cuh sepconv_maps: the depthwise on the fly
// and the pointwise product on tensor cores, the X-side term and tanh in the epilogue) for F
// (reading H_{t−1} in the NCHW output) and Z = SepConv_z(F) with its max per pixel tile; then
// the fused step (SepconvCellStep, as (a)'s) that does the candidate's SepConv_h(H_{t−1}) +
// xc[t], forms exp(Z − max Z), updates the cell and writes H_t into the NCHW output and its
// column sums. One more step launches, forward, 4 kernels of ours and no ATen call; backward 7
// and 13 (its recompute of F and Z is the forward's two kernels; the driver is shared with
// (d); emulation_check.py counts them).
// LAUNCHES_PER_STEP forward=(4, 0) backward=(7, 13)
#include "batched_input_layer.cuh"

namespace convlstm_fast {
namespace cuda {

TORCH_LIBRARY_IMPL(convlstm_fast, CONVLSTM_CUDA_DISPATCH_KEY, m) {
  register_layer_kernels<batched_input_layer_forward<cells::kInputAttentionLayer>>(
      m, cells::kInputAttentionLayer, &batched_input_layer_backward<cells::kInputAttentionLayer>);
}

}  // namespace cuda
}  // namespace convlstm_fast
