// CUDA kernels of variant (a), `convlstm_fast::pooled_layer` and `pooled_layer_backward`:
// pooled-FC gates + depthwise-separable candidate (shared/SPEC.md eqs. 8-15). The host driver
// is shared with (c)/(d): batched_input_layer.cuh; the fused step epilogue with every pooled cell:
// pooled_cell.cuh.
#include "batched_input_layer.cuh"

namespace convlstm_fast {
namespace cuda {
namespace {

constexpr const cells::Cell& kCell = cells::kPooledLayer;

LayerResult pooled_layer(const Tensor& x, const Tensor& h0, const Tensor& c0,
                         at::TensorList params, int64_t gate_activation, bool save) {
  return batched_input_layer_forward(x, h0, c0, params, gate_activation, save, kCell);
}

BackwardResult pooled_layer_backward(const Tensor& grad_output, const Tensor& grad_h_n,
                                     const Tensor& grad_c_n, const Tensor& x, const Tensor& h0,
                                     const Tensor& c0, at::TensorList params, const Tensor& output,
                                     at::TensorList saved, int64_t gate_activation) {
  return batched_input_layer_backward(grad_output, grad_h_n, grad_c_n, x, h0, c0, params, output,
                                      saved, gate_activation, kCell);
}

}  // namespace
}  // namespace cuda
}  // namespace convlstm_fast

TORCH_LIBRARY_IMPL(convlstm_fast, CONVLSTM_CUDA_DISPATCH_KEY, m) {
  convlstm_fast::register_layer_kernels<convlstm_fast::cuda::pooled_layer>(
      m, convlstm_fast::cuda::kCell, &convlstm_fast::cuda::pooled_layer_backward);
}
