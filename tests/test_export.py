"""ONNX export: models built from torchfast layers export with either exporter (the ops lower to
their plain-PyTorch references while exporting) and onnxruntime reproduces them."""
import pytest
import torch

import torchfast
from torchfast.ops._registry import exporting

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _run_onnx(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_complex_network_exports_and_runs_in_onnxruntime(dynamo, tmp_path):
    if dynamo:
        pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    net = torchfast.models.ComplexNetwork(num_classes=10).eval()
    for m in net.modules():  # non-trivial running statistics for the folded BN
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / "net.onnx"
    torch.onnx.export(net, (x,), str(path), dynamo=dynamo)
    onnx.checker.check_model(str(path))
    with torch.no_grad():
        expected = net(x).numpy()
    assert abs(_run_onnx(path, x) - expected).max() < 1e-4
    assert not exporting()


def test_attention_and_fused_layers_export(tmp_path):
    pytest.importorskip("onnxscript")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torchfast.nn.ConvBNReLU2d(4, 8, 3, padding=1)
            self.bn = torchfast.nn.BatchNormReLU2d(8)
            self.mha = torchfast.nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            y = self.bn(self.conv(x)).flatten(2).transpose(1, 2)  # (N, H*W, 8)
            return self.mha(y, y, y, need_weights=False)[0]

    net = Net().eval()
    x = torch.randn(2, 4, 5, 6)
    path = tmp_path / "net.onnx"
    torch.onnx.export(net, (x,), str(path), dynamo=True)
    with torch.no_grad():
        expected = net(x).numpy()
    assert abs(_run_onnx(path, x) - expected).max() < 1e-4
