// Argument validation of the optimizer ops, shared by their CPU and CUDA kernels. Everything is
// checked before anything is written, so a bad call leaves every tensor as it was.
#pragma once
#include "common/tensor_lists.h"

namespace torchfast {

inline void check_adam_args(const char* op, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                            bool amsgrad) {
  const size_t n = params.size();
  check_list_length(op, "grads", grads, n);
  check_list_length(op, "exp_avgs", exp_avgs, n);
  check_list_length(op, "exp_avg_sqs", exp_avg_sqs, n);
  check_list_length(op, "state_steps", state_steps, n);
  check_list_length(op, "max_exp_avg_sqs", max_exp_avg_sqs, amsgrad ? n : 0);
  if (n == 0) return;
  const at::Device device = params[0].device();
  for (size_t i = 0; i < n; ++i) {
    check_param(op, i, params[i], device);
    check_like_param(op, "grads", i, grads[i], params[i]);
    check_like_param(op, "exp_avgs", i, exp_avgs[i], params[i]);
    check_like_param(op, "exp_avg_sqs", i, exp_avg_sqs[i], params[i]);
    if (amsgrad) check_like_param(op, "max_exp_avg_sqs", i, max_exp_avg_sqs[i], params[i]);
    check_step(op, i, state_steps[i], device);
  }
}

inline void check_sgd_args(const char* op, at::TensorList params, at::TensorList grads,
                           at::TensorList momentum_buffers, bool use_momentum) {
  const size_t n = params.size();
  check_list_length(op, "grads", grads, n);
  check_list_length(op, "momentum_buffers", momentum_buffers, use_momentum ? n : 0);
  if (n == 0) return;
  const at::Device device = params[0].device();
  for (size_t i = 0; i < n; ++i) {
    check_param(op, i, params[i], device);
    check_like_param(op, "grads", i, grads[i], params[i]);
    if (use_momentum) check_like_param(op, "momentum_buffers", i, momentum_buffers[i], params[i]);
  }
}

}  // namespace torchfast
