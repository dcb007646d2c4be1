// Meta-ACON in eager code: one op, acon::_meta_acon_c, whose autograd node is
// C++ (MetaAconCNode below), so that a training step costs one op call from
// Python and no Python in the backward: on small maps ~30 Python-level calls
// per step cost more than every kernel together.
//
// beta = sigmoid(bn2(fc2(bn1(fc1(mean(x)))))) on (N, C) matrices: the 1x1
// convolutions as matrix products on views of their weights, the BatchNorms
// on (N, hidden) and (N, C) values (csrc/meta_acon_c_generator.h), each
// BatchNorm's mode resolved here as nn.BatchNorm2d.forward does. The traced
// path (meta_acon_c_plain in acon_cuda/meta_acon.py) computes the same in
// ordinary ops.
//
// A second op, acon::_batch_norm_meta_acon_c, is Meta-ACON after a BatchNorm
// of x (the pairs fuse_batchnorm makes), on the CPU: the same node runs the
// fused BatchNorm + ACON-C passes (cpu/batch_norm_acon_c_cpu.h), whose
// statistics pass gives the generator its means (of the BatchNorm's output)
// and whose sums pass gives beta's gradient, with the generator in between:
// no pass over x beyond the fused AconC pair's, and x the only x-sized
// tensor kept.
#include "acon_c.h"
#include "cpu/batch_norm_acon_c_cpu.h"
#include "meta_acon_c_generator.h"

#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <utility>
#include <vector>

namespace acon_cuda {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// One T per input of the op that has a gradient, by name: the inputs
// (undefined: the module has none), their gradients, or whether each
// gradient is wanted.
template <typename T>
struct PerInput {
  T x, p1, p2;
  T w1, b1, w2, b2; // fc1's and fc2's weight and bias
  T bn1_weight, bn1_bias, bn2_weight, bn2_bias;
  T input_bn_weight, input_bn_bias; // the BatchNorm of x (_batch_norm_meta_acon_c)
};

// Pointers to the fields of `in`, a PerInput (const or not), in the order in
// which autograd numbers the node's inputs.
template <typename P>
auto in_order(P& in) {
  return std::array{
      &in.x,
      &in.p1,
      &in.p2,
      &in.w1,
      &in.b1,
      &in.w2,
      &in.b2,
      &in.bn1_weight,
      &in.bn1_bias,
      &in.bn2_weight,
      &in.bn2_bias,
      &in.input_bn_weight,
      &in.input_bn_bias};
}

// Everything MetaAconCNode computes from.
struct NodeInputs {
  PerInput<at::Tensor> tensors;
  bool norm = false;
  BatchNormMode bn1, bn2; // unused without norm
  int64_t cdim = 1;
  // _batch_norm_meta_acon_c: x goes through a BatchNorm first (channel axis 1).
  bool input_bn = false;
  BatchNormMode input_bn_mode;
};

// The BatchNorm of x as the fused CPU passes take it.
cpu::NormArgs input_norm_args(const NodeInputs& in) {
  const BatchNormMode& m = in.input_bn_mode;
  return {
      in.tensors.input_bn_weight,
      in.tensors.input_bn_bias,
      m.running_mean,
      m.running_var,
      m.use_batch_stats,
      m.momentum,
      m.eps};
}

// in's BatchNorms with their parameters.
std::pair<BatchNorm, BatchNorm> batch_norms(const NodeInputs& in) {
  const PerInput<at::Tensor>& t = in.tensors;
  return {{t.bn1_weight, t.bn1_bias, in.bn1}, {t.bn2_weight, t.bn2_bias, in.bn2}};
}

// The generator's values that its backward reads.
struct GeneratorSaved {
  at::Tensor beta;
  at::Tensor mean;         // fc1's input
  at::Tensor fc2_in;       // fc1's output, through bn1 with norm
  BatchNormSaved bn1, bn2; // undefined without norm
  // With input_bn: the statistics it normalised x with, and each sample's
  // mean of x minus them (cpu::NormAconCForward).
  at::Tensor input_bn_mean, input_bn_invstd, sample_offsets;
};

// Pointers to the tensors the backward reads, in the order save and restore
// keep them: into `in` and `s` (const to save, not to restore).
template <typename Inputs, typename Saved>
auto saved_tensors(Inputs& in, Saved& s) {
  const auto inputs = in_order(in.tensors);
  std::vector<typename decltype(inputs)::value_type> all(inputs.begin(), inputs.end());
  all.insert(
      all.end(),
      {&in.bn1.running_mean,
       &in.bn1.running_var,
       &in.bn2.running_mean,
       &in.bn2.running_var,
       &in.input_bn_mode.running_mean,
       &in.input_bn_mode.running_var,
       &s.input_bn_mean,
       &s.input_bn_invstd,
       &s.sample_offsets,
       &s.beta,
       &s.mean,
       &s.fc2_in,
       &s.bn1.input,
       &s.bn1.save_mean,
       &s.bn1.save_invstd,
       &s.bn2.input,
       &s.bn2.save_mean,
       &s.bn2.save_invstd});
  return all;
}

void save(AutogradContext* ctx, NodeInputs in, const GeneratorSaved& s) {
  // The running statistics only where the backward uses them (a BatchNorm
  // without batch statistics): saved with their version, so that a later
  // forward updating them in place makes this backward raise instead of
  // using the new values.
  for (BatchNormMode* mode : {&in.bn1, &in.bn2, &in.input_bn_mode}) {
    if (mode->use_batch_stats) {
      mode->running_mean = mode->running_var = at::Tensor();
    }
  }
  variable_list tensors;
  for (const at::Tensor* t : saved_tensors(std::as_const(in), s)) {
    tensors.push_back(*t);
  }
  ctx->save_for_backward(tensors);
  ctx->saved_data["norm"] = in.norm;
  ctx->saved_data["bn1_use_batch_stats"] = in.bn1.use_batch_stats;
  ctx->saved_data["bn1_eps"] = in.bn1.eps;
  ctx->saved_data["bn2_use_batch_stats"] = in.bn2.use_batch_stats;
  ctx->saved_data["bn2_eps"] = in.bn2.eps;
  ctx->saved_data["cdim"] = in.cdim;
  ctx->saved_data["input_bn"] = in.input_bn;
  ctx->saved_data["input_bn_use_batch_stats"] = in.input_bn_mode.use_batch_stats;
  ctx->saved_data["input_bn_eps"] = in.input_bn_mode.eps;
}

// What save kept; the BatchNorms' momentum is not among it.
std::pair<NodeInputs, GeneratorSaved> restore(AutogradContext* ctx) {
  NodeInputs in;
  GeneratorSaved s;
  const variable_list tensors = ctx->get_saved_variables();
  const auto fields = saved_tensors(in, s);
  TORCH_INTERNAL_ASSERT(tensors.size() == fields.size());
  for (size_t i = 0; i < fields.size(); ++i) {
    *fields[i] = tensors[i];
  }
  in.norm = ctx->saved_data["norm"].toBool();
  in.bn1.use_batch_stats = ctx->saved_data["bn1_use_batch_stats"].toBool();
  in.bn1.eps = ctx->saved_data["bn1_eps"].toDouble();
  in.bn2.use_batch_stats = ctx->saved_data["bn2_use_batch_stats"].toBool();
  in.bn2.eps = ctx->saved_data["bn2_eps"].toDouble();
  in.cdim = ctx->saved_data["cdim"].toInt();
  in.input_bn = ctx->saved_data["input_bn"].toBool();
  in.input_bn_mode.use_batch_stats = ctx->saved_data["input_bn_use_batch_stats"].toBool();
  in.input_bn_mode.eps = ctx->saved_data["input_bn_eps"].toDouble();
  return {in, s};
}

// beta from the (N, C) means of the activation's input, and what the
// generator's backward reads, into s.
void generate(const NodeInputs& in, const at::Tensor& mean, GeneratorSaved& s) {
  const PerInput<at::Tensor>& t = in.tensors;
  const auto [bn1, bn2] = batch_norms(in);
  s.mean = mean;
  const at::Tensor fc1_out = product(s.mean, t.w1.flatten(1).t(), t.b1);
  s.fc2_in = fc1_out;
  if (in.norm) {
    s.bn1.input = fc1_out;
    std::tie(s.fc2_in, s.bn1.save_mean, s.bn1.save_invstd) = batch_norm(fc1_out, bn1);
  }
  const at::Tensor fc2_out = product(s.fc2_in, t.w2.flatten(1).t(), t.b2);
  at::Tensor h = fc2_out;
  if (in.norm) {
    s.bn2.input = fc2_out;
    std::tie(h, s.bn2.save_mean, s.bn2.save_invstd) = batch_norm(fc2_out, bn2);
  }
  s.beta = h.sigmoid_();
}

// grad_x[n, ..., c, ...] += scale * term[n, c], in place, in one
// broadcasting pass (a kernel of ours was no faster on the CPU).
void add_sample_channel_(const at::Tensor& grad_x, const at::Tensor& term, int64_t cdim, double scale) {
  std::vector<int64_t> shape(grad_x.dim(), 1);
  shape[0] = grad_x.size(0);
  shape[cdim] = grad_x.size(cdim);
  grad_x.add_(term.view(shape), scale);
}

// The generator's backward from beta's gradient: the gradients of its
// parameters that `wanted` asks for, into grads, and the gradient of its
// input means (N, C) where want_means (undefined otherwise).
at::Tensor generator_backward(
    const at::Tensor& grad_beta,
    const NodeInputs& in,
    const GeneratorSaved& s,
    const PerInput<bool>& wanted,
    bool want_means,
    PerInput<at::Tensor>& grads) {
  const PerInput<at::Tensor>& t = in.tensors;
  const auto [bn1, bn2] = batch_norms(in);
  if (!(want_means || wanted.w1 || wanted.b1 || wanted.w2 || wanted.b2 || wanted.bn1_weight || wanted.bn1_bias ||
        wanted.bn2_weight || wanted.bn2_bias)) {
    return {};
  }
  at::Tensor grad = at::sigmoid_backward(grad_beta.view(s.beta.sizes()), s.beta);
  if (in.norm) {
    std::tie(grad, grads.bn2_weight, grads.bn2_bias) =
        batch_norm_backward(grad, bn2, s.bn2, {true, wanted.bn2_weight, wanted.bn2_bias});
  }
  if (wanted.w2) {
    grads.w2 = product(grad.t(), s.fc2_in).view(t.w2.sizes());
  }
  if (wanted.b2) {
    grads.b2 = column_sums(grad);
  }
  grad = product(grad, t.w2.flatten(1));
  if (in.norm) {
    std::tie(grad, grads.bn1_weight, grads.bn1_bias) =
        batch_norm_backward(grad, bn1, s.bn1, {true, wanted.bn1_weight, wanted.bn1_bias});
  }
  if (wanted.b1) {
    grads.b1 = column_sums(grad);
  }
  if (wanted.w1) {
    // Large: (mean^T grad)^T, the product with the narrow (hidden-wide)
    // output; grad^T mean (a wide output) ran 3x slower on 2 threads here.
    // Small (plain loops): grad^T mean, in the weight's own layout, which
    // AccumulateGrad then takes without a copy.
    const at::Tensor grad_t = grad.t();
    grads.w1 = small_product_runs(grad_t, s.mean) ? product(grad_t, s.mean).view(t.w1.sizes())
                                                  : product(s.mean.t(), grad).t().view(t.w1.sizes());
  }
  return want_means ? product(grad, t.w1.flatten(1)) : at::Tensor();
}

// The gradients `wanted` asks for (others may be computed too).
PerInput<at::Tensor> meta_acon_c_backward(
    const at::Tensor& grad_y,
    const NodeInputs& in,
    const GeneratorSaved& s,
    const PerInput<bool>& wanted) {
  const PerInput<at::Tensor>& t = in.tensors;
  PerInput<at::Tensor> grads;
  if (in.input_bn) {
    // The fused passes call the generator's backward between their two: the
    // means' gradient enters x's, and the BatchNorm's weight's and bias's.
    const bool want_norm = wanted.input_bn_weight || wanted.input_bn_bias;
    const bool want_means = wanted.x || want_norm;
    std::tie(grads.x, grads.input_bn_weight, grads.input_bn_bias, grads.p1, grads.p2, std::ignore) =
        cpu::batch_norm_acon_c_backward(
            grad_y,
            t.x,
            t.input_bn_weight,
            t.input_bn_bias,
            s.input_bn_mean,
            s.input_bn_invstd,
            t.p1,
            t.p2,
            s.beta,
            in.input_bn_mode.use_batch_stats,
            {wanted.x, want_norm, true},
            s.sample_offsets,
            [&](const at::Tensor& grad_beta) {
              return generator_backward(grad_beta, in, s, wanted, want_means, grads);
            });
    return grads;
  }
  const bool want_generator = wanted.x || wanted.w1 || wanted.b1 || wanted.w2 || wanted.b2 || wanted.bn1_weight ||
      wanted.bn1_bias || wanted.bn2_weight || wanted.bn2_bias;
  const bool want_p = wanted.p1 || wanted.p2;
  at::Tensor grad_beta;
  std::tie(grads.x, grads.p1, grads.p2, grad_beta) =
      call_acon_c_backward(grad_y, t.x, t.p1, t.p2, s.beta, in.cdim, {wanted.x, want_p || want_generator});
  if (!want_generator) {
    return grads;
  }
  const at::Tensor grad_means = generator_backward(grad_beta, in, s, wanted, wanted.x, grads);
  if (wanted.x) {
    // The mean's gradient, the same along the reduced axes: added into the
    // acon op's dx in place, by one broadcasting pass.
    const double count = static_cast<double>(t.x.numel() / (t.x.size(0) * t.x.size(in.cdim)));
    add_sample_channel_(grads.x, grad_means, in.cdim, 1.0 / count);
  }
  return grads;
}

// The generator and activation in ordinary differentiable ATen ops (acon_c
// as acon_cuda.reference computes it): the backward under create_graph=True
// differentiates this, so that the gradients are differentiable.
at::Tensor differentiable_meta_acon_c(const NodeInputs& in) {
  const PerInput<at::Tensor>& t = in.tensors;
  // The running statistics are saved only where used (see save).
  const auto normalise =
      [](const at::Tensor& v, const at::Tensor& weight, const at::Tensor& bias, const BatchNormMode& m) {
        return at::batch_norm(v, weight, bias, m.running_mean, m.running_var, m.use_batch_stats, 0.0, m.eps, false);
      };
  const at::Tensor x = in.input_bn ? normalise(t.x, t.input_bn_weight, t.input_bn_bias, in.input_bn_mode) : t.x;
  const std::vector<int64_t> axes = reduced_axes(x, in.cdim);
  const at::ScalarType opmath = opmath_dtype(x);
  at::Tensor h = axes.empty() ? x : at::mean(x, axes, false, opmath).to(x.scalar_type());
  h = at::linear(h, t.w1.flatten(1), t.b1);
  if (in.norm) {
    h = normalise(h, t.bn1_weight, t.bn1_bias, in.bn1);
  }
  h = at::linear(h, t.w2.flatten(1), t.b2);
  if (in.norm) {
    h = normalise(h, t.bn2_weight, t.bn2_bias, in.bn2);
  }
  std::vector<int64_t> shape(x.dim(), 1);
  shape[in.cdim] = x.size(in.cdim);
  const at::Tensor xo = x.to(opmath);
  const at::Tensor p2 = t.p2.reshape(shape).to(opmath);
  const at::Tensor d = t.p1.reshape(shape).to(opmath) - p2;
  shape[0] = x.size(0);
  const at::Tensor bd = h.sigmoid().reshape(shape).to(opmath) * d;
  return (xo * (d * at::sigmoid(bd * xo) + p2)).to(x.scalar_type());
}

// The tensors of `in` that get an edge, in the order autograd numbers them:
// those of in_order that are present, then the running statistics (whose
// edges no gradient takes).
variable_list autograd_inputs(const NodeInputs& in) {
  variable_list tensors;
  for (const at::Tensor* t : in_order(in.tensors)) {
    if (t->defined()) {
      tensors.push_back(*t);
    }
  }
  for (const at::Tensor* t :
       {&in.bn1.running_mean,
        &in.bn1.running_var,
        &in.bn2.running_mean,
        &in.bn2.running_var,
        &in.input_bn_mode.running_mean,
        &in.input_bn_mode.running_var}) {
    if (t->defined()) {
      tensors.push_back(*t);
    }
  }
  return tensors;
}

// Meta-ACON as one autograd node, in C++: an eager call costs one op call
// from Python, and the backward no Python at all.
class MetaAconCNode : public torch::autograd::Function<MetaAconCNode> {
 public:
  // Autograd gives an edge only to a tensor passed to apply as an argument
  // of its own: `tensors` is autograd_inputs(in), passed for their edges
  // (forward reads only their count); `in` names them.
  static at::Tensor forward(AutogradContext* ctx, at::TensorList tensors, const NodeInputs& in) {
    const PerInput<at::Tensor>& t = in.tensors;
    GeneratorSaved s;
    at::Tensor y;
    if (in.input_bn) {
      // The generator runs between the fused passes, on the means of the
      // BatchNorm's output that the statistics pass gives.
      const cpu::NormAconCForward out =
          cpu::batch_norm_acon_c_forward(t.x, input_norm_args(in), t.p1, t.p2, at::Tensor(), [&](const at::Tensor& m) {
            generate(in, m, s);
            return s.beta;
          });
      y = out.y;
      s.input_bn_mean = out.save_mean;
      s.input_bn_invstd = out.save_invstd;
      s.sample_offsets = out.sample_offsets;
    } else {
      generate(in, sample_channel_means(t.x, in.cdim), s);
      y = call_acon_c_forward(t.x, t.p1, t.p2, s.beta, in.cdim);
    }
    save(ctx, in, s);
    ctx->saved_data["autograd_inputs"] = static_cast<int64_t>(tensors.size());
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto [in, saved] = restore(ctx);
    const auto inputs = in_order(in.tensors);
    PerInput<bool> wanted{};
    const auto wants = in_order(wanted);
    size_t edge = 0;
    for (size_t i = 0; i < inputs.size(); ++i) {
      if (inputs[i]->defined()) {
        *wants[i] = ctx->needs_input_grad(edge++);
      }
    }
    PerInput<at::Tensor> grads;
    const auto grad_of = in_order(grads);
    if (at::GradMode::is_enabled()) {
      // create_graph=True: differentiate the recomputation.
      variable_list differentiated;
      for (size_t i = 0; i < inputs.size(); ++i) {
        if (*wants[i]) {
          differentiated.push_back(*inputs[i]);
        }
      }
      const variable_list got =
          torch::autograd::grad({differentiable_meta_acon_c(in)}, differentiated, {grad_outputs[0]}, true, true, true);
      size_t next = 0;
      for (size_t i = 0; i < inputs.size(); ++i) {
        if (*wants[i]) {
          *grad_of[i] = got[next++];
        }
      }
    } else {
      grads = meta_acon_c_backward(grad_outputs[0], in, saved, wanted);
    }
    // One gradient per argument of apply: one per edge, in autograd_inputs'
    // order, then none for `in`.
    variable_list out;
    for (size_t i = 0; i < inputs.size(); ++i) {
      if (inputs[i]->defined()) {
        out.push_back(*wants[i] ? *grad_of[i] : at::Tensor());
      }
    }
    out.resize(ctx->saved_data["autograd_inputs"].toInt() + 1);
    return out;
  }
};

// One BatchNorm of the generator as nn.BatchNorm2d holds it, less its weight
// and bias (in PerInput): buffers (undefined: None) and settings.
struct BatchNormModule {
  at::Tensor running_mean, running_var, num_batches_tracked;
  bool training = false, track_running_stats = false;
  std::optional<double> momentum; // none: a cumulative moving average
  double eps = 0.0;
};

// What nn.BatchNorm2d.forward passes to F.batch_norm: the running statistics
// to use and update (none in training without track_running_stats), whether
// to normalise with batch statistics, and the momentum (count_batch sets a
// cumulative one). batch_norm_mode and count_batch together are the twin of
// acon_cuda.meta_acon.batch_norm_mode, which the traced path keeps.
BatchNormMode batch_norm_mode(const BatchNormModule& bn) {
  BatchNormMode mode{bn.running_mean, bn.running_var, false, bn.momentum.value_or(0.0), bn.eps};
  mode.use_batch_stats = bn.training || (!bn.running_mean.defined() && !bn.running_var.defined());
  if (bn.training && !bn.track_running_stats) {
    mode.running_mean = mode.running_var = at::Tensor();
  }
  return mode;
}

// The forward's one change to state before the node runs: the batch counted
// in num_batches_tracked, which sets a cumulative momentum.
void count_batch(BatchNormMode& mode, const BatchNormModule& bn) {
  if (!bn.training || !bn.track_running_stats || !bn.num_batches_tracked.defined()) {
    return;
  }
  const at::Tensor& count = bn.num_batches_tracked;
  double batches;
  if (count.is_cpu() && count.scalar_type() == at::kLong && count.numel() == 1) {
    // In place without an add_ call (a few us each, twice per step). The
    // version first: it raises for an inference tensor, before any change.
    torch::autograd::impl::bump_version(count);
    batches = static_cast<double>(++*count.mutable_data_ptr<int64_t>());
  } else {
    count.add_(1);
    batches = bn.momentum ? 0.0 : count.item<double>();
  }
  if (!bn.momentum) {
    mode.momentum = 1.0 / batches;
  }
}

// Every argument of _meta_acon_c that the forward reads, checked before
// count_batch or a BatchNorm changes any buffer: a call that raises changes
// no state. Errors name the argument.
void check_meta_acon_c_args(
    const PerInput<at::Tensor>& in,
    bool norm,
    const BatchNormModule& bn1,
    const BatchNormModule& bn2,
    int64_t channel_dim) {
  const at::Tensor& x = in.x;
  TORCH_CHECK_VALUE(x.dim() >= 2 && x.numel() > 0, "MetaAconC: x must be a non-empty tensor of rank >= 2");
  TORCH_CHECK(
      x.is_cpu() || x.is_cuda(),
      "MetaAconC: x is on ",
      x.device(),
      "; the op runs on CPU and CUDA tensors (MetaAconC takes ordinary ops elsewhere)");
  TORCH_CHECK_VALUE(channel_dim != 0 && channel_dim != -x.dim(), "MetaAconC: channel_dim must not be the batch axis 0");
  // p1, p2, dtype and channel_dim as acon_c checks them (beta is generated).
  const int64_t cdim = check_acon_c_args(x, in.p1, in.p2, at::Tensor(), channel_dim);
  const int64_t channels = x.size(cdim);
  // A counter may also live on the CPU (count_batch adds to it where it is).
  const auto check_on_x_device = [&](const char* name, const at::Tensor& t, bool or_cpu = false) {
    TORCH_CHECK(
        t.device() == x.device() || (or_cpu && t.is_cpu()),
        "MetaAconC: ",
        name,
        " is on ",
        t.device(),
        " but x is on ",
        x.device(),
        "; move the whole module");
  };
  // The generator's products take x's dtype.
  const auto check_matrix = [&](const char* name, const at::Tensor& w, int64_t rows, int64_t cols) {
    check_on_x_device(name, w);
    TORCH_CHECK_TYPE(
        w.scalar_type() == x.scalar_type(),
        "MetaAconC: x is ",
        x.scalar_type(),
        " but ",
        name,
        " is ",
        w.scalar_type(),
        "; convert the module (module.to(dtype)) or run under autocast");
    TORCH_CHECK_VALUE(
        w.dim() >= 2 && w.size(0) == rows && w.size(1) == cols && w.numel() == rows * cols,
        "MetaAconC: ",
        name,
        " must have shape (",
        rows,
        ", ",
        cols,
        ") or (",
        rows,
        ", ",
        cols,
        ", 1, 1) for x with C = ",
        channels,
        " channels; got shape ",
        w.sizes());
  };
  // Undefined: the module has none.
  // A BatchNorm's tensors take what at::native_batch_norm takes on every
  // device: x's dtype, or float32 for 16-bit x (the CPU loops take any).
  const bool half_x = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  const auto check_vector = [&](const char* name, const at::Tensor& t, int64_t size, bool x_dtype) {
    if (!t.defined()) {
      return;
    }
    check_on_x_device(name, t);
    TORCH_CHECK_TYPE(
        t.scalar_type() == x.scalar_type() || (!x_dtype && half_x && t.scalar_type() == at::kFloat),
        "MetaAconC: ",
        name,
        " must be ",
        x_dtype ? "of x's dtype (" : "of x's dtype, or float32 for 16-bit x (x is ",
        x.scalar_type(),
        "), got ",
        t.scalar_type());
    TORCH_CHECK_VALUE(
        t.dim() == 1 && t.size(0) == size, "MetaAconC: ", name, " must have shape (", size, ",), got ", t.sizes());
  };
  // count_batch adds 1 in place and may read the count back.
  const auto check_counter = [&](const char* name, const at::Tensor& t) {
    if (!t.defined()) {
      return;
    }
    check_on_x_device(name, t, true);
    TORCH_CHECK_VALUE(
        t.numel() == 1 && !at::isComplexType(t.scalar_type()) && t.scalar_type() != at::kBool,
        "MetaAconC: ",
        name,
        " must be a one-element number tensor, got shape ",
        t.sizes(),
        " of ",
        t.scalar_type());
    TORCH_CHECK(
        !t.is_inference(),
        "MetaAconC: ",
        name,
        " is an inference tensor, which cannot be updated outside torch.inference_mode "
        "(the module was created or loaded under inference mode)");
  };
  TORCH_CHECK_VALUE(
      in.w1.dim() >= 2,
      "MetaAconC: fc1.weight (w1) must have shape (hidden, C) or (hidden, C, 1, 1), got ",
      in.w1.sizes());
  const int64_t hidden = in.w1.size(0);
  check_matrix("fc1.weight (w1)", in.w1, hidden, channels);
  check_vector("fc1.bias (b1)", in.b1, hidden, true);
  check_matrix("fc2.weight (w2)", in.w2, channels, hidden);
  check_vector("fc2.bias (b2)", in.b2, channels, true);
  if (norm) {
    check_vector("bn1.weight", in.bn1_weight, hidden, false);
    check_vector("bn2.weight", in.bn2_weight, channels, false);
    check_vector("bn1.bias", in.bn1_bias, hidden, false);
    check_vector("bn2.bias", in.bn2_bias, channels, false);
    check_vector("bn1.running_mean", bn1.running_mean, hidden, false);
    check_vector("bn2.running_mean", bn2.running_mean, channels, false);
    check_vector("bn1.running_var", bn1.running_var, hidden, false);
    check_vector("bn2.running_var", bn2.running_var, channels, false);
    check_counter("bn1.num_batches_tracked", bn1.num_batches_tracked);
    check_counter("bn2.num_batches_tracked", bn2.num_batches_tracked);
  }
}

at::Tensor opt(const std::optional<at::Tensor>& t) {
  return t.value_or(at::Tensor());
}

// The _meta_acon_c schema's arguments (csrc/acon.cpp), in its order, after
// the BatchNorm of x for _batch_norm_meta_acon_c (none for _meta_acon_c).
at::Tensor meta_acon_c_node(
    const std::optional<cpu::NormArgs>& input_bn,
    const at::Tensor& x,
    const at::Tensor& p1,
    const at::Tensor& p2,
    const at::Tensor& w1,
    const std::optional<at::Tensor>& b1,
    const at::Tensor& w2,
    const std::optional<at::Tensor>& b2,
    int64_t channel_dim,
    bool norm,
    const std::optional<at::Tensor>& bn1_weight,
    const std::optional<at::Tensor>& bn1_bias,
    const std::optional<at::Tensor>& bn1_running_mean,
    const std::optional<at::Tensor>& bn1_running_var,
    const std::optional<at::Tensor>& bn1_num_batches_tracked,
    bool bn1_training,
    bool bn1_track_running_stats,
    std::optional<double> bn1_momentum,
    double bn1_eps,
    const std::optional<at::Tensor>& bn2_weight,
    const std::optional<at::Tensor>& bn2_bias,
    const std::optional<at::Tensor>& bn2_running_mean,
    const std::optional<at::Tensor>& bn2_running_var,
    const std::optional<at::Tensor>& bn2_num_batches_tracked,
    bool bn2_training,
    bool bn2_track_running_stats,
    std::optional<double> bn2_momentum,
    double bn2_eps) {
  NodeInputs in;
  // Without norm no BatchNorm argument is read: none gets an edge or is saved.
  const auto bn_param = [&](const std::optional<at::Tensor>& t) { return norm ? opt(t) : at::Tensor(); };
  in.tensors = {
      x,
      p1,
      p2,
      w1,
      opt(b1),
      w2,
      opt(b2),
      bn_param(bn1_weight),
      bn_param(bn1_bias),
      bn_param(bn2_weight),
      bn_param(bn2_bias),
      input_bn ? input_bn->weight : at::Tensor(),
      input_bn ? input_bn->bias : at::Tensor()};
  in.norm = norm;
  const BatchNormModule bn1{
      opt(bn1_running_mean),
      opt(bn1_running_var),
      opt(bn1_num_batches_tracked),
      bn1_training,
      bn1_track_running_stats,
      bn1_momentum,
      bn1_eps};
  const BatchNormModule bn2{
      opt(bn2_running_mean),
      opt(bn2_running_var),
      opt(bn2_num_batches_tracked),
      bn2_training,
      bn2_track_running_stats,
      bn2_momentum,
      bn2_eps};
  check_meta_acon_c_args(in.tensors, norm, bn1, bn2, channel_dim);
  in.cdim = at::maybe_wrap_dim(channel_dim, x.dim());
  if (input_bn) {
    TORCH_CHECK(x.is_cpu(), "_batch_norm_meta_acon_c: x is on ", x.device(), "; the fused op runs on the CPU only");
    TORCH_CHECK_VALUE(in.cdim == 1, "_batch_norm_meta_acon_c: the channel axis must be 1, the BatchNorm's");
    cpu::check_batch_norm_acon_c_args(x, p1, p2, at::Tensor(), *input_bn);
    in.input_bn = true;
    in.input_bn_mode = {
        input_bn->running_mean, input_bn->running_var, input_bn->training, input_bn->momentum, input_bn->eps};
  }
  if (norm) {
    in.bn1 = batch_norm_mode(bn1);
    in.bn2 = batch_norm_mode(bn2);
    TORCH_CHECK_VALUE(
        x.size(0) > 1 || !(in.bn1.use_batch_stats || in.bn2.use_batch_stats),
        "MetaAconC: a BatchNorm with batch statistics cannot normalise a batch of 1");
    count_batch(in.bn1, bn1);
    count_batch(in.bn2, bn2);
  }
  return MetaAconCNode::apply(at::TensorList(autograd_inputs(in)), in);
}

at::Tensor meta_acon_c_autograd(
    const at::Tensor& x,
    const at::Tensor& p1,
    const at::Tensor& p2,
    const at::Tensor& w1,
    const std::optional<at::Tensor>& b1,
    const at::Tensor& w2,
    const std::optional<at::Tensor>& b2,
    int64_t channel_dim,
    bool norm,
    const std::optional<at::Tensor>& bn1_weight,
    const std::optional<at::Tensor>& bn1_bias,
    const std::optional<at::Tensor>& bn1_running_mean,
    const std::optional<at::Tensor>& bn1_running_var,
    const std::optional<at::Tensor>& bn1_num_batches_tracked,
    bool bn1_training,
    bool bn1_track_running_stats,
    std::optional<double> bn1_momentum,
    double bn1_eps,
    const std::optional<at::Tensor>& bn2_weight,
    const std::optional<at::Tensor>& bn2_bias,
    const std::optional<at::Tensor>& bn2_running_mean,
    const std::optional<at::Tensor>& bn2_running_var,
    const std::optional<at::Tensor>& bn2_num_batches_tracked,
    bool bn2_training,
    bool bn2_track_running_stats,
    std::optional<double> bn2_momentum,
    double bn2_eps) {
  return meta_acon_c_node(
      std::nullopt,
      x,
      p1,
      p2,
      w1,
      b1,
      w2,
      b2,
      channel_dim,
      norm,
      bn1_weight,
      bn1_bias,
      bn1_running_mean,
      bn1_running_var,
      bn1_num_batches_tracked,
      bn1_training,
      bn1_track_running_stats,
      bn1_momentum,
      bn1_eps,
      bn2_weight,
      bn2_bias,
      bn2_running_mean,
      bn2_running_var,
      bn2_num_batches_tracked,
      bn2_training,
      bn2_track_running_stats,
      bn2_momentum,
      bn2_eps);
}

// The _batch_norm_meta_acon_c schema's arguments: the BatchNorm of x as
// F.batch_norm takes it (training: batch statistics), then _meta_acon_c's
// but channel_dim (1).
at::Tensor batch_norm_meta_acon_c_autograd(
    const at::Tensor& x,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    bool training,
    double momentum,
    double eps,
    const at::Tensor& p1,
    const at::Tensor& p2,
    const at::Tensor& w1,
    const std::optional<at::Tensor>& b1,
    const at::Tensor& w2,
    const std::optional<at::Tensor>& b2,
    bool norm,
    const std::optional<at::Tensor>& bn1_weight,
    const std::optional<at::Tensor>& bn1_bias,
    const std::optional<at::Tensor>& bn1_running_mean,
    const std::optional<at::Tensor>& bn1_running_var,
    const std::optional<at::Tensor>& bn1_num_batches_tracked,
    bool bn1_training,
    bool bn1_track_running_stats,
    std::optional<double> bn1_momentum,
    double bn1_eps,
    const std::optional<at::Tensor>& bn2_weight,
    const std::optional<at::Tensor>& bn2_bias,
    const std::optional<at::Tensor>& bn2_running_mean,
    const std::optional<at::Tensor>& bn2_running_var,
    const std::optional<at::Tensor>& bn2_num_batches_tracked,
    bool bn2_training,
    bool bn2_track_running_stats,
    std::optional<double> bn2_momentum,
    double bn2_eps) {
  const cpu::NormArgs input_bn{opt(weight), opt(bias), opt(running_mean), opt(running_var), training, momentum, eps};
  return meta_acon_c_node(
      input_bn,
      x,
      p1,
      p2,
      w1,
      b1,
      w2,
      b2,
      1,
      norm,
      bn1_weight,
      bn1_bias,
      bn1_running_mean,
      bn1_running_var,
      bn1_num_batches_tracked,
      bn1_training,
      bn1_track_running_stats,
      bn1_momentum,
      bn1_eps,
      bn2_weight,
      bn2_bias,
      bn2_running_mean,
      bn2_running_var,
      bn2_num_batches_tracked,
      bn2_training,
      bn2_track_running_stats,
      bn2_momentum,
      bn2_eps);
}

} // namespace
} // namespace acon_cuda

TORCH_LIBRARY_IMPL(acon, Autograd, m) {
  m.impl("_meta_acon_c", &acon_cuda::meta_acon_c_autograd);
  m.impl("_batch_norm_meta_acon_c", &acon_cuda::batch_norm_meta_acon_c_autograd);
}
