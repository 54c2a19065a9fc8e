// Autograd-key kernel of torchfast::bn_add_relu, in C++: a Python autograd registration costs
// ~100 us per call in torch.library's wrappers, more than the kernels themselves take on small
// activations (a (64, 32, 8, 8) forward + backward runs in ~70 us).
//
// Saved for backward: the input, the output (its ReLU mask is out > 0: the residual is not kept),
// the weight and bias (parameters) and the per-channel statistics. The backward runs the
// bn_add_relu_backward kernel; under create_graph=True (a double backward) it differentiates
// mask * (bn(x) + r) built from ATen ops instead, which has relu(bn(x) + r)'s first and second
// derivatives.
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/rsqrt.h>
#include <ATen/ops/var_mean.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace torchfast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;
using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Outputs forward_below_autograd(const at::Tensor& input, const OptTensor& weight, const OptTensor& bias,
                               const OptTensor& residual, const OptTensor& running_mean, const OptTensor& running_var,
                               bool training, double eps, bool relu) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("torchfast::bn_add_relu", "")
                             .typed<Outputs(const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                            const OptTensor&, const OptTensor&, bool, double, bool)>();
  c10::impl::ExcludeDispatchKeyGuard guard(c10::autograd_dispatch_keyset);
  return op.call(input, weight, bias, residual, running_mean, running_var, training, eps, relu);
}

Outputs backward_kernel(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& out,
                        const OptTensor& weight, const at::Tensor& mean, const at::Tensor& invstd, bool training,
                        bool relu, bool has_residual) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("torchfast::bn_add_relu_backward", "")
                             .typed<Outputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                                            const at::Tensor&, const at::Tensor&, bool, bool, bool)>();
  c10::impl::ExcludeDispatchKeyGuard guard(c10::autograd_dispatch_keyset);
  return op.call(grad_out, input, out, weight, mean, invstd, training, relu, has_residual);
}

OptTensor defined_or_none(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// bn(x) (no residual, no ReLU) from differentiable ATen ops, in the statistics dtype: batch
// statistics in training, the forward's (running) ones in eval.
at::Tensor differentiable_batch_norm(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                                     const at::Tensor& mean, const at::Tensor& var, bool training, double eps) {
  const at::ScalarType stat = mean.scalar_type();
  const at::Tensor x = input.to(stat);
  std::vector<int64_t> dims{0}, shape(x.dim(), 1);
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  shape[1] = -1;
  at::Tensor mu = mean, v = var;
  if (training) std::tie(v, mu) = at::var_mean(x, dims, /*correction=*/0, /*keepdim=*/false);
  at::Tensor y = (x - mu.view(shape)) * at::rsqrt(v + eps).view(shape);
  if (weight.defined()) y = y * weight.to(stat).view(shape);
  if (bias.defined()) y = y + bias.to(stat).view(shape);
  return y.to(input.scalar_type());
}

class BnAddRelu : public torch::autograd::Function<BnAddRelu> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& residual, const OptTensor& running_mean,
                               const OptTensor& running_var, bool training, double eps, bool relu) {
    auto [out, mean, invstd, var] =
        forward_below_autograd(input, weight, bias, residual, running_mean, running_var, training, eps, relu);
    ctx->save_for_backward({input, out, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()), mean, invstd,
                            var});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["has_residual"] = residual.has_value() && residual->defined();
    // The statistics are not differentiable; they are detached by the caller rather than marked
    // here (compiled autograd does not take marked outputs of C++ functions).
    return {out, mean, invstd, var};
  }

  // Whether forward argument `arg` (0 input, 1 weight, 2 bias, 3 residual) needs a gradient. The
  // node has an edge per defined tensor argument only, so the edge index counts the defined ones
  // before it.
  static bool needs_grad(AutogradContext* ctx, const variable_list& saved, size_t arg) {
    const bool defined[4] = {true, saved[2].defined(), saved[3].defined(), ctx->saved_data["has_residual"].toBool()};
    if (!defined[arg]) return false;
    size_t edge = 0;
    for (size_t a = 0; a < arg; ++a) edge += defined[a] ? 1 : 0;
    return ctx->needs_input_grad(edge);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &out = saved[1], &weight = saved[2], &bias = saved[3];
    const at::Tensor &mean = saved[4], &invstd = saved[5], &var = saved[6];
    const bool training = ctx->saved_data["training"].toBool(), relu = ctx->saved_data["relu"].toBool();
    const bool has_residual = ctx->saved_data["has_residual"].toBool();
    const at::Tensor& grad_out = grads[0];
    variable_list result(9);  // one per forward argument; the non-tensor ones stay undefined
    if (!grad_out.defined()) return result;
    if (at::GradMode::is_enabled()) {  // create_graph=True: a differentiable backward
      // (out, mean and var are this node's own outputs: unpacked, they lead back to this node, so
      // they enter only detached -- as the constants they are here)
      const at::Tensor gy = relu ? at::where(out.detach() > 0, grad_out, at::zeros_like(grad_out)) : grad_out;
      const at::Tensor y = differentiable_batch_norm(input, weight, bias, mean.detach(), var.detach(), training,
                                                     ctx->saved_data["eps"].toDouble());
      variable_list wanted;
      std::vector<size_t> slots;
      for (size_t i = 0; i < 3; ++i) {
        if (needs_grad(ctx, saved, i)) {
          wanted.push_back(saved[i == 0 ? 0 : i + 1]);  // input, weight, bias
          slots.push_back(i);
        }
      }
      if (!wanted.empty()) {
        const variable_list g = torch::autograd::grad({y}, wanted, {gy}, /*retain_graph=*/true,
                                                      /*create_graph=*/true, /*allow_unused=*/true);
        for (size_t n = 0; n < slots.size(); ++n) result[slots[n]] = g[n];
      }
      if (needs_grad(ctx, saved, 3)) result[3] = gy;
      return result;
    }
    const bool residual_grad = has_residual && needs_grad(ctx, saved, 3);
    auto [gx, gw, gb, gres] = backward_kernel(grad_out, input, out, defined_or_none(weight), mean, invstd, training,
                                              relu, residual_grad);
    if (needs_grad(ctx, saved, 0)) result[0] = gx;
    if (needs_grad(ctx, saved, 1)) result[1] = gw.to(weight.scalar_type());
    if (needs_grad(ctx, saved, 2)) result[2] = gb.to(bias.scalar_type());
    if (residual_grad) result[3] = gres;
    return result;
  }
};

Outputs bn_add_relu_autograd(const at::Tensor& input, const OptTensor& weight, const OptTensor& bias,
                             const OptTensor& residual, const OptTensor& running_mean, const OptTensor& running_var,
                             bool training, double eps, bool relu) {
  const variable_list outs =
      BnAddRelu::apply(input, weight, bias, residual, running_mean, running_var, training, eps, relu);
  return {outs[0], outs[1].detach(), outs[2].detach(), outs[3].detach()};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchfast, Autograd, m) { m.impl("bn_add_relu", &bn_add_relu_autograd); }

}  // namespace torchfast
