// Schemas of the acon ops. Each device registers its kernels in its own file
// (csrc/cpu/, csrc/cuda/); fake kernels and autograd live in acon_cuda/ops.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Lets `import acon_cuda._C` load this library, which runs the registrations
// below; the ops themselves are reached through torch.ops.acon.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(acon, m) {
  m.def("acon_c_forward(Tensor x, Tensor p1, Tensor p2, Tensor beta, int channel_dim) -> Tensor");
  // output_mask = [x's gradient, the parameters' gradients]: a masked-out
  // output is an empty tensor (0 elements) and its work is skipped.
  m.def(
      "acon_c_backward(Tensor grad_y, Tensor x, Tensor p1, Tensor p2, Tensor beta, "
      "int channel_dim, bool[2] output_mask=[True, True]) -> (Tensor, Tensor, Tensor, Tensor)");
  // The argument checks of both ops, on metadata only: the fake kernels call
  // it so that meta and fake tensors get the same errors as real ones.
  m.def(
      "acon_c_check_args(Tensor x, Tensor p1, Tensor p2, Tensor beta, int channel_dim, "
      "Tensor? grad_y=None) -> ()");
}
