// Schema definitions for the badam_kernels ops. Each backend registers its implementation in its
// own file with TORCH_LIBRARY_IMPL(badam_kernels, CPU|CUDA, m). Fake kernels live in Python
// (badam_kernels/ops.py).
#include <Python.h>
#include <torch/library.h>

// Importing badam_kernels._C only has to run the static registrations below; it defines no
// Python functions.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(badam_kernels, m) {
  m.def(
      "fused_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] masters, float lr, float beta1, float beta2, "
      "float eps, float weight_decay, int step, str master_weights, bool stochastic_rounding, "
      "int seed, Tensor? grad_mul, Tensor? found_inf) -> ()");
  m.def("grad_norm(Tensor[] tensors) -> Tensor");
  m.def(
      "sparse_adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] masters, Tensor[] indices, float lr, float beta1, float beta2, float eps, int step, "
      "str master_weights, Tensor? grad_mul) -> ()");
}
