// selora_ext CUDA kernels: multi-tensor AdamW with per-slot step counters (adam_step_).
//
// Math (notation of selora_ops.cpp): for module i and live slot k < live_rank_i (read on the device),
//   t_k = ++steps[k];  bc1 = 1 - b1^t_k;  bc2 = 1 - b2^t_k
//   p <- p (1 - lr wd);  m <- lerp(m, g, 1 - b1);  v <- b2 v + (1 - b2) g^2
//   p <- p - (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps)
// Dead slots (k >= live_rank) are not read or written. Arithmetic in float (fp32 / fp16 / bf16
// buffers) or double (fp64 buffers), as in the CPU kernel.
//
// Two launches per chunk of up to kMaxTensorsPerLaunch tensors of one dtype:
//   1. increment_slot_steps_kernel: steps[k] += 1 for live slots (one block per tensor);
//   2. adam_update_kernel: element-wise update, every element reads its slot's (already incremented)
//      step. Splitting the increment out avoids a cross-block race on steps[k].
// Tensor metadata travels as a by-value kernel argument (no host->device copy, no host sync).
// grow_capacity_ and expand_slots_ are device-generic ATen compositions registered in selora_ops.cpp.
#include "../selora_ops.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

namespace selora {
namespace {

constexpr int kMaxTensorsPerLaunch = 16;  // 16 * 120 B + header stays far below the 4 KiB parameter limit
constexpr int kUpdateThreads = 256;
constexpr int kStepThreads = 128;

struct AdamTensorMeta {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  float* slot_steps;
  const int64_t* live_rank;
  int64_t slots;     // capacity along the slot dimension
  int64_t per_slot;  // elements per slot
  // Strides along (slot, element-within-slot).
  int64_t p_ss, p_es, g_ss, g_es, m_ss, m_es, v_ss, v_es;
  int64_t step_stride;
};

struct AdamLaunchMeta {
  AdamTensorMeta tensors[kMaxTensorsPerLaunch];
};

struct AdamHyperDevice {
  double lr, beta1, beta2;
  AdamCoeffs<float> f32;   // fp32 / fp16 / bf16 buffers
  AdamCoeffs<double> f64;  // fp64 buffers
  int apply_decay;
};

// Correctly rounded arithmetic in the compute type (float or double). The explicit _rn intrinsics
// keep nvcc from contracting into FMAs, so the result matches the CPU kernel and torch.optim.AdamW
// to the last bit in most cases.
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ float sqrt_rn(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ float abs_of(float a) { return fabsf(a); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ double sqrt_rn(double a) { return __dsqrt_rn(a); }
__device__ __forceinline__ double abs_of(double a) { return fabs(a); }

template <typename T>
__device__ __forceinline__ const AdamCoeffs<T>& coeffs_of(const AdamHyperDevice& h) {
  if constexpr (std::is_same_v<T, double>) {
    return h.f64;
  } else {
    return h.f32;
  }
}

__device__ __forceinline__ int64_t clamp_live(const AdamTensorMeta& t) {
  const int64_t live = *t.live_rank;
  return live < 0 ? 0 : (live > t.slots ? t.slots : live);
}

__global__ void increment_slot_steps_kernel(AdamLaunchMeta meta) {
  const AdamTensorMeta& t = meta.tensors[blockIdx.x];
  const int64_t live = clamp_live(t);
  for (int64_t k = threadIdx.x; k < live; k += blockDim.x) {
    t.slot_steps[k * t.step_stride] += 1.0f;
  }
}

template <typename scalar_t>
__global__ void adam_update_kernel(AdamLaunchMeta meta, AdamHyperDevice h) {
  using opmath_t = adam_compute_t<scalar_t>;
  const AdamCoeffs<opmath_t>& c = coeffs_of<opmath_t>(h);
  const AdamTensorMeta& t = meta.tensors[blockIdx.y];
  const int64_t live = clamp_live(t);
  // Elements are enumerated slot-major: index = k * per_slot + j, so dead slots are never visited.
  const int64_t n_live = live * t.per_slot;
  scalar_t* p_ptr = static_cast<scalar_t*>(t.param);
  const scalar_t* g_ptr = static_cast<const scalar_t*>(t.grad);
  scalar_t* m_ptr = static_cast<scalar_t*>(t.exp_avg);
  scalar_t* v_ptr = static_cast<scalar_t*>(t.exp_avg_sq);
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n_live;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t k = idx / t.per_slot;
    const int64_t j = idx - k * t.per_slot;
    const double step = static_cast<double>(t.slot_steps[k * t.step_stride]);
    const double bias_correction1 = 1.0 - pow(h.beta1, step);
    const double bias_correction2 = 1.0 - pow(h.beta2, step);
    const opmath_t neg_step_size = static_cast<opmath_t>(-(h.lr / bias_correction1));
    const opmath_t bias_correction2_sqrt = static_cast<opmath_t>(sqrt(bias_correction2));

    const int64_t p_off = k * t.p_ss + j * t.p_es;
    const int64_t m_off = k * t.m_ss + j * t.m_es;
    const int64_t v_off = k * t.v_ss + j * t.v_es;
    opmath_t p = static_cast<opmath_t>(p_ptr[p_off]);
    const opmath_t g = static_cast<opmath_t>(g_ptr[k * t.g_ss + j * t.g_es]);
    opmath_t m = static_cast<opmath_t>(m_ptr[m_off]);
    opmath_t v = static_cast<opmath_t>(v_ptr[v_off]);
    if (h.apply_decay) {
      p = mul_rn(p, c.decay);
    }
    // torch.lerp's formula
    m = (abs_of(c.lerp_weight) < opmath_t(0.5))
            ? add_rn(m, mul_rn(c.lerp_weight, sub_rn(g, m)))
            : sub_rn(g, mul_rn(sub_rn(g, m), sub_rn(opmath_t(1), c.lerp_weight)));
    v = add_rn(mul_rn(v, c.beta2), mul_rn(mul_rn(c.one_minus_beta2, g), g));
    const opmath_t denom = add_rn(div_rn(sqrt_rn(v), bias_correction2_sqrt), c.eps);
    p = add_rn(p, mul_rn(neg_step_size, div_rn(m, denom)));
    p_ptr[p_off] = static_cast<scalar_t>(p);
    m_ptr[m_off] = static_cast<scalar_t>(m);
    v_ptr[v_off] = static_cast<scalar_t>(v);
  }
}

AdamTensorMeta make_meta(
    const at::Tensor& param,
    const at::Tensor& grad,
    const at::Tensor& exp_avg,
    const at::Tensor& exp_avg_sq,
    const at::Tensor& slot_steps,
    const at::Tensor& live_rank,
    int64_t slot_dim) {
  AdamTensorMeta t;
  t.param = param.data_ptr();
  t.grad = grad.const_data_ptr();
  t.exp_avg = exp_avg.data_ptr();
  t.exp_avg_sq = exp_avg_sq.data_ptr();
  t.slot_steps = slot_steps.data_ptr<float>();
  t.live_rank = live_rank.const_data_ptr<int64_t>();
  const int64_t elem_dim = 1 - slot_dim;
  t.slots = param.size(slot_dim);
  t.per_slot = param.size(elem_dim);
  t.p_ss = param.stride(slot_dim);
  t.p_es = param.stride(elem_dim);
  t.g_ss = grad.stride(slot_dim);
  t.g_es = grad.stride(elem_dim);
  t.m_ss = exp_avg.stride(slot_dim);
  t.m_es = exp_avg.stride(elem_dim);
  t.v_ss = exp_avg_sq.stride(slot_dim);
  t.v_es = exp_avg_sq.stride(elem_dim);
  t.step_stride = slot_steps.stride(0);
  return t;
}

void adam_step_cuda(
    at::TensorList params,
    const c10::List<std::optional<at::Tensor>>& grads,
    at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs,
    at::TensorList slot_steps,
    at::TensorList live_ranks,
    at::IntArrayRef slot_dims,
    double lr,
    double beta1,
    double beta2,
    double eps,
    double weight_decay) {
  check_adam_step_inputs(
      params, grads, exp_avgs, exp_avg_sqs, slot_steps, live_ranks, slot_dims, lr, beta1, beta2, eps,
      weight_decay);
  if (params.empty()) {
    return;
  }
  const AdamHyper host = AdamHyper::make(lr, beta1, beta2, eps, weight_decay);
  AdamHyperDevice h;
  h.lr = host.lr;
  h.beta1 = host.beta1;
  h.beta2 = host.beta2;
  h.f32 = host.f32;
  h.f64 = host.f64;
  h.apply_decay = host.apply_decay ? 1 : 0;

  const c10::Device device = params[0].device();
  const c10::cuda::CUDAGuard device_guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();

  // Group entries with a gradient by dtype (one template instantiation per dtype).
  for (const at::ScalarType dtype : {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble}) {
    std::vector<size_t> group;
    for (size_t i = 0; i < params.size(); ++i) {
      const std::optional<at::Tensor> grad = grads.get(i);
      if (!grad.has_value() || !grad->defined() || params[i].scalar_type() != dtype) {
        continue;
      }
      TORCH_CHECK_VALUE(
          params[i].device() == device,
          "adam_step_ (CUDA kernel): params[", i, "] is on ", params[i].device(), " but params[0] is on ", device);
      group.push_back(i);
    }
    for (size_t start = 0; start < group.size(); start += kMaxTensorsPerLaunch) {
      const size_t count = std::min<size_t>(kMaxTensorsPerLaunch, group.size() - start);
      AdamLaunchMeta meta;
      int64_t max_elements = 0;
      for (size_t c = 0; c < count; ++c) {
        const size_t i = group[start + c];
        const at::Tensor grad = *grads.get(i);
        meta.tensors[c] = make_meta(
            params[i], grad, exp_avgs[i], exp_avg_sqs[i], slot_steps[i], live_ranks[i], slot_dims[i]);
        max_elements = std::max<int64_t>(max_elements, params[i].numel());
      }
      if (max_elements == 0) {
        continue;
      }
      increment_slot_steps_kernel<<<static_cast<unsigned>(count), kStepThreads, 0, stream>>>(meta);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int64_t blocks_x = std::min<int64_t>((max_elements + kUpdateThreads - 1) / kUpdateThreads, 1024);
      const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(count));
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "selora_adam_step_cuda", [&] {
        adam_update_kernel<scalar_t><<<grid, kUpdateThreads, 0, stream>>>(meta, h);
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      for (size_t c = 0; c < count; ++c) {
        const size_t i = group[start + c];
        bump_version(params[i]);
        bump_version(exp_avgs[i]);
        bump_version(exp_avg_sqs[i]);
        bump_version(slot_steps[i]);
      }
    }
  }
}

}  // namespace
}  // namespace selora

TORCH_LIBRARY_IMPL(selora_ext, CUDA, m) {
  m.impl("adam_step_", &selora::adam_step_cuda);
}
