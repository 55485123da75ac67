// The two registrations of a layer forward (csrc/convlstm_fast.cpp), shared by the CPU and CUDA
// kernels: the op itself, which saves for backward, and its `<op>_inference` twin, which keeps
// nothing and returns (output, h_n, c_n). A kernel writes one forward taking `save`; with
// `save` false it puts each step's would-be-saved tensors in buffers reused across steps.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>
#include <vector>

namespace convlstm_fast {

using LayerOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>>;
using InferenceOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using SavingForward = LayerOutputs (*)(const at::Tensor& x, const at::Tensor& h0,
                                       const at::Tensor& c0, at::TensorList params,
                                       int64_t gate_activation, bool save);

template <SavingForward kForward>
LayerOutputs training_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                              at::TensorList params, int64_t gate_activation) {
  return kForward(x, h0, c0, params, gate_activation, true);
}

template <SavingForward kForward>
InferenceOutputs inference_forward(const at::Tensor& x, const at::Tensor& h0,
                                   const at::Tensor& c0, at::TensorList params,
                                   int64_t gate_activation) {
  const LayerOutputs outputs = kForward(x, h0, c0, params, gate_activation, false);
  return {std::get<0>(outputs), std::get<1>(outputs), std::get<2>(outputs)};
}

}  // namespace convlstm_fast
