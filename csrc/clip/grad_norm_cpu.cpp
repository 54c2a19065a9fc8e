// CPU kernels of torchfast::total_norm and torchfast::clip_grads_with_norm_: one parallel region
// over all (tensor, chunk) pairs each; per-chunk partial norms in fp32 vectors, combined in double.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <array>
#include <vector>

// vec_map.h first: its Vectorized overloads of tf_abs/tf_max must be visible where the *_math.h
// templates are defined (see common/host_device.h).
#include "common/vec_map.h"
// (blank line keeps the formatter from reordering)
#include "clip/clip_checks.h"
#include "clip/grad_norm_math.h"
#include "common/multi_tensor_cpu.h"
#include "common/tensor_lists.h"

namespace torchfast {
namespace {

template <NormKind kKind, typename scalar_t>
double chunk_partial(const scalar_t* data, int64_t n) {
  using acc_t = acc_type_t<scalar_t>;
  using aVec = at::vec::Vectorized<acc_t>;
  constexpr bool kNative = std::is_same_v<scalar_t, acc_t>;
  using sVec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t kStep = kNative ? aVec::size() : sVec::size();
  aVec acc0(acc_t(0)), acc1(acc_t(0));  // two accumulators: independent add chains
  int64_t d = 0;
  for (; d + kStep <= n; d += kStep) {
    if constexpr (kNative) {
      acc0 = norm_accumulate<kKind>(acc0, aVec::loadu(data + d));
    } else {
      auto both = at::vec::convert_to_float<scalar_t>(sVec::loadu(data + d));
      acc0 = norm_accumulate<kKind>(acc0, std::get<0>(both));
      acc1 = norm_accumulate<kKind>(acc1, std::get<1>(both));
    }
  }
  const aVec acc = norm_combine<kKind>(acc0, acc1);
  alignas(64) acc_t lanes[aVec::size()];
  acc.store(lanes);
  double total = 0;
  for (int64_t l = 0; l < aVec::size(); ++l) total = norm_combine<kKind>(total, static_cast<double>(lanes[l]));
  acc_t tail = 0;
  for (; d < n; ++d) tail = norm_accumulate<kKind>(tail, static_cast<acc_t>(data[d]));
  return norm_combine<kKind>(total, static_cast<double>(tail));
}

template <NormKind kKind>
double total_norm_of(const std::vector<const void*>& data, const std::vector<at::ScalarType>& dtypes,
                     const std::vector<int64_t>& numels) {
  const std::vector<CpuChunk> chunks = split_into_chunks(numels);
  std::vector<double> partials(chunks.size(), 0.0);
  parallel_over_chunks(chunks, [&](const CpuChunk& c) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtypes[c.tensor], "total_norm_cpu", [&] {
      partials[&c - chunks.data()] =
          chunk_partial<kKind>(static_cast<const scalar_t*>(data[c.tensor]) + c.begin, c.end - c.begin);
    });
  });
  double total = 0;
  for (double p : partials) total = norm_combine<kKind>(total, p);
  return norm_finish<kKind>(total);
}

at::Tensor total_norm_cpu(at::TensorList tensors, double norm_type, std::optional<at::ScalarType> dtype) {
  const NormKind kind = check_total_norm_args("torchfast.total_norm", tensors, norm_type);
  const size_t n = tensors.size();
  std::vector<at::Tensor> dense(n);  // non-dense tensors are read through a contiguous copy
  std::vector<const void*> data(n);
  std::vector<at::ScalarType> dtypes(n);
  std::vector<int64_t> numels(n);
  for (size_t i = 0; i < n; ++i) {
    dense[i] = tensors[i].is_non_overlapping_and_dense() ? tensors[i] : tensors[i].contiguous();
    data[i] = dense[i].const_data_ptr();
    dtypes[i] = dense[i].scalar_type();
    numels[i] = dense[i].numel();
  }
  double norm = 0;
  switch (kind) {
    case NormKind::kTwo: norm = total_norm_of<NormKind::kTwo>(data, dtypes, numels); break;
    case NormKind::kOne: norm = total_norm_of<NormKind::kOne>(data, dtypes, numels); break;
    case NormKind::kInf: norm = total_norm_of<NormKind::kInf>(data, dtypes, numels); break;
  }
  return at::scalar_tensor(norm, at::TensorOptions().dtype(dtype.value_or(norm_result_dtype(tensors))));
}

void clip_grads_with_norm_cpu(at::TensorList grads, const at::Tensor& total_norm, double max_norm) {
  check_clip_args("torchfast.clip_grads_with_norm_", grads, total_norm);
  if (grads.empty()) return;
  const double coef = total_norm.scalar_type() == at::kDouble
                         ? clip_coefficient<double>(total_norm.item<double>(), max_norm)
                         : clip_coefficient<float>(total_norm.item<float>(), static_cast<float>(max_norm));
  if (coef == 1.0) return;  // x * 1 == x: nothing to write
  LayoutStager stager;
  std::vector<void*> data(grads.size());
  std::vector<int64_t> numels(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    numels[i] = grads[i].numel();
    if (numels[i] > 0) data[i] = stager.reference(grads[i]).data_ptr();  // non-dense: staged, written back
  }
  parallel_over_chunks(split_into_chunks(numels), [&](const CpuChunk& c) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[c.tensor].scalar_type(), "clip_grads_cpu", [&] {
      using acc_t = acc_type_t<scalar_t>;
      const acc_t k = static_cast<acc_t>(coef);
      const std::array<scalar_t*, 1> ptrs = {static_cast<scalar_t*>(data[c.tensor]) + c.begin};
      map_streams<scalar_t, 1, 0b1u, 0b1u>(ptrs, c.end - c.begin, [k](auto& x) {
        using V = std::decay_t<decltype(x[0])>;
        x[0] = x[0] * V(k);
      });
    });
  });
  stager.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(torchfast, CPU, m) {
  m.impl("total_norm", &total_norm_cpu);
  m.impl("clip_grads_with_norm_", &clip_grads_with_norm_cpu);
}

}  // namespace torchfast
