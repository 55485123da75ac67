// Schemas of the native ops (one layer over a whole sequence, forward and backward), and the
// Python module stub that loads them.
//
// Every op here has a Triton twin `<name>_triton` with the same schema, declared from Python
// (convlstm_fast/ops/registration.py holds the same schema strings; a test checks they agree).
// `<name>_inference` is the forward without the tensors saved for backward (no autograd): what
// a backend runs when no gradient is wanted, so inference neither writes nor keeps them.
// Kernels register with TORCH_LIBRARY_IMPL in csrc/cpu/*_kernel.cpp and csrc/cuda/*_kernel.cu;
// autograd and fake tensors are registered once, in Python (convlstm_fast/backends/native.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// An empty `_C` module: importing it loads this library, whose static initialisers register
// the ops. No pybind11, so one build serves every Python 3 version (py_limited_api).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

#define CONVLSTM_LAYER_SCHEMA                                                       \
  "(Tensor x, Tensor h0, Tensor c0, Tensor[] params, int gate_activation)"         \
  " -> (Tensor output, Tensor h_n, Tensor c_n, Tensor[] saved)"
#define CONVLSTM_BACKWARD_SCHEMA                                                    \
  "(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor x, Tensor h0, Tensor c0," \
  " Tensor[] params, Tensor output, Tensor[] saved, int gate_activation)"          \
  " -> (Tensor grad_x, Tensor grad_h0, Tensor grad_c0, Tensor[] grad_params)"
#define CONVLSTM_INFERENCE_SCHEMA                                                   \
  "(Tensor x, Tensor h0, Tensor c0, Tensor[] params, int gate_activation)"         \
  " -> (Tensor output, Tensor h_n, Tensor c_n)"

TORCH_LIBRARY(convlstm_fast, m) {
  for (const char* name : {"convlstm_layer", "pooled_layer", "spatial_attention_layer",
                           "input_attention_layer", "output_attention_layer"}) {
    m.def((std::string(name) + CONVLSTM_LAYER_SCHEMA).c_str());
    m.def((std::string(name) + "_backward" + CONVLSTM_BACKWARD_SCHEMA).c_str());
    m.def((std::string(name) + "_inference" + CONVLSTM_INFERENCE_SCHEMA).c_str());
  }
}
