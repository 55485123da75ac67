// CUDA kernels of variant (a), `convlstm_fast::pooled_layer` and `pooled_layer_backward`:
// pooled-FC gates + depthwise-separable candidate (shared/SPEC.md eqs. 8-15). The host driver
// is shared with (c)/(d): batched_input_layer.cuh; the fused step epilogue with every pooled cell:
// pooled_cell.cuh.
#include "batched_input_layer.cuh"

namespace convlstm_fast {
namespace cuda {

TORCH_LIBRARY_IMPL(convlstm_fast, CONVLSTM_CUDA_DISPATCH_KEY, m) {
  register_layer_kernels<batched_input_layer_forward<cells::kPooledLayer>>(
      m, cells::kPooledLayer, &batched_input_layer_backward<cells::kPooledLayer>);
}

}  // namespace cuda
}  // namespace convlstm_fast
