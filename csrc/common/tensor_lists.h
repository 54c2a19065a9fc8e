// Checks and layout staging for the multi-tensor ops (CPU and CUDA).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <deque>
#include <utility>
#include <vector>

namespace torchfast {

inline void check_list_length(const char* op, const char* name, at::TensorList list, size_t expected) {
  TORCH_CHECK(list.size() == expected, op, ": ", name, " has ", list.size(), " tensors but params has ",
              expected);
}

// A per-parameter tensor (grad or optimizer state) must match its parameter.
inline void check_like_param(const char* op, const char* name, size_t i, const at::Tensor& t,
                             const at::Tensor& param) {
  TORCH_CHECK(t.defined(), op, ": ", name, "[", i, "] is undefined");
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, "[", i, "] has layout ", t.layout(),
              " (sparse gradients are not supported)");
  TORCH_CHECK(t.device() == param.device(), op, ": ", name, "[", i, "] is on ", t.device(), " but params[", i,
              "] is on ", param.device());
  TORCH_CHECK(t.scalar_type() == param.scalar_type(), op, ": ", name, "[", i, "] has dtype ", t.scalar_type(),
              " but params[", i, "] has dtype ", param.scalar_type());
  TORCH_CHECK(t.sizes() == param.sizes(), op, ": ", name, "[", i, "] has shape ", t.sizes(), " but params[", i,
              "] has shape ", param.sizes());
}

inline void check_param(const char* op, size_t i, const at::Tensor& p, const at::Device& device) {
  TORCH_CHECK(p.defined() && p.layout() == at::kStrided, op, ": params[", i, "] must be a dense tensor");
  TORCH_CHECK(p.device() == device, op, ": all tensors of one call must be on one device; params[0] is on ",
              device, " but params[", i, "] is on ", p.device());
  const auto dt = p.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, op, ": params[", i,
              "] has dtype ", dt, "; supported: float32, float16, bfloat16, float64");
}

inline void check_step(const char* op, size_t i, const at::Tensor& s, const at::Device& device) {
  TORCH_CHECK(s.defined() && s.numel() == 1, op, ": state_steps[", i, "] must hold one value, got shape ",
              s.sizes());
  TORCH_CHECK(s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble, op, ": state_steps[", i,
              "] must be float32 or float64, got ", s.scalar_type());
  TORCH_CHECK(s.device() == device, op, ": state_steps[", i, "] is on ", s.device(),
              " but the params are on ", device);
}

// The kernels treat every tensor as flat memory laid out like its parameter. A tensor whose layout
// differs (a non-contiguous grad, a param that is itself a strided view) is staged into a dense
// copy with the reference layout and, if the op writes it, copied back by finish(). The fast path
// (everything dense and alike) copies no Tensor handles: it runs once per tensor per step.
class LayoutStager {
 public:
  // The tensor whose layout the kernel uses for a parameter: itself when dense, else a contiguous
  // staged copy. The reference stays valid until finish().
  const at::Tensor& reference(const at::Tensor& param) {
    if (param.is_contiguous() || param.is_non_overlapping_and_dense()) return param;
    return stage(param, param.contiguous(), /*write_back=*/true);
  }
  // Data pointer of `t` laid out like `ref` (t's own memory when it already is).
  void* data_like(const at::Tensor& t, const at::Tensor& ref, bool write_back) {
    if ((t.is_contiguous() && ref.is_contiguous()) ||
        (t.is_non_overlapping_and_dense() && t.strides() == ref.strides()))
      return t.data_ptr();
    return stage(t, at::empty_like(ref).copy_(t), write_back).data_ptr();
  }
  void finish() {
    for (auto& s : staged_)
      if (s.write_back) s.original.copy_(s.work);
    staged_.clear();
  }

 private:
  struct Staged {
    at::Tensor original, work;  // work stays alive here until finish(): the kernel holds raw pointers
    bool write_back;
  };
  const at::Tensor& stage(const at::Tensor& original, at::Tensor work, bool write_back) {
    staged_.push_back({original, std::move(work), write_back});
    return staged_.back().work;
  }
  std::deque<Staged> staged_;  // deque: references to earlier entries survive push_back
};

}  // namespace torchfast
