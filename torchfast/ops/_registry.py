"""Helpers shared by the op families' Python faces."""
from __future__ import annotations

import contextlib
import sys

import torch

from torchfast import _loader


def compiled_op(name: str):
    """The compiled operator torch.ops.torchfast.<name> (only call when _loader.has_kernel says so)."""
    return getattr(torch.ops.torchfast, name)


def eager_entry(name: str):
    """torchfast._C.<name>: the op with positional arguments and no per-tensor boxing, or None.

    Only for eager mode: it returns NotImplemented for tensor subclasses, and is not traceable, so
    callers use it only when not compiling and when no __torch_function__ mode is active."""
    module = _loader.STATE.module
    return getattr(module, name, None) if module is not None else None


def exporting() -> bool:
    """Whether torch.onnx.export or torch.export is tracing (the fused layers then fold afresh and
    skip the oneDNN post-op convolutions, which have no fake-tensor implementation)."""
    return onnx_exporting() or _torch_exporting()


def _torch_exporting() -> bool:
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting()) if is_exporting is not None else False


def onnx_exporting() -> bool:
    onnx = sys.modules.get("torch.onnx")  # not imported: not exporting (and no import cost per call)
    return onnx is not None and bool(getattr(onnx, "is_in_onnx_export", lambda: False)())


# Set by torchfast.deploy while it exports to ONNX with its translations of the torchfast ops.
_ONNX_TRANSLATIONS_ACTIVE = False


@contextlib.contextmanager
def onnx_translations_active():
    """Inside it, an ONNX export keeps the torchfast ops in the graph: the caller hands the exporter
    their translations (torchfast.deploy does)."""
    global _ONNX_TRANSLATIONS_ACTIVE
    previous, _ONNX_TRANSLATIONS_ACTIVE = _ONNX_TRANSLATIONS_ACTIVE, True
    try:
        yield
    finally:
        _ONNX_TRANSLATIONS_ACTIVE = previous


def lower_to_reference() -> bool:
    """Whether the ops should run their plain-PyTorch references so that a tracer records standard
    ops: while an ONNX exporter traces without torchfast's translations (a plain torch.onnx.export,
    either exporter, then works with no torchfast-specific step). torch.export keeps the ops: they
    have fake kernels, and the exported program runs the fused kernels."""
    return onnx_exporting() and not _ONNX_TRANSLATIONS_ACTIVE


def grads_through(output, inputs, needs, grad_output) -> list:
    """Differentiable gradients of `output` with respect to those `inputs` whose `needs` flag is set
    (None for the others), for a double backward through a reference computation."""
    wanted = [t for t, need in zip(inputs, needs) if need]
    grads = iter(torch.autograd.grad(output, wanted, grad_output, create_graph=True) if wanted else ())
    return [next(grads) if need else None for need in needs]


def autograd_transforms_active() -> bool:
    """Whether forward-mode AD (a dual_level) or a torch.func transform (jvp, grad, vmap, ...) is
    running: the compiled ops have reverse-mode autograd only (forward AD through them would give
    zero tangents), so callers run the references, whose plain torch ops support every transform."""
    if torch.compiler.is_compiling():
        return False
    if torch.autograd.forward_ad._current_level >= 0:
        return True
    return torch._C._are_functorch_transforms_active()


def use_eager_entry() -> bool:
    return not torch.compiler.is_compiling() and not torch._C._is_torch_function_mode_enabled()


def _schema_registered(name: str) -> bool:
    try:
        getattr(torch.ops.torchfast, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def register_fake_if_compiled(name: str):
    """torch.library.register_fake for torchfast::<name>, when the library (and so its schema) is loaded."""
    def wrap(fn):
        if _loader.STATE.loaded and _schema_registered(name):
            torch.library.register_fake(f"torchfast::{name}")(fn)
        return fn
    return wrap
