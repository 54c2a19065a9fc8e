"""Deployment: a model in torch eager vs its ONNX export in onnxruntime vs int8 (onnxruntime static
QDQ, onnxruntime dynamic, PT2E lowered by inductor), CPU, batch 1 and 32.

    pytest benchmarks/bench_deploy.py --benchmark-only

`torchfast bench --suites deploy` prints the full comparison (the main job's trained network with
accuracy, ComplexNetwork at 3x32x32, two ResidualBlock(256)), interleaved in one run.
"""
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from torchfast.bench import deploy as bench_deploy  # noqa: E402
from torchfast.deploy import OrtModule, export_onnx, quantize  # noqa: E402

VARIANTS = ["torch eager", "onnxruntime fp32", "onnx-static int8"]


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("deploy")
    model, shape, _, calibration = bench_deploy.build("complexnet", str(workdir))
    example = torch.randn(2, *shape)
    fp32 = export_onnx(model, example, str(workdir / "fp32.onnx"))
    int8 = quantize(model, example, method="onnx-static", calibration=calibration, path=str(workdir / "int8.onnx"))
    return {"torch eager": model, "onnxruntime fp32": OrtModule(fp32.path), "onnx-static int8": int8.module}, shape


@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("variant", VARIANTS)
def test_complexnet_inference(benchmark, deployed, variant, batch, device):
    if device != "cpu":
        pytest.skip("deployment targets the CPU (onnxruntime's CPU provider, x86 int8 kernels)")
    runs, shape = deployed
    x = torch.randn(batch, *shape)
    run = runs[variant]
    benchmark.group = f"ComplexNetwork 3x32x32 inference batch {batch}"
    with torch.no_grad():
        benchmark.pedantic(run, args=(x,), rounds=10, iterations=1, warmup_rounds=2)
