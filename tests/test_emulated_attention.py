"""The CUDA kernels of flash_attention / flash_attention_backward, run by the CUDA emulator on CPU
tensors, against the reference: the scalar kernels (fp64, fp32, fp16, bf16; head dims 32/64/128 and
odd ones, D != Dv, L != S, broadcast/bool/padding masks, causal, dropout, fully masked rows,
expanded (GQA-style) key/value views) and the tensor-core kernels (fp16/bf16 at head dims 32/64/128,
forward and the opt-in backward), with the arch and shared-memory fallbacks of sm75/sm80/sm86, under
every emulated thread schedule. Reduced precision follows flash-attention's rule: at most twice the
error of the same attention computed in that dtype with PyTorch's ops."""
import math

import pytest
import torch

from torchfast.reference import attention as ref
from test_attention import _inputs, _mask

SEED = torch.tensor([424242], dtype=torch.int64)

SCALAR_CASES = [  # B, H, L, S, D, Dv, causal, mask, dropout
    (2, 2, 37, 21, 32, 32, False, None, 0.0),
    (1, 2, 20, 70, 64, 48, True, "float_heads", 0.0),
    (2, 1, 1, 5, 16, 16, False, "bool_bcast", 0.0),
    (1, 1, 45, 33, 128, 128, True, None, 0.2),
    (2, 2, 19, 40, 17, 9, False, "padding", 0.0),  # odd head dims
    (1, 1, 33, 50, 200, 200, False, None, 0.0),  # the widest bucket (up to 256)
]


def _check(emu, q, k, v, g, mask, causal, p, rtol, atol, ref_dtype=None):
    scale = 1 / math.sqrt(q.size(-1))
    out, lse = emu.ops.flash_attention(q, k, v, mask, causal, scale, p, SEED)
    grads = emu.ops.flash_attention_backward(g, q, k, v, out, lse, mask, causal, scale, p, SEED)
    rd = ref_dtype or q.dtype
    rq, rk, rv = (t.to(rd).requires_grad_() for t in (q, k, v))
    rmask = None if mask is None else mask.to(rd)
    rout, rlse = ref.flash_attention(rq, rk, rv, rmask, causal, scale, p, SEED)
    rgrads = torch.autograd.grad(rout, (rq, rk, rv), g.to(rd))
    assert out.dtype == q.dtype and not out.isnan().any()
    torch.testing.assert_close(out.to(rd), rout, rtol=rtol, atol=atol)
    torch.testing.assert_close(lse.to(rlse.dtype), rlse, rtol=max(rtol, 1e-5), atol=max(atol, 1e-5))
    for name, a, b in zip(("dq", "dk", "dv"), grads, rgrads):
        assert a.dtype == q.dtype and not a.isnan().any(), name
        torch.testing.assert_close(a.to(rd), b, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    return out, grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", SCALAR_CASES, ids=lambda c: "x".join(map(str, c[:6])) + f"-c{int(c[6])}-{c[7]}-p{c[8]}")
def test_scalar_kernels_match_reference(emu, schedule, case, dtype):
    B, H, L, S, D, Dv, causal, kind, p = case
    q, k, v, g = _inputs(B, H, L, S, D, Dv, dtype, "cpu")
    mask = _mask(kind, B, H, L, S, dtype, "cpu")
    t = 1e-9 if dtype == torch.float64 else 2e-5
    if dtype == torch.float64 and max(D, Dv) > 128:  # fp64 tiles past D=128 exceed shared memory
        with pytest.raises(RuntimeError, match="head dims up to 128"):
            emu.ops.flash_attention(q, k, v, mask, causal, 1.0, p, SEED)
        return
    _check(emu, q, k, v, g, mask, causal, p, t, t)


def test_fully_masked_rows_and_gqa_views(emu, schedule):
    """A fully masked row gives 0 with zero gradients; keys and values expanded across heads (GQA's
    broadcast, stride 0 on the head dim) are read through their strides."""
    q, _, _, g = _inputs(2, 4, 23, 31, 32, 32, torch.float32, "cpu")
    k1, v1 = (torch.randn(2, 1, 31, 32) for _ in range(2))
    k, v = k1.expand(2, 4, 31, 32), v1.expand(2, 4, 31, 32)
    mask = torch.randn(1, 4, 23, 31)
    mask[:, :, 3] = float("-inf")
    out, grads = _check(emu, q, k, v, g, mask, False, 0.0, 2e-5, 2e-5)
    assert out[:, :, 3].abs().max() == 0 and grads[0][:, :, 3].abs().max() == 0


def _stats_with(emu, word):
    return sum(v["launches"] for k, v in emu.launch_stats().items() if word in k)


def _reduced(D, dtype, L, S, seed=12, B=1):
    torch.manual_seed(seed)
    q, k, v, g = (torch.randn(B, 2, n, D).to(dtype) for n in (L, S, S, L))
    mask = torch.randn(1, 2, L, S)
    mask[:, :, 5] = float("-inf")  # a fully masked row
    return q, k, v, g, mask



def _eager(q, k, v, g, mask, causal, scale, p):
    """Attention in the inputs' own dtype (PyTorch's ops): the error budget of reduced precision."""
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    s = (q @ k.transpose(-2, -1)) * scale
    if mask is not None:
        s = s + mask.to(s.dtype)
    L, S = s.shape[-2:]
    if causal:
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), float("-inf"))
    dead = (s == float("-inf")).all(-1, keepdim=True)  # fully masked rows give 0, as the kernels
    a = torch.softmax(s.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    if p > 0:
        keep = ref.dropout_keep_mask(int(SEED), q.size(0), q.size(1), L, S, p)
        a = a * keep.to(a.dtype) / (1 - p)
    o = a @ v
    return (o, *torch.autograd.grad(o, (q, k, v), g))


def _check_within_twice_eager_error(emu, q, k, v, g, mask, causal, p):
    """flash-attention's rule: the kernel's error against an fp64 reference is at most twice that of
    the same computation in the inputs' dtype with PyTorch's ops (forward and the three gradients)."""
    scale = 1 / math.sqrt(q.size(-1))
    out, lse = emu.ops.flash_attention(q, k, v, mask, causal, scale, p, SEED)
    mine = (out, *emu.ops.flash_attention_backward(g, q, k, v, out, lse, mask, causal, scale, p, SEED))
    rq, rk, rv = (t.double().requires_grad_() for t in (q, k, v))
    rmask = None if mask is None else mask.double()
    rout, _ = ref.flash_attention(rq, rk, rv, rmask, causal, scale, p, SEED)
    truth = (rout, *torch.autograd.grad(rout, (rq, rk, rv), g.double()))
    base = _eager(q, k, v, g, mask, causal, scale, p)
    for name, m, b, t in zip(("out", "dq", "dk", "dv"), mine, base, truth):
        assert m.dtype == q.dtype and not m.isnan().any(), name
        err, base_err = (m.double() - t).abs().max().item(), (b.double() - t).abs().max().item()
        assert err <= 2 * base_err + 1e-5, f"{name}: error {err:.3g} vs eager {q.dtype} error {base_err:.3g}"
    return out, mine[1:]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [32, 64, 128])
def test_tensor_core_forward_and_backward(emu, schedule, D, dtype, monkeypatch):
    """sm90: the tensor-core forward (default) and backward (TORCHFAST_ATTENTION_WMMA_BACKWARD=1),
    batch 2, at L < S and L > S (tiles with tails): no mask, per-head masks with a fully masked row,
    an (L, S) 0/-inf mask shared by the batch, a padding mask, causal, dropout, causal + dropout.
    Errors within twice those of the same attention in fp16/bf16 with PyTorch's ops."""
    monkeypatch.setenv("TORCHFAST_ATTENTION_WMMA_BACKWARD", "1")
    for L, S, kind, causal, p in ((70, 100, None, False, 0.0), (100, 70, "heads", True, 0.0),
                                  (70, 100, "bool_bcast", True, 0.2), (70, 70, "padding", False, 0.2)):
        q, k, v, g, heads = _reduced(D, dtype, L, S, B=2)
        mask = heads if kind == "heads" else _mask(kind, 2, 2, L, S, torch.float32, "cpu")
        emu.reset_launch_stats()
        out, grads = _check_within_twice_eager_error(emu, q, k, v, g, mask, causal, p)
        assert _stats_with(emu, "tensor_core_forward") == 1 and _stats_with(emu, "tensor_core_backward") == 1
        assert _stats_with(emu, "scalar_") == 0
        if kind == "heads":
            assert out[:, :, 5].abs().max() == 0 and grads[0][:, :, 5].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_tensor_core_kernels_see_the_last_key(emu, schedule, dtype, monkeypatch):
    """Values zero but for the last key (in the last, partial key tile): an off-by-one at a tile's tail
    moves the output by that key's whole weight."""
    monkeypatch.setenv("TORCHFAST_ATTENTION_WMMA_BACKWARD", "1")
    q, k, _, g, _ = _reduced(64, dtype, 70, 100)
    v = torch.zeros_like(k)
    v[:, :, -1] = 1.0
    _check_within_twice_eager_error(emu, q, k, v, g, None, False, 0.0)


# (device, D): which kernel the forward and the opt-in backward take (tiles vs shared memory, arch)
FALLBACKS = [
    ("sm75", 64, "scalar_forward", "scalar_backward"),  # no tensor cores before sm80
    ("sm80", 128, "tensor_core_forward", "scalar_backward"),  # backward tiles at D=128 exceed 163 KiB
    ("sm80", 64, "tensor_core_forward", "tensor_core_backward"),
    ("sm86", 128, "scalar_forward", "scalar_backward"),  # 99 KiB: the forward fits up to D=64
    ("sm86", 64, "tensor_core_forward", "scalar_backward"),  # and the backward only D=32
    ("sm86", 32, "tensor_core_forward", "tensor_core_backward"),
]


@pytest.mark.parametrize("arch, D, forward, backward", FALLBACKS)
def test_arch_and_shared_memory_fallbacks(emu, schedule, arch, D, forward, backward, monkeypatch):
    monkeypatch.setenv("TORCHFAST_ATTENTION_WMMA_BACKWARD", "1")
    q, k, v, g, mask = _reduced(D, torch.float16, 40, 50)
    with emu.device(arch):
        emu.reset_launch_stats()
        _check_within_twice_eager_error(emu, q, k, v, g, mask, False, 0.0)
        assert _stats_with(emu, forward) == 1 and _stats_with(emu, backward) == 1, emu.launch_stats()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_reduced_precision_scalar_kernels(emu, schedule, dtype, monkeypatch):
    """fp16/bf16 where the tensor-core kernels do not apply: odd head dims, D != Dv, and with the
    tensor-core forward switched off."""
    q, k, v, g = _inputs(1, 2, 30, 45, 24, 40, dtype, "cpu")
    _check_within_twice_eager_error(emu, q, k, v, g, None, True, 0.0)
    monkeypatch.setenv("TORCHFAST_ATTENTION_WMMA", "0")
    q, k, v, g, mask = _reduced(64, dtype, 40, 50)
    emu.reset_launch_stats()
    _check_within_twice_eager_error(emu, q, k, v, g, mask, False, 0.1)
    assert _stats_with(emu, "tensor_core") == 0


def test_bad_input_errors_as_on_the_gpu(emu):
    q = torch.randn(1, 1, 4, 300)
    with pytest.raises(RuntimeError, match="head dims up to 256"):
        emu.ops.flash_attention(q, q, q, None, False, 1.0, 0.0, None)


EMULATED_OPTIN = {"sm75": 64 * 1024, "sm80": 163 * 1024, "sm86": 99 * 1024, "sm90": 227 * 1024}


@pytest.mark.parametrize("arch", sorted(EMULATED_OPTIN))
def test_python_shared_memory_rule_matches_the_kernels(emu, arch, monkeypatch):
    """torchfast.ops.attention routes a CUDA call to the reference where the scalar kernels' shared
    memory exceeds the GPU's opt-in limit; its formula must agree with what the kernels ask for: they
    launch exactly where it says they fit, and fail with the shared-memory error elsewhere."""
    from torchfast.ops.attention import cuda_scalar_kernel_shared_memory
    monkeypatch.setenv("TORCHFAST_ATTENTION_WMMA", "0")
    with emu.device(arch):
        for dtype, dims in ((torch.float32, (64, 128, 200, 256)), (torch.float64, (32, 64, 128)),
                            (torch.float16, (128, 256))):
            for D in dims:
                q = torch.randn(1, 1, 5, D).to(dtype)
                fwd, bwd = cuda_scalar_kernel_shared_memory(dtype, D, D)
                for need, run in ((fwd, lambda: emu.ops.flash_attention(q, q, q, None, False, 0.1, 0.0, None)),
                                  (bwd, lambda: emu.ops.flash_attention_backward(
                                      q, q, q, q, q, torch.zeros(1, 1, 5, dtype=torch.float64 if dtype ==
                                                                 torch.float64 else torch.float32),
                                      None, False, 0.1, 0.0, None))):
                    if need <= EMULATED_OPTIN[arch]:
                        run()
                    else:
                        with pytest.raises(RuntimeError, match=f"need {need} bytes of shared memory"):
                            run()
