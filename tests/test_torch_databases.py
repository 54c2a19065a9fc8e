"""torchfast's drop-ins on the sample inputs PyTorch tests itself with (torch.testing._internal):
op_db's scaled_dot_product_attention samples, module_db's MultiheadAttention and BatchNorm2d inputs,
optim_db's Adam/AdamW/SGD configs and error inputs, each against torch's own result."""
import re

import pytest
import torch

import torchfast

pytest.importorskip("expecttest")  # what torch.testing._internal imports

from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402
from torch.testing._internal.common_modules import module_db  # noqa: E402
from torch.testing._internal.common_optimizers import OptimizerErrorEnum, optim_db  # noqa: E402

SDPA = next(o for o in op_db if o.name == "nn.functional.scaled_dot_product_attention")
DTYPES = [torch.float32, torch.float64]


def _rel_close(got, want, dtype, what=""):
    """|got - want| <= tol * max(1, |want|.max()): torch's samples reach magnitudes in the hundreds."""
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3e} at scale {scale:.3g}"


def _sdpa_samples(dtype):
    return list(SDPA.sample_inputs("cpu", dtype, requires_grad=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sdpa_on_torchs_sample_inputs(dtype, record_property):
    checked = shapes_only = 0
    samples = _sdpa_samples(dtype)
    for s in samples:
        q, k, v = s.input, *s.args[:2]
        kwargs = dict(s.kwargs)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, *s.args[2:], **kwargs)
        got = torchfast.nn.functional.scaled_dot_product_attention(q, k, v, *s.args[2:], **kwargs)
        assert got.shape == want.shape and got.dtype == want.dtype
        if kwargs.get("dropout_p", 0.0) > 0.0:
            shapes_only += 1
            continue  # a different (equally distributed) dropout mask: shapes only
        shapes = f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {kwargs}"
        _rel_close(got, want, dtype, shapes)
        g = torch.randn_like(want)
        for name, a, b in zip("qkv", torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
            _rel_close(a, b, dtype, f"grad {name} of {shapes}")
        checked += 1
    record_property("checked", f"{checked}/{len(samples)}, {shapes_only} with dropout: shape and dtype only")
    assert checked + shapes_only == len(samples) and checked >= 10


def _module_inputs(cls, dtype, training):
    info = next(m for m in module_db if m.module_cls is cls)
    return list(info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=training))


def _tensors(args):
    return [t for t in args if isinstance(t, torch.Tensor) and t.requires_grad]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_multihead_attention_on_torchs_module_inputs(training, record_property):
    """The flash path (need_weights=False) on every module_db input: outputs and gradients of
    inputs and parameters, fp64."""
    checked = 0
    inputs = _module_inputs(torch.nn.MultiheadAttention, torch.float64, training)
    for mi in inputs:
        args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
        if training and kwargs.get("dropout", 0.0):
            continue
        fwd_args, fwd_kwargs = mi.forward_input.args, dict(mi.forward_input.kwargs, need_weights=False)
        torch.manual_seed(0)
        ref = torch.nn.MultiheadAttention(*args, **kwargs).double().train(training)
        ours = torchfast.nn.MultiheadAttention(*args, **kwargs).double().train(training)
        ours.load_state_dict(ref.state_dict())
        want, got = ref(*fwd_args, **fwd_kwargs)[0], ours(*fwd_args, **fwd_kwargs)[0]
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        g = torch.randn_like(want)
        wrt_ref = _tensors(fwd_args) + list(ref.parameters())
        wrt_ours = _tensors(fwd_args) + list(ours.parameters())
        for a, b in zip(torch.autograd.grad(got, wrt_ours, g, allow_unused=True),
                        torch.autograd.grad(want, wrt_ref, g, allow_unused=True)):
            if a is not None or b is not None:
                torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)
        checked += 1
    record_property("checked", f"{checked}/{len(inputs)}")
    assert checked >= 32


def _same_outputs_gradients_statistics(got, want, ours, ref, inputs):
    """fp64: outputs, the gradients of `inputs` and of each module's parameters, the running statistics."""
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, [*inputs, *ours.parameters()], g),
                    torch.autograd.grad(want, [*inputs, *ref.parameters()], g)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)
    for a, b in zip(ours.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batchnorm_relu_on_torchs_batchnorm2d_inputs(training, record_property):
    """BatchNormReLU2d against relu(nn.BatchNorm2d) on module_db's BatchNorm2d inputs (momentum None,
    affine off, no running statistics included): outputs, gradients, running statistics."""
    checked = 0
    inputs = _module_inputs(torch.nn.BatchNorm2d, torch.float64, training)
    for mi in inputs:
        args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
        (x,) = mi.forward_input.args
        ref = torch.nn.BatchNorm2d(*args, **kwargs).double().train(training)
        ours = torchfast.nn.BatchNormReLU2d(*args, **kwargs).double().train(training)
        ours.load_state_dict(ref.state_dict())
        want, got = torch.relu(ref(x)), ours(x)
        _same_outputs_gradients_statistics(got, want, ours, ref, [x])
        checked += 1
    record_property("checked", f"{checked}/{len(inputs)}")
    assert checked >= 4


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batchnorm_add_relu_on_torchs_batchnorm2d_inputs(training, record_property):
    """BatchNormAddReLU2d against relu(nn.BatchNorm2d(x) + residual) on module_db's BatchNorm2d inputs:
    outputs, gradients (the residual's too), running statistics."""
    checked = 0
    inputs = _module_inputs(torch.nn.BatchNorm2d, torch.float64, training)
    for mi in inputs:
        args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
        (x,) = mi.forward_input.args
        residual = torch.randn(x.shape, dtype=x.dtype).requires_grad_()
        ref = torch.nn.BatchNorm2d(*args, **kwargs).double().train(training)
        ours = torchfast.nn.BatchNormAddReLU2d(*args, **kwargs).double().train(training)
        ours.load_state_dict(ref.state_dict())
        want, got = torch.relu(ref(x) + residual), ours(x, residual)
        _same_outputs_gradients_statistics(got, want, ours, ref, [x, residual])
        checked += 1
    record_property("checked", f"{checked}/{len(inputs)}")
    assert checked >= 4


DROP_INS = {torch.optim.Adam: torchfast.optim.Adam, torch.optim.AdamW: torchfast.optim.AdamW,
            torch.optim.SGD: torchfast.optim.SGD}
OPTIM_INFOS = [info for info in optim_db if info.optim_cls in DROP_INS]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("info", OPTIM_INFOS, ids=lambda i: i.optim_cls.__name__)
def test_optimizers_on_torchs_configs(info, dtype, record_property):
    """Every optim_db config (lr as float or Tensor, weight decay, amsgrad, maximize, nesterov, ...):
    five steps from the same parameters and gradients, torchfast vs torch."""
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    configs = info.optim_inputs_func(device="cpu", dtype=dtype)
    assert configs
    for config in configs:
        g = torch.Generator().manual_seed(0)
        theirs = [torch.randn(5, 3, dtype=dtype, generator=g).requires_grad_(), torch.randn(7, dtype=dtype,
                                                                                            generator=g).requires_grad_()]
        ours = [p.detach().clone().requires_grad_() for p in theirs]
        opt_t = info.optim_cls(theirs, **config.kwargs)
        opt_o = DROP_INS[info.optim_cls](ours, **config.kwargs)
        for _ in range(5):
            for a, b in zip(theirs, ours):
                grad = torch.randn(a.shape, dtype=dtype, generator=g)
                a.grad, b.grad = grad.clone(), grad.clone()
            opt_t.step()
            opt_o.step()
        for a, b in zip(theirs, ours):
            torch.testing.assert_close(b, a, **tol, msg=f"{info.optim_cls.__name__} {config.desc}")
    record_property("checked", f"{len(configs)}/{len(configs)}")


# optim_db error inputs that torchfast accepts on purpose: its step is always one fused kernel, which
# takes a Tensor lr or Tensor betas whatever `foreach` says (torch's foreach path cannot), and it
# reads betas as numbers, so a float/Tensor mix is fine.
ACCEPTED_ON_PURPOSE = ("lr as a Tensor is not supported for capturable=False and foreach=True",
                       "betas must be either both floats or both Tensors",
                       r"betas\[0\] as a Tensor is not supported for capturable=False and foreach=True")


@pytest.mark.parametrize("info", OPTIM_INFOS, ids=lambda i: i.optim_cls.__name__)
def test_optimizer_error_inputs_raise_as_torch_does(info, record_property):
    params = lambda: [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    errors = info.optim_error_inputs_func(device="cpu", dtype=torch.float32)
    for error in errors:
        spec = error.optimizer_error_input
        cls = DROP_INS[info.optim_cls]
        if error.error_regex in ACCEPTED_ON_PURPOSE:
            ours = params()
            opt = cls(ours, **spec.kwargs)  # accepted: and it steps as torch's per-tensor path does
            theirs = [p.detach().clone().requires_grad_() for p in ours]
            ref_kwargs = dict(spec.kwargs, foreach=False)
            if "betas" in ref_kwargs:  # the same numbers, as torch takes them
                ref_kwargs["betas"] = tuple(float(b) for b in ref_kwargs["betas"])
            ref = info.optim_cls(theirs, **ref_kwargs)
            for a, b in zip(ours, theirs):
                a.grad = torch.ones_like(a)
                b.grad = torch.ones_like(b)
            opt.step()
            ref.step()
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a, b)
            continue
        if issubclass(error.error_type, Warning):
            with pytest.warns(error.error_type, match=error.error_regex):
                cls(spec.params, **spec.kwargs)
            continue
        with pytest.raises(error.error_type, match=error.error_regex):
            opt = cls(spec.params, **spec.kwargs)
            if error.error_on == OptimizerErrorEnum.STEP_ERROR:
                opt.step()
        assert re.compile(error.error_regex)
    record_property("checked", f"{len(errors)}/{len(errors)}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_conv_bn_relu_on_torchs_conv2d_inputs(training, record_property):
    """ConvBNReLU2d against nn.Sequential(Conv2d, BatchNorm2d, ReLU) on module_db's batched Conv2d
    inputs (strides, paddings, padding modes, dilation, groups), with and without grad (eval without
    grad takes the folded path)."""
    checked = 0
    inputs = _module_inputs(torch.nn.Conv2d, torch.float64, training)
    for mi in inputs:
        args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
        (x,) = mi.forward_input.args
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(*args, **kwargs).double()
        ref = torch.nn.Sequential(conv, torch.nn.BatchNorm2d(conv.out_channels).double(), torch.nn.ReLU())
        ours = torchfast.nn.ConvBNReLU2d(*args, **kwargs).double()
        ours.load_state_dict(ref.state_dict())
        ours.train(training), ref.train(training)
        if x.dim() != 4:  # unbatched: BatchNorm2d takes 4-D input only, and both stacks say so
            for stack in (ref, ours):
                with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
                    stack(x)
            checked += 1
            continue
        with torch.no_grad():
            torch.testing.assert_close(ours(x), ref(x), rtol=1e-9, atol=1e-9)
        x = x.detach().requires_grad_()
        want, got = ref(x), ours(x)
        _same_outputs_gradients_statistics(got, want, ours, ref, [x])
        checked += 1
    record_property("checked", f"{checked}/{len(inputs)}")
    assert checked == len(inputs)


@pytest.mark.parametrize("cls", [torchfast.optim.Adam, torchfast.optim.AdamW], ids=lambda c: c.__name__)
@pytest.mark.parametrize("hyper", ["tensor lr", "tensor betas"])
def test_tensor_hyperparameters_on_fp64_match_torchs_fused_path_exactly(cls, hyper):
    """fp32 Tensor lr/betas on fp64 params: torch's own paths disagree (its per-tensor path does the
    hyperparameter arithmetic in the tensors' fp32, its fused path reads them as numbers); torchfast
    is its fused path, to the bit, and within torch's fp32 rounding of the per-tensor path."""
    kwargs = dict(lr=torch.tensor(1e-3)) if hyper == "tensor lr" else \
        dict(lr=1e-3, betas=(torch.tensor(0.9), torch.tensor(0.999)))
    torch_cls = getattr(torch.optim, cls.__name__)
    g = torch.Generator().manual_seed(0)
    start = torch.randn(5, 3, dtype=torch.float64, generator=g)
    runs = {name: [start.clone().requires_grad_()] for name in ("ours", "fused", "single")}
    opts = {"ours": cls(runs["ours"], **kwargs), "fused": torch_cls(runs["fused"], fused=True, **kwargs),
            "single": torch_cls(runs["single"], foreach=False, **kwargs)}
    for _ in range(5):
        grad = torch.randn(5, 3, dtype=torch.float64, generator=g)
        for name, opt in opts.items():
            runs[name][0].grad = grad.clone()
            opt.step()
    assert torch.equal(runs["ours"][0], runs["fused"][0])
    torch.testing.assert_close(runs["ours"][0], runs["single"][0], rtol=0, atol=1e-6)
