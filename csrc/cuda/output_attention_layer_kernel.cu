// CUDA kernels of variant (d), `convlstm_fast::output_attention_layer` and its `_backward`: the
// output gate o becomes the channel-wise max-normalised attention map A = exp(Z − max_HW Z), with
// Z = SepConv_z(F), F = tanh(SepConv_xa(X_t) + SepConv_ha(H_{t−1}) + b_a) (shared/SPEC.md
// eqs. 21-23); the gates i, f are pooled FCs as in (a). Host driver: batched_input_layer.cuh.
//
// Per forward step: two depthwise kernels + two GEMMs on H_{t−1} (candidate, attention
// features), tanh, the depthwise + GEMM of SepConv_z, the per-(b, c) max over the pixels (ATen
// amax), then the fused epilogue that forms exp(Z − max), the cell update and GAP(H_t).
#include "batched_input_layer.cuh"

namespace convlstm_fast {
namespace cuda {
namespace {

constexpr const cells::Cell& kCell = cells::kOutputAttentionLayer;

LayerResult output_attention_layer(const Tensor& x, const Tensor& h0, const Tensor& c0,
                                   at::TensorList params, int64_t gate_activation, bool save) {
  return batched_input_layer_forward(x, h0, c0, params, gate_activation, save, kCell);
}

BackwardResult output_attention_layer_backward(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n, const Tensor& x,
    const Tensor& h0, const Tensor& c0, at::TensorList params, const Tensor& output,
    at::TensorList saved, int64_t gate_activation) {
  return batched_input_layer_backward(grad_output, grad_h_n, grad_c_n, x, h0, c0, params, output,
                                      saved, gate_activation, kCell);
}

}  // namespace
}  // namespace cuda
}  // namespace convlstm_fast

TORCH_LIBRARY_IMPL(convlstm_fast, CONVLSTM_CUDA_DISPATCH_KEY, m) {
  convlstm_fast::register_layer_kernels<convlstm_fast::cuda::output_attention_layer>(
      m, convlstm_fast::cuda::kCell, &convlstm_fast::cuda::output_attention_layer_backward);
}
