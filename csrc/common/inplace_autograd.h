// Autograd-key kernels for torchfast's in-place, non-differentiable ops (the optimizer steps).
//
// What the codegen'd VariableType + ADInplaceOrView kernels do for ATen's own in-place ops:
// refuse to run under grad mode on tensors that require grad, run the backend kernel below the
// autograd keys, and bump the version counters of the tensors written, so that autograd notices
// if a tensor saved for backward was modified. Being unboxed, this also spares every call the
// boxed autograd fallback (which converts every tensor of every list to an IValue).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>

#include <initializer_list>

namespace torchfast {

inline void check_not_grad_mode(const char* op, std::initializer_list<at::TensorList> written) {
  if (!at::GradMode::is_enabled()) return;
  for (at::TensorList list : written)
    for (const at::Tensor& t : list)
      TORCH_CHECK(!t.requires_grad(), op, " updates its tensors in place and is not differentiable: call it under "
                  "torch.no_grad() (got a tensor of shape ", t.sizes(), " that requires grad)");
}

inline void bump_versions(std::initializer_list<at::TensorList> written) {
  for (at::TensorList list : written)
    for (const at::Tensor& t : list) t.unsafeGetTensorImpl()->bump_version();
}

// Calls the op's backend kernel, below the Autograd and ADInplaceOrView keys.
template <typename Sig, typename... Args>
inline void call_below_autograd(const char* qualified_name, Args&&... args) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(qualified_name, "").typed<Sig>();
  c10::impl::ExcludeDispatchKeyGuard guard(c10::autograd_dispatch_keyset_with_ADInplaceOrView);
  op.call(std::forward<Args>(args)...);
}

}  // namespace torchfast
