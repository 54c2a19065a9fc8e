"""Deployment: ONNX export with translations of the torchfast ops (both exporters), int8
quantization (onnxruntime, torchao PT2E), pruning (torch.nn.utils.prune) and the plain-PyTorch form
of fused models. Importing it registers the TorchScript exporter's symbolic functions."""
from __future__ import annotations

from torchfast.deploy import onnx_legacy
from torchfast.deploy.onnx_common import TranslationError
from torchfast.deploy.onnx_dynamo import translation_table
from torchfast.deploy.onnx_export import ExportReport, export_onnx, verify_onnx
from torchfast.deploy.plain import to_plain
from torchfast.deploy.pruning import PruneReport, make_permanent_, prune, sparsity
from torchfast.deploy.quantization import QuantizedModel, quantize
from torchfast.deploy.runtime import OrtModule
from torchfast.ops._registry import onnx_translations_active as keep_torchfast_ops

__all__ = ["ExportReport", "OrtModule", "PruneReport", "QuantizedModel", "TranslationError", "export_onnx",
           "keep_torchfast_ops", "make_permanent_", "prune", "quantize", "sparsity", "to_plain",
           "translation_table", "verify_onnx"]

onnx_legacy.register()
