// Schemas of the native ops (one layer over a whole sequence, forward and backward), one triple
// per cell of csrc/cells.h, and the Python module stub that loads them.
//
// Every op here has a Triton twin `<name>_triton` with the same schema, declared from Python
// (convlstm_fast/ops/registration.py holds the same schema strings; tests/test_native_layout.py
// checks they agree). `<name>_inference` is the forward without the tensors saved for backward
// (no autograd): what a backend runs when no gradient is wanted, so inference neither writes nor
// keeps them. Kernels register with TORCH_LIBRARY_IMPL in csrc/cpu/<op>_kernel.cpp and
// csrc/cuda/<op>_kernel.cu; autograd and fake tensors are registered once, in Python
// (convlstm_fast/ops/registration.py).
#include <Python.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "cells.h"

extern "C" {
// An empty `_C` module: importing it loads this library, whose static initialisers register
// the ops. No pybind11, so one build serves every Python 3 version (py_limited_api).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

#define CONVLSTM_LAYER_SCHEMA                                                       \
  "(Tensor x, Tensor h0, Tensor c0, Tensor[] params, int gate_activation,"         \
  " bool reverse=False, Tensor? lengths=None)"                                      \
  " -> (Tensor output, Tensor h_n, Tensor c_n, Tensor[] saved)"
#define CONVLSTM_BACKWARD_SCHEMA                                                    \
  "(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor x, Tensor h0, Tensor c0," \
  " Tensor[] params, Tensor output, Tensor[] saved, int gate_activation,"          \
  " bool reverse=False, Tensor? lengths=None)"                                      \
  " -> (Tensor grad_x, Tensor grad_h0, Tensor grad_c0, Tensor[] grad_params)"
#define CONVLSTM_INFERENCE_SCHEMA                                                   \
  "(Tensor x, Tensor h0, Tensor c0, Tensor[] params, int gate_activation,"         \
  " bool reverse=False, Tensor? lengths=None) -> (Tensor output, Tensor h_n, Tensor c_n)"
#define CELL_LAYOUT_SCHEMA                                                                   \
  "cell_layout(str op, int in_channels, int hidden_channels, int kernel_size, int steps,"   \
  " int batch, int height, int width) -> (str[] parameters, int[][] parameter_shapes,"       \
  " str gates, int[][] saved_cpu, int[][] saved_cuda)"

namespace convlstm_fast {
namespace {

using Shapes = std::vector<std::vector<int64_t>>;

// What csrc/cells.h declares for `op` at the given sizes: the parameter names and shapes in op
// order, the gate slots, and the shapes of what the CPU and the CUDA kernel save. For
// tests/test_native_layout.py, which compares them with the registry's entry of the cell.
std::tuple<std::vector<std::string>, Shapes, std::string, Shapes, Shapes> cell_layout(
    const std::string& op, int64_t in_channels, int64_t hidden_channels, int64_t kernel_size,
    int64_t steps, int64_t batch, int64_t height, int64_t width) {
  for (const cells::Cell* cell : cells::kCells) {
    if (cell->op != op) continue;
    const cells::Sizes sizes{in_channels, hidden_channels, kernel_size, steps, batch, height,
                             width};
    std::vector<std::string> names;
    for (const cells::NamedShape& parameter : cell->parameters) names.emplace_back(parameter.name);
    return {names, cells::shapes_of(cell->parameters, sizes), std::string(cell->gates),
            cells::shapes_of(cell->saved_cpu, sizes), cells::shapes_of(cell->saved_cuda, sizes)};
  }
  TORCH_CHECK(false, "cell_layout: no native cell has the op ", op);
}

}  // namespace
}  // namespace convlstm_fast

TORCH_LIBRARY(convlstm_fast, m) {
  for (const convlstm_fast::cells::Cell* cell : convlstm_fast::cells::kCells) {
    const std::string name(cell->op);
    m.def((name + CONVLSTM_LAYER_SCHEMA).c_str());
    m.def((name + "_backward" + CONVLSTM_BACKWARD_SCHEMA).c_str());
    m.def((name + "_inference" + CONVLSTM_INFERENCE_SCHEMA).c_str());
  }
  m.def(CELL_LAYOUT_SCHEMA, &convlstm_fast::cell_layout);
}
