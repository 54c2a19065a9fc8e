"""torchfast.deploy.export_onnx: the torchfast ops translated for both exporters (opset 18 and 23),
dynamic batch (exported at 2, run at 1 and 7), onnxruntime parity, standard-domain nodes only; and
torch.export keeping the torchfast ops in its programs."""
import pytest
import torch
from torch import nn

import torchfast
from torchfast import deploy
from torchfast.ops._registry import lower_to_reference

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# (exporter, opset): the dynamo exporter at the common opset and at the Attention node's; the
# TorchScript exporter (it stops at opset 20)
CONFIGS = [("dynamo", 18), ("dynamo", 23), ("legacy", 18)]
CONFIG_IDS = [f"{e}-opset{o}" for e, o in CONFIGS]


def _randomise_stats(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()


class BNAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = torchfast.nn.BatchNormAddReLU2d(6)

    def forward(self, x, r):
        return self.bn(x, r)


class BNReLUNoAffine(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = torchfast.nn.BatchNormReLU2d(6, affine=False)

    def forward(self, x):
        return self.bn(x)


class ReLUPool(nn.Module):
    def forward(self, x):
        return torchfast.nn.functional.relu_max_pool2d(x, 3, 2, 1)


class MHA(nn.Module):
    """torchfast.nn.MultiheadAttention with batch-first outside (so the batch is dim 0 everywhere)."""

    def __init__(self, mask=None, kpm=False, causal=False, batch_first=True, kdim=None):
        super().__init__()
        self.batch_first, self.kpm, self.causal = batch_first, kpm, causal
        self.mha = torchfast.nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim, vdim=kdim)
        self.register_buffer("mask", mask if mask is not None else torch.zeros(0), persistent=False)

    def forward(self, q, kv):
        kpm = (kv[..., 0] > 0.8) if self.kpm else None  # some keys padded, per batch row
        mask = self.mask if self.mask.numel() else None
        if self.causal:
            mask = torch.ones(q.size(1), kv.size(1), dtype=torch.bool).triu(1)
        if not self.batch_first:
            q, kv = q.transpose(0, 1), kv.transpose(0, 1)
        out = self.mha(q, kv, kv, key_padding_mask=kpm, attn_mask=mask, need_weights=False,
                       is_causal=self.causal)[0]
        return out if self.batch_first else out.transpose(0, 1)


class SDPA(nn.Module):
    def __init__(self, mask=None, causal=False):
        super().__init__()
        self.causal = causal
        self.register_buffer("mask", mask if mask is not None else torch.zeros(0), persistent=False)

    def forward(self, q, k, v):
        mask = self.mask if self.mask.numel() else None
        return torchfast.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal)


def _cases():
    x4 = torch.randn(2, 6, 5, 7)
    q, kv = torch.randn(2, 5, 16), torch.randn(2, 9, 16)
    q4, k4, v4 = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 4)
    float_mask = torch.randn(5, 9)
    bool_mask = torch.rand(2, 1, 5, 9) > 0.3
    bool_mask[..., 0, :] = False  # one fully masked query row: 0 out, as the kernels
    return {
        "ResidualBlock": (lambda: torchfast.nn.ResidualBlock(6), (x4,)),
        "ConvBNReLU2d": (lambda: torchfast.nn.ConvBNReLU2d(6, 8, 3, padding=1), (x4,)),
        "BatchNormReLU2d": (lambda: torchfast.nn.BatchNormReLU2d(6), (x4,)),
        "BatchNormReLU2d-noaffine": (BNReLUNoAffine, (x4,)),
        "BatchNormAddReLU2d": (BNAdd, (x4, torch.randn(2, 6, 5, 7))),
        "relu_max_pool2d": (ReLUPool, (x4,)),
        "MHA": (lambda: MHA(), (q, kv)),
        "MHA-seq-first": (lambda: MHA(batch_first=False), (q, kv)),
        "MHA-key_padding_mask": (lambda: MHA(kpm=True), (q, kv)),
        "MHA-attn_mask": (lambda: MHA(mask=torch.rand(5, 9) > 0.5), (q, kv)),
        "MHA-causal": (lambda: MHA(causal=True), (q, torch.randn(2, 5, 16))),
        "MHA-kdim": (lambda: MHA(kdim=12), (q, torch.randn(2, 9, 12))),
        "SDPA": (SDPA, (q4, k4, v4)),
        "SDPA-float-mask": (lambda: SDPA(mask=float_mask), (q4, k4, v4)),
        "SDPA-bool-mask": (lambda: SDPA(mask=bool_mask[:1]), (q4, k4, v4)),
        "SDPA-causal": (lambda: SDPA(causal=True), (q4, k4, v4)),
        "ComplexNetwork": (lambda: torchfast.models.ComplexNetwork(10, 3), (torch.randn(2, 3, 16, 16),)),
    }


CASES = _cases()


@pytest.mark.parametrize("exporter,opset", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("case", list(CASES))
def test_export_matches_onnxruntime_at_other_batch_sizes(case, exporter, opset, tmp_path):
    torch.manual_seed(0)
    make, inputs = CASES[case]
    model = _randomise_stats(make())
    report = deploy.export_onnx(model, inputs, tmp_path / "m.onnx", opset=opset, exporter=exporter)
    assert report.verified_batches == [1, 7] and report.max_error <= 1e-4, str(report)
    assert set(report.domains) <= {"", "ai.onnx"}, report.domains  # standard operators only
    assert report.opset == opset
    attends = case.startswith(("MHA", "SDPA", "Complex"))
    if attends and exporter == "dynamo":
        assert ("Attention" in report.nodes) == (opset >= 23), report.nodes
    if case.startswith(("ResidualBlock", "ConvBNReLU")):
        assert "BatchNormalization" not in report.nodes  # folded into the convolutions
    if case in ("relu_max_pool2d", "ComplexNetwork"):
        assert "MaxPool" in report.nodes and "Relu" in report.nodes, report.nodes
    assert not lower_to_reference()


def test_trained_batch_norm_translation_uses_batch_statistics(tmp_path):
    """A batch norm exported in training mode by a caller who asks for it (the translation's
    ReduceMean arithmetic) matches the training-mode forward."""
    from torchfast.deploy import onnx_dynamo
    from torchfast.ops._registry import onnx_translations_active

    bn = torchfast.nn.BatchNormReLU2d(6, track_running_stats=False)  # batch statistics in eval too
    x = torch.randn(3, 6, 4, 5)
    path = tmp_path / "bn.onnx"
    with onnx_translations_active():
        torch.onnx.export(bn.eval(), (x,), str(path), dynamo=True,
                          custom_translation_table=onnx_dynamo.translation_table(18))
    got = deploy.OrtModule(str(path))(x)
    torch.testing.assert_close(got, bn(x), atol=1e-5, rtol=1e-5)


def test_export_errors_name_what_they_got(tmp_path):
    net = torchfast.nn.BatchNormReLU2d(4).eval()
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="opset must be in"):
        deploy.export_onnx(net, x, tmp_path / "a.onnx", opset=11)
    with pytest.raises(ValueError, match=r"\[14, 20\] for the legacy"):
        deploy.export_onnx(net, x, tmp_path / "a.onnx", opset=23, exporter="legacy")
    with pytest.raises(ValueError, match="exporter must be one of"):
        deploy.export_onnx(net, x, tmp_path / "a.onnx", exporter="tflite")
    with pytest.raises(TypeError, match="example_inputs"):
        deploy.export_onnx(net, "not a tensor", tmp_path / "a.onnx")


def test_dropout_in_an_exported_graph_is_refused(tmp_path):
    mha = torchfast.nn.MultiheadAttention(8, 2, dropout=0.5, batch_first=True)

    class TrainingMHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            self.mha.train()  # dropout on while exporting
            return self.mha(x, x, x, need_weights=False)[0]

    with pytest.raises(Exception, match="dropout"):
        deploy.export_onnx(TrainingMHA(), torch.randn(2, 3, 8), tmp_path / "a.onnx", verify=False)


def test_export_restores_training_mode(tmp_path):
    net = torchfast.nn.ResidualBlock(4).train()
    deploy.export_onnx(net, torch.randn(2, 4, 5, 5), tmp_path / "a.onnx")
    assert net.training and net.bn1.training


def test_example_batch_of_one_still_exports_a_dynamic_batch(tmp_path):
    net = _randomise_stats(torchfast.nn.ConvBNReLU2d(3, 4, 3))
    report = deploy.export_onnx(net, torch.randn(1, 3, 6, 6), tmp_path / "a.onnx")
    assert report.max_error <= 1e-4 and report.verified_batches == [1, 7]


# -- torch.export -----------------------------------------------------------------------------------

def _torchfast_targets(program) -> set:
    return {str(n.target) for n in program.graph.nodes if str(n.target).startswith("torchfast.")}


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_torch_export_keeps_the_torchfast_ops_and_runs_them(mode):
    if not torchfast.info()["kernels_loaded"]:
        pytest.skip("the compiled library is not loaded: the layers run their references")
    torch.manual_seed(0)
    net = torchfast.models.ComplexNetwork(10, 3)
    net.train(mode == "train")
    net.classifier[3].p = 0.0  # no dropout: the two runs must agree
    x = torch.randn(4, 3, 16, 16)
    program = torch.export.export(net, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    ops = _torchfast_targets(program)
    assert {"torchfast.bn_add_relu.default", "torchfast.flash_attention.default"} <= ops, ops
    module = program.module()
    x2 = torch.randn(3, 3, 16, 16)
    expected = net(x2)
    with torch.profiler.profile() as prof:
        got = module(x2)
    names = {e.name for e in prof.events()}
    assert {"torchfast::bn_add_relu", "torchfast::flash_attention"} <= names, sorted(n for n in names if "::" in n)[:20]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    compiled = torch.compile(module)
    torch.testing.assert_close(compiled(x2), expected, atol=1e-4, rtol=1e-4)
