// torchfast._C as a Python module: direct entry points for the list-taking ops.
//
// Calling torch.ops.torchfast.fused_adam_ from Python converts every tensor of every list to an
// IValue and back (~0.5 us per tensor); with thousands of parameters that costs more than the
// update of small tensors. These functions unpack the lists straight into std::vector<at::Tensor>
// and call the op through the typed dispatcher (Autograd key, version bumps, device kernels: the
// same path, minus the boxing). They accept plain tensors and Parameters only; for anything else
// (tensor subclasses) they return NotImplemented and the caller uses torch.ops, which handles
// __torch_function__. torch.compile always traces torch.ops (see torchfast/ops/).
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <optional>
#include <vector>

namespace {

using OptTensor = const std::optional<at::Tensor>&;

// false: an element is not a plain tensor/Parameter (the caller returns NotImplemented).
bool unpack_list(PyObject* seq, std::vector<at::Tensor>& out) {
  if (!PyList_Check(seq) && !PyTuple_Check(seq)) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  out.reserve(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!THPVariable_CheckExact(items[i])) return false;
    out.push_back(THPVariable_Unpack(items[i]));
  }
  return true;
}

bool unpack_optional(PyObject* obj, std::optional<at::Tensor>& out) {
  if (obj == Py_None) return true;
  if (!THPVariable_CheckExact(obj)) return false;
  out = THPVariable_Unpack(obj);
  return true;
}

// Releases the GIL for the op; the destructor takes it back also when the op throws.
struct ReleaseGil {
  PyThreadState* state = PyEval_SaveThread();
  ~ReleaseGil() { PyEval_RestoreThread(state); }
};

template <typename F>
PyObject* call_op(F&& f) {
  try {
    ReleaseGil released;
    f();
  } catch (const c10::ValueError& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  } catch (const c10::TypeError& e) {
    PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
    return nullptr;
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

// fused_adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2,
//             weight_decay, eps, amsgrad, maximize, decoupled_weight_decay, lr_tensor, grad_scale,
//             found_inf, clip_coef): positional, as in the schema.
PyObject* fused_adam_(PyObject*, PyObject* args) {
  PyObject *l0, *l1, *l2, *l3, *l4, *l5, *o_lr, *o_scale, *o_inf, *o_clip;
  double lr, beta1, beta2, weight_decay, eps;
  int amsgrad, maximize, decoupled;
  if (!PyArg_ParseTuple(args, "OOOOOOdddddpppOOOO", &l0, &l1, &l2, &l3, &l4, &l5, &lr, &beta1, &beta2, &weight_decay,
                        &eps, &amsgrad, &maximize, &decoupled, &o_lr, &o_scale, &o_inf, &o_clip))
    return nullptr;
  std::vector<at::Tensor> lists[6];
  std::optional<at::Tensor> lr_t, scale_t, inf_t, clip_t;
  PyObject* seqs[6] = {l0, l1, l2, l3, l4, l5};
  for (int k = 0; k < 6; ++k)
    if (!unpack_list(seqs[k], lists[k])) Py_RETURN_NOTIMPLEMENTED;
  if (!unpack_optional(o_lr, lr_t) || !unpack_optional(o_scale, scale_t) || !unpack_optional(o_inf, inf_t) ||
      !unpack_optional(o_clip, clip_t))
    Py_RETURN_NOTIMPLEMENTED;
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("torchfast::fused_adam_", "")
                             .typed<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                                         at::TensorList, double, double, double, double, double, bool, bool, bool,
                                         OptTensor, OptTensor, OptTensor, OptTensor)>();
  return call_op([&] {
    op.call(lists[0], lists[1], lists[2], lists[3], lists[4], lists[5], lr, beta1, beta2, weight_decay, eps,
            amsgrad != 0, maximize != 0, decoupled != 0, lr_t, scale_t, inf_t, clip_t);
  });
}

// fused_sgd_(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov,
//            maximize, is_first_step, lr_tensor, grad_scale, found_inf, clip_coef): positional.
PyObject* fused_sgd_(PyObject*, PyObject* args) {
  PyObject *l0, *l1, *l2, *o_lr, *o_scale, *o_inf, *o_clip;
  double lr, momentum, dampening, weight_decay;
  int nesterov, maximize, first;
  if (!PyArg_ParseTuple(args, "OOOddddpppOOOO", &l0, &l1, &l2, &lr, &momentum, &dampening, &weight_decay, &nesterov,
                        &maximize, &first, &o_lr, &o_scale, &o_inf, &o_clip))
    return nullptr;
  std::vector<at::Tensor> lists[3];
  std::optional<at::Tensor> lr_t, scale_t, inf_t, clip_t;
  PyObject* seqs[3] = {l0, l1, l2};
  for (int k = 0; k < 3; ++k)
    if (!unpack_list(seqs[k], lists[k])) Py_RETURN_NOTIMPLEMENTED;
  if (!unpack_optional(o_lr, lr_t) || !unpack_optional(o_scale, scale_t) || !unpack_optional(o_inf, inf_t) ||
      !unpack_optional(o_clip, clip_t))
    Py_RETURN_NOTIMPLEMENTED;
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("torchfast::fused_sgd_", "")
                             .typed<void(at::TensorList, at::TensorList, at::TensorList, double, double, double, double,
                                         bool, bool, bool, OptTensor, OptTensor, OptTensor, OptTensor)>();
  return call_op([&] {
    op.call(lists[0], lists[1], lists[2], lr, momentum, dampening, weight_decay, nesterov != 0, maximize != 0,
            first != 0, lr_t, scale_t, inf_t, clip_t);
  });
}

PyMethodDef methods[] = {
    {"fused_adam_", fused_adam_, METH_VARARGS, "torchfast::fused_adam_ with positional arguments (eager fast path)"},
    {"fused_sgd_", fused_sgd_, METH_VARARGS, "torchfast::fused_sgd_ with positional arguments (eager fast path)"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "torchfast._C", "torchfast's compiled ops (eager entry points)", -1,
                      methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
