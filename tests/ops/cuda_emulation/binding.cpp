// Python bindings of the emulated CUDA Sinkhorn and kernel-expansion kernels, with the entry points' contract: CPU
// tensors stand in for the CUDA ones (float32, float16, bfloat16), fresh outputs filled with NaN.
#include <torch/extension.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "expansion_emulated.h"
#include "sinkhorn_emulated.h"

namespace ec = symkernels::expansion_cuda;
namespace sc = symkernels::sinkhorn_cuda;

namespace {

sc::ElementType element_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return sc::ElementType::kFloat32;
    case at::kHalf:
      return sc::ElementType::kFloat16;
    case at::kBFloat16:
      return sc::ElementType::kBFloat16;
    default:
      TORCH_CHECK(false, "emulated kernels take float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

int64_t max_size(const std::vector<int64_t>& sizes, const std::vector<int64_t>& counts) {
  int64_t max_n = 0;
  for (size_t l = 0; l < sizes.size(); ++l) {
    if (counts[l] > 0) max_n = std::max(max_n, sizes[l]);
  }
  return max_n;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& logits,
                                                                   const std::vector<int64_t>& sizes,
                                                                   const std::vector<int64_t>& counts, int64_t n_iter,
                                                                   double tau, double tol,
                                                                   const std::optional<at::Tensor>& caps,
                                                                   int64_t cluster, int64_t shared_rows,
                                                                   const std::vector<int64_t>& blocks) {
  TORCH_CHECK(logits.is_contiguous() && logits.dim() == 1, "logits must be 1-D and contiguous");
  int64_t matrices = 0;
  for (int64_t c : counts) matrices += c;
  const int64_t max_n = max_size(sizes, counts);
  auto nan = std::numeric_limits<double>::quiet_NaN();
  at::Tensor p = at::full_like(logits, nan);
  at::Tensor cols = at::full({matrices, n_iter, max_n}, nan, logits.options().dtype(at::kDouble));
  at::Tensor domain = at::full({matrices}, -7, logits.options().dtype(at::kInt));
  at::Tensor iterations = at::full({matrices}, -7, logits.options().dtype(at::kInt));
  at::Tensor kernel_rows = at::full({logits.numel()}, nan, logits.options().dtype(at::kFloat));
  at::Tensor cap_values = caps.has_value() ? caps->contiguous() : at::Tensor();
  sc::ForwardArgs a{};
  a.logits = logits.const_data_ptr();
  a.p = p.mutable_data_ptr();
  a.cols = cols.mutable_data_ptr<double>();
  a.domain = domain.mutable_data_ptr<int32_t>();
  a.iterations = iterations.mutable_data_ptr<int32_t>();
  a.caps = cap_values.defined() ? cap_values.const_data_ptr<int32_t>() : nullptr;
  a.kernel_rows = kernel_rows.mutable_data_ptr<float>();
  a.type = element_type(logits);
  a.n_iter = static_cast<int32_t>(n_iter);
  a.max_n = static_cast<int32_t>(max_n);
  a.tau = static_cast<float>(tau);
  a.tol = static_cast<float>(tol);
  a.test = tol > 0 ? 1 : 0;
  if (matrices > 0) {
    sc::emulated_forward(a, sizes, counts, {static_cast<int>(cluster), static_cast<int>(shared_rows), blocks});
  }
  return {p, cols, domain, iterations};
}

at::Tensor backward(const at::Tensor& grad_p, const at::Tensor& logits, const std::vector<int64_t>& sizes,
                    const std::vector<int64_t>& counts, const at::Tensor& cols, const at::Tensor& domain,
                    const at::Tensor& iterations, double tau, int64_t cluster, int64_t shared_rows,
                    const std::vector<int64_t>& blocks) {
  TORCH_CHECK(logits.is_contiguous() && grad_p.is_contiguous() && cols.is_contiguous(), "contiguous inputs");
  auto nan = std::numeric_limits<double>::quiet_NaN();
  at::Tensor out = at::full_like(logits, nan);
  const int64_t n_iter = cols.size(1);
  const int64_t slots = std::max<int64_t>(1, sc::emulated_block_rows(sizes, counts) * sc::row_slots(n_iter));
  at::Tensor kernel_rows = at::full({logits.numel()}, nan, logits.options().dtype(at::kFloat));
  at::Tensor row_scratch = at::full({slots}, nan, logits.options().dtype(at::kDouble));
  at::Tensor vector_scratch = at::full({slots}, nan, logits.options().dtype(at::kFloat));
  sc::BackwardArgs a{};
  a.grad = grad_p.const_data_ptr();
  a.logits = logits.const_data_ptr();
  a.out = out.mutable_data_ptr();
  a.cols = cols.const_data_ptr<double>();
  a.domain = domain.const_data_ptr<int32_t>();
  a.iterations = iterations.const_data_ptr<int32_t>();
  a.kernel_rows = kernel_rows.mutable_data_ptr<float>();
  a.row_scratch = row_scratch.mutable_data_ptr<double>();
  a.vector_scratch = vector_scratch.mutable_data_ptr<float>();
  a.type = element_type(logits);
  a.n_iter = static_cast<int32_t>(n_iter);
  a.max_n = static_cast<int32_t>(cols.size(2));
  a.tau = static_cast<float>(tau);
  if (cols.size(0) > 0) {
    sc::emulated_backward(a, sizes, counts, {static_cast<int>(cluster), static_cast<int>(shared_rows), blocks});
  }
  return out;
}

// The block launches planned for `calls` ((device, max n, matrices) each) through one plan cache, with a driver
// that counts its questions: per call (cluster, shared bytes, limit raises, last limit, fit queries so far).
std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t>> plan_block_calls(
    const std::vector<std::vector<int64_t>>& calls, bool backward, int64_t major, int64_t multiprocessors,
    int64_t max_shared_bytes, int64_t max_cluster) {
  const sc::DeviceInfo device{0, static_cast<int>(major), static_cast<int>(multiprocessors),
                              static_cast<int>(max_shared_bytes)};
  const auto pass = backward ? sc::BlockPass::kBackward : sc::BlockPass::kForward;
  std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t>> out;
  for (const sc::PlannedCall& c : sc::plan_block_calls(calls, pass, device, static_cast<int>(max_cluster))) {
    out.emplace_back(c.launch.cluster, c.launch.shared_bytes, c.limit_raises, c.limit_bytes, c.fit_queries);
  }
  return out;
}

// Whether the conv weight [O*G, I*G_in, k, k] is addressed as channels_last (else it must be contiguous).
bool channels_last(const at::Tensor& conv_weight) {
  if (conv_weight.is_contiguous()) return false;
  TORCH_CHECK(conv_weight.is_contiguous(at::MemoryFormat::ChannelsLast), "a contiguous or channels_last conv weight");
  return true;
}

// The expansion's arguments for reps [G', d, d] and weight [O, I, d] (contiguous, one dtype), the conv weight it
// writes or reads, and its plan; a positive split_rows replaces the plan's runs of the grad_reps reduction, to reach
// the partial sums on small shapes.
ec::ExpansionArgs expansion_args(const at::Tensor& reps, const at::Tensor& weight, const at::Tensor& conv_weight,
                                 bool leading_identity, int64_t split_rows, ec::ExpansionPlan& plan) {
  TORCH_CHECK(reps.is_contiguous() && weight.is_contiguous(), "contiguous inputs");
  TORCH_CHECK(reps.scalar_type() == weight.scalar_type(), "reps and weight of one dtype");
  const int64_t learned = reps.size(0);
  const int64_t groups = learned + (leading_identity ? 1 : 0);
  const int64_t d = weight.size(2);
  TORCH_CHECK(conv_weight.dim() == 4 && conv_weight.size(0) == weight.size(0) * groups &&
                  conv_weight.size(2) * conv_weight.size(3) * conv_weight.size(1) == d * weight.size(1),
              "a conv weight [O*G, I*G_in, k, k]");
  plan = ec::plan_expansion(weight.size(0), weight.size(1), groups, learned, d);
  if (split_rows > 0) {
    plan.split_rows = split_rows;
    plan.splits = std::max<int64_t>(1, ec::ceil_div(weight.size(0) * weight.size(1), split_rows));
    plan.reps_ctas = plan.splits * learned * plan.column_tiles * plan.column_tiles;
  }
  ec::ExpansionArgs a{};
  a.reps = reps.const_data_ptr();
  a.weight = weight.const_data_ptr();
  a.type = element_type(weight);
  a.kernel_type = element_type(conv_weight);
  a.channels_last = channels_last(conv_weight) ? 1 : 0;
  a.kernel_area = static_cast<int32_t>(conv_weight.size(2) * conv_weight.size(3));
  a.in_group = static_cast<int32_t>(d / a.kernel_area);
  a.out = static_cast<int32_t>(weight.size(0));
  a.in = static_cast<int32_t>(weight.size(1));
  a.groups = static_cast<int32_t>(groups);
  a.learned = static_cast<int32_t>(learned);
  a.identity = leading_identity ? 1 : 0;
  a.d = static_cast<int32_t>(d);
  a.split_rows = static_cast<int32_t>(plan.split_rows);
  a.splits = static_cast<int32_t>(plan.splits);
  return a;
}

// Writes kernel [O*G, I*G_in, k, k] (contiguous or channels_last, any of the three element types).
void expand_forward(const at::Tensor& reps, const at::Tensor& weight, bool leading_identity, const at::Tensor& kernel) {
  ec::ExpansionPlan plan{};
  ec::ExpansionArgs a = expansion_args(reps, weight, kernel, leading_identity, 0, plan);
  a.kernel = kernel.mutable_data_ptr();
  if (kernel.numel() > 0) ec::emulated_expand_forward(a, plan);
}

// (grad_reps, grad_weight) from grad [O*G, I*G_in, k, k] (contiguous or channels_last, any of the element types).
std::tuple<at::Tensor, at::Tensor> expand_backward(const at::Tensor& grad, const at::Tensor& reps,
                                                   const at::Tensor& weight, bool leading_identity,
                                                   int64_t split_rows) {
  ec::ExpansionPlan plan{};
  ec::ExpansionArgs a = expansion_args(reps, weight, grad, leading_identity, split_rows, plan);
  auto nan = std::numeric_limits<double>::quiet_NaN();
  at::Tensor grad_reps = at::full_like(reps, nan);
  at::Tensor grad_weight = at::full_like(weight, nan);
  at::Tensor partials = at::full({std::max<int64_t>(1, plan.splits * reps.numel())}, nan,
                                 weight.options().dtype(at::kFloat));
  a.grad = grad.const_data_ptr();
  a.grad_reps = grad_reps.mutable_data_ptr();
  a.grad_weight = grad_weight.mutable_data_ptr();
  a.partials = a.splits > 1 ? partials.mutable_data_ptr<float>() : nullptr;
  if (weight.numel() > 0 && a.groups > 0) ec::emulated_expand_backward(a, plan);
  return {grad_reps, grad_weight};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // blocks: the blocks of every launch to emulate (by their first block for clusters); empty: all of them.
  m.def("sinkhorn_forward", &forward, py::arg("logits"), py::arg("sizes"), py::arg("counts"), py::arg("n_iter"),
        py::arg("tau"), py::arg("tol"), py::arg("caps"), py::arg("cluster"), py::arg("shared_rows"),
        py::arg("blocks") = std::vector<int64_t>());
  m.def("sinkhorn_backward", &backward, py::arg("grad_p"), py::arg("logits"), py::arg("sizes"), py::arg("counts"),
        py::arg("cols"), py::arg("domain"), py::arg("iterations"), py::arg("tau"), py::arg("cluster"),
        py::arg("shared_rows"), py::arg("blocks") = std::vector<int64_t>());
  m.def("plan_block_calls", &plan_block_calls);
  m.def("expand_forward", &expand_forward);
  m.def("expand_backward", &expand_backward);
}
