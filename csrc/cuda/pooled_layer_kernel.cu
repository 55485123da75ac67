// CUDA kernels of variant (a), `convlstm_fast::pooled_layer` and `pooled_layer_backward`:
// pooled-FC gates + depthwise-separable candidate (shared/SPEC.md eqs. 8-15). The host driver
// is shared with (c)/(d): batched_input_layer.cuh; the fused step epilogue with every pooled cell:
// pooled_cell.cuh.
// One more step launches, forward, 2 kernels of ours and no ATen call: the pooled gates straight
// from the previous step's column sums of H (PooledGatePreacts), then the fused step
// (SepconvCellStep, pooled_cell.cuh: the depthwise of H_{t−1} on the fly, the pointwise product
// on tensor cores in half/bfloat16, xc[t], the cell and the column sums of H_t in one kernel);
// backward 3 and 3 (2 mm, sum). emulation_check.py counts them.
// LAUNCHES_PER_STEP forward=(2, 0) backward=(3, 3)
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
