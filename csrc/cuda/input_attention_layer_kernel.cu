// CUDA kernels of variant (c), `convlstm_fast::input_attention_layer` and its `_backward`: the
// input gate i becomes the channel-wise max-normalised attention map A = exp(Z − max_HW Z), with
// Z = SepConv_z(F), F = tanh(SepConv_xa(X_t) + SepConv_ha(H_{t−1}) + b_a) (shared/SPEC.md
// eqs. 21-23); the gates f, o are pooled FCs as in (a). Host driver: batched_input_layer.cuh.
//
// Per forward step: two depthwise kernels + two GEMMs on H_{t−1} (candidate, attention
// features), tanh, the depthwise + GEMM of SepConv_z, the per-(b, c) max over the pixels (ATen
// amax), the pooled gates from the previous step's column sums of H (one kernel, no GEMM call),
// then the fused epilogue that forms exp(Z − max), the cell update and H_t's column sums.
// One more step launches, forward, 5 kernels of ours and 5 ATen calls; backward 7 and 17
// (the driver is shared with (d); emulation_check.py counts them).
// LAUNCHES_PER_STEP forward=(5, 5) backward=(7, 17)
#include "batched_input_layer.cuh"

namespace convlstm_fast {
namespace cuda {

TORCH_LIBRARY_IMPL(convlstm_fast, CONVLSTM_CUDA_DISPATCH_KEY, m) {
  register_layer_kernels<batched_input_layer_forward<cells::kInputAttentionLayer>>(
      m, cells::kInputAttentionLayer, &batched_input_layer_backward<cells::kInputAttentionLayer>);
}

}  // namespace cuda
}  // namespace convlstm_fast
