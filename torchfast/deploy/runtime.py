"""Running an exported ONNX file from torch code: onnxruntime behind a module's call."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError("running ONNX models needs onnxruntime: pip install 'torchfast[onnx]'") from e
    return onnxruntime


def require_onnx():
    try:
        import onnx
    except ImportError as e:
        raise ImportError("ONNX export needs onnx: pip install 'torchfast[onnx]'") from e
    return onnx


class OrtModule(nn.Module):
    """An ONNX file run by onnxruntime on the CPU, called like the module it was exported from:
    tensors in, a tensor (or a tuple, for several outputs) out. `threads` sets intra-op threads
    (default: onnxruntime's, one per core); `spin=True` lets them busy-wait between runs (lower
    latency for a process that runs only this model)."""

    def __init__(self, path: str, threads: Optional[int] = None, spin: bool = False):
        super().__init__()
        ort = require_onnxruntime()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if not spin:
            # onnxruntime's threads otherwise busy-wait after each run, taking the cores from whatever
            # torch runs next (measured here: a torch model run right after it took 5x as long)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = os.fspath(path)
        self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def forward(self, *inputs: Tensor):
        if len(inputs) != len(self.input_names):
            raise ValueError(f"OrtModule({self.path}): the model takes {len(self.input_names)} inputs "
                             f"({self.input_names}), got {len(inputs)}")
        feeds = {name: _to_numpy(t) for name, t in zip(self.input_names, inputs)}
        outputs = [torch.from_numpy(o) for o in self.session.run(None, feeds)]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def _to_numpy(t) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy() if isinstance(t, Tensor) else np.asarray(t)


def flat_outputs(out) -> list:
    """A module's result as a flat list of tensors (a tensor, or nested tuples/lists of them)."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in flat_outputs(o)]
    raise TypeError(f"expected the model to return tensors, got {type(out).__name__}")


def as_tuple(example_inputs) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def batch_like(inputs: Sequence[Tensor], batch: int, seed: int = 0) -> tuple:
    """Inputs of another batch size made from the example's rows (cycled), float ones jittered so
    that the rows differ: verification data in the example's own range."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in inputs:
        idx = torch.arange(batch) % t.size(0)
        rows = t.detach()[idx]
        if rows.is_floating_point():
            scale = rows.float().std().nan_to_num(1.0).clamp_min(1e-3) * 0.1
            rows = rows + (torch.randn(rows.shape, generator=g) * scale.cpu()).to(rows.device, rows.dtype)
        out.append(rows)
    return tuple(out)


def file_bytes(path: str) -> int:
    """Size of an ONNX file together with its external-data files, if any."""
    total = os.path.getsize(path)
    data = path + ".data"
    return total + (os.path.getsize(data) if os.path.exists(data) else 0)
