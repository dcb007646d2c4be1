// Autograd of the acon ops themselves, in C++, for every device.
//
// acon_cuda.acon_c is a Python torch.autograd.Function (acon_cuda/ops.py)
// whose forward calls acon_c_forward with grad mode off; there this kernel
// costs one check and a redispatch. Code that calls the op directly, such as
// a torch.export program run with trainable parameters, gets its first-order
// gradients from AconCForward below. A Python autograd registration
// (torch.library.register_autograd) would cost about 7 us on every call,
// the Function's included.
#include "acon_c.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace acon_cuda {

at::Tensor call_acon_c_forward(
    const at::Tensor& x,
    const at::Tensor& p1,
    const at::Tensor& p2,
    const at::Tensor& beta,
    int64_t channel_dim) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("acon::acon_c_forward", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(x, p1, p2, beta, channel_dim);
}

AconCGrads call_acon_c_backward(
    const at::Tensor& grad_y,
    const at::Tensor& x,
    const at::Tensor& p1,
    const at::Tensor& p2,
    const at::Tensor& beta,
    int64_t channel_dim,
    std::array<bool, 2> output_mask) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("acon::acon_c_backward", "")
                             .typed<AconCGrads(
                                 const at::Tensor&,
                                 const at::Tensor&,
                                 const at::Tensor&,
                                 const at::Tensor&,
                                 const at::Tensor&,
                                 int64_t,
                                 std::array<bool, 2>)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(grad_y, x, p1, p2, beta, channel_dim, output_mask);
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool any_requires_grad(std::initializer_list<const at::Tensor*> tensors) {
  if (!at::GradMode::is_enabled()) {
    return false;
  }
  for (const at::Tensor* t : tensors) {
    if (t->requires_grad()) {
      return true;
    }
  }
  return false;
}

// The backward op's results are not differentiable: differentiating them
// raises with a pointer to what is.
class AconCBackward : public torch::autograd::Function<AconCBackward> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
      const at::Tensor& grad_y,
      const at::Tensor& x,
      const at::Tensor& p1,
      const at::Tensor& p2,
      const at::Tensor& beta,
      int64_t channel_dim,
      std::array<bool, 2> output_mask) {
    auto [gx, gp1, gp2, gbeta] = call_acon_c_backward(grad_y, x, p1, p2, beta, channel_dim, output_mask);
    return {gx, gp1, gp2, gbeta};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    TORCH_CHECK(
        false,
        "acon::acon_c_backward is not differentiable; differentiate acon_cuda.acon_c "
        "(its backward supports create_graph=True) instead of calling the op directly");
  }
};

AconCGrads acon_c_backward_autograd(
    const at::Tensor& grad_y,
    const at::Tensor& x,
    const at::Tensor& p1,
    const at::Tensor& p2,
    const at::Tensor& beta,
    int64_t channel_dim,
    std::array<bool, 2> output_mask) {
  if (!any_requires_grad({&grad_y, &x, &p1, &p2, &beta})) {
    return call_acon_c_backward(grad_y, x, p1, p2, beta, channel_dim, output_mask);
  }
  const variable_list out = AconCBackward::apply(grad_y, x, p1, p2, beta, channel_dim, output_mask);
  return {out[0], out[1], out[2], out[3]};
}

class AconCForward : public torch::autograd::Function<AconCForward> {
 public:
  static at::Tensor forward(
      AutogradContext* ctx,
      const at::Tensor& x,
      const at::Tensor& p1,
      const at::Tensor& p2,
      const at::Tensor& beta,
      int64_t channel_dim) {
    ctx->save_for_backward({x, p1, p2, beta});
    ctx->saved_data["channel_dim"] = channel_dim;
    return call_acon_c_forward(x, p1, p2, beta, channel_dim);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const std::array<bool, 2> mask = {
        ctx->needs_input_grad(0), ctx->needs_input_grad(1) || ctx->needs_input_grad(2) || ctx->needs_input_grad(3)};
    // Under create_graph=True the backward op goes through its own autograd,
    // so that differentiating these gradients raises (acon_cuda.acon_c is
    // what supports double backward) instead of silently giving nothing.
    auto [gx, gp1, gp2, gbeta] = acon_c_backward_autograd(
        grad_outputs[0], saved[0], saved[1], saved[2], saved[3], ctx->saved_data["channel_dim"].toInt(), mask);
    const auto wanted = [&](at::Tensor g, size_t i) { return ctx->needs_input_grad(i) ? g : at::Tensor(); };
    return {wanted(gx, 0), wanted(gp1, 1), wanted(gp2, 2), wanted(gbeta, 3), at::Tensor()};
  }
};

at::Tensor acon_c_forward_autograd(
    const at::Tensor& x,
    const at::Tensor& p1,
    const at::Tensor& p2,
    const at::Tensor& beta,
    int64_t channel_dim) {
  if (!any_requires_grad({&x, &p1, &p2, &beta})) {
    return call_acon_c_forward(x, p1, p2, beta, channel_dim);
  }
  return AconCForward::apply(x, p1, p2, beta, channel_dim);
}

} // namespace
} // namespace acon_cuda

TORCH_LIBRARY_IMPL(acon, Autograd, m) {
  m.impl("acon_c_forward", &acon_cuda::acon_c_forward_autograd);
  m.impl("acon_c_backward", &acon_cuda::acon_c_backward_autograd);
}
