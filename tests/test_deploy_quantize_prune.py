"""torchfast.deploy.quantize and .prune on a small ComplexNetwork trained on digits in the test
(seeded): int8 accuracy within a point of fp32, the int8 files smaller, pruning exact, fused layers
reading pruned weights, pruned and quantized models exporting and running in onnxruntime."""
import pytest
import torch
from torch import nn

import torchfast
from torchfast import deploy
from torchfast.deploy import measure
from torchfast.reference import modules as plain

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The main job's model: `torchfast train` (12 epochs, seeded) on digits, and its data."""
    from torchfast.deploy.from_run import load_run
    from torchfast.train import data
    from torchfast.train.job import JobConfig, run

    out = str(tmp_path_factory.mktemp("digits-run"))
    run(JobConfig(out=out, progress=False), log=lambda *_: None)
    model = load_run(out).model
    train_set, val_set, _, _ = data.digits_datasets()
    g = torch.Generator().manual_seed(0)
    train = torch.utils.data.DataLoader(train_set, batch_size=64, shuffle=True, generator=g)
    val = torch.utils.data.DataLoader(val_set, batch_size=128)
    return model, train, val


@pytest.mark.parametrize("method", ["onnx-static", "dynamic", "pt2e"])
def test_int8_keeps_accuracy_within_a_point(method, digits, tmp_path):
    if method == "pt2e":
        pytest.importorskip("torchao")
    model, _, val = digits
    fp32 = measure.accuracy(model, val)
    assert fp32 >= 0.97
    example = next(iter(val))[0][:2]
    path = None if method == "pt2e" else str(tmp_path / f"{method}.onnx")
    q = deploy.quantize(model, example, method=method, calibration=val, path=path)
    assert measure.accuracy(q, val) >= fp32 - 0.01, q.details
    assert not model.training  # the caller's model is left as it was
    out = q(torch.rand(5, 1, 8, 8))  # another batch size
    assert out.shape == (5, 10)
    if method == "onnx-static":  # every weight int8: >= 3.5x smaller than the fp32 ONNX file
        fp32_file = deploy.export_onnx(model, example, tmp_path / "fp32.onnx", verify=False).file_bytes
        assert fp32_file / q.size_bytes >= 3.5, (fp32_file, q.size_bytes)
        assert q.details["format"].startswith("QDQ")
    if method == "pt2e":  # int8 weights in the graph (attention projections included)
        assert measure.model_bytes(model) / q.size_bytes >= 3.0, q.size_bytes


def test_quantize_rewrites_fused_layers_to_plain_torch(digits):
    model, _, _ = digits
    flat = deploy.to_plain(model, fold_bn=True)
    kinds = {type(m) for m in flat.modules()}
    assert not kinds & {torchfast.nn.ResidualBlock, torchfast.nn.MultiheadAttention}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in flat.modules())  # folded
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(flat(x), model(x), atol=1e-5, rtol=1e-5)
    assert isinstance(model.features[3], torchfast.nn.ResidualBlock)  # the original is untouched
    with pytest.raises(ValueError, match="eval mode"):
        deploy.to_plain(torchfast.nn.ResidualBlock(4).train(), fold_bn=True)


def test_quantize_rejects_unknown_methods_and_bad_calibration(digits):
    model, _, _ = digits
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="method must be one of"):
        deploy.quantize(model, x, method="fp8")
    with pytest.raises(TypeError, match="calibration batches"):
        deploy.quantize(model, x, method="onnx-static", calibration=["not a tensor"])


def test_global_l1_pruning_is_exact_and_reported():
    torch.manual_seed(0)
    net = torchfast.models.ComplexNetwork(10, 3)
    report = deploy.prune(net, 0.5)
    total = sum(m.weight.numel() for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert report.numel == total and report.zeros == round(0.5 * total)
    assert deploy.sparsity(net) == pytest.approx(0.5, abs=1 / total)
    assert not any(n.endswith("_orig") for n, _ in net.named_parameters())  # made permanent
    assert net.features[3].conv1.weight.is_contiguous(memory_format=torch.channels_last)  # the model's layout
    assert set(net.state_dict()) == set(torchfast.models.ComplexNetwork(10, 3).state_dict())
    assert "features.3.conv1" in str(report)


def test_structured_pruning_removes_whole_output_channels_but_not_the_head():
    torch.manual_seed(0)
    net = torchfast.models.ComplexNetwork(10, 3)
    report = deploy.prune(net, 0.25, method="ln_structured")
    conv = net.features[3].conv1.weight
    dead = (conv.flatten(1).abs().sum(1) == 0).sum().item()
    assert dead == 16  # 25% of 64 output channels
    assert "classifier.5" in report.skipped and (net.classifier[5].weight != 0).all()


def test_fused_layers_read_pruned_weights_and_refold():
    torch.manual_seed(0)
    block = torchfast.nn.ResidualBlock(8).eval()
    ref = plain.ResidualBlock(8).eval()
    ref.load_state_dict(block.state_dict())
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        block(x)  # folds and caches the unpruned weights
        deploy.prune(block, 0.6, make_permanent=False)
        deploy.prune(ref, 0.6, make_permanent=False)
        assert not torchfast.nn.layers.plain_path_needed(block, (block.bn1, block.bn2), x)  # the fused path stays
        torch.testing.assert_close(block(x), ref(x), atol=1e-5, rtol=1e-5)
        deploy.make_permanent_(block)
        deploy.make_permanent_(ref)
        torch.testing.assert_close(block(x), ref(x), atol=1e-5, rtol=1e-5)
    block.train()  # training: the fused kernels, with the pruned weights
    ref.train()
    torch.testing.assert_close(block(x), ref(x), atol=1e-5, rtol=1e-5)


def test_pruned_then_fine_tuned_model_keeps_accuracy_and_exports(digits, tmp_path):
    import copy

    model, train, val = digits
    pruned = copy.deepcopy(model)
    deploy.prune(pruned, 0.5, make_permanent=False)  # masks stay while fine-tuning
    torch.manual_seed(1)
    from torchfast.train import Trainer

    opt = torchfast.optim.AdamW(pruned.parameters(), lr=1e-3, weight_decay=1e-2)
    Trainer(pruned, opt, nn.CrossEntropyLoss(), train, val, max_grad_norm=1.0, log=lambda *_: None,
            progress=False).fit(1)
    pruned.eval()
    deploy.make_permanent_(pruned)
    assert deploy.sparsity(pruned) >= 0.5
    assert measure.accuracy(pruned, val) >= 0.97
    report = deploy.export_onnx(pruned, next(iter(val))[0][:2], tmp_path / "pruned.onnx")
    assert report.max_error <= 1e-4
    q = deploy.quantize(pruned, next(iter(val))[0][:2], method="onnx-static", calibration=val,
                        path=str(tmp_path / "pruned-int8.onnx"))
    assert measure.accuracy(q, val) >= 0.96
