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
#include <type_traits>

namespace selora {

// Arithmetic type of the Adam update of a buffer of dtype scalar_t: double for fp64 buffers (a float
// update would round them to fp32 precision, moving them even at lr = 0), float otherwise (AdamW's
// fp32 compute type for fp32 / fp16 / bf16).
template <typename scalar_t>
using adam_compute_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// The per-element coefficients of adam_step_ in the compute type T.
template <typename T>
struct AdamCoeffs {
  T lerp_weight;      // 1 - beta1   (exp_avg.lerp_(grad, 1 - beta1))
  T beta2;            // beta2       (exp_avg_sq.mul_(beta2))
  T one_minus_beta2;  // 1 - beta2   (addcmul_(grad, grad, value=1 - beta2))
  T eps;              // eps         (denom.add_(eps))
  T decay;            // 1 - lr * weight_decay (param.mul_(...)); 1 when weight_decay == 0

  static AdamCoeffs make(double lr, double beta1, double beta2, double eps, double weight_decay) {
    AdamCoeffs c;
    c.lerp_weight = static_cast<T>(1.0 - beta1);
    c.beta2 = static_cast<T>(beta2);
    c.one_minus_beta2 = static_cast<T>(1.0 - beta2);
    c.eps = static_cast<T>(eps);
    c.decay = static_cast<T>(1.0 - lr * weight_decay);
    return c;
  }
};

// Hyper-parameters of one adam_step_ call, pre-computed once on the host in double precision exactly
// as torch.optim.AdamW (single_tensor) computes them in Python, then cast to the compute type where
// AdamW's tensor ops cast the Python scalar to the tensor's compute type (float, or double for fp64).
struct AdamHyper {
  double lr;
  double beta1;
  double beta2;
  AdamCoeffs<float> f32;
  AdamCoeffs<double> f64;
  bool apply_decay;

  template <typename T>
  const AdamCoeffs<T>& coeffs() const {
    if constexpr (std::is_same_v<T, double>) {
      return f64;
    } else {
      return f32;
    }
  }

  static AdamHyper make(double lr, double beta1, double beta2, double eps, double weight_decay) {
    AdamHyper h;
    h.lr = lr;
    h.beta1 = beta1;
    h.beta2 = beta2;
    h.f32 = AdamCoeffs<float>::make(lr, beta1, beta2, eps, weight_decay);
    h.f64 = AdamCoeffs<double>::make(lr, beta1, beta2, eps, weight_decay);
    h.apply_decay = weight_decay != 0.0;
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
