"""Flash attention: the ops against their reference (forward, backward, dropout), gradcheck, opcheck,
torch.compile, torchfast.nn.functional.scaled_dot_product_attention against PyTorch's, and
torchfast.nn.MultiheadAttention against nn.MultiheadAttention across its options."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchfast
from torchfast.nn.functional import scaled_dot_product_attention as tf_sdpa
from torchfast.reference import attention as ref
from conftest import require_kernel

OP = "flash_attention"


def _inputs(B, H, L, S, D, Dv, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return mk(B, H, L, D), mk(B, H, S, D), mk(B, H, S, Dv), mk(B, H, L, Dv)


def _mask(kind, B, H, L, S, dtype, device):
    g = torch.Generator().manual_seed(7)
    if kind is None:
        return None
    if kind == "bool_bcast":  # (L, S) shared by batch and heads, as additive 0/-inf
        keep = torch.rand(L, S, generator=g) > 0.3
        return torch.zeros(L, S, dtype=dtype).masked_fill(~keep, float("-inf")).to(device)
    if kind == "float_heads":  # (1, H, L, S)
        return torch.randn(1, H, L, S, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    if kind == "padding":  # (B, 1, 1, S): keys padded away per batch element
        m = torch.zeros(B, 1, 1, S, dtype=dtype)
        m[0, ..., S // 2:] = float("-inf")
        return m.to(device)
    raise ValueError(kind)


CASES = [  # B, H, L, S, D, Dv, causal, mask
    (2, 3, 97, 61, 32, 32, False, None),
    (1, 2, 130, 1025, 64, 64, True, None),
    (2, 2, 1, 5, 16, 16, False, "bool_bcast"),
    (2, 2, 97, 97, 64, 48, False, "float_heads"),
    (1, 1, 300, 700, 128, 128, True, "float_heads"),
    (3, 1, 33, 1, 8, 8, False, None),
    (2, 2, 65, 80, 256, 256, False, "padding"),
    (1, 1, 1025, 97, 80, 80, True, None),
    (1, 2, 70, 517, 6, 40, False, "padding"),  # bf16 packed products: tiny head dim, padded Dv, odd S
    (2, 1, 33, 45, 7, 9, True, None),  # odd head dim (bf16 stays on the BLAS)
]


def _run_op(q, k, v, mask, causal, scale, p=0.0, seed=None):
    return torch.ops.torchfast.flash_attention(q, k, v, mask, causal, scale, p, seed)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:6])) + f"-c{int(c[6])}-{c[7]}")
def test_kernel_matches_reference_fp64(case, device):
    require_kernel(OP, device)
    B, H, L, S, D, Dv, causal, kind = case
    if device == "cuda" and D > torchfast.ops.attention.CUDA_MAX_HEAD_DIM_FP64:
        pytest.skip("fp64 at this head dim is served by the reference on CUDA")
    q, k, v, g = _inputs(B, H, L, S, D, Dv, torch.float64, device)
    mask = _mask(kind, B, H, L, S, torch.float64, device)
    scale = 1 / math.sqrt(D)
    out, lse = _run_op(q, k, v, mask, causal, scale)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ro, rlse = ref.flash_attention(qr, kr, vr, mask, causal, scale, 0.0, None)
    torch.testing.assert_close(out, ro, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, rlse, rtol=1e-10, atol=1e-10)
    grads = torch.ops.torchfast.flash_attention_backward(g, q, k, v, out, lse, mask, causal, scale, 0.0, None)
    rgrads = torch.autograd.grad(ro, (qr, kr, vr), g)
    for a, b in zip(grads, rgrads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


# A comparison of error sizes needs more than a handful of scores (with L=1, S=5, one lucky rounding
# in eager decides it).
STATISTICAL_CASES = [c for c in CASES if c[2] * c[3] >= 64]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", STATISTICAL_CASES, ids=lambda c: f"L{c[2]}S{c[3]}D{c[4]}")
def test_reduced_precision_within_twice_eager_error(case, dtype, device):
    """The kernel's error against an fp64 reference is at most 2x that of PyTorch's same-dtype eager
    attention (flash-attention's rule), forward and backward."""
    require_kernel(OP, device)
    B, H, L, S, D, Dv, causal, kind = case
    q, k, v, g = _inputs(B, H, L, S, D, Dv, torch.float64, device, seed=3)
    mask = _mask(kind, B, H, L, S, torch.float64, device)
    scale = 1 / math.sqrt(D)

    def eager(q, k, v, mask, g):
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
        s = (q @ k.transpose(-2, -1)) * scale
        if mask is not None:
            s = s + mask
        if causal:
            s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=device).tril(), float("-inf"))
        o = torch.softmax(s, dim=-1) @ v
        return (o, *torch.autograd.grad(o, (q, k, v), g))

    truth = eager(q, k, v, mask, g)
    low = [t.to(dtype) for t in (q, k, v, g)]
    lmask = None if mask is None else mask.to(dtype)
    base = eager(*low[:3], lmask, low[3])
    qk = [t.clone().requires_grad_() for t in low[:3]]
    out = tf_sdpa(*qk, attn_mask=lmask, is_causal=causal, scale=scale)
    mine = (out, *torch.autograd.grad(out, qk, low[3]))
    for name, m, b, t in zip(("out", "dq", "dk", "dv"), mine, base, truth):
        assert m.dtype == dtype
        err, base_err = (m.double() - t).abs().max().item(), (b.double() - t).abs().max().item()
        assert err <= 2 * base_err + 1e-5, f"{name}: error {err:.3g} vs eager {dtype} error {base_err:.3g}"


@pytest.mark.parametrize("shape", [(2, 3, 97, 32), (5, 97, 16), (7, 16), (2, 2, 3, 1025, 8)])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_matches_torch(shape, causal, device):
    torch.manual_seed(0)
    q, k, v = (torch.randn(*shape, device=device, requires_grad=True) for _ in range(3))
    a = tf_sdpa(q, k, v, is_causal=causal)
    b = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(a)
    for x, y in zip(torch.autograd.grad(a, (q, k, v), g), torch.autograd.grad(b, (q, k, v), g)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_shape", [(97, 61), (1, 1, 97, 61), (2, 1, 97, 61), (2, 3, 97, 61), (1, 61), (97, 1),
                                        "transposed"])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_sdpa_masks_match_torch(mask_shape, kind, device):
    torch.manual_seed(1)
    q = torch.randn(2, 3, 97, 32, device=device, requires_grad=True)
    k = torch.randn(2, 3, 61, 32, device=device, requires_grad=True)
    v = torch.randn(2, 3, 61, 40, device=device, requires_grad=True)
    shape = (61, 97) if mask_shape == "transposed" else mask_shape
    if kind == "bool":
        mask = torch.rand(shape, device=device) > 0.3
        mask[..., 0] = True  # keep every row attending to something
    else:
        mask = torch.randn(shape, device=device)
    if mask_shape == "transposed":  # (97, 61) with a strided last dim
        mask = mask.t()
    a = tf_sdpa(q, k, v, attn_mask=mask, scale=0.3)
    b = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(a)
    for x, y in zip(torch.autograd.grad(a, (q, k, v), g), torch.autograd.grad(b, (q, k, v), g)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_fully_masked_rows_have_finite_gradients_on_the_reference_path(device):
    """A mask that requires grad (a learned bias) and a double backward go through the reference:
    rows whose every key is masked must give zero gradients there too, not NaN."""
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 2, n, 8, device=device, dtype=torch.float64, requires_grad=True) for n in (5, 7, 7))
    bias = torch.zeros(2, 2, 5, 7, device=device, dtype=torch.float64)
    bias[:, :, 1] = float("-inf")  # row 1 sees no key
    bias.requires_grad_()
    out = tf_sdpa(q, k, v, attn_mask=bias)
    grads = torch.autograd.grad(out.pow(2).sum(), (q, k, v, bias), create_graph=True)
    assert all(torch.isfinite(g).all() for g in grads[:3])
    assert grads[0][:, :, 1].abs().max() == 0 and torch.nan_to_num(grads[3][:, :, 1], nan=1.0).abs().max() == 0
    second = torch.autograd.grad(sum(g.pow(2).sum() for g in grads[:3]), (q, k, v))
    assert all(torch.isfinite(g).all() for g in second)


def test_forward_mode_ad_and_func_transforms_match_torch(device):
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 2, n, 8, device=device) for n in (5, 7, 7))
    t = torch.randn_like(q)
    causal = torch.ones(5, 7, dtype=torch.bool, device=device).tril()

    def eager(a, mask=None):  # torch's own fused SDPA has no forward AD on the CPU
        s = (a @ k.transpose(-2, -1)) / math.sqrt(8)
        return torch.softmax(s if mask is None else s.masked_fill(~mask, float("-inf")), -1) @ v

    _, ours = torch.func.jvp(lambda a: tf_sdpa(a, k, v, is_causal=True), (q,), (t,))
    _, theirs = torch.func.jvp(lambda a: eager(a, causal), (q,), (t,))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    g_ours = torch.func.grad(lambda a: tf_sdpa(a, k, v).pow(2).sum())(q)
    g_theirs = torch.func.grad(lambda a: eager(a).pow(2).sum())(q)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-5)
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(tf_sdpa(fwAD.make_dual(q, t), k, v, is_causal=True)).tangent
    torch.testing.assert_close(tangent, theirs, rtol=1e-5, atol=1e-5)


def test_sdpa_follows_autocast_like_torch():
    q, k, v = (torch.randn(2, 2, 9, 16) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = tf_sdpa(q, k, v), F.scaled_dot_product_attention(q, k, v)
        assert ours.dtype == theirs.dtype == torch.bfloat16
        mixed = tf_sdpa(q.bfloat16(), k, v)  # operands of different dtypes are cast, as torch casts them
        assert mixed.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=2e-2, atol=2e-2)


def test_sdpa_mask_with_extra_leading_dims():
    torch.manual_seed(4)
    q, k, v, m = torch.randn(3, 5, 8), torch.randn(3, 7, 8), torch.randn(3, 7, 6), torch.randn(1, 3, 5, 7)
    torch.testing.assert_close(tf_sdpa(q, k, v, attn_mask=m), F.scaled_dot_product_attention(q, k, v, attn_mask=m),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"attn_mask of shape \(2, 3, 5, 7\) has more dims than the inputs"):
        tf_sdpa(q, k, v, attn_mask=torch.randn(2, 3, 5, 7))


def test_sdpa_broadcasts_batch_dims_like_torch(device):
    torch.manual_seed(3)
    q = torch.randn(2, 3, 9, 8, device=device, requires_grad=True)
    k, v = (torch.randn(1, 3, 11, 8, device=device, requires_grad=True) for _ in range(2))
    a, b = tf_sdpa(q, k, v), F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(a)
    for x, y in zip(torch.autograd.grad(a, (q, k, v), g), torch.autograd.grad(b, (q, k, v), g)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_sdpa_gqa_and_mask_grad(device):
    torch.manual_seed(2)
    q = torch.randn(2, 8, 33, 16, device=device, requires_grad=True)
    k = torch.randn(2, 2, 40, 16, device=device, requires_grad=True)
    v = torch.randn(2, 2, 40, 16, device=device, requires_grad=True)
    a = tf_sdpa(q, k, v, enable_gqa=True)
    b = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # A mask that requires grad gets its gradient (through the reference path).
    m1 = torch.randn(33, 40, device=device, requires_grad=True)
    m2 = m1.detach().clone().requires_grad_()
    qq = q.detach()[:, :2]
    (tf_sdpa(qq, k, v, attn_mask=m1) ** 2).sum().backward()
    (F.scaled_dot_product_attention(qq, k, v, attn_mask=m2) ** 2).sum().backward()
    torch.testing.assert_close(m1.grad, m2.grad, rtol=1e-5, atol=1e-5)


def test_fully_masked_rows_give_zero_not_nan(device):
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 2, 9, 16, device=device, requires_grad=True) for _ in range(3))
    mask = torch.ones(9, 9, dtype=torch.bool, device=device)
    mask[4] = False
    out = tf_sdpa(q, k, v, attn_mask=mask)
    assert not out.isnan().any() and out[:, :, 4].abs().max() == 0
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert q.grad[:, :, 4].abs().max() == 0
    empty_keys = tf_sdpa(q, k[:, :, :0], v[:, :, :0])
    assert empty_keys.shape == (2, 2, 9, 16) and empty_keys.abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_nan_inputs_propagate_like_torch(dtype, device):
    """A NaN query row makes that output row NaN; a NaN key makes every row that sees it NaN (as torch:
    a NaN must not read as a masked key), and the gradients carry it."""
    torch.manual_seed(0)
    q = torch.randn(1, 1, 4, 16, device=device, dtype=dtype)
    k, v = (torch.randn(1, 1, 600, 16, device=device, dtype=dtype) for _ in range(2))
    q[0, 0, 2, 0] = float("nan")
    assert tf_sdpa(q, k, v).isnan().any(-1).flatten().tolist() == [False, False, True, False]
    reference = ref.flash_attention(q, k, v, None, False, 0.25, 0.0, None)[0]  # the fallback path agrees
    assert reference.isnan().any(-1).flatten().tolist() == [False, False, True, False]
    k[0, 0, 550, 3] = float("nan")
    qg = q.clone().requires_grad_()
    out = tf_sdpa(qg, k, v)
    assert out.isnan().any(-1).all()
    out.sum().backward()
    assert qg.grad.isnan().any()
    causal = tf_sdpa(q, k, v, is_causal=True)  # queries 0-3 see keys 0-3 only: the NaN key is out of reach
    assert causal.isnan().any(-1).flatten().tolist() == [False, False, True, False]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_zero_width_heads_match_torch(dtype, device):
    """A head dim of 0 scores 0 everywhere (uniform weights, torch gives the mean of V); Dv = 0 is empty."""
    q, k = torch.randn(1, 2, 5, 0, device=device, dtype=dtype), torch.randn(1, 2, 7, 0, device=device, dtype=dtype)
    v = torch.randn(1, 2, 7, 8, device=device, dtype=dtype)
    torch.testing.assert_close(tf_sdpa(q, k, v), F.scaled_dot_product_attention(q, k, v), rtol=1e-2, atol=1e-2)
    assert tf_sdpa(v, v, v[..., :0]).shape == (1, 2, 7, 0)


def test_bf16_without_onednn_and_causal_limit(device):
    """bf16 products run on oneDNN's brgemm where it can, the BLAS when oneDNN is switched off (same
    results); a causal diagonal block never reads the values past its queries' limit."""
    if device != "cpu":
        pytest.skip("oneDNN's brgemm and the packed bf16 products are the CPU kernel's")
    torch.manual_seed(5)
    q, k, v = (torch.randn(1, 2, n, 64, device=device, dtype=torch.bfloat16) for n in (299, 601, 601))
    base = tf_sdpa(q, k, v)
    with torch.backends.mkldnn.flags(enabled=False):
        torch.testing.assert_close(tf_sdpa(q, k, v), base, rtol=2e-2, atol=2e-2)
    for L in (299, 300, 7):
        vi = v.clone()
        vi[:, :, L:] = float("inf")  # no query (top-left causal) may see keys >= L
        out = tf_sdpa(q[:, :, :L], k, vi, is_causal=True)
        assert torch.isfinite(out).all(), L
        torch.testing.assert_close(out, tf_sdpa(q[:, :, :L], k, v, is_causal=True))


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_reproducible_and_consistent(causal, device):
    require_kernel(OP, device)
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 3, 70, 32, device=device) for _ in range(3))
    p = 0.3
    torch.manual_seed(11)
    a = tf_sdpa(q, k, v, dropout_p=p, is_causal=causal)
    torch.manual_seed(11)
    b = tf_sdpa(q, k, v, dropout_p=p, is_causal=causal)
    assert torch.equal(a, b)
    assert not torch.equal(a, tf_sdpa(q, k, v, dropout_p=p, is_causal=causal))
    # The kernel's forward and backward use exactly the reference's mask.
    seed = torch.tensor([123456789012345], dtype=torch.int64)
    qs = [t.clone().requires_grad_() for t in (q, k, v)]
    rs = [t.clone().requires_grad_() for t in (q, k, v)]
    out, _ = torch.ops.torchfast.flash_attention(*qs, None, causal, 0.2, p, seed)
    rout, _ = ref.flash_attention(*rs, None, causal, 0.2, p, seed)
    torch.testing.assert_close(out, rout, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    for x, y in zip(torch.autograd.grad(out, qs, g), torch.autograd.grad(rout, rs, g)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    keep = ref.dropout_keep_mask(int(seed), 4, 8, 128, 128, p)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [32, 64, 128])
def test_reduced_precision_masks_dropout_match_reference(D, dtype, device):
    """fp16/bf16 at the head dims of CUDA's tensor-core forward: masks, causal, fully masked rows and
    dropout against the fp32 reference with the same seed."""
    require_kernel(OP, device)
    torch.manual_seed(9)
    q, k, v = (torch.randn(2, 3, n, D, device=device).to(dtype) for n in (70, 130, 130))
    mask = torch.randn(1, 3, 70, 130, device=device)
    mask[:, :, 5] = float("-inf")  # a fully masked row
    seed = torch.tensor([424242], dtype=torch.int64)
    for causal, p in ((False, 0.0), (True, 0.0), (False, 0.2)):
        out, lse = torch.ops.torchfast.flash_attention(q, k, v, mask, causal, D ** -0.5, p, seed)
        rout, rlse = ref.flash_attention(q, k, v, mask, causal, D ** -0.5, p, seed)
        tol = 2e-2 if dtype == torch.float16 else 6e-2
        torch.testing.assert_close(out.float(), rout.float(), rtol=tol, atol=tol)
        torch.testing.assert_close(lse, rlse, rtol=1e-3, atol=1e-3)
        assert out[:, :, 5].abs().max() == 0 and not out.isnan().any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [32, 64, 128])
def test_cuda_tensor_core_backward_matches_reference(D, dtype, monkeypatch):
    """The opt-in tensor-core backward (TORCHFAST_ATTENTION_WMMA_BACKWARD=1): gradients against the
    fp32 reference with the same dropout seed, at lengths that are not multiples of its 64-row tiles
    (L < S and L > S), with masks, causal, a fully masked row and dropout."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    require_kernel(OP, "cuda")
    monkeypatch.setenv("TORCHFAST_ATTENTION_WMMA_BACKWARD", "1")
    torch.manual_seed(12)
    seed = torch.tensor([777], dtype=torch.int64)
    for L, S in ((70, 130), (130, 70)):
        q, k, v, g = (torch.randn(2, 3, n, D, device="cuda").to(dtype) for n in (L, S, S, L))
        mask = torch.randn(1, 3, L, S, device="cuda")
        mask[:, :, 5] = float("-inf")  # a fully masked row
        for m, causal, p in ((None, False, 0.0), (mask, True, 0.0), (mask, False, 0.2)):
            out, lse = torch.ops.torchfast.flash_attention(q, k, v, m, causal, D ** -0.5, p, seed)
            grads = torch.ops.torchfast.flash_attention_backward(g, q, k, v, out, lse, m, causal, D ** -0.5, p, seed)
            rq, rk, rv = (t.float().requires_grad_() for t in (q, k, v))
            rout, _ = ref.flash_attention(rq, rk, rv, m, causal, D ** -0.5, p, seed)
            rgrads = torch.autograd.grad(rout, (rq, rk, rv), g.float())
            for name, a, b in zip(("dq", "dk", "dv"), grads, rgrads):
                assert a.dtype == dtype and not a.isnan().any(), name
                rel = (a.float() - b).abs().max() / b.abs().max().clamp_min(1e-6)
                assert rel < (1e-2 if dtype == torch.float16 else 3e-2), (name, L, S, causal, p, rel.item())
            if m is not None:
                assert grads[0][:, :, 5].abs().max() == 0  # the fully masked row has no gradient
            if torch.cuda.get_device_capability() >= (9, 0):  # its tiles fit: the tensor-core kernel ran
                monkeypatch.setenv("TORCHFAST_ATTENTION_WMMA_BACKWARD", "0")
                scalar = torch.ops.torchfast.flash_attention_backward(g, q, k, v, out, lse, m, causal, D ** -0.5, p,
                                                                      seed)
                monkeypatch.setenv("TORCHFAST_ATTENTION_WMMA_BACKWARD", "1")
                assert not all(torch.equal(a, b) for a, b in zip(grads, scalar)), "the scalar kernel ran"


def test_dropout_edges(device):
    q = torch.randn(1, 2, 8, 16, device=device)
    assert tf_sdpa(q, q, q, dropout_p=1.0).abs().max() == 0
    with pytest.raises(ValueError, match="dropout_p"):
        tf_sdpa(q, q, q, dropout_p=1.5)


@pytest.mark.parametrize("causal,mask,p", [(False, None, 0.0), (True, "float", 0.0), (False, "bool", 0.25)])
def test_gradcheck(causal, mask, p, device):
    require_kernel(OP, device)
    torch.manual_seed(5)
    q, k, v = (torch.randn(2, 2, n, 8, dtype=torch.float64, device=device, requires_grad=True) for n in (5, 7, 7))
    m = None
    if mask == "float":
        m = torch.randn(1, 2, 5, 7, dtype=torch.float64, device=device)
    elif mask == "bool":
        m = torch.zeros(5, 7, dtype=torch.float64, device=device)
        m[1, 2:] = float("-inf")
    seed = torch.tensor([99], dtype=torch.int64) if p else None
    fn = lambda q, k, v: torch.ops.torchfast.flash_attention(q, k, v, m, causal, 0.4, p, seed)[0]
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_double_backward_through_reference(device):
    require_kernel(OP, device)
    torch.manual_seed(8)
    q, k, v = (torch.randn(1, 2, n, 8, dtype=torch.float64, device=device, requires_grad=True) for n in (5, 6, 6))
    fn = lambda q, k, v: tf_sdpa(q, k, v, is_causal=True)
    assert torch.autograd.gradgradcheck(fn, (q, k, v))


def test_opcheck(device):
    require_kernel(OP, device)
    torch.manual_seed(6)
    q, k, v, g = _inputs(2, 3, 17, 23, 16, 16, torch.float32, device)
    mask = torch.randn(1, 3, 17, 23, device=device)
    seed = torch.tensor([5], dtype=torch.int64)
    for args in ((q, k, v, None, False, 0.25, 0.0, None), (q, k, v, mask, True, 0.25, 0.1, seed)):
        torch.library.opcheck(torch.ops.torchfast.flash_attention.default, args)
        qq = [t.clone().requires_grad_() for t in args[:3]]
        torch.library.opcheck(torch.ops.torchfast.flash_attention.default, (*qq, *args[3:]))
        out, lse = torch.ops.torchfast.flash_attention(*args)
        torch.library.opcheck(torch.ops.torchfast.flash_attention_backward.default,
                              (g, q, k, v, out, lse, *args[3:]))


def test_torch_compile_fullgraph(device):
    require_kernel(OP, device)
    torch.manual_seed(7)
    mha = torchfast.nn.MultiheadAttention(64, 4, batch_first=True).to(device)
    x = torch.randn(3, 50, 64, device=device)
    mask = torch.randn(50, 50, device=device)

    def step(x):
        out, _ = mha(x, x, x, attn_mask=mask, need_weights=False)
        return tf_sdpa(out.view(3, 50, 4, 16).transpose(1, 2), out.view(3, 50, 4, 16).transpose(1, 2),
                       out.view(3, 50, 4, 16).transpose(1, 2), is_causal=True).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.testing.assert_close(compiled(xc), step(xe), rtol=1e-4, atol=1e-4)
    step(xe).backward()
    compiled(xc).backward()
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-4, atol=1e-4)


def test_bad_input_errors(device):
    q = torch.randn(2, 3, 5, 8, device=device)
    with pytest.raises(ValueError, match="rank >= 2"):
        tf_sdpa(q, q[0, 0, 0], q)
    with pytest.raises(ValueError, match=r"\(2, 3, 5, 8\), \(2, 3, 5, 7\)"):
        tf_sdpa(q, q[..., :7], q)
    with pytest.raises(ValueError, match=r"do not broadcast: \(2, 3, 5, 8\), \(3, 3, 5, 8\)"):
        tf_sdpa(q, torch.randn(3, 3, 5, 8, device=device), q)
    with pytest.raises(ValueError, match=r"must be a multiple of key/value heads \(2\)"):
        tf_sdpa(q, q[:, :2], q[:, :2], enable_gqa=True)
    with pytest.raises(ValueError, match=r"attn_mask of shape \(4, 5\)"):
        tf_sdpa(q, q, q, attn_mask=torch.ones(4, 5, dtype=torch.bool, device=device))
    if torchfast._loader.has_kernel(OP, device):
        with pytest.raises(RuntimeError, match="must share a dtype"):
            torch.ops.torchfast.flash_attention(q, q.double(), q, None, False, 1.0, 0.0, None)
        with pytest.raises(RuntimeError, match="needs rng_seed"):
            torch.ops.torchfast.flash_attention(q, q, q, None, False, 1.0, 0.5, None)


# ---- torchfast.nn.MultiheadAttention against nn.MultiheadAttention --------------------------------

MHA_OPTIONS = [
    dict(),
    dict(bias=False),
    dict(add_bias_kv=True),
    dict(add_zero_attn=True),
    dict(kdim=24, vdim=40),
    dict(batch_first=True),
    dict(add_bias_kv=True, add_zero_attn=True, kdim=24, vdim=40, batch_first=True),
]
CALLS = [
    dict(),
    dict(key_padding_mask="bool"),
    dict(key_padding_mask="float"),
    dict(attn_mask="bool2d"),
    dict(attn_mask="float3d"),
    dict(attn_mask="causal", is_causal=True),
    dict(attn_mask="bool2d", key_padding_mask="bool"),
]


def _pair(options, device, seed=0):
    torch.manual_seed(seed)
    theirs = nn.MultiheadAttention(32, 4, **options).to(device)
    ours = torchfast.nn.MultiheadAttention(32, 4, **options).to(device)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _mha_inputs(options, call, device, L=11, S=13, N=3, self_attention=False):
    bf = options.get("batch_first", False)
    shape = lambda n, e: (N, n, e) if bf else (n, N, e)
    g = torch.Generator().manual_seed(1)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device)
    if self_attention:
        x = rnd(*shape(L, 32)).requires_grad_()
        return x, x, x, {}
    q = rnd(*shape(L, 32)).requires_grad_()
    k = rnd(*shape(S, options.get("kdim") or 32)).requires_grad_()
    v = rnd(*shape(S, options.get("vdim") or 32)).requires_grad_()
    kwargs = {}
    if call.get("key_padding_mask") == "bool":
        m = torch.zeros(N, S, dtype=torch.bool)
        m[0, -4:] = True
        kwargs["key_padding_mask"] = m.to(device)
    elif call.get("key_padding_mask") == "float":
        kwargs["key_padding_mask"] = rnd(N, S)
    am = call.get("attn_mask")
    if am == "bool2d":
        m = torch.rand(L, S, generator=g) > 0.7
        m[:, 0] = False  # every query keeps a key (torch gives NaN for fully masked rows)
        kwargs["attn_mask"] = m.to(device)
    elif am == "float3d":
        kwargs["attn_mask"] = rnd(N * 4, L, S)
    elif am == "causal":
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(L, device=device)
        kwargs["is_causal"] = True
    return q, k, v, kwargs


@pytest.mark.parametrize("call", CALLS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "plain")
@pytest.mark.parametrize("options", MHA_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_mha_matches_torch(options, call, device):
    theirs, ours = _pair(options, device)
    causal = call.get("attn_mask") == "causal"
    q, k, v, kwargs = _mha_inputs(options, call, device, S=11 if causal else 13, self_attention=False)
    for need_weights in (False, True):
        theirs.zero_grad()
        ours.zero_grad()
        a, aw = theirs(q, k, v, need_weights=need_weights, **kwargs)
        b, bw = ours(q, k, v, need_weights=need_weights, **kwargs)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        assert (aw is None) == (bw is None)
        if aw is not None:
            torch.testing.assert_close(bw, aw, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(a)
        ga = torch.autograd.grad(a, [q, k, v, *theirs.parameters()], g)
        gb = torch.autograd.grad(b, [q, k, v, *ours.parameters()], g)
        for x, y in zip(gb, ga):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_first", [False, True])
def test_mha_self_attention_unbatched_and_average(batch_first, device):
    theirs, ours = _pair(dict(batch_first=batch_first), device, seed=3)
    x, _, _, _ = _mha_inputs(dict(batch_first=batch_first), {}, device, L=97, self_attention=True)
    a, _ = theirs(x, x, x, need_weights=False)
    b, _ = ours(x, x, x, need_weights=False)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    u = x[0] if batch_first else x[:, 0]
    torch.testing.assert_close(ours(u, u, u, need_weights=False)[0], theirs(u, u, u, need_weights=False)[0],
                               rtol=1e-5, atol=1e-5)
    for avg in (False, True):
        torch.testing.assert_close(ours(x, x, x, average_attn_weights=avg)[1],
                                   theirs(x, x, x, average_attn_weights=avg)[1], rtol=1e-5, atol=1e-5)


def test_mha_dropout_in_training_only(device):
    _, ours = _pair(dict(dropout=0.5), device)
    x = torch.randn(10, 2, 32, device=device)
    ours.train()
    torch.manual_seed(0)
    a = ours(x, x, x, need_weights=False)[0]
    torch.manual_seed(0)
    assert torch.equal(a, ours(x, x, x, need_weights=False)[0])
    ours.eval()
    theirs = nn.MultiheadAttention(32, 4, dropout=0.5).to(device).eval()
    theirs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x, x, x, need_weights=False)[0], theirs(x, x, x, need_weights=False)[0],
                               rtol=1e-5, atol=1e-5)


def test_mha_nested_tensor_input_like_torch(device):
    torch.manual_seed(6)
    theirs = nn.MultiheadAttention(16, 4, batch_first=True).to(device).eval()
    ours = torchfast.nn.MultiheadAttention(16, 4, batch_first=True).to(device).eval()
    ours.load_state_dict(theirs.state_dict())
    nt = torch.nested.nested_tensor([torch.randn(4, 16), torch.randn(6, 16)], device=device)
    with torch.no_grad():
        a, b = ours(nt, nt, nt, need_weights=False)[0], theirs(nt, nt, nt, need_weights=False)[0]
    assert a.is_nested
    for x, y in zip(a.unbind(), b.unbind()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_mha_state_dict_both_ways(device):
    theirs, ours = _pair(dict(kdim=24, vdim=40, add_bias_kv=True), device)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    back = nn.MultiheadAttention(32, 4, kdim=24, vdim=40, add_bias_kv=True).to(device)
    back.load_state_dict(copy.deepcopy(ours.state_dict()))


def test_mha_bad_input_errors(device):
    with pytest.raises(ValueError, match=r"embed_dim \(30\).*num_heads \(4\)"):
        torchfast.nn.MultiheadAttention(30, 4)
    mha = torchfast.nn.MultiheadAttention(32, 4).to(device)
    x = torch.randn(5, 2, 32, device=device)
    with pytest.raises(ValueError, match="batch sizes differ"):
        mha(x, x[:, :1], x[:, :1], need_weights=False)
    with pytest.raises(ValueError, match=r"attn_mask must have shape \(L, S\) = \(5, 5\).*got \(4, 5\)"):
        mha(x, x, x, attn_mask=torch.zeros(4, 5, device=device), need_weights=False)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(batch, S\) = \(2, 5\)"):
        mha(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool, device=device), need_weights=False)
    with pytest.raises(ValueError, match="feature size 16, expected 32"):
        mha(x[..., :16], x, x, need_weights=False)
    with pytest.raises(RuntimeError, match="is_causal"):
        mha(x, x, x, is_causal=True, need_weights=False)


def test_complex_network_attention_is_torchfast(device):
    net = torchfast.models.ComplexNetwork()
    assert isinstance(net.attention, torchfast.nn.MultiheadAttention)


@pytest.mark.parametrize("shapes", [((4, 3, 8), (4, 4, 6, 8)), ((2, 1, 3, 5, 8), (3, 6, 8)), ((5, 8), (2, 3, 7, 8))])
def test_query_rank_may_differ_from_key_and_value(shapes, device):
    """As torch: the batch dims broadcast whatever the ranks (torch's own OpInfo samples include
    query (4, 3, 8) with key/value (4, 4, 6, 8))."""
    q_shape, kv_shape = shapes
    g = torch.Generator().manual_seed(0)
    q = torch.randn(q_shape, generator=g).to(device).requires_grad_()
    k = torch.randn(kv_shape, generator=g).to(device).requires_grad_()
    v = torch.randn(kv_shape, generator=g).to(device).requires_grad_()
    ours = tf_sdpa(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    g_out = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), g_out), torch.autograd.grad(ref, (q, k, v), g_out)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
