// Every torchfast operator's schema, in one place: read this file as the API of the kernels.
// Per-device implementations live in csrc/<family>/<op>_{cpu.cpp,cuda.cu}; the Python face of
// each family (fake/autograd registrations and the reference fallback) in torchfast/ops/.
#include <torch/library.h>

// The namespace the schemas register under: torchfast, or torchfast_emu when the CUDA emulator's
// library compiles this file a second time (csrc/emulator/: the same ops, running the CUDA kernels
// on CPU tensors). The second macro expands the name before TORCH_LIBRARY pastes it.
#ifndef TORCHFAST_NAMESPACE
#define TORCHFAST_NAMESPACE torchfast
#endif
#define TF_DEFINE_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)

TF_DEFINE_LIBRARY(TORCHFAST_NAMESPACE, m) {
  // ---- optimizers (csrc/optim) -------------------------------------------------------------
  // One call updates a whole list of parameters; tensors of mixed dtypes (fp32/fp16/bf16) may
  // share a call, but each parameter's grad and state have its dtype. Math is fp32.
  // state_steps are float32 scalars on the parameters' device; the kernel increments them.
  // lr_tensor, when given, overrides lr (a device tensor avoids a host sync on CUDA).
  // grad_scale/found_inf come from torch.amp.GradScaler: grads are unscaled in place, and the
  // whole step (step counts included) is skipped when found_inf is non-zero.
  // clip_coef (a one-element tensor, e.g. min(max_norm / (norm + 1e-6), 1)) multiplies the
  // unscaled grads inside the update; the grads themselves are not rewritten with it.
  m.def(
      "fused_adam_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] state_steps, *, "
      "float lr, float beta1, float beta2, float weight_decay, float eps, bool amsgrad, "
      "bool maximize, bool decoupled_weight_decay, Tensor? lr_tensor=None, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor? clip_coef=None) -> ()");
  // momentum_buffers is empty when momentum == 0. is_first_step: the buffers are uninitialised
  // and take the (decayed) gradient itself, as torch.optim.SGD does on its first step.
  m.def(
      "fused_sgd_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, *, "
      "float lr, float momentum, float dampening, float weight_decay, bool nesterov, "
      "bool maximize, bool is_first_step, Tensor? lr_tensor=None, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, Tensor? clip_coef=None) -> ()");

  // ---- gradient clipping (csrc/clip) ---------------------------------------------------------
  // The norm of all tensors viewed as one vector, for norm_type 2, 1 or inf; a 0-dim tensor on
  // their device, in `dtype` (default: their promoted dtype, as torch returns it), accumulated in
  // fp32 (fp64 for fp64 tensors). Inf/NaN elements make it inf/NaN, which is how callers detect
  // non-finite gradients in the same pass.
  m.def("total_norm(Tensor[] tensors, float norm_type, ScalarType? dtype=None) -> Tensor");
  // grads *= min(max_norm / (total_norm + 1e-6), 1) (torch.nn.utils.clip_grad_norm_'s rule); the
  // coefficient is computed where total_norm lives (no host sync on CUDA), and when it is 1 the
  // grads are left untouched (multiplying by 1 would not change them).
  m.def("clip_grads_with_norm_(Tensor(a!)[] grads, Tensor total_norm, float max_norm) -> ()");

  // ---- batch norm + residual add + ReLU (csrc/norm) ------------------------------------------
  // out = relu?(batch_norm(input) + residual?), for (N, C, *) inputs, contiguous or channels_last
  // (out keeps the input's layout). training: batch statistics, returned as (mean, invstd, biased
  // var) for backward and for the caller's running-stat update; eval: running_mean/running_var.
  // Statistics are fp32 (fp64 for fp64 input); the op is functional (it updates no buffer).
  m.def(
      "bn_add_relu(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, Tensor? running_mean, "
      "Tensor? running_var, bool training, float eps, bool relu) -> (Tensor out, Tensor save_mean, "
      "Tensor save_invstd, Tensor batch_var)");
  // Gradients of bn_add_relu from its saved output (the ReLU mask is out > 0): one pass for the
  // per-channel sums, one for the input gradient. grad_residual is the masked grad_out (an empty
  // tensor when has_residual is false); grad_weight/grad_bias are fp32 (fp64) per-channel sums.
  m.def(
      "bn_add_relu_backward(Tensor grad_out, Tensor input, Tensor out, Tensor? weight, Tensor save_mean, "
      "Tensor save_invstd, bool training, bool relu, bool has_residual) -> (Tensor grad_input, "
      "Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)");

  // ---- ReLU + max pooling (csrc/pool) -------------------------------------------------------
  // out = max_pool2d(relu?(input)) = relu?(max_pool2d(input)) for (N, C, H, W) inputs, contiguous or
  // channels_last (out and argmax keep the input's layout); dilation 1, floor mode, padding at most
  // half the kernel, windows of at most 256 elements. argmax (uint8): the position of each window's
  // maximum inside the window (row * kernel_w + col), torch's choice of element (NaN wins; else the
  // first maximum), so the gradients are torch's.
  m.def(
      "relu_max_pool2d(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, bool relu) -> "
      "(Tensor out, Tensor argmax)");
  // Gradient of relu_max_pool2d for an input of input_size: each window's gradient goes to its
  // maximum, none where relu and out <= 0. Every input gradient is written once (summed over the
  // windows that picked it when windows overlap), in channels_last when asked.
  m.def(
      "relu_max_pool2d_backward(Tensor grad_out, Tensor out, Tensor argmax, SymInt[] input_size, "
      "int[2] kernel_size, int[2] stride, int[2] padding, bool relu, bool channels_last) -> Tensor");

  // ---- scaled dot-product attention (csrc/attention) -----------------------------------------
  // Flash attention: softmax(scale * q k^T + mask) v without materialising the (L, S) scores.
  // query (B, H, L, D), key (B, H, S, D), value (B, H, S, Dv); any strides with the last dim
  // contiguous. attn_mask: an additive float32 mask broadcastable to (B, H, L, S) (callers turn
  // boolean masks into 0/-inf). is_causal keeps key j for query i when j <= i (top-left aligned,
  // as torch.nn.functional.scaled_dot_product_attention). dropout_p > 0 drops probabilities with
  // a counter-based hash of (rng_seed, batch*head, i, j) (csrc/attention/attention_math.h), so
  // the backward regenerates the same mask and the same seed reproduces the result on any device.
  // Returns out (B, H, L, Dv) in the query's dtype and logsumexp (B, H, L) in fp32 (fp64 for fp64
  // input); rows with every key masked give out = 0 and logsumexp = -inf. Math is fp32 (fp64).
  m.def(
      "flash_attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, bool is_causal, "
      "float scale, float dropout_p, Tensor? rng_seed) -> (Tensor out, Tensor logsumexp)");
  // Gradients of flash_attention: recomputes the probabilities block by block from logsumexp.
  m.def(
      "flash_attention_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, "
      "Tensor logsumexp, Tensor? attn_mask, bool is_causal, float scale, float dropout_p, "
      "Tensor? rng_seed) -> (Tensor grad_query, Tensor grad_key, Tensor grad_value)");
}
