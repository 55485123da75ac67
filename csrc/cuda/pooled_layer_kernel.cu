// CUDA kernels of variant (a), `convlstm_fast::pooled_layer` and `pooled_layer_backward`:
// pooled-FC gates + depthwise-separable candidate (shared/SPEC.md eqs. 8-15). The host driver
// and the fused step epilogue are shared with (c)/(d): pooled_family.cuh, pooled_cell.cuh.
#include "pooled_family.cuh"

namespace convlstm_fast {
namespace cuda {
namespace {

LayerResult pooled_layer(const Tensor& x, const Tensor& h0, const Tensor& c0,
                         at::TensorList params, int64_t gate_activation, bool save) {
  return pooled_family_forward(x, h0, c0, params, gate_activation, save, kNoAttention,
                               "pooled_layer");
}

BackwardResult pooled_layer_backward(const Tensor& grad_output, const Tensor& grad_h_n,
                                     const Tensor& grad_c_n, const Tensor& x, const Tensor& h0,
                                     const Tensor& c0, at::TensorList params, const Tensor& output,
                                     at::TensorList saved, int64_t gate_activation) {
  return pooled_family_backward(grad_output, grad_h_n, grad_c_n, x, h0, c0, params, output, saved,
                                gate_activation, kNoAttention, "pooled_layer_backward");
}

}  // namespace
}  // namespace cuda
}  // namespace convlstm_fast

TORCH_LIBRARY_IMPL(convlstm_fast, CONVLSTM_CUDA_DISPATCH_KEY, m) {
  m.impl("pooled_layer", &convlstm_fast::training_forward<convlstm_fast::cuda::pooled_layer>);
  m.impl("pooled_layer_inference",
         &convlstm_fast::inference_forward<convlstm_fast::cuda::pooled_layer>);
  m.impl("pooled_layer_backward", &convlstm_fast::cuda::pooled_layer_backward);
}
