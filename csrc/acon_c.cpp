#include "acon_c.h"

#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

namespace acon_cuda {
namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_param(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(
      t.device() == x.device(),
      "acon_c: ",
      name,
      " is on ",
      t.device(),
      " but x is on ",
      x.device(),
      "; move both to the same device");
  TORCH_CHECK_TYPE(
      t.scalar_type() == x.scalar_type() || t.scalar_type() == at::kFloat,
      "acon_c: ",
      name,
      " must have x's dtype (",
      x.scalar_type(),
      ") or float32, got ",
      t.scalar_type());
}

// Whether t's sizes, leaving out size-1 axes, are `expected` (also leaving
// out its 1 entries): (C,), (1, C, 1, 1) and (C, 1) all hold C values along
// one axis, (N, C, 1, 1) holds N x C, but (C, N) does not.
bool holds_along_axes(const at::Tensor& t, std::initializer_list<c10::SymInt> expected) {
  std::vector<c10::SymInt> want;
  for (const c10::SymInt& s : expected) {
    if (s != 1) {
      want.push_back(s);
    }
  }
  size_t k = 0;
  for (const c10::SymInt& s : t.sym_sizes()) {
    if (s == 1) {
      continue;
    }
    if (k == want.size() || s != want[k]) {
      return false;
    }
    ++k;
  }
  return k == want.size();
}

} // namespace

int64_t check_acon_c_args(
    const at::Tensor& x,
    const at::Tensor& p1,
    const at::Tensor& p2,
    const at::Tensor& beta,
    int64_t channel_dim,
    const at::Tensor& grad_y) {
  TORCH_CHECK_TYPE(
      is_supported_float(x.scalar_type()),
      "acon_c: x must be a float32, float64, float16 or bfloat16 tensor, got ",
      x.scalar_type());
  TORCH_CHECK_VALUE(
      x.dim() >= 2, "acon_c: x must have at least 2 dimensions (batch, channels, ...), got shape ", x.sym_sizes());
  TORCH_CHECK_VALUE(
      channel_dim >= -x.dim() && channel_dim < x.dim(),
      "acon_c: channel_dim=",
      channel_dim,
      " is out of range for x of rank ",
      x.dim(),
      " (expected -",
      x.dim(),
      " <= channel_dim < ",
      x.dim(),
      ")");
  const int64_t cdim = channel_dim < 0 ? channel_dim + x.dim() : channel_dim;
  // Symbolic sizes, so the fake kernels can run these checks under
  // torch.compile with dynamic shapes.
  const c10::SymInt channels = x.sym_size(cdim);
  const c10::SymInt batch = x.sym_size(0);

  check_param("p1", p1, x);
  check_param("p2", p2, x);
  if (beta.defined()) {
    check_param("beta", beta, x);
  }
  TORCH_CHECK_VALUE(
      holds_along_axes(p1, {channels}),
      "acon_c: p1 must hold C = x.shape[channel_dim] = ",
      channels,
      " values: shape (C,), or that with size-1 axes added such as (1, C, 1, 1); got shape ",
      p1.sym_sizes());
  TORCH_CHECK_VALUE(
      holds_along_axes(p2, {channels}),
      "acon_c: p2 must hold C = x.shape[channel_dim] = ",
      channels,
      " values: shape (C,), or that with size-1 axes added such as (1, C, 1, 1); got shape ",
      p2.sym_sizes());
  if (!beta.defined()) {
    return cdim; // Meta-ACON's generated beta: checked where it is made
  }
  TORCH_CHECK_VALUE(
      holds_along_axes(beta, {channels}) || holds_along_axes(beta, {batch, channels}),
      "acon_c: beta must have shape (C,) = (",
      channels,
      ",) (one per channel) or (N, C) = (",
      batch,
      ", ",
      channels,
      ") (one per sample and channel), or one of those with size-1 axes "
      "added such as (1, C, 1, 1) or (N, C, 1, 1); got shape ",
      beta.sym_sizes());
  TORCH_CHECK_VALUE(
      beta.sym_numel() == channels || cdim != 0,
      "acon_c: a per-sample beta needs a batch axis distinct from the channel axis, "
      "but channel_dim is 0");

  if (grad_y.defined()) {
    TORCH_CHECK(grad_y.device() == x.device(), "acon_c: grad_y is on ", grad_y.device(), " but x is on ", x.device());
    TORCH_CHECK_TYPE(
        grad_y.scalar_type() == x.scalar_type(),
        "acon_c: grad_y must have x's dtype (",
        x.scalar_type(),
        "), got ",
        grad_y.scalar_type());
    TORCH_CHECK_VALUE(
        grad_y.sym_sizes() == x.sym_sizes(),
        "acon_c: grad_y must have x's shape ",
        x.sym_sizes(),
        ", got ",
        grad_y.sym_sizes());
  }
  return cdim;
}

namespace {

// t.permute(perm).is_contiguous(), without making the view.
bool is_contiguous_in_order(const at::Tensor& t, const std::vector<int64_t>& perm) {
  int64_t expected = 1;
  for (auto it = perm.rbegin(); it != perm.rend(); ++it) {
    const int64_t size = t.size(*it);
    if (size == 0) {
      return true;
    }
    if (size != 1 && t.stride(*it) != expected) {
      return false;
    }
    expected *= size;
  }
  return true;
}

// t's dimensions in memory order, outermost first (by stride; a per-sample
// beta keeps the batch outermost, so that a group is one contiguous block).
std::vector<int64_t> memory_order(const at::Tensor& t, bool per_sample_beta) {
  std::vector<int64_t> perm(t.dim());
  std::iota(perm.begin(), perm.end(), 0);
  std::stable_sort(perm.begin() + (per_sample_beta ? 1 : 0), perm.end(), [&](int64_t a, int64_t b) {
    return t.stride(a) > t.stride(b);
  });
  return perm;
}

ChannelLayout layout_in_order(
    const at::Tensor& t,
    const std::vector<int64_t>& perm,
    int64_t channel_dim,
    bool per_sample_beta) {
  ChannelLayout layout;
  layout.channels = t.size(channel_dim);
  layout.per_sample_beta = per_sample_beta;
  const int64_t pos = std::find(perm.begin(), perm.end(), channel_dim) - perm.begin();
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (i < pos) {
      layout.outer *= t.size(perm[i]);
    } else if (i > pos) {
      layout.inner *= t.size(perm[i]);
    }
  }
  if (per_sample_beta && t.size(0) > 0) {
    layout.groups = t.size(0);
    layout.outer /= layout.groups;
  }
  return layout;
}

} // namespace

WorkTensors make_work_tensors(
    const at::Tensor& out,
    const at::Tensor& x,
    const at::Tensor& beta,
    int64_t channel_dim,
    const at::Tensor& grad_y) {
  return make_work_tensors(out, x, beta.numel() != x.size(channel_dim), channel_dim, grad_y);
}

WorkTensors make_work_tensors(
    const at::Tensor& out,
    const at::Tensor& x,
    bool per_sample_beta,
    int64_t channel_dim,
    const at::Tensor& grad_y) {
  WorkTensors w;
  std::vector<int64_t> perm = memory_order(out, per_sample_beta);
  w.out = out;
  if (!is_contiguous_in_order(out, perm)) {
    // Only reachable with a per-sample beta on a layout whose batch axis is
    // not outermost: compute in a contiguous buffer, the caller copies back.
    std::iota(perm.begin(), perm.end(), 0);
    w.out = at::empty(x.sizes(), out.options());
  }
  // The usual case, an input already in that layout, costs no tensor op.
  const auto in_layout = [&](const at::Tensor& t) {
    return t.strides() == w.out.strides() || is_contiguous_in_order(t, perm) ? t : t.permute(perm).contiguous();
  };
  w.x = in_layout(x);
  if (grad_y.defined()) {
    w.grad_y = in_layout(grad_y);
  }
  w.layout = layout_in_order(x, perm, channel_dim, per_sample_beta);
  return w;
}

std::optional<ChannelLayout> sample_channel_layout(const at::Tensor& t, int64_t channel_dim) {
  const std::vector<int64_t> perm = memory_order(t, true);
  if (!is_contiguous_in_order(t, perm)) {
    return std::nullopt;
  }
  return layout_in_order(t, perm, channel_dim, true);
}

at::Tensor values_in(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype && t.is_contiguous() ? t : t.reshape(-1).to(dtype).contiguous();
}

at::Tensor masked_out_grad(const at::Tensor& t) {
  return at::empty({0}, t.options());
}

} // namespace acon_cuda

TORCH_LIBRARY_IMPL(acon, CompositeExplicitAutograd, m) {
  m.impl(
      "acon_c_check_args",
      [](const at::Tensor& x,
         const at::Tensor& p1,
         const at::Tensor& p2,
         const at::Tensor& beta,
         int64_t channel_dim,
         const std::optional<at::Tensor>& grad_y) {
        acon_cuda::check_acon_c_args(x, p1, p2, beta, channel_dim, grad_y.value_or(at::Tensor()));
      });
}
