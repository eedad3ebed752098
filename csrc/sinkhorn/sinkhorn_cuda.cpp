// The CUDA side of the Sinkhorn entry points (sinkhorn.h): scratch buffers, the launches of a call, and their errors.
// Host code only (the kernels are in the sinkhorn_cuda_*.cu files); compiled when the CUDA part is built.
#ifdef SYMKERNELS_WITH_CUDA

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <array>
#include <mutex>
#include <stdexcept>

#include "sinkhorn/sinkhorn.h"
#include "sinkhorn/sinkhorn_cuda.h"
#include "sinkhorn/sinkhorn_cuda_launchers.h"
#include "sinkhorn/sinkhorn_cuda_plan.h"

namespace symkernels::sinkhorn_detail {
namespace {

namespace sc = sinkhorn_cuda;

sc::ElementType element_type(const char* op, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return sc::ElementType::kFloat32;
    case at::kHalf:
      return sc::ElementType::kFloat16;
    case at::kBFloat16:
      return sc::ElementType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": CUDA logits must be float16, bfloat16 or float32, got ", t.scalar_type());
  }
}

void check_cuda(const char* op, cudaError_t error, const char* what) {
  TORCH_CHECK(error == cudaSuccess, op, ": ", what, " failed: ", cudaGetErrorString(error));
}

// The device's limits that shape block launches, read once per device (attribute queries; no synchronisation).
sc::DeviceInfo device_info(const char* op, int device) {
  static std::mutex mutex;
  static std::array<sc::DeviceInfo, 64> known{};
  static std::array<bool, 64> read{};
  TORCH_CHECK(device >= 0 && device < 64, op, ": CUDA device index ", device, " out of range");
  const std::lock_guard<std::mutex> lock(mutex);
  if (!read[device]) {
    sc::DeviceInfo info{};
    info.index = device;
    check_cuda(op, cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, device),
               "reading the compute capability");
    check_cuda(op, cudaDeviceGetAttribute(&info.multiprocessors, cudaDevAttrMultiProcessorCount, device),
               "reading the multiprocessor count");
    check_cuda(op, cudaDeviceGetAttribute(&info.max_shared_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
               "reading the shared memory per block");
    known[device] = info;
    read[device] = true;
  }
  return known[device];
}

sc::CallPlan plan(const char* op, const std::vector<int64_t>& sizes, const std::vector<int64_t>& counts) {
  try {
    return sc::plan_call(sizes, counts);
  } catch (const std::invalid_argument& error) {
    TORCH_CHECK(false, op, ": ", error.what());
  }
}

struct BlockPlans {
  std::vector<sc::BlockLaunch> launches;  // one per launch group (unused for small ones)
  bool overflow = false;                  // some rows of K live in the global scratch copy
};

template <class Planner>
BlockPlans plan_blocks(const char* op, const sc::CallPlan& call, const sc::DeviceInfo& device, sc::BlockPass pass,
                       Planner planner) {
  BlockPlans plans;
  for (const sc::LaunchGroup& group : call.launches) {
    sc::BlockLaunch launch{1, 0};
    if (!group.small) {
      check_cuda(op, planner(group.max_n, group.table.num_units, device, &launch), "planning a block launch");
      TORCH_CHECK(static_cast<int64_t>(group.table.num_units) * launch.cluster <= 0x7fffffff, op,
                  ": too many matrices for one launch");
      for (int s = 0; s < group.table.num_stacks; ++s) {
        const int64_t n = group.table.slot[s].n;
        plans.overflow = plans.overflow || sc::block_rows_overflow(n, sc::block_shape(n, pass), launch);
      }
    }
    plans.launches.push_back(launch);
  }
  return plans;
}

}  // namespace

void sinkhorn_forward_cuda(const at::Tensor& logits, const std::vector<int64_t>& sizes,
                           const std::vector<int64_t>& counts, int64_t n_iter, double tau, double tol,
                           const int32_t* caps, const at::Tensor& p, const at::Tensor& cols, const at::Tensor& domain,
                           const at::Tensor& iterations) {
  const char* op = "sinkhorn_forward";
  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.device().index()).stream();
  const sc::CallPlan call = plan(op, sizes, counts);
  const sc::DeviceInfo device = device_info(op, logits.device().index());
  const BlockPlans blocks = plan_blocks(op, call, device, sc::BlockPass::kForward, sc::plan_block_forward);
  at::Tensor kernel_rows;
  if (blocks.overflow) kernel_rows = at::empty({logits.numel()}, logits.options().dtype(at::kFloat));

  sc::ForwardArgs args{};
  args.logits = logits.const_data_ptr();
  args.p = p.mutable_data_ptr();
  args.cols = cols.mutable_data_ptr<double>();
  args.domain = domain.mutable_data_ptr<int32_t>();
  args.iterations = iterations.mutable_data_ptr<int32_t>();
  args.caps = caps;
  args.kernel_rows = kernel_rows.defined() ? kernel_rows.mutable_data_ptr<float>() : nullptr;
  args.type = element_type(op, logits);
  args.n_iter = static_cast<int32_t>(n_iter);
  args.max_n = static_cast<int32_t>(cols.size(2));
  args.tau = static_cast<float>(tau);
  args.tol = static_cast<float>(tol);
  args.test = early_exit_enabled(tol) ? 1 : 0;
  for (size_t g = 0; g < call.launches.size(); ++g) {
    const sc::LaunchGroup& group = call.launches[g];
    const cudaError_t error =
        group.small ? sc::launch_small_forward(group.width, args, group.table, stream)
                    : sc::launch_block_forward(group.max_n, args, group.table, blocks.launches[g], stream);
    check_cuda(op, error, "launching a kernel");
  }
}

void sinkhorn_backward_cuda(const at::Tensor& grad_p, const at::Tensor& logits, const std::vector<int64_t>& sizes,
                            const std::vector<int64_t>& counts, const at::Tensor& cols, const at::Tensor& domain,
                            const at::Tensor& iterations, double tau, const at::Tensor& grad_logits) {
  const char* op = "sinkhorn_backward";
  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.device().index()).stream();
  const sc::CallPlan call = plan(op, sizes, counts);
  const sc::DeviceInfo device = device_info(op, logits.device().index());
  const BlockPlans blocks = plan_blocks(op, call, device, sc::BlockPass::kBackward, sc::plan_block_backward);
  const int64_t n_iter = cols.size(1);
  at::Tensor kernel_rows;
  if (blocks.overflow) kernel_rows = at::empty({logits.numel()}, logits.options().dtype(at::kFloat));
  at::Tensor row_scratch;
  at::Tensor vector_scratch;
  if (call.block_rows > 0) {
    const int64_t slots = call.block_rows * sc::row_slots(n_iter);
    row_scratch = at::empty({slots}, logits.options().dtype(at::kDouble));
    vector_scratch = at::empty({slots}, logits.options().dtype(at::kFloat));
  }

  sc::BackwardArgs args{};
  args.grad = grad_p.const_data_ptr();
  args.logits = logits.const_data_ptr();
  args.out = grad_logits.mutable_data_ptr();
  args.cols = cols.const_data_ptr<double>();
  args.domain = domain.const_data_ptr<int32_t>();
  args.iterations = iterations.const_data_ptr<int32_t>();
  args.kernel_rows = kernel_rows.defined() ? kernel_rows.mutable_data_ptr<float>() : nullptr;
  args.row_scratch = row_scratch.defined() ? row_scratch.mutable_data_ptr<double>() : nullptr;
  args.vector_scratch = vector_scratch.defined() ? vector_scratch.mutable_data_ptr<float>() : nullptr;
  args.type = element_type(op, logits);
  args.n_iter = static_cast<int32_t>(n_iter);
  args.max_n = static_cast<int32_t>(cols.size(2));
  args.tau = static_cast<float>(tau);
  for (size_t g = 0; g < call.launches.size(); ++g) {
    const sc::LaunchGroup& group = call.launches[g];
    const cudaError_t error =
        group.small ? sc::launch_small_backward(group.width, args, group.table, stream)
                    : sc::launch_block_backward(group.max_n, args, group.table, blocks.launches[g], stream);
    check_cuda(op, error, "launching a kernel");
  }
}

}  // namespace symkernels::sinkhorn_detail

#endif  // SYMKERNELS_WITH_CUDA
