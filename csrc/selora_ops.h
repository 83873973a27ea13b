// Shared declarations of the selora_ext operator library (CPU + CUDA translation units).
//
// Operator namespace: selora_ext. Schemas live in selora_ops.cpp (TORCH_LIBRARY); the CUDA kernels in
// cuda/selora_ops_cuda.cu only add TORCH_LIBRARY_IMPL(selora_ext, CUDA, ...) registrations.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/List.h>

#include <cmath>
#include <cstdint>
#include <optional>

namespace selora {

// Hyper-parameters of one adam_step_ call, pre-computed once on the host in double precision exactly
// as torch.optim.AdamW (single_tensor) computes them in Python, then cast to float where AdamW's
// tensor ops cast the Python scalar to the tensor's (fp32) compute type.
struct AdamHyper {
  double lr;
  double beta1;
  double beta2;
  float lerp_weight;          // 1 - beta1   (exp_avg.lerp_(grad, 1 - beta1))
  float beta2_f;              // beta2       (exp_avg_sq.mul_(beta2))
  float one_minus_beta2;      // 1 - beta2   (addcmul_(grad, grad, value=1 - beta2))
  float eps;                  // eps         (denom.add_(eps))
  float decay;                // 1 - lr * weight_decay (param.mul_(...)); 1 when weight_decay == 0
  bool apply_decay;

  static AdamHyper make(double lr, double beta1, double beta2, double eps, double weight_decay) {
    AdamHyper h;
    h.lr = lr;
    h.beta1 = beta1;
    h.beta2 = beta2;
    h.lerp_weight = static_cast<float>(1.0 - beta1);
    h.beta2_f = static_cast<float>(beta2);
    h.one_minus_beta2 = static_cast<float>(1.0 - beta2);
    h.eps = static_cast<float>(eps);
    h.apply_decay = weight_decay != 0.0;
    h.decay = static_cast<float>(1.0 - lr * weight_decay);
    return h;
  }
};

// Validates the arguments of adam_step_ (list lengths, ranks of tensors, dtypes, shapes, devices).
// Never reads a device value, so it is safe to call before an asynchronous CUDA launch.
void check_adam_step_inputs(
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
    double weight_decay);

// Marks a tensor written through a raw pointer as modified for autograd's saved-tensor checks
// (what an in-place ATen op does through ADInplaceOrView).
inline void bump_version(const at::Tensor& t) {
  if (!t.is_inference()) {
    t.unsafeGetTensorImpl()->bump_version();
  }
}

}  // namespace selora
