// CUDA kernels of variant (a), `convlstm_fast::pooled_layer` and `pooled_layer_backward`:
// pooled-FC gates + depthwise-separable candidate (shared/SPEC.md eqs. 8-15). The host driver
// is shared with (c)/(d): batched_input_layer.cuh; the fused step epilogue with every pooled cell:
// pooled_cell.cuh.
// One more step launches, forward, 3 kernels of ours (the depthwise of H_{t−1}, the pooled gates
// straight from the previous step's column sums of H, the fused epilogue) and 1 ATen call (the
// pointwise addmm, xc[t] its bias: 4 launches against the 1 of the Triton step); backward 3 and
// 3 (2 mm, sum). emulation_check.py counts them.
// LAUNCHES_PER_STEP forward=(3, 1) backward=(3, 3)
#include "batched_input_layer.cuh"

namespace convlstm_fast {
namespace cuda {

TORCH_LIBRARY_IMPL(convlstm_fast, CONVLSTM_CUDA_DISPATCH_KEY, m) {
  register_layer_kernels<batched_input_layer_forward<cells::kPooledLayer>>(
      m, cells::kPooledLayer, &batched_input_layer_backward<cells::kPooledLayer>);
}

}  // namespace cuda
}  // namespace convlstm_fast

#ifdef CONVLSTM_CUDA_EMULATE
extern "C" int64_t convlstm_fast_emulated_launches() {
  return convlstm_fast::cuda::emulated_launches().load();
}
#endif
