// CUDA kernels of variants (c) `convlstm_fast::input_attention_layer` and (d)
// `convlstm_fast::output_attention_layer` (with their `_backward` ops): the input (c) or output
// (d) gate becomes the channel-wise max-normalised attention exp(Z − max_{h,w} Z) with
// Z = SepConv_z(tanh(SepConv_xi(X_t) + SepConv_hi(H_{t−1}) + b_i)) (shared/SPEC.md eqs. 21-23);
// the other two gates are pooled FCs as in (a). Host driver: pooled_family.cuh.
//
// Per forward step: two depthwise kernels + two GEMMs on H_{t−1} (candidate, attention
// features), tanh, the depthwise + GEMM of SepConv_z, the per-(b, c) max over the pixels (ATen
// amax), then the fused epilogue that forms exp(Z − max), the cell update and GAP(H_t).
#include "pooled_family.cuh"

namespace convlstm_fast {
namespace cuda {
namespace {

LayerResult input_attention_layer(const Tensor& x, const Tensor& h0, const Tensor& c0,
                                  at::TensorList params, int64_t gate_activation, bool save) {
  return pooled_family_forward(x, h0, c0, params, gate_activation, save, kInputAttention,
                               "input_attention_layer");
}

BackwardResult input_attention_layer_backward(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n, const Tensor& x,
    const Tensor& h0, const Tensor& c0, at::TensorList params, const Tensor& output,
    at::TensorList saved, int64_t gate_activation) {
  return pooled_family_backward(grad_output, grad_h_n, grad_c_n, x, h0, c0, params, output, saved,
                                gate_activation, kInputAttention, "input_attention_layer_backward");
}

LayerResult output_attention_layer(const Tensor& x, const Tensor& h0, const Tensor& c0,
                                   at::TensorList params, int64_t gate_activation, bool save) {
  return pooled_family_forward(x, h0, c0, params, gate_activation, save, kOutputAttention,
                               "output_attention_layer");
}

BackwardResult output_attention_layer_backward(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n, const Tensor& x,
    const Tensor& h0, const Tensor& c0, at::TensorList params, const Tensor& output,
    at::TensorList saved, int64_t gate_activation) {
  return pooled_family_backward(grad_output, grad_h_n, grad_c_n, x, h0, c0, params, output, saved,
                                gate_activation, kOutputAttention,
                                "output_attention_layer_backward");
}

}  // namespace
}  // namespace cuda
}  // namespace convlstm_fast

TORCH_LIBRARY_IMPL(convlstm_fast, CONVLSTM_CUDA_DISPATCH_KEY, m) {
  m.impl("input_attention_layer",
         &convlstm_fast::training_forward<convlstm_fast::cuda::input_attention_layer>);
  m.impl("input_attention_layer_inference",
         &convlstm_fast::inference_forward<convlstm_fast::cuda::input_attention_layer>);
  m.impl("input_attention_layer_backward", &convlstm_fast::cuda::input_attention_layer_backward);
  m.impl("output_attention_layer",
         &convlstm_fast::training_forward<convlstm_fast::cuda::output_attention_layer>);
  m.impl("output_attention_layer_inference",
         &convlstm_fast::inference_forward<convlstm_fast::cuda::output_attention_layer>);
  m.impl("output_attention_layer_backward", &convlstm_fast::cuda::output_attention_layer_backward);
}
