#include "meta_acon_c_generator.h"

#include "acon_c.h"
#include "cpu/meta_acon_c_cpu.h"

#include <c10/core/impl/LocalDispatchKeySet.h>

namespace acon_cuda {
namespace {

// Whether no TorchDispatchMode is active (the Python key in the thread's
// included set; BackendSelect and ADInplaceOrView are always there). Under a
// mode the products and sums run as ATen ops on this thread: a mode must see
// them, and the pool's threads do not carry it.
bool plain_dispatch() {
  return !c10::impl::tls_local_dispatch_key_set().included_.has(c10::DispatchKey::Python);
}

} // namespace

bool small_product_runs(const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias) {
  return plain_dispatch() && cpu::is_small_product(a, b, bias);
}

at::Tensor product(const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias) {
  if (small_product_runs(a, b, bias)) {
    return cpu::small_product(a, b, bias);
  }
  if (a.is_cpu() && plain_dispatch() && cpu::is_parallel_product(a, b)) {
    return cpu::parallel_product(a, b, bias);
  }
  return bias.defined() ? at::addmm(bias, a, b) : at::mm(a, b);
}

at::Tensor column_sums(const at::Tensor& a) {
  return plain_dispatch() && cpu::is_small_column_sum(a) ? cpu::column_sums(a) : a.sum(0);
}

std::vector<int64_t> reduced_axes(const at::Tensor& x, int64_t cdim) {
  std::vector<int64_t> axes;
  for (int64_t i = 1; i < x.dim(); ++i) {
    if (i != cdim) {
      axes.push_back(i);
    }
  }
  return axes;
}

at::Tensor sample_channel_means(const at::Tensor& x, int64_t cdim) {
  if (x.is_cpu()) {
    return cpu::sample_channel_means(x, cdim);
  }
  const std::vector<int64_t> axes = reduced_axes(x, cdim);
  if (axes.empty()) {
    return x;
  }
  const at::ScalarType opmath = opmath_dtype(x);
  return at::mean(x, axes, false, opmath).to(x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm(const at::Tensor& input, const BatchNorm& bn) {
  const int64_t features = input.size(1);
  for (const at::Tensor* t : {&bn.weight, &bn.bias, &bn.mode.running_mean, &bn.mode.running_var}) {
    TORCH_CHECK_VALUE(
        !t->defined() || (t->dim() == 1 && t->size(0) == features),
        "MetaAconC: a BatchNorm of the generator has parameters or running statistics of shape ",
        t->sizes(),
        " but normalises ",
        features,
        " features");
    TORCH_CHECK(
        !t->defined() || t->device() == input.device(),
        "MetaAconC: a BatchNorm of the generator is on ",
        t->device(),
        " but x is on ",
        input.device(),
        "; move the whole module");
  }
  if (input.is_cpu()) {
    return cpu::batch_norm_rows(input, bn);
  }
  const BatchNormMode& m = bn.mode;
  return at::native_batch_norm(
      input, bn.weight, bn.bias, m.running_mean, m.running_var, m.use_batch_stats, m.momentum, m.eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(
    const at::Tensor& grad_out,
    const BatchNorm& bn,
    const BatchNormSaved& saved,
    std::array<bool, 3> output_mask) {
  if (saved.input.is_cpu()) {
    return cpu::batch_norm_rows_backward(grad_out, bn, saved, output_mask);
  }
  const BatchNormMode& m = bn.mode;
  return at::native_batch_norm_backward(
      grad_out,
      saved.input,
      bn.weight,
      m.running_mean,
      m.running_var,
      saved.save_mean,
      saved.save_invstd,
      m.use_batch_stats,
      m.eps,
      output_mask);
}

} // namespace acon_cuda
