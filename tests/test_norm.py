"""Fused batch norm + residual add + ReLU: the ops against their reference, gradcheck, opcheck,
torch.compile, and the torchfast.nn layers against the torch stacks / cheat-sheet modules they replace."""
import copy

import pytest
import torch
from torch import nn

import torchfast
from torchfast.reference import norm as ref
from torchfast.reference.modules import ComplexNetwork as SeedComplexNetwork
from torchfast.reference.modules import ResidualBlock as SeedResidualBlock
from conftest import require_kernel, tol

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (shape, layout): odd on purpose — 1x1 spatial, 97 channels, 2-D and 3-D inputs, channels_last —
# and even ones
CASES = [((4, 6, 5, 7), "contiguous"), ((4, 6, 5, 7), "channels_last"), ((3, 97, 1, 1), "contiguous"),
         ((2, 97, 3, 3), "channels_last"), ((16, 5), "contiguous"), ((3, 4, 11), "contiguous"),
         ((2, 3, 4, 5), "transposed"),
         # channel runs of 16 and 32: the vectorised paths (CUDA's 16-byte packs, CPU vectors)
         ((2, 16, 4, 8), "contiguous"), ((2, 16, 4, 8), "channels_last"), ((2, 16, 4, 8), "offset")]


def make_input(shape, layout, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype=dtype, device=device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = x.transpose(2, 3).contiguous().transpose(2, 3)  # neither contiguous nor channels_last
    elif layout == "offset":  # contiguous, one element into its storage: not 16-byte aligned
        x = torch.empty(x.numel() + 1, dtype=dtype, device=device)[1:].view(x.shape).copy_(x)
    return x


def channel_tensors(c, dtype, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(c, generator=g), torch.randn(c, generator=g)
    rm, rv = torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5
    return [t.to(dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device) for t in (w, b, rm, rv)]


def close(a, b, dtype, **kw):
    torch.testing.assert_close(a.float() if a.dtype != torch.float64 else a,
                               b.float() if b.dtype != torch.float64 else b, **{**tol(dtype), **kw})


@pytest.mark.parametrize("shape,layout", CASES, ids=[f"{s}-{l}" for s, l in CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("residual,relu", [(True, True), (False, True), (False, False)])
def test_kernel_matches_reference(shape, layout, dtype, training, residual, relu, device):
    require_kernel("bn_add_relu", device)
    x = make_input(shape, layout, dtype, device)
    r = make_input(shape, layout, dtype, device, seed=5) if residual else None
    w, b, rm, rv = channel_tensors(shape[1], dtype, device)
    got = torch.ops.torchfast.bn_add_relu(x, w, b, r, rm, rv, training, 1e-5, relu)
    want = ref.bn_add_relu(x, w, b, r, rm, rv, training, 1e-5, relu)
    for a, e in zip(got, want):
        close(a, e, dtype)
    if layout == "channels_last":
        assert got[0].is_contiguous(memory_format=torch.channels_last)
    g = make_input(shape, layout, dtype, device, seed=9)
    got_b = torch.ops.torchfast.bn_add_relu_backward(g, x, got[0], w, got[1], got[2], training, relu, residual)
    want_b = ref.bn_add_relu_backward(g, x, got[0], w, got[1], got[2], training, relu, residual)
    for a, e in zip(got_b, want_b):
        # grad_weight/grad_bias are sums over N*H*W elements: relative tolerance on their scale
        close(a, e, dtype, atol=tol(dtype)["atol"] * max(1.0, float(e.abs().max()) if e.numel() else 1.0))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck(training, layout, device):
    require_kernel("bn_add_relu", device)
    x = make_input((3, 4, 3, 2), layout, torch.float64, device).requires_grad_()
    r = make_input((3, 4, 3, 2), layout, torch.float64, device, seed=3).requires_grad_()
    w, b, rm, rv = channel_tensors(4, torch.float64, device)
    w.requires_grad_()
    b.requires_grad_()

    def fn(x, w, b, r):
        return torch.ops.torchfast.bn_add_relu(x, w, b, r, rm, rv, training, 1e-5, True)[0]

    assert torch.autograd.gradcheck(fn, (x, w, b, r))


@pytest.mark.parametrize("op", ["bn_add_relu", "bn_add_relu_backward"])
def test_opcheck(op, device):
    require_kernel(op, device)
    x = make_input((4, 6, 5, 3), "channels_last", torch.float32, device)
    r = make_input((4, 6, 5, 3), "channels_last", torch.float32, device, seed=2)
    w, b, rm, rv = channel_tensors(6, torch.float32, device)
    if op == "bn_add_relu":
        torch.library.opcheck(torch.ops.torchfast.bn_add_relu.default,
                              (x.requires_grad_(), w, b, r, rm, rv, True, 1e-5, True))
        torch.library.opcheck(torch.ops.torchfast.bn_add_relu.default, (x.detach(), w, b, None, rm, rv, False, 1e-5,
                                                                         False))
    else:
        out, mean, invstd, _ = torch.ops.torchfast.bn_add_relu(x, w, b, r, rm, rv, True, 1e-5, True)
        torch.library.opcheck(torch.ops.torchfast.bn_add_relu_backward.default,
                              (torch.randn_like(x), x, out, w, mean, invstd, True, True, True))


def test_torch_compile_fullgraph_train_step(device):
    require_kernel("bn_add_relu", device)
    torch.manual_seed(0)
    block = torchfast.nn.ResidualBlock(8).to(device)
    compiled_block = copy.deepcopy(block)
    compiled = torch.compile(compiled_block, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 8, 6, 6, device=device)
    y1, y2 = block(x), compiled(x)
    y1.sum().backward()
    y2.sum().backward()
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    for p, q in zip(block.parameters(), compiled_block.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4)
    for a, b in zip(block.buffers(), compiled_block.buffers()):
        torch.testing.assert_close(a, b)


# ---- modules against the torch stacks they replace -------------------------------------------------


def compare_modules(theirs, ours, make_x, steps=3, forward=lambda m, x: m(x), rtol=1e-5, atol=1e-5):
    """Outputs, input and parameter grads, and buffers after `steps` train steps then one eval."""
    for step in range(steps + 1):
        train = step < steps
        theirs.train(train)
        ours.train(train)
        x1 = make_x(step).requires_grad_()
        x2 = x1.detach().clone().requires_grad_()
        y1, y2 = forward(theirs, x1), forward(ours, x2)
        torch.testing.assert_close(y2, y1, rtol=rtol, atol=atol)
        assert y2.stride() == y1.stride()  # whatever layout runs inside, the output keeps torch's
        g = torch.randn_like(y1)
        y1.backward(g)
        y2.backward(g)
        torch.testing.assert_close(x2.grad, x1.grad, rtol=rtol, atol=atol)
        assert x2.grad.stride() == x1.grad.stride()
        # a conv bias before a training-mode BN has a true gradient of 0 (BN removes the mean): its
        # computed value is rounding noise, so the tolerance follows the largest gradient around
        scale = max([1.0] + [float(p.grad.abs().max()) for p in theirs.parameters()])
        for (name, p), q in zip(theirs.named_parameters(), ours.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=rtol, atol=atol * scale, msg=lambda m: f"{name}: {m}")
            p.grad = q.grad = None
        for (name, a), b in zip(theirs.named_buffers(), ours.buffers()):
            torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_residual_block_matches_seed(layout, device):
    torch.manual_seed(0)
    theirs = SeedResidualBlock(16).to(device)
    ours = torchfast.nn.ResidualBlock(16).to(device)
    ours.load_state_dict(theirs.state_dict())  # unchanged keys
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    compare_modules(theirs, ours, lambda s: make_input((3, 16, 9, 7), layout, torch.float32, device, seed=s))


def test_residual_block_batch_one_in_eval(device):
    torch.manual_seed(0)
    theirs, ours = SeedResidualBlock(8).to(device), torchfast.nn.ResidualBlock(8).to(device)
    ours.load_state_dict(theirs.state_dict())
    theirs.eval()
    ours.eval()
    x = torch.randn(1, 8, 1, 1, device=device)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False)])
def test_batchnorm_relu_matches_torch(momentum, affine, track, device):
    theirs = nn.Sequential(nn.BatchNorm2d(7, momentum=momentum, affine=affine, track_running_stats=track),
                           nn.ReLU()).to(device)
    ours = torchfast.nn.BatchNormReLU2d(7, momentum=momentum, affine=affine, track_running_stats=track).to(device)
    ours.load_state_dict(theirs[0].state_dict())
    compare_modules(theirs, ours, lambda s: make_input((5, 7, 4, 3), "contiguous", torch.float32, device, seed=s))
    if track:
        assert int(ours.num_batches_tracked) == 3


def test_batchnorm_add_relu_matches_torch(device):
    bn = nn.BatchNorm2d(5).to(device)
    ours = torchfast.nn.BatchNormAddReLU2d(5).to(device)
    ours.load_state_dict(bn.state_dict())
    residual = make_input((4, 5, 6, 6), "channels_last", torch.float32, device, seed=11)

    class Stack(nn.Module):
        def __init__(self, bn):
            super().__init__()
            self.bn = bn

        def forward(self, x):
            return torch.relu(self.bn(x) + residual)

    compare_modules(Stack(bn), ours, lambda s: make_input((4, 5, 6, 6), "channels_last", torch.float32, device, s),
                    forward=lambda m, x: m(x) if isinstance(m, Stack) else m(x, residual))


@pytest.mark.parametrize("relu", [True, False])
def test_conv_bn_relu_loads_the_plain_stack(relu, device):
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 12, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(12, eps=1e-3)]
    theirs = nn.Sequential(*(layers + ([nn.ReLU()] if relu else []))).to(device)
    ours = torchfast.nn.ConvBNReLU2d(3, 12, 3, stride=2, padding=1, bias=False, eps=1e-3, relu=relu).to(device)
    ours.load_state_dict(theirs.state_dict())
    compare_modules(theirs, ours, lambda s: make_input((2, 3, 15, 13), "contiguous", torch.float32, device, s))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_conv_bn_relu_inference_folds_bn(layout, device):
    torch.manual_seed(0)
    theirs = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()).to(device)
    theirs[1].running_mean.uniform_(-1, 1)
    theirs[1].running_var.uniform_(0.5, 2)
    ours = torchfast.nn.ConvBNReLU2d(4, 6, 3, padding=1).to(device)
    ours.load_state_dict(theirs.state_dict())
    theirs.eval()
    ours.eval()
    x = make_input((2, 4, 7, 9), layout, torch.float32, device)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
        assert ours._folded.key is not None
        assert ours(x).stride() == theirs(x).stride()  # the output keeps torch's layout
        theirs[1].running_var.mul_(2)
        ours[1].running_var.mul_(2)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_residual_block_reduced_precision(dtype, device):
    """bf16/fp16 blocks: no further from an fp32 run than 2x torch's same-dtype block is."""
    torch.manual_seed(0)
    theirs = SeedResidualBlock(8).to(device)
    ours = torchfast.nn.ResidualBlock(8).to(device)
    ours.load_state_dict(theirs.state_dict())
    x = make_input((2, 8, 6, 5), "contiguous", torch.float32, device)
    truth = theirs(x)
    err_torch = (copy.deepcopy(theirs).to(dtype)(x.to(dtype)).float() - truth).abs().max()
    err_ours = (ours.to(dtype)(x.to(dtype)).float() - truth).abs().max()
    assert err_ours <= 2 * err_torch + 1e-3, (float(err_ours), float(err_torch))


def test_complex_network_loads_seed_state_dict(device):
    torch.manual_seed(0)

    theirs = SeedComplexNetwork().to(device).eval()
    ours = torchfast.models.ComplexNetwork().to(device).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 16, 16, device=device)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)
    assert torchfast.models.ComplexNetwork(num_classes=4, in_channels=1)(torch.randn(2, 1, 8, 8)).shape == (2, 4)


def test_bad_input_errors():
    with pytest.raises(ValueError, match=r"ResidualBlock\(16\): expected input of shape \(N, 16, H, W\), got \(2, 8, 5, 5\)"):
        torchfast.nn.ResidualBlock(16)(torch.randn(2, 8, 5, 5))
    with pytest.raises(ValueError, match="expected 4D input"):
        torchfast.nn.BatchNormReLU2d(4)(torch.randn(2, 4))
    with pytest.raises(RuntimeError, match=r"weight must have shape \[3\] \(the input's channels\), got \[4\]"):
        torchfast.ops.norm.bn_add_relu(torch.randn(2, 3, 4, 4), torch.ones(4), None, None, None, None, True, 1e-5,
                                       True)
    with pytest.raises(RuntimeError, match=r"residual has shape \[2, 3, 4, 5\] but input has shape \[2, 3, 4, 4\]"):
        torchfast.ops.norm.bn_add_relu(torch.randn(2, 3, 4, 4), None, None, torch.randn(2, 3, 4, 5), None, None,
                                       True, 1e-5, True)
    with pytest.raises(RuntimeError, match="more than 1 value per channel"):
        torchfast.ops.norm.bn_add_relu(torch.randn(1, 3, 1, 1), None, None, None, None, None, True, 1e-5, True)
    with pytest.raises(RuntimeError, match="dtype Int"):
        torchfast.ops.norm.bn_add_relu(torch.ones(2, 3, 2, 2, dtype=torch.int32), None, None, None, None, None,
                                       True, 1e-5, True)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_residual_block_inference_folds_bn(layout, device):
    torch.manual_seed(0)
    theirs, ours = SeedResidualBlock(16).to(device), torchfast.nn.ResidualBlock(16).to(device)
    for bn in (theirs.bn1, theirs.bn2):  # non-trivial running statistics
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    ours.load_state_dict(theirs.state_dict())
    theirs.eval()
    ours.eval()
    x = make_input((2, 16, 9, 7), layout, torch.float32, device)
    with torch.no_grad():
        y = ours(x)
        torch.testing.assert_close(y, theirs(x), rtol=1e-5, atol=1e-5)
        assert y.stride() == theirs(x).stride()  # the output keeps torch's layout
        assert ours._folded[0].key is not None  # the folded path ran
        # the cache follows the parameters and buffers it was built from
        for m in (theirs, ours):
            m.bn2.running_mean.add_(0.5)
            m.conv1.weight.mul_(1.1)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    ours.train()
    assert ours._folded[0].key is None


def test_residual_block_eval_with_grad_does_not_fold(device):
    torch.manual_seed(0)
    theirs, ours = SeedResidualBlock(8).to(device).eval(), torchfast.nn.ResidualBlock(8).to(device).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 8, 5, 5, device=device)
    ours(x).sum().backward()
    theirs(x).sum().backward()
    assert ours._folded[0].key is None
    torch.testing.assert_close(ours.conv1.weight.grad, theirs.conv1.weight.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_conv_bn_inference_without_relu_and_strided(layout, device):
    torch.manual_seed(1)
    theirs = nn.Sequential(nn.Conv2d(5, 7, 3, stride=2, padding=(1, 2), dilation=2), nn.BatchNorm2d(7)).to(device)
    theirs[1].running_mean.uniform_(-1, 1)
    theirs[1].running_var.uniform_(0.5, 2)
    ours = torchfast.nn.ConvBNReLU2d(5, 7, 3, stride=2, padding=(1, 2), dilation=2, relu=False).to(device)
    ours.load_state_dict(theirs.state_dict())
    theirs.eval()
    ours.eval()
    x = make_input((3, 5, 11, 13), layout, torch.float32, device)
    with torch.no_grad():
        y = ours(x)
        torch.testing.assert_close(y, theirs(x), rtol=1e-5, atol=1e-5)
        assert y.stride() == theirs(x).stride() and (y < 0).any()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_backward_with_broadcast_grad(layout, device):
    """out.sum() / out.mean() hand back one value broadcast everywhere (stride 0)."""
    torch.manual_seed(3)
    x = make_input((4, 6, 5, 7), layout, torch.float32, device)
    for reduce in (torch.sum, torch.mean):
        ours = torchfast.nn.BatchNormAddReLU2d(6).to(device)
        theirs = nn.BatchNorm2d(6).to(device)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ra, rb = (torch.randn_like(x).requires_grad_() for _ in range(2))
        rb.data.copy_(ra.data)
        reduce(ours(xa, ra)).backward()
        reduce(torch.relu(theirs(xb) + rb)).backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ra.grad, rb.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-5, atol=1e-5)


def test_double_backward_matches_torch(device):
    """create_graph=True (a gradient penalty): the second-order gradients go through the reference."""
    require_kernel("bn_add_relu", device)
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5, device=device, dtype=torch.float64)
    r = torch.randn_like(x)
    plain, fused = nn.BatchNorm2d(3).to(device).double(), torchfast.nn.BatchNormAddReLU2d(3).to(device).double()
    with torch.no_grad():
        plain.weight.uniform_(0.5, 2)
    fused.load_state_dict(plain.state_dict())
    results = []
    for training in (True, False):
        for m, call in ((plain, lambda xi, ri: torch.relu(plain(xi) + ri)), (fused, fused)):
            m.train(training)
            xi, ri = x.clone().requires_grad_(), r.clone().requires_grad_()
            gx, = torch.autograd.grad(call(xi, ri).pow(2).sum(), xi, create_graph=True)
            penalty = gx.pow(2).sum()
            results.append(torch.autograd.grad(penalty, (xi, ri, m.weight, m.bias)))
    for theirs, ours in ((results[0], results[1]), (results[2], results[3])):
        for a, b in zip(theirs, ours):
            torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-7)
    w, b = (torch.rand(3, device=device, dtype=torch.float64, requires_grad=True) + 0.5 for _ in range(2))
    fn = lambda x, w, b, r: torch.ops.torchfast.bn_add_relu(x, w, b, r, None, None, True, 1e-5, True)[0]
    xs = (torch.randn(3, 3, 2, 2, device=device, dtype=torch.float64, requires_grad=True), w, b,
          torch.randn(3, 3, 2, 2, device=device, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradgradcheck(fn, xs)
    # optional tensors left out (the autograd node has an edge per given tensor only), eval included
    rm, rv = torch.zeros(3, device=device, dtype=torch.float64), torch.ones(3, device=device, dtype=torch.float64)
    for weight, bias, res, training in ((None, None, False, True), (w, None, False, False), (None, b, True, True)):
        def partial(x, *rest, weight=weight, bias=bias, res=res, training=training):
            r = rest[0] if res else None
            return torch.ops.torchfast.bn_add_relu(x, weight, bias, r, None if training else rm,
                                                   None if training else rv, training, 1e-5, True)[0]
        args = (xs[0],) + ((xs[3],) if res else ())
        assert torch.autograd.gradgradcheck(partial, args)
        torch.autograd.grad(torchfast.nn.BatchNormReLU2d(3).to(device).double()(xs[0]).sum(), xs[0], create_graph=True)


def test_statistics_outputs_and_compiled_autograd(device):
    """The statistics come out detached; a compiled-autograd backward of an eager forward works."""
    require_kernel("bn_add_relu", device)
    x = torch.randn(2, 3, 4, 4, device=device, requires_grad=True)
    out, mean, invstd, var = torch.ops.torchfast.bn_add_relu(x, None, None, None, None, None, True, 1e-5, True)
    assert not (mean.requires_grad or invstd.requires_grad or var.requires_grad)
    compiled_autograd = getattr(getattr(torch._dynamo, "compiled_autograd", None), "_enable", None)
    if compiled_autograd is None:
        pytest.skip("this torch has no compiled autograd")
    loss = out.pow(2).sum()
    with compiled_autograd(torch.compile(backend="aot_eager")):
        loss.backward()
    expected, = torch.autograd.grad(torch.relu(torch.nn.functional.batch_norm(x, None, None, training=True)).pow(2).sum(),
                                    x)
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-5)


def test_empty_batch_keeps_running_statistics(device):
    for module in (torchfast.nn.BatchNormReLU2d(4), torchfast.nn.ResidualBlock(4)):
        module.to(device)
        bns = [module] if isinstance(module, nn.BatchNorm2d) else [module.bn1, module.bn2]
        for bn in bns:
            bn.running_mean.fill_(1.0)
            bn.running_var.fill_(2.0)
        for _ in range(3):
            assert module(torch.randn(0, 4, 3, 3, device=device)).shape == (0, 4, 3, 3)
        for bn in bns:
            assert bn.running_mean.eq(1.0).all() and bn.running_var.eq(2.0).all()
            assert int(bn.num_batches_tracked) == 3  # as torch counts them


def test_wrong_running_stat_size_fails_before_updating():
    bn = torchfast.nn.BatchNormReLU2d(6, affine=False)
    with pytest.raises(RuntimeError, match=r"running_mean should contain 4 elements not 6"):
        bn(torch.randn(2, 4, 3, 3))
    assert bn.running_mean.eq(0).all() and bn.running_var.eq(1).all()


def test_modules_built_under_inference_mode(device):
    with torch.inference_mode():
        theirs, ours = SeedResidualBlock(4).to(device).eval(), torchfast.nn.ResidualBlock(4).to(device).eval()
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(2, 4, 5, 5, device=device)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
        conv = torchfast.nn.ConvBNReLU2d(4, 3, 3).to(device).eval()
        assert conv(x).shape == (2, 3, 3, 3)


@pytest.mark.parametrize("kind", ["compile", "export"])
def test_eval_no_grad_compiles_and_exports(kind, device):
    torch.manual_seed(0)
    theirs, ours = SeedResidualBlock(8).to(device).eval(), torchfast.nn.ResidualBlock(8).to(device).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 8, 6, 6, device=device)
    with torch.no_grad():
        ours(x)  # a cached fold exists before tracing: tracing must not read it
        if kind == "compile":
            y = torch.compile(ours, fullgraph=True, backend="aot_eager")(x)
        else:
            y = torch.export.export(ours, (x,)).module()(x)
        torch.testing.assert_close(y, theirs(x), rtol=1e-5, atol=1e-5)


def test_hooks_autocast_and_sync_batchnorm_take_the_plain_path():
    torch.manual_seed(0)
    theirs, ours = SeedResidualBlock(4), torchfast.nn.ResidualBlock(4)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 4, 5, 5)
    for train in (True, False):
        seen = []
        handles = [m.register_forward_hook(lambda mod, i, o, name=name: seen.append(name))
                   for name, m in ours.named_children()]
        theirs.train(train)
        ours.train(train)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
        assert sorted(set(seen)) == ["bn1", "bn2", "conv1", "conv2", "relu"], (train, seen)
        for h in handles:
            h.remove()
    theirs.eval()
    ours.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        conv = torchfast.nn.ConvBNReLU2d(4, 4, 3).eval()
        assert ours(x).dtype == theirs(x).dtype == torch.bfloat16
        assert conv(x).dtype == torch.bfloat16
    # convert_sync_batchnorm keeps the fused layers' ReLU / residual and the state_dict keys
    model = nn.Sequential(torchfast.nn.BatchNormReLU2d(4), torchfast.nn.ResidualBlock(4))
    synced = torchfast.nn.convert_sync_batchnorm(model)
    assert type(synced[0]) is torchfast.nn.SyncBatchNormReLU2d and isinstance(synced[1].bn1, nn.SyncBatchNorm)
    assert synced.state_dict().keys() == model.state_dict().keys()
    # the block runs its converted batch norms as submodules, as the converted seed block does
    seed_synced = nn.SyncBatchNorm.convert_sync_batchnorm(SeedResidualBlock(4))
    seed_synced.load_state_dict(synced[1].state_dict())
    torch.testing.assert_close(synced[1](x), seed_synced(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(synced[1].bn1.running_mean, seed_synced.bn1.running_mean)


def test_batchnorm_add_relu_broadcasts_the_residual(device):
    torch.manual_seed(0)
    plain, fused = nn.BatchNorm2d(4).to(device), torchfast.nn.BatchNormAddReLU2d(4).to(device)
    x = torch.randn(3, 4, 5, 5, device=device)
    for shape in ((1, 4, 1, 1), (4, 5, 5), (3, 1, 5, 5)):
        r = torch.randn(shape, device=device)
        outs = []
        for call in (lambda xi, ri: torch.relu(plain(xi) + ri), fused):
            xi, ri = x.clone().requires_grad_(), r.clone().requires_grad_()
            y = call(xi, ri)
            outs.append((y, *torch.autograd.grad(y.pow(2).sum(), (xi, ri))))
        for a, b in zip(*outs):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"residual of shape \(2, 4, 1, 1\) does not broadcast to the input's"):
        fused(x, torch.randn(2, 4, 1, 1, device=device))


def test_forward_mode_ad_matches_torch(device):
    """jvp (forward-mode AD) runs on the reference: the kernels have reverse mode only."""
    torch.manual_seed(0)
    x, r, t = (torch.randn(3, 4, 5, 5, device=device) for _ in range(3))
    # (torch.func cannot update running statistics in place: batch statistics without them, and eval)
    for train, track in ((True, False), (False, True)):
        plain = nn.BatchNorm2d(4, track_running_stats=track).to(device).train(train)
        fused = torchfast.nn.BatchNormAddReLU2d(4, track_running_stats=track).to(device).train(train)
        _, theirs = torch.func.jvp(lambda a: torch.relu(plain(a) + r), (x,), (t,))
        _, ours = torch.func.jvp(lambda a: fused(a, r), (x,), (t,))
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("wrap", ["weight_norm", "spectral_norm"])
def test_parametrized_convolutions_in_eval(wrap):
    """A parametrized conv weight is recomputed on each access: the folded path folds it afresh."""
    from torch.nn.utils import parametrizations
    torch.manual_seed(0)
    theirs, ours = SeedResidualBlock(4), torchfast.nn.ResidualBlock(4)
    for m in (theirs, ours):
        getattr(parametrizations, wrap)(m.conv1)
    ours.load_state_dict(theirs.state_dict())
    theirs.eval()
    ours.eval()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
        for m in (theirs, ours):  # a change of the underlying parameter is seen
            weight = m.conv1.parametrizations.weight
            (weight.original if wrap == "spectral_norm" else weight.original0).mul_(0.5)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_backward_hooks_on_submodules_fire():
    block, seen = torchfast.nn.ResidualBlock(4), []
    block.bn1.register_full_backward_hook(lambda m, gi, go: seen.append("bn1"))
    block.relu.register_full_backward_pre_hook(lambda m, go: seen.append("relu"))
    block(torch.randn(2, 4, 5, 5, requires_grad=True)).sum().backward()
    assert "bn1" in seen and "relu" in seen
