// Meta-ACON in eager code: one op, acon::_meta_acon_c, whose autograd node is
// C++ (MetaAconCNode below), so that a training step costs one op call from
// Python and no Python in the backward: on small maps ~30 Python-level calls
// per step cost more than every kernel together.
//
// beta = sigmoid(bn2(fc2(bn1(fc1(mean(x)))))) on (N, C) matrices: the 1x1
// convolutions as matrix products on views of their weights, the BatchNorms
// on (N, hidden) and (N, C) values, each BatchNorm's mode resolved here as
// nn.BatchNorm2d.forward does. The traced path (meta_acon_c_plain in
// acon_cuda/meta_acon.py) computes the same in ordinary ops.
#include "acon_c.h"
#include "cpu/meta_acon_c_cpu.h"

#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace acon_cuda {
namespace {

// Whether no TorchDispatchMode is active (the Python key in the thread's
// included set; BackendSelect and ADInplaceOrView are always there). Under a
// mode the generator's products and sums run as ATen ops on this thread: a
// mode must see them, and the pool's threads do not carry it.
bool plain_dispatch() {
  return !c10::impl::tls_local_dispatch_key_set().included_.has(c10::DispatchKey::Python);
}

// Whether product(a, b, bias) runs in cpu::small_product's plain loops.
bool small_product_runs(const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias = {}) {
  return plain_dispatch() && cpu::is_small_product(a, b, bias);
}

// bias + a @ b (bias undefined: none). On the CPU small products run in
// plain loops (cpu::small_product), and large ones are cut
// into one block of rows or columns per thread, each an ordinary BLAS call:
// BLAS libraries hardly parallelise these short products (N rows, N the
// batch), which made them the generator's largest cost on 2 cores. Each
// output element is still computed by one call, so results do not depend on
// timing.
at::Tensor product(const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias = {}) {
  if (small_product_runs(a, b, bias)) {
    return cpu::small_product(a, b, bias);
  }
  const bool plain = plain_dispatch();
  const int64_t rows = a.size(0);
  const int64_t cols = b.size(1);
  const int64_t threads = a.is_cpu() && plain ? at::get_num_threads() : 1;
  // Below ~1 MFLOP the threads' start-up costs more than they save.
  if (threads < 2 || rows * cols * a.size(1) < (int64_t{1} << 19)) {
    return bias.defined() ? at::addmm(bias, a, b) : at::mm(a, b);
  }
  at::Tensor out = at::empty({rows, cols}, a.options());
  const bool by_rows = rows >= cols;
  const int64_t length = by_rows ? rows : cols;
  const int64_t parts = std::min(threads, length);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    // Grad mode is per thread and on by default in the pool's threads (the
    // caller's is off: a node's forward or backward).
    const at::NoGradGuard no_grad;
    for (int64_t part = begin; part < end; ++part) {
      const int64_t start = length * part / parts;
      const int64_t size = length * (part + 1) / parts - start;
      const at::Tensor a_part = by_rows ? a.narrow(0, start, size) : a;
      const at::Tensor b_part = by_rows ? b : b.narrow(1, start, size);
      at::Tensor out_part = out.narrow(by_rows ? 0 : 1, start, size);
      if (bias.defined()) {
        at::addmm_out(out_part, by_rows ? bias : bias.narrow(0, start, size), a_part, b_part);
      } else {
        at::mm_out(out_part, a_part, b_part);
      }
    }
  });
  return out;
}

// Every axis of x but the batch (0) and cdim: those the mean runs over.
std::vector<int64_t> reduced_axes(const at::Tensor& x, int64_t cdim) {
  std::vector<int64_t> axes;
  for (int64_t i = 1; i < x.dim(); ++i) {
    if (i != cdim) {
      axes.push_back(i);
    }
  }
  return axes;
}

bool present(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

// The mean of x over every axis but batch and channel, (N, C), in x's dtype.
// 16-bit x is summed in float32 (a float16 sum of a large map overflows).
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

// a.sum(0) of a (rows, cols) matrix: a bias's gradient.
at::Tensor column_sums(const at::Tensor& a) {
  return plain_dispatch() && cpu::is_small_column_sum(a) ? cpu::column_sums(a) : a.sum(0);
}

// grad_x[n, ..., c, ...] += scale * term[n, c], in place, in one
// broadcasting pass (a kernel of ours was no faster on the CPU).
void add_sample_channel_(const at::Tensor& grad_x, const at::Tensor& term, int64_t cdim, double scale) {
  std::vector<int64_t> shape(grad_x.dim(), 1);
  shape[0] = grad_x.size(0);
  shape[cdim] = grad_x.size(cdim);
  grad_x.add_(term.view(shape), scale);
}

at::Tensor opt(const std::optional<at::Tensor>& t) {
  return t.value_or(at::Tensor());
}

// at::native_batch_norm on (N, F) values; on the CPU its own loops (ATen's
// set-up costs more than the arithmetic at these sizes).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm(
    const at::Tensor& input,
    const at::Tensor& weight,
    const at::Tensor& bias,
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    bool use_batch_stats,
    double momentum,
    double eps) {
  // native_batch_norm does not check these (a wrong size reads and writes
  // out of bounds); nn.BatchNorm2d's forward would raise.
  const int64_t features = input.size(1);
  for (const at::Tensor* t : {&weight, &bias, &running_mean, &running_var}) {
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
    return cpu::batch_norm_rows(input, weight, bias, running_mean, running_var, use_batch_stats, momentum, eps);
  }
  return at::native_batch_norm(input, weight, bias, running_mean, running_var, use_batch_stats, momentum, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    const at::Tensor& weight,
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    const at::Tensor& save_mean,
    const at::Tensor& save_invstd,
    bool use_batch_stats,
    double eps,
    std::array<bool, 3> output_mask) {
  if (input.is_cpu()) {
    return cpu::batch_norm_rows_backward(
        grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, use_batch_stats, eps, output_mask);
  }
  return at::native_batch_norm_backward(
      grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, use_batch_stats, eps, output_mask);
}

// Gradients of [x, p1, p2, fc1 weight, fc1 bias, fc2 weight, fc2 bias,
// bn1 weight, bn1 bias, bn2 weight, bn2 bias], each defined where
// output_mask asks for it (others may be too). `saved`: beta, the mean, fc1's
// output, bn1's output, fc2's output, bn1's save_mean and save_invstd, bn2's
// (the last six empty without norm), as MetaAconCNode::forward saves them.
std::vector<at::Tensor> meta_acon_c_backward(
    const at::Tensor& grad_y,
    const at::Tensor& x,
    const at::Tensor& p1,
    const at::Tensor& p2,
    const at::Tensor& w1,
    const at::Tensor& w2,
    const std::optional<at::Tensor>& bn1_weight,
    const std::optional<at::Tensor>& bn1_running_mean,
    const std::optional<at::Tensor>& bn1_running_var,
    const std::optional<at::Tensor>& bn2_weight,
    const std::optional<at::Tensor>& bn2_running_mean,
    const std::optional<at::Tensor>& bn2_running_var,
    at::TensorList saved,
    bool norm,
    std::array<bool, 2> batch_stats,
    at::ArrayRef<double> eps,
    int64_t channel_dim,
    std::array<bool, 11> output_mask) {
  TORCH_INTERNAL_ASSERT(saved.size() == 9, "meta_acon_c_backward: saved must hold the forward's 9 tensors");
  const int64_t cdim = at::maybe_wrap_dim(channel_dim, x.dim());
  const at::Tensor &beta = saved[0], &mean = saved[1], &fc1 = saved[2], &bn1_out = saved[3], &fc2_out = saved[4];
  const at::Tensor& fc2_in = norm ? bn1_out : fc1;
  const bool want_x = output_mask[0];
  bool want_generator = want_x;
  for (size_t i = 3; i < output_mask.size(); ++i) {
    want_generator = want_generator || output_mask[i];
  }
  const bool want_p = output_mask[1] || output_mask[2];
  std::vector<at::Tensor> grads(11);
  auto [dx, dp1, dp2, dbeta] = call_acon_c_backward(grad_y, x, p1, p2, beta, cdim, {want_x, want_p || want_generator});
  grads[0] = dx;
  grads[1] = dp1;
  grads[2] = dp2;
  if (want_generator) {
    at::Tensor grad = at::sigmoid_backward(dbeta.view(beta.sizes()), beta);
    if (norm) {
      std::tie(grad, grads[9], grads[10]) = batch_norm_backward(
          grad,
          fc2_out,
          opt(bn2_weight),
          opt(bn2_running_mean),
          opt(bn2_running_var),
          saved[7],
          saved[8],
          batch_stats[1],
          eps[1],
          {true, output_mask[9], output_mask[10]});
    }
    if (output_mask[5]) {
      grads[5] = product(grad.t(), fc2_in).view(w2.sizes());
    }
    if (output_mask[6]) {
      grads[6] = column_sums(grad);
    }
    grad = product(grad, w2.flatten(1));
    if (norm) {
      std::tie(grad, grads[7], grads[8]) = batch_norm_backward(
          grad,
          fc1,
          opt(bn1_weight),
          opt(bn1_running_mean),
          opt(bn1_running_var),
          saved[5],
          saved[6],
          batch_stats[0],
          eps[0],
          {true, output_mask[7], output_mask[8]});
    }
    if (output_mask[4]) {
      grads[4] = column_sums(grad);
    }
    if (output_mask[3]) {
      // Large: (mean^T grad)^T, the product with the narrow (hidden-wide)
      // output; grad^T mean (a wide output) ran 3x slower on 2 threads here.
      // Small (plain loops): grad^T mean, in the weight's own layout, which
      // AccumulateGrad then takes without a copy.
      const at::Tensor grad_t = grad.t();
      grads[3] = small_product_runs(grad_t, mean) ? product(grad_t, mean).view(w1.sizes())
                                                  : product(mean.t(), grad).t().view(w1.sizes());
    }
    if (want_x) {
      // The mean's gradient, the same along the reduced axes: added into the
      // acon op's dx in place, by one broadcasting pass.
      const double count = static_cast<double>(x.numel() / (x.size(0) * x.size(cdim)));
      add_sample_channel_(dx, product(grad, w1.flatten(1)), cdim, 1.0 / count);
    }
  }
  return grads;
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The generator and activation in ordinary differentiable ATen ops (acon_c
// as acon_cuda.reference computes it): the backward under create_graph=True
// differentiates this, so that the gradients are differentiable.
at::Tensor differentiable_meta_acon_c(
    const variable_list& p, // x, p1, p2, w1, b1, w2, b2, bn1 weight, bias, bn2 weight, bias
    const at::Tensor running[4],
    bool norm,
    std::array<bool, 2> batch_stats,
    const std::vector<double>& eps,
    int64_t cdim) {
  const at::Tensor& x = p[0];
  const std::vector<int64_t> axes = reduced_axes(x, cdim);
  const at::ScalarType opmath = opmath_dtype(x);
  at::Tensor h = axes.empty() ? x : at::mean(x, axes, false, opmath).to(x.scalar_type());
  const auto batch_norm = [&](const at::Tensor& v, int i) {
    const bool use_batch = batch_stats[i];
    return at::batch_norm(
        v,
        p[7 + 2 * i],
        p[8 + 2 * i],
        use_batch ? at::Tensor() : running[2 * i],
        use_batch ? at::Tensor() : running[2 * i + 1],
        use_batch,
        0.0,
        eps[i],
        false);
  };
  h = at::linear(h, p[3].flatten(1), p[4]);
  if (norm) {
    h = batch_norm(h, 0);
  }
  h = at::linear(h, p[5].flatten(1), p[6]);
  if (norm) {
    h = batch_norm(h, 1);
  }
  std::vector<int64_t> shape(x.dim(), 1);
  shape[cdim] = x.size(cdim);
  const at::Tensor xo = x.to(opmath);
  const at::Tensor p2 = p[2].reshape(shape).to(opmath);
  const at::Tensor d = p[1].reshape(shape).to(opmath) - p2;
  shape[0] = x.size(0);
  const at::Tensor bd = h.sigmoid().reshape(shape).to(opmath) * d;
  return (xo * (d * at::sigmoid(bd * xo) + p2)).to(x.scalar_type());
}

// Meta-ACON as one autograd node, in C++: an eager call costs one op call
// from Python, and the backward no Python at all.
class MetaAconCNode : public torch::autograd::Function<MetaAconCNode> {
 public:
  // Inputs 0-14 are tensors (std::nullopt where the module has none): the
  // _meta_acon_c schema's, without the num_batches_tracked buffers.
  static constexpr size_t kInputs = 20;

  static at::Tensor forward(
      AutogradContext* ctx,
      const at::Tensor& x,
      const at::Tensor& p1,
      const at::Tensor& p2,
      const at::Tensor& w1,
      const std::optional<at::Tensor>& b1,
      const at::Tensor& w2,
      const std::optional<at::Tensor>& b2,
      const std::optional<at::Tensor>& bn1_weight,
      const std::optional<at::Tensor>& bn1_bias,
      const std::optional<at::Tensor>& bn1_running_mean,
      const std::optional<at::Tensor>& bn1_running_var,
      const std::optional<at::Tensor>& bn2_weight,
      const std::optional<at::Tensor>& bn2_bias,
      const std::optional<at::Tensor>& bn2_running_mean,
      const std::optional<at::Tensor>& bn2_running_var,
      bool norm,
      std::array<bool, 2> batch_stats,
      const std::vector<double>& momentum,
      const std::vector<double>& eps,
      int64_t channel_dim) {
    const int64_t cdim = at::maybe_wrap_dim(channel_dim, x.dim());
    const at::Tensor mean = sample_channel_means(x, cdim);
    const at::Tensor fc1 = product(mean, w1.flatten(1).t(), opt(b1));
    at::Tensor h = fc1;
    at::Tensor stats1[2], stats2[2], fc2_out;
    if (norm) {
      std::tie(h, stats1[0], stats1[1]) = batch_norm(
          fc1,
          opt(bn1_weight),
          opt(bn1_bias),
          opt(bn1_running_mean),
          opt(bn1_running_var),
          batch_stats[0],
          momentum[0],
          eps[0]);
    }
    fc2_out = product(h, w2.flatten(1).t(), opt(b2));
    at::Tensor g = fc2_out;
    if (norm) {
      std::tie(g, stats2[0], stats2[1]) = batch_norm(
          fc2_out,
          opt(bn2_weight),
          opt(bn2_bias),
          opt(bn2_running_mean),
          opt(bn2_running_var),
          batch_stats[1],
          momentum[1],
          eps[1]);
    }
    const at::Tensor beta = g.sigmoid_();
    // What meta_acon_c_backward takes, after the parameters: see its `saved`.
    const at::Tensor empty = at::empty({0}, x.options());
    const auto or_empty = [&](const at::Tensor& t) { return t.defined() ? t : empty; };
    ctx->save_for_backward(
        {x,
         p1,
         p2,
         w1,
         opt(b1),
         w2,
         opt(b2),
         opt(bn1_weight),
         opt(bn1_bias),
         opt(bn2_weight),
         opt(bn2_bias),
         beta,
         mean,
         fc1,
         norm ? h : empty,
         norm ? fc2_out : empty,
         or_empty(stats1[0]),
         or_empty(stats1[1]),
         or_empty(stats2[0]),
         or_empty(stats2[1]),
         // The running statistics where the backward uses them (a BatchNorm
         // without batch statistics), saved with their version, so that a
         // later forward updating them in place makes this backward raise
         // instead of using the new values.
         batch_stats[0] ? at::Tensor() : opt(bn1_running_mean),
         batch_stats[0] ? at::Tensor() : opt(bn1_running_var),
         batch_stats[1] ? at::Tensor() : opt(bn2_running_mean),
         batch_stats[1] ? at::Tensor() : opt(bn2_running_var)});
    // Absent (None) inputs have no edge: needs_input_grad counts only the
    // tensors given, so record each tensor input's edge (-1: none).
    const std::optional<at::Tensor>* optional_inputs[10] = {
        &b1,
        &b2,
        &bn1_weight,
        &bn1_bias,
        &bn1_running_mean,
        &bn1_running_var,
        &bn2_weight,
        &bn2_bias,
        &bn2_running_mean,
        &bn2_running_var};
    constexpr int kOptionalInput[10] = {4, 6, 7, 8, 9, 10, 11, 12, 13, 14};
    std::vector<int64_t> edges(15, 0);
    for (int i = 0; i < 10; ++i) {
      edges[kOptionalInput[i]] = present(*optional_inputs[i]) ? 0 : -1;
    }
    int64_t next = 0;
    for (int64_t& edge : edges) {
      edge = edge < 0 ? -1 : next++;
    }
    ctx->saved_data["edges"] = edges;
    ctx->saved_data["norm"] = norm;
    ctx->saved_data["batch_stats"] = std::vector<bool>{batch_stats[0], batch_stats[1]};
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["cdim"] = cdim;
    return call_acon_c_forward(x, p1, p2, beta, cdim);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor running[4] = {saved[20], saved[21], saved[22], saved[23]};
    const bool norm = ctx->saved_data["norm"].toBool();
    const c10::List<bool> stats = ctx->saved_data["batch_stats"].toBoolList();
    const std::array<bool, 2> batch_stats = {stats[0], stats[1]};
    const std::vector<double> eps = ctx->saved_data["eps"].toDoubleVector();
    const int64_t cdim = ctx->saved_data["cdim"].toInt();
    const std::vector<int64_t> edges = ctx->saved_data["edges"].toIntVector();
    const auto needs_grad = [&](size_t input) { return edges[input] >= 0 && ctx->needs_input_grad(edges[input]); };
    // Input index of each gradient meta_acon_c_backward computes.
    constexpr std::array<size_t, 11> kInput = {0, 1, 2, 3, 4, 5, 6, 7, 8, 11, 12};
    variable_list grads(kInputs);
    if (at::GradMode::is_enabled()) {
      // create_graph=True: differentiate the recomputation.
      const variable_list params(saved.begin(), saved.begin() + 11);
      const at::Tensor y = differentiable_meta_acon_c(params, running, norm, batch_stats, eps, cdim);
      variable_list wanted;
      std::vector<size_t> where;
      for (size_t i = 0; i < kInput.size(); ++i) {
        if (needs_grad(kInput[i])) {
          wanted.push_back(params[i]);
          where.push_back(kInput[i]);
        }
      }
      const variable_list got = torch::autograd::grad({y}, wanted, {grad_outputs[0]}, true, true, true);
      for (size_t i = 0; i < where.size(); ++i) {
        grads[where[i]] = got[i];
      }
      return grads;
    }
    std::array<bool, 11> mask{};
    for (size_t i = 0; i < kInput.size(); ++i) {
      mask[i] = needs_grad(kInput[i]);
    }
    const std::vector<at::Tensor> got = meta_acon_c_backward(
        grad_outputs[0],
        saved[0],
        saved[1],
        saved[2],
        saved[3],
        saved[5],
        saved[7],
        running[0],
        running[1],
        saved[9],
        running[2],
        running[3],
        at::TensorList(saved).slice(11, 9),
        norm,
        batch_stats,
        eps,
        cdim,
        mask);
    for (size_t i = 0; i < kInput.size(); ++i) {
      if (mask[i]) {
        grads[kInput[i]] = got[i];
      }
    }
    return grads;
  }
};

// What nn.BatchNorm2d.forward passes to F.batch_norm: the running statistics
// to use and update (none in training without track_running_stats), whether
// to normalise with batch statistics, and the momentum (None, given as NaN:
// a cumulative average, set by count_batch). batch_norm_mode and count_batch
// together are the twin of acon_cuda.meta_acon.batch_norm_mode, which the
// traced path keeps.
struct BatchNormMode {
  std::optional<at::Tensor> running_mean, running_var;
  bool use_batch_stats;
  double momentum;
};

BatchNormMode batch_norm_mode(
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    bool training,
    bool track_running_stats,
    double momentum) {
  BatchNormMode mode{running_mean, running_var, false, std::isnan(momentum) ? 0.0 : momentum};
  mode.use_batch_stats = training || (!present(running_mean) && !present(running_var));
  if (training && !track_running_stats) {
    mode.running_mean = mode.running_var = std::nullopt;
  }
  return mode;
}

// The forward's one change to state before the node runs: the batch counted
// in num_batches_tracked, which sets a cumulative (NaN) momentum.
void count_batch(
    BatchNormMode& mode,
    const std::optional<at::Tensor>& num_batches_tracked,
    bool training,
    bool track_running_stats,
    double momentum) {
  if (training && track_running_stats && present(num_batches_tracked)) {
    const at::Tensor& count = *num_batches_tracked;
    double batches;
    if (count.is_cpu() && count.scalar_type() == at::kLong && count.numel() == 1) {
      // In place without an add_ call (a few us each, twice per step). The
      // version first: it raises for an inference tensor, before any change.
      torch::autograd::impl::bump_version(count);
      batches = static_cast<double>(++*count.mutable_data_ptr<int64_t>());
    } else {
      count.add_(1);
      batches = std::isnan(momentum) ? count.item<double>() : 0.0;
    }
    if (std::isnan(momentum)) {
      mode.momentum = 1.0 / batches;
    }
  }
}

// Every argument of _meta_acon_c that the forward reads, checked before
// count_batch or a BatchNorm changes any buffer: a call that raises changes
// no state. Errors name the argument.
void check_meta_acon_c_args(
    const at::Tensor& x,
    const at::Tensor& p1,
    const at::Tensor& p2,
    const at::Tensor& w1,
    const std::optional<at::Tensor>& b1,
    const at::Tensor& w2,
    const std::optional<at::Tensor>& b2,
    const std::array<const std::optional<at::Tensor>*, 4>& bn1,
    const std::array<const std::optional<at::Tensor>*, 4>& bn2,
    bool norm,
    int64_t channel_dim) {
  TORCH_CHECK_VALUE(x.dim() >= 2 && x.numel() > 0, "MetaAconC: x must be a non-empty tensor of rank >= 2");
  TORCH_CHECK(
      x.is_cpu() || x.is_cuda(),
      "MetaAconC: x is on ",
      x.device(),
      "; the op runs on CPU and CUDA tensors (MetaAconC takes ordinary ops elsewhere)");
  TORCH_CHECK_VALUE(channel_dim != 0 && channel_dim != -x.dim(), "MetaAconC: channel_dim must not be the batch axis 0");
  // p1, p2, dtype and channel_dim as acon_c checks them (beta is generated).
  const int64_t cdim = check_acon_c_args(x, p1, p2, at::Tensor(), channel_dim);
  const int64_t channels = x.size(cdim);
  const auto check_on_x_device = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK(
        t.device() == x.device(),
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
  const auto check_vector = [&](const char* name, const std::optional<at::Tensor>& t, int64_t size, bool x_dtype) {
    if (!present(t)) {
      return;
    }
    check_on_x_device(name, *t);
    TORCH_CHECK_TYPE(
        x_dtype ? t->scalar_type() == x.scalar_type() : at::isFloatingType(t->scalar_type()),
        "MetaAconC: ",
        name,
        " must be ",
        x_dtype ? "of x's dtype" : "floating point",
        ", got ",
        t->scalar_type());
    TORCH_CHECK_VALUE(
        t->dim() == 1 && t->size(0) == size, "MetaAconC: ", name, " must have shape (", size, ",), got ", t->sizes());
  };
  TORCH_CHECK_VALUE(
      w1.dim() >= 2, "MetaAconC: fc1.weight (w1) must have shape (hidden, C) or (hidden, C, 1, 1), got ", w1.sizes());
  const int64_t hidden = w1.size(0);
  check_matrix("fc1.weight (w1)", w1, hidden, channels);
  check_vector("fc1.bias (b1)", b1, hidden, true);
  check_matrix("fc2.weight (w2)", w2, channels, hidden);
  check_vector("fc2.bias (b2)", b2, channels, true);
  if (norm) {
    constexpr const char* kBn1[4] = {"bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"};
    constexpr const char* kBn2[4] = {"bn2.weight", "bn2.bias", "bn2.running_mean", "bn2.running_var"};
    for (int i = 0; i < 4; ++i) {
      check_vector(kBn1[i], *bn1[i], hidden, false);
      check_vector(kBn2[i], *bn2[i], channels, false);
    }
  }
}

at::Tensor meta_acon_c_autograd(
    const at::Tensor& x,
    const at::Tensor& p1,
    const at::Tensor& p2,
    const at::Tensor& w1,
    const std::optional<at::Tensor>& b1,
    const at::Tensor& w2,
    const std::optional<at::Tensor>& b2,
    const std::optional<at::Tensor>& bn1_weight,
    const std::optional<at::Tensor>& bn1_bias,
    const std::optional<at::Tensor>& bn1_running_mean,
    const std::optional<at::Tensor>& bn1_running_var,
    const std::optional<at::Tensor>& bn1_num_batches_tracked,
    const std::optional<at::Tensor>& bn2_weight,
    const std::optional<at::Tensor>& bn2_bias,
    const std::optional<at::Tensor>& bn2_running_mean,
    const std::optional<at::Tensor>& bn2_running_var,
    const std::optional<at::Tensor>& bn2_num_batches_tracked,
    bool norm,
    std::array<bool, 4> bn_flags,
    std::array<double, 4> bn_values,
    int64_t channel_dim) {
  check_meta_acon_c_args(
      x,
      p1,
      p2,
      w1,
      b1,
      w2,
      b2,
      {&bn1_weight, &bn1_bias, &bn1_running_mean, &bn1_running_var},
      {&bn2_weight, &bn2_bias, &bn2_running_mean, &bn2_running_var},
      norm,
      channel_dim);
  BatchNormMode bn1{}, bn2{};
  if (norm) {
    bn1 = batch_norm_mode(bn1_running_mean, bn1_running_var, bn_flags[0], bn_flags[1], bn_values[0]);
    bn2 = batch_norm_mode(bn2_running_mean, bn2_running_var, bn_flags[2], bn_flags[3], bn_values[2]);
    TORCH_CHECK_VALUE(
        x.size(0) > 1 || !(bn1.use_batch_stats || bn2.use_batch_stats),
        "_meta_acon_c: a BatchNorm with batch statistics cannot normalise a batch of 1");
    count_batch(bn1, bn1_num_batches_tracked, bn_flags[0], bn_flags[1], bn_values[0]);
    count_batch(bn2, bn2_num_batches_tracked, bn_flags[2], bn_flags[3], bn_values[2]);
  }
  return MetaAconCNode::apply(
      x,
      p1,
      p2,
      w1,
      b1,
      w2,
      b2,
      bn1_weight,
      bn1_bias,
      bn1.running_mean,
      bn1.running_var,
      bn2_weight,
      bn2_bias,
      bn2.running_mean,
      bn2.running_var,
      norm,
      std::array<bool, 2>{bn1.use_batch_stats, bn2.use_batch_stats},
      std::vector<double>{bn1.momentum, bn2.momentum},
      std::vector<double>{bn_values[1], bn_values[3]},
      channel_dim);
}

} // namespace
} // namespace acon_cuda

TORCH_LIBRARY_FRAGMENT(acon, m) {
  // Internal, eager only: MetaAconC's forward (acon_cuda/meta_acon.py), the
  // BatchNorms given by their parameters, buffers (updated as their forward
  // updates them), bn_flags = [bn1.training, bn1.track_running_stats, bn2's]
  // and bn_values = [bn1.momentum (NaN: None), bn1.eps, bn2's]. Traced and
  // compiled code runs meta_acon_c_plain's ordinary ops instead.
  m.def(
      "_meta_acon_c(Tensor x, Tensor p1, Tensor p2, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, "
      "Tensor? bn1_weight, Tensor? bn1_bias, Tensor(a!)? bn1_running_mean, Tensor(b!)? bn1_running_var, "
      "Tensor(c!)? bn1_num_batches_tracked, Tensor? bn2_weight, Tensor? bn2_bias, Tensor(d!)? bn2_running_mean, "
      "Tensor(e!)? bn2_running_var, Tensor(f!)? bn2_num_batches_tracked, bool norm, bool[4] bn_flags, "
      "float[4] bn_values, int channel_dim) -> Tensor");
}

TORCH_LIBRARY_IMPL(acon, Autograd, m) {
  m.impl("_meta_acon_c", &acon_cuda::meta_acon_c_autograd);
}
