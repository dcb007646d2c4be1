// Every schema of the acon library. Kernels are registered beside their
// code: each device's in csrc/cpu/ and csrc/cuda/, the autograd kernels in
// csrc/acon_c_autograd.cpp and csrc/meta_acon_c.cpp; fake kernels and vmap
// rules are Python (acon_cuda/ops.py).
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

  // Internal, eager only: MetaAconC's forward (acon_cuda/meta_acon.py), each
  // BatchNorm given by its parameters, buffers (updated as its forward
  // updates them) and settings, bn*_momentum None for a cumulative average.
  // The defaults are nn.BatchNorm2d's; without norm no BatchNorm argument is
  // read. Traced and compiled code runs meta_acon_c_plain's ordinary ops.
  m.def(
      "_meta_acon_c(Tensor x, Tensor p1, Tensor p2, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, int channel_dim, "
      "bool norm=False, "
      "Tensor? bn1_weight=None, Tensor? bn1_bias=None, Tensor(a!)? bn1_running_mean=None, "
      "Tensor(b!)? bn1_running_var=None, Tensor(c!)? bn1_num_batches_tracked=None, bool bn1_training=True, "
      "bool bn1_track_running_stats=True, float? bn1_momentum=0.1, float bn1_eps=1e-05, "
      "Tensor? bn2_weight=None, Tensor? bn2_bias=None, Tensor(d!)? bn2_running_mean=None, "
      "Tensor(e!)? bn2_running_var=None, Tensor(f!)? bn2_num_batches_tracked=None, bool bn2_training=True, "
      "bool bn2_track_running_stats=True, float? bn2_momentum=0.1, float bn2_eps=1e-05) -> Tensor");
  // Internal, eager and CPU only: a BatchNorm of x (F.batch_norm's resolved
  // arguments, training meaning batch statistics; its running statistics
  // updated) followed by MetaAconC on axis 1, in the fused passes
  // (acon_cuda/fuse.py's pairs). Elsewhere the two run apart.
  m.def(
      "_batch_norm_meta_acon_c(Tensor x, Tensor? weight, Tensor? bias, Tensor(g!)? running_mean, "
      "Tensor(h!)? running_var, bool training, float momentum, float eps, "
      "Tensor p1, Tensor p2, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, bool norm=False, "
      "Tensor? bn1_weight=None, Tensor? bn1_bias=None, Tensor(a!)? bn1_running_mean=None, "
      "Tensor(b!)? bn1_running_var=None, Tensor(c!)? bn1_num_batches_tracked=None, bool bn1_training=True, "
      "bool bn1_track_running_stats=True, float? bn1_momentum=0.1, float bn1_eps=1e-05, "
      "Tensor? bn2_weight=None, Tensor? bn2_bias=None, Tensor(d!)? bn2_running_mean=None, "
      "Tensor(e!)? bn2_running_var=None, Tensor(f!)? bn2_num_batches_tracked=None, bool bn2_training=True, "
      "bool bn2_track_running_stats=True, float? bn2_momentum=0.1, float bn2_eps=1e-05) -> Tensor");

  // BatchNorm (nn.BatchNorm's forward, given its resolved arguments as
  // F.batch_norm takes them) followed by ACON-C on axis 1 with a per-channel
  // beta; CPU kernels only (acon_cuda/batch_norm.py runs the two ops
  // elsewhere). The forward returns (y, mean, invstd): the statistics it
  // normalised with, in opmath precision, which the backward takes; with
  // training (batch statistics) it updates the running statistics given.
  // output_mask = [x's gradient, weight's and bias's, p1's, p2's and beta's].
  m.def(
      "batch_norm_acon_c_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, Tensor p1, Tensor p2, Tensor beta, bool training, float momentum, float eps) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "batch_norm_acon_c_backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor save_mean, "
      "Tensor save_invstd, Tensor p1, Tensor p2, Tensor beta, bool training, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // Which build of the CPU kernels runs here: "AVX512", "AVX2" or "DEFAULT".
  m.def("cpu_kernel_isa() -> str");

  // Test hooks with a kernel in CUDA builds only (csrc/cuda/acon_c_emulation.cpp;
  // acon_cuda.testing.has_cuda_test_hooks): the CUDA kernels' per-thread code
  // and launch plan run on CPU tensors as on a GPU of the given size.
  m.def(
      "_acon_c_forward_cuda_emulated(Tensor x, Tensor p1, Tensor p2, Tensor beta, int channel_dim, "
      "int multiprocessors, int blocks_per_multiprocessor) -> Tensor");
  m.def(
      "_acon_c_backward_cuda_emulated(Tensor grad_y, Tensor x, Tensor p1, Tensor p2, Tensor beta, "
      "int channel_dim, int multiprocessors, int blocks_per_multiprocessor, bool[2] output_mask) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "_acon_c_cuda_launch_plan(Tensor x, Tensor beta, int channel_dim, bool backward, int multiprocessors, "
      "int blocks_per_multiprocessor) -> int[]");
  // The emulation's mutations until the next call (0, 0: none): the barrier
  // site to drop, the shuffle width to use instead of the kernel's.
  m.def("_acon_c_cuda_emulation_mutate(int dropped_barrier, int shuffle_width) -> ()");
}
