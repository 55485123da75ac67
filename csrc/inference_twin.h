// The registrations of a layer op's kernels (csrc/convlstm_fast.cpp), shared by the CPU and CUDA
// kernels: the op itself, which saves for backward, its `<op>_inference` twin, which keeps
// nothing and returns (output, h_n, c_n), and its `<op>_backward`. A kernel writes one forward
// taking `save`; with `save` false it puts each step's would-be-saved tensors in buffers reused
// across steps. `reverse` walks the steps t = T − 1 … 0 (cells::Walk); `lengths` (int64 [B], or
// none) masks each sample's steps t ≥ lengths[b] inside the loop (ops/registration.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cells.h"

namespace convlstm_fast {

using LayerOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>>;
using InferenceOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using SavingForward = LayerOutputs (*)(const at::Tensor& x, const at::Tensor& h0,
                                       const at::Tensor& c0, at::TensorList params,
                                       int64_t gate_activation, bool reverse,
                                       const std::optional<at::Tensor>& lengths, bool save);
using LayerBackward = LayerOutputs (*)(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                                       const at::Tensor& grad_c_n, const at::Tensor& x,
                                       const at::Tensor& h0, const at::Tensor& c0,
                                       at::TensorList params, const at::Tensor& output,
                                       at::TensorList saved, int64_t gate_activation,
                                       bool reverse, const std::optional<at::Tensor>& lengths);

template <SavingForward kForward>
LayerOutputs training_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                              at::TensorList params, int64_t gate_activation, bool reverse,
                              const std::optional<at::Tensor>& lengths) {
  return kForward(x, h0, c0, params, gate_activation, reverse, lengths, true);
}

template <SavingForward kForward>
InferenceOutputs inference_forward(const at::Tensor& x, const at::Tensor& h0,
                                   const at::Tensor& c0, at::TensorList params,
                                   int64_t gate_activation, bool reverse,
                                   const std::optional<at::Tensor>& lengths) {
  const LayerOutputs outputs =
      kForward(x, h0, c0, params, gate_activation, reverse, lengths, false);
  return {std::get<0>(outputs), std::get<1>(outputs), std::get<2>(outputs)};
}

// Registers `cell`'s op, its `_inference` twin and its `_backward` with `m` (a
// TORCH_LIBRARY_IMPL block of one dispatch key).
template <SavingForward kForward>
void register_layer_kernels(torch::Library& m, const cells::Cell& cell, LayerBackward backward) {
  const std::string op(cell.op);
  m.impl(op.c_str(), &training_forward<kForward>);
  m.impl((op + "_inference").c_str(), &inference_forward<kForward>);
  m.impl((op + "_backward").c_str(), backward);
}

}  // namespace convlstm_fast
