"""torchfast.convert on models we did not write: the cheat sheet's plain-torch network, torchvision's
ResNets, plain Sequential stacks; same state_dict, outputs, gradients and running statistics; what
it must leave alone; the optimizer swap; F.scaled_dot_product_attention routing."""
import copy

import pytest
import torch
from torch import nn

import torchfast
from torchfast.reference import modules as plain


def _rel_err(a, b, floor=1e-3) -> float:
    return (a - b).abs().max().item() / max(floor, b.abs().max().item())


def _check_equivalent(original, converted, x, modes=("train", "eval"), out_tol=1e-5, grad_tol=1e-5):
    assert list(converted.state_dict()) == list(original.state_dict())
    for mode in modes:
        original.train(mode == "train"), converted.train(mode == "train")
        want, got = original(x), converted(x)
        assert _rel_err(got, want) < out_tol, mode
        want.square().sum().backward()
        got.square().sum().backward()
        # relative to each gradient's largest magnitude, or to the largest of all where its own is ~0 (a
        # conv bias right before a batch norm: a true gradient of 0, rounding noise in both)
        top = max(p.grad.abs().max().item() for p in original.parameters())
        for (name, p), q in zip(original.named_parameters(), converted.parameters()):
            own = p.grad.abs().max().item()
            assert _rel_err(q.grad, p.grad, floor=own if own > 1e-3 * top else top) < grad_tol, (mode, name)
            p.grad = q.grad = None
        for (name, a), b in zip(original.named_buffers(), converted.buffers()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():
        original.eval(), converted.eval()
        assert _rel_err(converted(x), original(x)) < 1e-5


def test_cheat_sheet_network_in_plain_torch():
    torch.manual_seed(0)
    net = plain.ComplexNetwork(10, 3)
    net.classifier[3].p = 0.0
    fast = torchfast.convert(net)
    swaps = dict(fast.torchfast_conversion.swaps)
    assert swaps["attention"].endswith("torchfast.nn.MultiheadAttention")
    assert [w for p, w in fast.torchfast_conversion.swaps if p == "features.3"] == [
        "bn1 + ReLU -> BatchNormReLU2d", "bn2 + residual add + ReLU -> BatchNormAddReLU2d",
        "conv1 + bn1: the batch norm folded into the convolution in inference",
        "conv2 + bn2: the batch norm folded into the convolution in inference"]
    assert isinstance(net.attention, nn.MultiheadAttention) and type(net.attention) is nn.MultiheadAttention
    _check_equivalent(net, fast, torch.randn(4, 3, 16, 16))
    plain.ComplexNetwork(10, 3).load_state_dict(fast.state_dict())  # checkpoints load both ways
    fast.load_state_dict(net.state_dict())


def _converted_resnet(arch: str, blocks: int):
    """(torchvision model, its conversion), every residual block's BN + add + ReLU fused."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)(num_classes=10)
    fast = torchfast.convert(net)
    report = fast.torchfast_conversion
    assert len([p for p, w in report.swaps if "residual add" in w]) == blocks and not report.skipped, str(report)
    # every block convolution folds its batch norm in inference, the downsample branches' included
    # (resnet18: layers 2-4; resnet50: layers 1-4, its layer1 widens 64 -> 256)
    downsamples = 3 if arch == "resnet18" else 4
    assert len([p for p, w in report.swaps if "folded" in w]) == blocks * (2 if arch == "resnet18" else 3) + downsamples
    assert len([p for p, w in report.swaps if "downsample.0 + downsample.1" in w]) == downsamples
    assert ("", "CPU inference runs channels_last inside (the input converted once, 4-D outputs converted back): "
                "torchfast.layout_plan") in report.swaps
    # the stem's ReLU -> max pool (module calls in the root's own forward) as one layer
    assert ("relu", "ReLU + MaxPool2d (maxpool) -> ReLUMaxPool2d (the ReLU becomes torchfast.nn.AbsorbedReLU, an identity)") in report.swaps
    assert type(fast.relu) is torchfast.nn.AbsorbedReLU and type(fast.maxpool) is torchfast.nn.ReLUMaxPool2d
    assert type(fast) is type(net)  # the root keeps its class: only its layers were swapped
    assert ("conv1", "nn.Conv2d -> torchfast.nn.Conv2d (CPU fp32 inference: the weight pre-packed for oneDNN)") \
        in report.swaps
    return net, fast


def test_torchvision_resnet18():
    net, fast = _converted_resnet("resnet18", blocks=8)
    _check_equivalent(net, fast, torch.randn(8, 3, 64, 64))


def test_torchvision_resnet50_within_twice_torchs_own_rounding():
    """50 layers of training-mode batch norm (layer4 normalises 32 values per channel here) amplify fp32
    rounding: the converted model's error against an fp64 run is at most twice torch's own."""
    net, fast = _converted_resnet("resnet50", blocks=16)
    assert list(fast.state_dict()) == list(net.state_dict())
    exact = copy.deepcopy(net).double()
    x = torch.randn(8, 3, 64, 64)
    outs = [m(x.to(dtype)) for m, dtype in ((net, torch.float32), (fast, torch.float32), (exact, torch.float64))]
    for o in outs:
        o.square().sum().backward()
    assert _rel_err(outs[1].double(), outs[2]) <= 2 * _rel_err(outs[0].double(), outs[2]) + 1e-6
    flat = lambda m: torch.cat([p.grad.double().flatten() for p in m.parameters()])
    g_torch, g_ours, g_exact = flat(net), flat(fast), flat(exact)
    err = lambda g: ((g - g_exact).norm() / g_exact.norm()).item()  # over all gradients together
    assert err(g_ours) <= 2 * err(g_torch) + 1e-6, (err(g_ours), err(g_torch))


def test_sequential_conv_bn_relu_and_what_stays():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),  # ReLU6: not ours
                        nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),  # not a BatchNorm
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU())
    fast = torchfast.convert(net)
    kinds = [type(m) for m in fast]
    assert kinds[1] is torchfast.nn.BatchNormReLU2d and kinds[2] is torchfast.nn.AbsorbedReLU
    assert kinds[4] is nn.BatchNorm2d and kinds[5] is nn.ReLU6
    assert kinds[7] is nn.GroupNorm and kinds[10] is nn.BatchNorm2d and kinds[11] is nn.SiLU
    _check_equivalent(net, fast, torch.randn(4, 3, 10, 10))


class _StemThenHead(nn.Module):
    """A stem like torchvision ResNet's in a forward of module calls, and candidates that must stay."""

    def __init__(self, share_relu=False, inplace_reads_input=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.relu2 = self.relu if share_relu else nn.ReLU()
        self.pool2 = nn.MaxPool2d(2, ceil_mode=True)  # not a window the kernel computes
        self.inplace_reads_input = inplace_reads_input

    def forward(self, x):
        y = self.bn(self.conv(x))
        z = self.pool(self.relu(y))
        if self.inplace_reads_input:  # y is the ReLU's output too (in place): the ReLU must stay
            z = z + y.mean()
        return self.pool2(self.relu2(z))


def test_relu_then_max_pool_fused_in_sequentials_and_forwards():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, dilation=2))
    fast = torchfast.convert(seq)
    kinds = [type(m) for m in fast]
    # (the pool, not BatchNorm2d -> ReLU, takes the ReLU: the pool's NCHW kernel pays more)
    assert kinds[1:4] == [nn.BatchNorm2d, torchfast.nn.AbsorbedReLU, torchfast.nn.ReLUMaxPool2d]
    assert kinds[5:] == [nn.ReLU, nn.MaxPool2d]  # dilation: left alone, with the reason
    assert any(p == "5" and "dilation" in w for p, w in fast.torchfast_conversion.skipped)
    _check_equivalent(seq, fast, torch.randn(4, 3, 19, 23))

    net = _StemThenHead()
    fast = torchfast.convert(net)
    assert type(fast.relu) is torchfast.nn.AbsorbedReLU and type(fast.pool) is torchfast.nn.ReLUMaxPool2d
    assert type(fast.relu2) is nn.ReLU and type(fast.pool2) is nn.MaxPool2d
    _check_equivalent(net, fast, torch.randn(2, 3, 15, 17))
    for kwargs, why in (({"share_relu": True}, "called more than once"),
                        ({"inplace_reads_input": True}, "in-place ReLU whose input is read elsewhere")):
        net = _StemThenHead(**kwargs)
        fast = torchfast.convert(net)
        assert type(fast.relu) is nn.ReLU and type(fast.pool) is nn.MaxPool2d, kwargs
        assert any(p == "relu" and why in w for p, w in fast.torchfast_conversion.skipped), \
            str(fast.torchfast_conversion)
        _check_equivalent(net, fast, torch.randn(2, 3, 15, 17))


def test_hooks_and_nothing_to_convert():
    torch.manual_seed(0)
    hooked = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    hooked[1].register_forward_hook(lambda *a: None)
    fast = torchfast.convert(hooked)
    assert type(fast[1]) is nn.BatchNorm2d and fast.torchfast_conversion.skipped
    mlp = nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 2))
    same = torchfast.convert(mlp)
    assert [type(m) for m in same.modules()] == [type(m) for m in mlp.modules()]
    assert not same.torchfast_conversion.swaps
    assert torchfast.convert(mlp, inplace=True) is mlp


def test_shared_or_untraceable_blocks_stay():
    class TwiceBN(nn.Module):  # the same batch norm called twice: not provably one fused call
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)) + torch.relu(self.bn(x)))

    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.relu(self.bn(x)) if x.sum() > 0 else x

    net = nn.Sequential(TwiceBN(), DataDependent())
    fast = torchfast.convert(net)
    assert not fast.torchfast_conversion.swaps and len(fast.torchfast_conversion.skipped) == 2
    assert type(fast[0]) is TwiceBN and type(fast[1]) is DataDependent


@pytest.mark.parametrize("kind", ["SGD", "Adam", "AdamW"])
def test_optimizer_swap_keeps_groups_and_state(kind):
    # (no convolution bias before the batch norm: its gradient is 0 up to rounding, which Adam's
    # normalised step would turn into lr-sized noise in both runs)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 8 * 8, 10))
    cls = getattr(torch.optim, kind)
    kwargs = dict(momentum=0.9) if kind == "SGD" else {}

    def groups(model):
        return [{"params": list(model[0].parameters()) + list(model[1].parameters()), "lr": 0.01},
                {"params": model[4].parameters(), "lr": 0.001}]

    opt = cls(groups(net), **kwargs)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))

    def step(model, optimizer):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    step(net, opt)  # state to carry over
    reference = copy.deepcopy(net)
    ref_opt = cls(groups(reference), **kwargs)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # (load_state_dict keeps the given tensors)
    fast, fast_opt = torchfast.convert(net, optimizer=opt)
    assert type(fast[1]) is torchfast.nn.BatchNormReLU2d
    assert type(fast_opt) is getattr(torchfast.optim, kind)
    assert [g["lr"] for g in fast_opt.param_groups] == [0.01, 0.001]
    assert all(p in set(fast.parameters()) for g in fast_opt.param_groups for p in g["params"])
    for _ in range(2):
        step(reference, ref_opt)
        step(fast, fast_opt)
    for p, q in zip(reference.parameters(), fast.parameters()):
        assert _rel_err(q, p) < 1e-5
    step(net, opt)  # the original optimizer still steps its own model, its state untouched by the swap


def test_converted_model_compiles():
    torch.manual_seed(0)
    net = plain.ComplexNetwork(10, 3).eval()
    fast = torchfast.convert(net)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert _rel_err(torch.compile(fast)(x), net(x)) < 1e-4


def test_enable_routes_sdpa_calls():
    q = torch.randn(2, 4, 16, 8)

    def attention(q):
        return nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)

    want = attention(q)
    with torch.profiler.profile() as prof, torchfast.enable():
        got = attention(q)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if torchfast.info()["kernels_loaded"]:
        assert "torchfast::flash_attention" in {e.name for e in prof.events()}


def _tiny_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.models.VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)


def test_timm_vit_attention_routed_to_torchfast_without_enable(monkeypatch):
    import sys
    monkeypatch.setattr(sys.modules["torchfast.convert"], "CPU_ROUTING_MIN_PAIRS", 1)  # a tiny ViT: route even its 5 tokens
    net = _tiny_vit()
    fast = torchfast.convert(net)
    swaps = dict(fast.torchfast_conversion.swaps)
    assert set(swaps) == {"blocks.0.attn", "blocks.1.attn"}
    assert all(w.startswith("F.scaled_dot_product_attention calls -> torchfast's flash attention") for w in swaps.values())
    assert not net.blocks[0].attn._forward_pre_hooks  # the original is untouched
    x = torch.randn(3, 3, 16, 16)
    with torch.profiler.profile() as prof:
        got = fast(x)
    if torchfast.info()["kernels_loaded"]:
        assert "torchfast::flash_attention" in {e.name for e in prof.events()}
    _check_equivalent(net, fast, x)
    again = copy.deepcopy(fast)  # the hooks travel with a copy, and leave no routing mode behind
    torch.testing.assert_close(again(x), net(x), rtol=1e-5, atol=1e-6)
    assert not torch.overrides._get_current_function_mode_stack()


def test_routing_mode_is_left_when_the_forward_raises():
    fast = torchfast.convert(_tiny_vit())
    attn = fast.blocks[0].attn
    with pytest.raises(RuntimeError):
        attn(torch.randn(2, 5, 31))  # inside the routed forward: its qkv projection refuses 31 features
    assert not torch.overrides._get_current_function_mode_stack()
    torch.testing.assert_close(attn(torch.randn(2, 5, 32)).shape, torch.Size([2, 5, 32]))


def test_converted_vit_compiles():
    net = _tiny_vit().eval()
    fast = torchfast.convert(net)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert _rel_err(torch.compile(fast)(x), net(x)) < 1e-4


def test_folded_inference_follows_the_weights_and_leaves_the_conv_alone():
    """Inference with the batch norm folded into the convolution: equal to the original after the weights
    and statistics change (an optimizer step, a train-mode forward), under hooks, and the conv called
    alone is still a conv."""
    net, fast = _converted_resnet("resnet18", blocks=8)
    x = torch.randn(4, 3, 32, 32)
    opt = torch.optim.SGD(fast.parameters(), lr=0.1)
    for _ in range(2):
        fast.eval(), net.eval()
        with torch.no_grad():
            assert _rel_err(fast(x), net(x)) < 1e-5
        fast.train(), net.train()
        fast(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        net.load_state_dict(fast.state_dict())
    fast.eval(), net.eval()
    block = fast.layer1[0]
    with torch.no_grad():
        assert _rel_err(fast(x), net(x)) < 1e-5
        y = torch.randn(2, 64, 8, 8)
        torch.testing.assert_close(block.conv1(y), net.layer1[0].conv1(y))  # not folded when called alone
        seen = []
        handle = block.bn1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        assert _rel_err(fast(x), net(x)) < 1e-5 and seen  # a hook on the bn: the modules are called
        handle.remove()


def test_converted_resnet_under_autocast_and_exported_to_onnx(tmp_path):
    """Under bf16 autocast the converted model is as close to the fp32 result as torch's own (the fused batch
    norms keep fp32 statistics), in training and in inference."""
    net, fast = _converted_resnet("resnet18", blocks=8)
    x = torch.randn(4, 3, 32, 32)
    for mode in (False, True):  # inference first: a training forward moves the running statistics
        net.train(mode), fast.train(mode)
        exact = net(x).detach()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want, got = net(x), fast(x)
        assert got.dtype == want.dtype == torch.bfloat16
        err = lambda out: (out.float() - exact).abs().max().item()
        assert err(got) <= 2 * err(want) + 1e-3, (mode, err(got), err(want))
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from torchfast.deploy import OrtModule, export_onnx
    fast.load_state_dict(net.state_dict())  # (the training forwards above moved the two models' statistics apart)
    fast.eval(), net.eval()
    report = export_onnx(fast, x, str(tmp_path / "resnet18.onnx"))  # verified in onnxruntime at batch 1 and 7
    with torch.no_grad():
        assert _rel_err(OrtModule(report.path)(x), net(x)) < 1e-4


def test_automatic_routing_leaves_short_cpu_sequences_to_torch():
    fast = torchfast.convert(_tiny_vit())  # 5 tokens: torch's SDPA is the faster there
    with torch.profiler.profile() as prof:
        fast(torch.randn(2, 3, 16, 16))
    assert "torchfast::flash_attention" not in {e.name for e in prof.events()}


class _Tap(nn.Sequential):
    """An nn.Sequential subclass whose forward also returns the ReLU's output: not a plain chain."""

    def forward(self, x):
        a = self[1](self[0](x))
        return self[2](a), a


def test_sequential_subclass_with_its_own_forward_is_left_alone():
    torch.manual_seed(0)
    model = _Tap(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)).eval()
    fast = torchfast.convert(model)
    x = torch.randn(2, 3, 16, 16)
    for a, b in zip(fast(x), model(x)):
        torch.testing.assert_close(a, b)


def test_converted_resnet_traces_and_to_plain_brings_the_relus_back():
    tv = pytest.importorskip("torchvision")
    from torchfast.deploy import to_plain
    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=10).eval()
    fast = torchfast.convert(model)
    x = torch.randn(2, 3, 64, 64)
    gm = torch.fx.symbolic_trace(fast)  # ReLUMaxPool2d records torch's ReLU and pool under tracing
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-4)
    plain = to_plain(fast)
    assert type(plain.relu) is nn.ReLU and type(plain.maxpool) is nn.MaxPool2d
    fused = torch.ao.quantization.fuse_modules(plain, [["conv1", "bn1", "relu"]])  # what quantizers run
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)


def test_plain_convolutions_keep_the_input_layout():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1)).eval()
    fast = torchfast.convert(model)
    x = torch.randn(4, 3, 40, 40)
    with torch.no_grad():
        got = fast(x)
    assert got.is_contiguous()
    torch.testing.assert_close(got.view(4, -1), model(x).view(4, -1), rtol=1e-4, atol=1e-4)


class _OwnForward(nn.Module):
    """A model whose own forward (not a child block's) holds conv -> BN -> ReLU, and pairs torchfast
    has no fused form of."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True)
        self.conv2, self.gn = nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.bn2, self.act = nn.BatchNorm2d(8), nn.SiLU()

    def forward(self, x):
        return self.act(self.bn2(self.gn(self.conv2(self.relu(self.bn(self.conv(x)))))))


def test_the_models_own_forward_is_converted_and_the_rest_reported():
    from torchfast.deploy import to_plain
    torch.manual_seed(0)
    net = _OwnForward()
    fast = torchfast.convert(net)
    assert type(fast.bn) is torchfast.nn.BatchNormReLU2d and type(fast.relu) is torchfast.nn.AbsorbedReLU
    assert fast.relu.inplace and type(fast.bn2) is nn.BatchNorm2d and type(fast.act) is nn.SiLU
    rep = fast.torchfast_conversion
    assert [path for path, _ in rep.swaps] == ["bn"]
    skipped = dict(rep.skipped)
    assert "GroupNorm" in skipped["conv2"] and "SiLU" in skipped["bn2"]
    # (the GroupNorm -> BatchNorm2d -> SiLU tail behind the fused layer sums over whole groups: its
    # conv's gradients carry ~1e-5 of fp32 rounding whichever order the sums take)
    _check_equivalent(net, fast, torch.randn(4, 3, 12, 10), grad_tol=3e-5)
    back = to_plain(fast)
    assert type(back.bn) is nn.BatchNorm2d and type(back.relu) is nn.ReLU


def test_left_alone_pairs_are_reported_with_why():
    seq = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 8, 3), nn.InstanceNorm2d(8))
    fast = torchfast.convert(seq)
    rep = fast.torchfast_conversion
    assert type(fast) is torchfast.nn.FusedSequential and type(fast[2]) is nn.ReLU6  # conv + BN fold; ReLU6 stays
    assert ("0", "0 + 1: the batch norm folded into the convolution in inference") in rep.swaps
    skipped = dict(rep.skipped)
    assert skipped["1"] == "BatchNorm2d -> ReLU6: torchfast fuses a batch norm with ReLU only"
    assert skipped["3"] == "Conv2d -> InstanceNorm2d: torchfast folds and fuses BatchNorm2d only"
    assert "left alone: BatchNorm2d -> ReLU6" in str(rep)


def test_converted_resnet_trains_under_ddp_and_compiled_like_the_original(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=10)
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    compiled_twin = copy.deepcopy(model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        original, fast = DDP(model), DDP(torchfast.convert(model))
        for m in (original, fast):
            nn.functional.cross_entropy(m(x), y).backward()
    finally:
        dist.destroy_process_group()
    top = max(p.grad.abs().max().item() for p in model.parameters())
    for (name, p), q in zip(model.named_parameters(), fast.module.parameters()):
        assert _rel_err(q.grad, p.grad, floor=top) < 1e-5, name
    fast_compiled = torch.compile(torchfast.convert(compiled_twin))
    out = fast_compiled(x)
    assert _rel_err(out, original.module(x)) < 1e-4
    nn.functional.cross_entropy(out, y).backward()
    converted = fast_compiled._orig_mod
    for (name, p), q in zip(compiled_twin.named_parameters(), converted.parameters()):
        assert q.grad is not None and p.grad is None, name  # (the twin itself never ran)
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    for (name, p), q in zip(model.named_parameters(), converted.parameters()):
        assert _rel_err(q.grad, p.grad, floor=top) < 1e-4, name


def test_sequential_conv_bn_pairs_fold_in_inference():
    import io
    from torchfast.deploy import to_plain
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16), nn.MaxPool2d(2),
                        nn.Conv2d(16, 8, 1))
    fast = torchfast.convert(net)
    assert type(fast) is torchfast.nn.FusedSequential and isinstance(fast, nn.Sequential)
    assert type(fast[0]) is nn.Conv2d and type(fast[3]) is nn.Conv2d  # handed to conv_bn_relu, not swapped
    x = torch.randn(8, 3, 32, 32)
    _check_equivalent(net, fast, x)
    with torch.no_grad():
        fast(x)
    assert "_torchfast_folded" in fast[1].__dict__ and "_torchfast_folded" in fast[4].__dict__  # folded
    buf = io.BytesIO()
    torch.save(fast, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    gm = torch.fx.symbolic_trace(fast)  # the fused layers recorded as calls of themselves
    with torch.no_grad():
        for m in (loaded, gm, to_plain(fast), to_plain(fast, fold_bn=True)):
            assert _rel_err(m(x), net(x)) < 1e-5
        fast[0].register_forward_hook(lambda m, a, out: out * 2)  # a hook added later: the plain calls run it
        assert _rel_err(fast(x), fast[1:](fast[0](x))) < 1e-6
    assert type(to_plain(fast)) is nn.Sequential
