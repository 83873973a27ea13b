// selora_ext: operators on SeLoRA capacity buffers (schemas + CPU / device-generic kernels).
//
// A SeLoRA module keeps A (capacity x in) and B (out x capacity) as fixed "capacity" buffers; slots
// k < live_rank are trained, slots k >= live_rank are dead (exact zeros, never touched by Adam).
//
//   grow_capacity_  re-allocates buffers along their slot dimension (old values kept, new slots zero)
//                   and swaps storage in place, so Parameters / optimizer state keep their identity.
//   expand_slots_   adopts the trial row K of many modules at once: A[r, :] = K, B[:, r] = 0,
//                   live_rank = r + 1, then draws the next trial rows (Kaiming-uniform, a = 0) from a
//                   CPU generator seeded with `seed`, in list order.
//   adam_step_      multi-tensor AdamW with one step counter per slot:
//                     for live slot k:  t_k = ++steps[k],  bc1 = 1 - b1^t_k,  bc2 = 1 - b2^t_k
//                     p <- p (1 - lr wd);  m <- lerp(m, g, 1 - b1);  v <- b2 v + (1 - b2) g^2
//                     p <- p - (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps)
//                   i.e. exactly torch.optim.AdamW(foreach=False) on each slot as if it were a fresh
//                   tensor that went live when the slot did (why: docs/algorithm.md#optimizer-state-on-growth).
//                   Arithmetic in float (fp32 / fp16 / bf16 buffers) or double (fp64 buffers).
//
// Build modes: setup.py defines SELORA_PYTHON_MODULE (the library is the Python module
// selora_kernels._C); the JIT loader and CMake build a plain shared library for torch.ops.load_library.
#ifdef SELORA_PYTHON_MODULE
#include <Python.h>
#endif

#include "selora_ops.h"

#include <ATen/Parallel.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace selora {
namespace {

// ---------------------------------------------------------------------------------------------
// grow_capacity_
// ---------------------------------------------------------------------------------------------
void grow_capacity_(at::TensorList tensors, at::IntArrayRef slot_dims, int64_t new_capacity) {
  TORCH_CHECK_VALUE(
      tensors.size() == slot_dims.size(),
      "grow_capacity_: got ", tensors.size(), " tensors but ", slot_dims.size(), " slot_dims");
  TORCH_CHECK_VALUE(new_capacity >= 0, "grow_capacity_: new_capacity must be >= 0, got ", new_capacity);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK_VALUE(t.defined(), "grow_capacity_: tensors[", i, "] is undefined");
    const int64_t dim = slot_dims[i];
    TORCH_CHECK_VALUE(
        dim >= 0 && dim < t.dim(),
        "grow_capacity_: slot_dims[", i, "] = ", dim, " is not a dimension of tensors[", i,
        "] with shape ", t.sizes());
    TORCH_CHECK_VALUE(
        t.size(dim) <= new_capacity,
        "grow_capacity_: tensors[", i, "] has ", t.size(dim), " slots along dim ", dim,
        " but new_capacity is ", new_capacity, " (capacity buffers never shrink)");
  }
  // Keep autograd out of the way (Parameters require grad) but let ADInplaceOrView bump versions.
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < tensors.size(); ++i) {
    at::Tensor t = tensors[i];
    const int64_t dim = slot_dims[i];
    const int64_t old_capacity = t.size(dim);
    if (old_capacity == new_capacity) {
      continue;
    }
    std::vector<int64_t> new_sizes = t.sizes().vec();
    new_sizes[dim] = new_capacity;
    at::Tensor grown = at::zeros(new_sizes, t.options());
    grown.narrow(dim, 0, old_capacity).copy_(t);
    t.set_(grown);
  }
}

// ---------------------------------------------------------------------------------------------
// expand_slots_
// ---------------------------------------------------------------------------------------------
void check_expand_slots_inputs(
    at::TensorList lora_a,
    at::TensorList lora_b,
    at::TensorList trial_rows,
    at::TensorList live_ranks,
    at::IntArrayRef ranks,
    int64_t seed) {
  const size_t n = lora_a.size();
  TORCH_CHECK_VALUE(
      lora_b.size() == n && trial_rows.size() == n && live_ranks.size() == n && ranks.size() == n,
      "expand_slots_: list lengths differ: lora_a ", n, ", lora_b ", lora_b.size(), ", trial_rows ",
      trial_rows.size(), ", live_ranks ", live_ranks.size(), ", ranks ", ranks.size());
  TORCH_CHECK_VALUE(seed >= 0, "expand_slots_: seed must be >= 0, got ", seed);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& a = lora_a[i];
    const at::Tensor& b = lora_b[i];
    TORCH_CHECK_VALUE(a.dim() == 2, "expand_slots_: lora_a[", i, "] must be 2-D (capacity, in), got shape ", a.sizes());
    TORCH_CHECK_VALUE(b.dim() == 2, "expand_slots_: lora_b[", i, "] must be 2-D (out, capacity), got shape ", b.sizes());
    TORCH_CHECK_VALUE(
        a.size(0) == b.size(1),
        "expand_slots_: capacity mismatch at index ", i, ": lora_a[", i, "] has ", a.size(0),
        " slots, lora_b[", i, "] has ", b.size(1));
    TORCH_CHECK_VALUE(
        trial_rows[i].dim() == 1 && trial_rows[i].size(0) == a.size(1),
        "expand_slots_: trial_rows[", i, "] must have shape (", a.size(1), ",), got ", trial_rows[i].sizes());
    TORCH_CHECK_VALUE(
        live_ranks[i].dim() == 0 && live_ranks[i].scalar_type() == at::kLong,
        "expand_slots_: live_ranks[", i, "] must be a 0-d int64 tensor, got shape ", live_ranks[i].sizes(),
        " dtype ", live_ranks[i].scalar_type());
    TORCH_CHECK_VALUE(
        ranks[i] >= 0 && ranks[i] < a.size(0),
        "expand_slots_: ranks[", i, "] = ", ranks[i], " but capacity is ", a.size(0),
        " (need 0 <= rank < capacity; grow_capacity_ first)");
  }
}

void expand_slots_(
    at::TensorList lora_a,
    at::TensorList lora_b,
    at::TensorList trial_rows,
    at::TensorList live_ranks,
    at::IntArrayRef ranks,
    int64_t seed) {
  check_expand_slots_inputs(lora_a, lora_b, trial_rows, live_ranks, ranks, seed);
  const size_t n = lora_a.size();
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < n; ++i) {
    const int64_t r = ranks[i];
    lora_a[i].select(0, r).copy_(trial_rows[i]);
    lora_b[i].select(1, r).zero_();
    live_ranks[i].fill_(r + 1);
  }
  // Same generator and the same ATen uniform_ kernel on a CPU float32 tensor as the Python fallback:
  // the drawn rows are bit-identical on both paths and on every device.
  at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed));
  for (size_t i = 0; i < n; ++i) {
    const int64_t in_features = lora_a[i].size(1);
    const double bound = std::sqrt(6.0 / static_cast<double>(in_features));
    at::Tensor row = at::empty({in_features}, at::TensorOptions().dtype(at::kFloat));
    row.uniform_(-bound, bound, generator);
    trial_rows[i].copy_(row);
  }
}

// ---------------------------------------------------------------------------------------------
// adam_step_ (CPU)
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
void adam_step_cpu_one(
    const at::Tensor& param,
    const at::Tensor& grad,
    const at::Tensor& exp_avg,
    const at::Tensor& exp_avg_sq,
    const at::Tensor& slot_steps,
    int64_t live_rank,
    int64_t slot_dim,
    const AdamHyper& h) {
  const int64_t slots = param.size(slot_dim);
  const int64_t live = std::min(std::max<int64_t>(live_rank, 0), slots);
  if (live == 0) {
    return;
  }
  const int64_t per_slot = param.size(1 - slot_dim);
  // Strides along (slot, element-within-slot) for every tensor.
  const int64_t p_ss = param.stride(slot_dim), p_es = param.stride(1 - slot_dim);
  const int64_t g_ss = grad.stride(slot_dim), g_es = grad.stride(1 - slot_dim);
  const int64_t m_ss = exp_avg.stride(slot_dim), m_es = exp_avg.stride(1 - slot_dim);
  const int64_t v_ss = exp_avg_sq.stride(slot_dim), v_es = exp_avg_sq.stride(1 - slot_dim);
  const int64_t step_stride = slot_steps.stride(0);
  scalar_t* p_ptr = param.data_ptr<scalar_t>();
  const scalar_t* g_ptr = grad.const_data_ptr<scalar_t>();
  scalar_t* m_ptr = exp_avg.data_ptr<scalar_t>();
  scalar_t* v_ptr = exp_avg_sq.data_ptr<scalar_t>();
  float* steps_ptr = slot_steps.data_ptr<float>();

  using opmath_t = adam_compute_t<scalar_t>;
  const AdamCoeffs<opmath_t>& c = h.coeffs<opmath_t>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(per_slot, 1));
  at::parallel_for(0, live, grain, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const float step = steps_ptr[k * step_stride] + 1.0f;
      steps_ptr[k * step_stride] = step;
      const double bias_correction1 = 1.0 - std::pow(h.beta1, static_cast<double>(step));
      const double bias_correction2 = 1.0 - std::pow(h.beta2, static_cast<double>(step));
      const opmath_t neg_step_size = static_cast<opmath_t>(-(h.lr / bias_correction1));
      const opmath_t bias_correction2_sqrt = static_cast<opmath_t>(std::sqrt(bias_correction2));
      scalar_t* p_slot = p_ptr + k * p_ss;
      const scalar_t* g_slot = g_ptr + k * g_ss;
      scalar_t* m_slot = m_ptr + k * m_ss;
      scalar_t* v_slot = v_ptr + k * v_ss;
      for (int64_t j = 0; j < per_slot; ++j) {
        opmath_t p = static_cast<opmath_t>(p_slot[j * p_es]);
        const opmath_t g = static_cast<opmath_t>(g_slot[j * g_es]);
        opmath_t m = static_cast<opmath_t>(m_slot[j * m_es]);
        opmath_t v = static_cast<opmath_t>(v_slot[j * v_es]);
        if (h.apply_decay) {
          p = p * c.decay;
        }
        // torch.lerp's formula (the one AdamW uses for exp_avg).
        m = (std::abs(c.lerp_weight) < opmath_t(0.5)) ? m + c.lerp_weight * (g - m)
                                                      : g - (g - m) * (opmath_t(1) - c.lerp_weight);
        v = v * c.beta2 + c.one_minus_beta2 * g * g;
        const opmath_t denom = std::sqrt(v) / bias_correction2_sqrt + c.eps;
        p = p + neg_step_size * (m / denom);
        p_slot[j * p_es] = static_cast<scalar_t>(p);
        m_slot[j * m_es] = static_cast<scalar_t>(m);
        v_slot[j * v_es] = static_cast<scalar_t>(v);
      }
    }
  });
}

void adam_step_cpu(
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
  const AdamHyper h = AdamHyper::make(lr, beta1, beta2, eps, weight_decay);
  for (size_t i = 0; i < params.size(); ++i) {
    const std::optional<at::Tensor> grad = grads.get(i);
    if (!grad.has_value() || !grad->defined()) {
      continue;
    }
    const at::Tensor& param = params[i];
    TORCH_CHECK_VALUE(
        param.is_cpu() && grad->is_cpu() && exp_avgs[i].is_cpu() && exp_avg_sqs[i].is_cpu() &&
            slot_steps[i].is_cpu() && live_ranks[i].is_cpu(),
        "adam_step_ (CPU kernel): all tensors of entry ", i, " must be on the CPU");
    const int64_t live_rank = live_ranks[i].item<int64_t>();  // CPU tensor: a plain memory read
    TORCH_CHECK_VALUE(
        live_rank >= 0 && live_rank <= param.size(slot_dims[i]),
        "adam_step_: live_ranks[", i, "] = ", live_rank, " but capacity is ", param.size(slot_dims[i]));
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, param.scalar_type(), "selora_adam_step_cpu", [&] {
          adam_step_cpu_one<scalar_t>(
              param, *grad, exp_avgs[i], exp_avg_sqs[i], slot_steps[i], live_rank, slot_dims[i], h);
        });
    bump_version(param);
    bump_version(exp_avgs[i]);
    bump_version(exp_avg_sqs[i]);
    bump_version(slot_steps[i]);
  }
}

// Fake / meta kernel: expand_slots_ only writes values (shapes never change); the composite kernel
// would draw the trial rows into a real CPU tensor, which fake-tensor tracing must not do.
void expand_slots_meta(
    at::TensorList lora_a,
    at::TensorList lora_b,
    at::TensorList trial_rows,
    at::TensorList live_ranks,
    at::IntArrayRef ranks,
    int64_t seed) {
  check_expand_slots_inputs(lora_a, lora_b, trial_rows, live_ranks, ranks, seed);
}

// Fake / meta kernel: adam_step_ only mutates its inputs in place, shapes never change.
void adam_step_meta(
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
}

}  // namespace

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
    double weight_decay) {
  const size_t n = params.size();
  TORCH_CHECK_VALUE(
      grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && slot_steps.size() == n &&
          live_ranks.size() == n && slot_dims.size() == n,
      "adam_step_: list lengths differ: params ", n, ", grads ", grads.size(), ", exp_avgs ",
      exp_avgs.size(), ", exp_avg_sqs ", exp_avg_sqs.size(), ", slot_steps ", slot_steps.size(),
      ", live_ranks ", live_ranks.size(), ", slot_dims ", slot_dims.size());
  TORCH_CHECK_VALUE(lr >= 0.0, "adam_step_: lr must be >= 0, got ", lr);
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, "adam_step_: beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, "adam_step_: beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK_VALUE(eps >= 0.0, "adam_step_: eps must be >= 0, got ", eps);
  TORCH_CHECK_VALUE(weight_decay >= 0.0, "adam_step_: weight_decay must be >= 0, got ", weight_decay);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK_VALUE(p.dim() == 2, "adam_step_: params[", i, "] must be a 2-D capacity buffer, got shape ", p.sizes());
    TORCH_CHECK_VALUE(
        slot_dims[i] == 0 || slot_dims[i] == 1,
        "adam_step_: slot_dims[", i, "] must be 0 (rows are slots) or 1 (columns are slots), got ", slot_dims[i]);
    const auto dtype = p.scalar_type();
    TORCH_CHECK_VALUE(
        dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
        "adam_step_: params[", i, "] has unsupported dtype ", dtype);
    for (const at::Tensor* moment : {&exp_avgs[i], &exp_avg_sqs[i]}) {
      TORCH_CHECK_VALUE(
          moment->sizes() == p.sizes() && moment->scalar_type() == dtype && moment->device() == p.device(),
          "adam_step_: moments of entry ", i, " must match params[", i, "] (shape ", p.sizes(), ", dtype ",
          dtype, ", device ", p.device(), "), got shape ", moment->sizes(), ", dtype ", moment->scalar_type(),
          ", device ", moment->device());
    }
    const std::optional<at::Tensor> grad = grads.get(i);
    if (grad.has_value() && grad->defined()) {
      TORCH_CHECK_VALUE(
          grad->sizes() == p.sizes() && grad->scalar_type() == dtype && grad->device() == p.device(),
          "adam_step_: grads[", i, "] must match params[", i, "] (shape ", p.sizes(), ", dtype ", dtype,
          ", device ", p.device(), "), got shape ", grad->sizes(), ", dtype ", grad->scalar_type(),
          ", device ", grad->device());
    }
    const int64_t capacity = p.size(slot_dims[i]);
    TORCH_CHECK_VALUE(
        slot_steps[i].dim() == 1 && slot_steps[i].size(0) == capacity && slot_steps[i].scalar_type() == at::kFloat &&
            slot_steps[i].device() == p.device(),
        "adam_step_: slot_steps[", i, "] must be a float32 tensor of shape (", capacity, ",) on ", p.device(),
        ", got shape ", slot_steps[i].sizes(), ", dtype ", slot_steps[i].scalar_type(), ", device ",
        slot_steps[i].device());
    TORCH_CHECK_VALUE(
        live_ranks[i].dim() == 0 && live_ranks[i].scalar_type() == at::kLong &&
            live_ranks[i].device() == p.device(),
        "adam_step_: live_ranks[", i, "] must be a 0-d int64 tensor on ", p.device(), ", got shape ",
        live_ranks[i].sizes(), ", dtype ", live_ranks[i].scalar_type(), ", device ", live_ranks[i].device());
  }
}

}  // namespace selora

TORCH_LIBRARY(selora_ext, m) {
  m.def("grow_capacity_(Tensor(a!)[] tensors, int[] slot_dims, int new_capacity) -> ()");
  m.def(
      "expand_slots_(Tensor(a!)[] lora_a, Tensor(b!)[] lora_b, Tensor(c!)[] trial_rows, "
      "Tensor(d!)[] live_ranks, int[] ranks, int seed) -> ()");
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor?[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] slot_steps, Tensor[] live_ranks, int[] slot_dims, float lr, float beta1, float beta2, "
      "float eps, float weight_decay) -> ()");
}

// grow_capacity_ and expand_slots_ are compositions of ATen ops: one implementation serves every
// backend (CPU, CUDA, Meta) and never reads a device value.
TORCH_LIBRARY_IMPL(selora_ext, CompositeExplicitAutograd, m) {
  m.impl("grow_capacity_", &selora::grow_capacity_);
  m.impl("expand_slots_", &selora::expand_slots_);
}

TORCH_LIBRARY_IMPL(selora_ext, CPU, m) {
  m.impl("adam_step_", &selora::adam_step_cpu);
}

TORCH_LIBRARY_IMPL(selora_ext, Meta, m) {
  m.impl("adam_step_", &selora::adam_step_meta);
  m.impl("expand_slots_", &selora::expand_slots_meta);
}

#ifdef SELORA_PYTHON_MODULE
// selora_kernels._C is imported only for the side effect above (operator registration).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "selora_ext operators (registered in torch.ops.selora_ext)", -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif
