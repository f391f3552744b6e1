"""kernels_gpu against references: Triton kernels in the interpreter on CPU (or on CUDA when present), forward and
gradients; the torch wrappers (SDPA, flex attention, _grouped_mm) directly.

TRITON_INTERPRET=1 must be set before triton is imported, and other test files may import torch (and through it
triton) first, so without CUDA `test_triton_suite_in_interpreter` re-runs this file in a subprocess with the
variable set; the Triton tests themselves skip in a process where triton cannot run.
Tolerances (fp32): Gated DeltaNet output and state within 2e-5 of a float64 recurrent oracle, gradients within
1e-4 of the largest entry of the float64 oracle's gradient; cross-entropy and RMSNorm 1e-5.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import kernels_gpu as kg  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
TRITON_RUNS = kg.triton is not None and (CUDA or kg.interpreting())
needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason="triton cannot run in this process (see module doc)")


@pytest.mark.skipif(kg.triton is None, reason="triton is not installed")
@pytest.mark.skipif(TRITON_RUNS, reason="the Triton tests run in this process")
def test_triton_suite_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                        "-k", "not test_triton_suite_in_interpreter"], env=env, capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1], r.stdout[-2000:]


def gdn_oracle(q, k, v, g, beta, h0, cu=None, seg=None, scale=None):
    """Recurrent gated delta rule in float64 torch (differentiable), fla layout; per token: S = S*exp(g);
    u = S^T k; S += k (beta (v - u))^T; o = S^T q * scale. Returns (o [B,T,HV,V], final [N,HV,K,V])."""
    B, T, H, K = q.shape
    HV = v.shape[2]
    scale = K ** -0.5 if scale is None else scale
    spans = [(b, 0, T) for b in range(B)] if cu is None else [(0, cu[i], cu[i + 1]) for i in range(len(cu) - 1)]
    o = [[None] * T for _ in range(B)]
    fin = []
    for n, (b, s, e) in enumerate(spans):
        S = h0[n]  # [HV, K, V]
        for t in range(s, e):
            if seg is not None and t > s and seg[b, t] != seg[b, t - 1]:
                S = torch.zeros_like(S)
            kr = k[b, t].repeat_interleave(HV // H, 0)  # value head j uses q/k head j // (HV/H)
            qr = q[b, t].repeat_interleave(HV // H, 0)
            S = S * torch.exp(g[b, t])[:, None, None]
            u = torch.einsum("hkv,hk->hv", S, kr)
            S = S + kr[:, :, None] * (beta[b, t][:, None] * (v[b, t] - u))[:, None, :]
            o[b][t] = torch.einsum("hkv,hk->hv", S, qr) * scale
        fin.append(S)
    return torch.stack([torch.stack(row) for row in o]), torch.stack(fin)


def _l2(x):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


CASES = {
    # B, T, H, HV, K, V, chunk, block_v, cu_seqlens, segments, l2norm
    "batch_gqa_vblocks": (2, 37, 1, 2, 16, 32, 16, 16, None, False, False),
    "varlen_empty_doc_segments_l2": (1, 45, 2, 4, 32, 16, 16, 16, [0, 0, 13, 45], True, True),
    "chunk32_k_not_pow2": (1, 40, 1, 1, 24, 16, 32, None, None, False, False),
}


@needs_triton
@pytest.mark.parametrize("case", list(CASES))
def test_gated_delta_rule(case):
    B, T, H, HV, K, V, C, BV, cu, use_seg, l2 = CASES[case]
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    N = B if cu is None else len(cu) - 1
    q, k, v = rnd(B, T, H, K), rnd(B, T, H, K), rnd(B, T, HV, V)
    if not l2:
        k = _l2(k)
    g = -torch.rand(B, T, HV, generator=gen, dtype=torch.float64) * 0.5
    beta = torch.rand(B, T, HV, generator=gen, dtype=torch.float64)
    h0 = rnd(N, HV, K, V)
    seg = None
    if use_seg:
        seg = torch.zeros(B, T, dtype=torch.int32)
        seg[0, 13:30], seg[0, 30:] = 1, 2
    ref_in = [x.clone().requires_grad_() for x in (q, k, v, g, beta, h0)]
    qr, kr = (_l2(ref_in[0]), _l2(ref_in[1])) if l2 else ref_in[:2]
    o_ref, ht_ref = gdn_oracle(qr, kr, *ref_in[2:], cu=cu, seg=seg)
    wo, wf = rnd(*o_ref.shape), rnd(*ht_ref.shape)
    ((o_ref * wo).sum() + (ht_ref * wf).sum()).backward()

    ins = [x.float().to(DEV).requires_grad_() for x in (q, k, v, g, beta, h0)]
    o, ht = kg.chunk_gated_delta_rule(*ins[:5], initial_state=ins[5], output_final_state=True,
                                      use_qk_l2norm_in_kernel=l2,
                                      cu_seqlens=None if cu is None else torch.tensor(cu, device=DEV),
                                      chunk_size=C, block_v=BV, segment_ids=None if seg is None else seg.to(DEV))
    torch.testing.assert_close(o.double().cpu(), o_ref.detach(), atol=2e-5, rtol=0)
    torch.testing.assert_close(ht.double().cpu(), ht_ref.detach(), atol=2e-5, rtol=0)
    ((o * wo.float().to(DEV)).sum() + (ht * wf.float().to(DEV)).sum()).backward()
    for name, a, b in zip("q k v g beta h0".split(), ins, ref_in):
        tol = 1e-4 * b.grad.abs().max().item()
        torch.testing.assert_close(a.grad.double().cpu(), b.grad, atol=tol, rtol=0, msg=name)


@needs_triton
def test_gated_delta_rule_model_signature():
    """The kernels-dict entry: one row per sequence, no final state requested, output in q's dtype."""
    q, k, v = torch.randn(2, 20, 1, 16), torch.randn(2, 20, 1, 16), torch.randn(2, 20, 2, 16)
    g, beta = -torch.rand(2, 20, 2), torch.rand(2, 20, 2)
    o, s = kg.gated_delta_rule(*(x.to(DEV) for x in (q, k, v, g, beta)), use_qk_l2norm_in_kernel=True,
                               chunk_size=16)
    assert s is None and o.shape == (2, 20, 2, 16) and o.dtype == torch.float32
    o_ref, _ = gdn_oracle(_l2(q.double()), _l2(k.double()), v.double(), g.double(), beta.double(),
                          torch.zeros(2, 2, 16, 16, dtype=torch.float64))
    torch.testing.assert_close(o.double().cpu(), o_ref, atol=2e-5, rtol=0)


@needs_triton
@pytest.mark.parametrize("N,chunk", [(37, 16), (64, None)])
def test_fused_linear_cross_entropy(N, chunk):
    gen = torch.Generator().manual_seed(1)
    E, V = 24, 1000
    h = torch.randn(N, E, generator=gen).to(DEV).requires_grad_()
    w = (torch.randn(E, V, generator=gen) * 0.3).to(DEV).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=gen).to(DEV)
    labels[3] = labels[10] = -100
    loss, count = kg.fused_linear_cross_entropy(h, w, labels, chunk=chunk)
    (2 * loss).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    loss_ref, count_ref = kg.cross_entropy_ref(h, w, labels)
    (2 * loss_ref).backward()
    assert int(count) == int(count_ref) == N - 2
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, h.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(gw, w.grad, rtol=0, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("zero_centered", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm(zero_centered, residual):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 48, generator=gen).to(DEV).requires_grad_()
    r = torch.randn(3, 5, 48, generator=gen).to(DEV).requires_grad_() if residual else None
    w = torch.randn(48, generator=gen).to(DEV).requires_grad_()
    outs = kg.rms_norm(x, w, 1e-6, residual=r, zero_centered=zero_centered)
    refs = kg.rms_norm_ref(x, w, 1e-6, residual=r, zero_centered=zero_centered)
    outs, refs = (outs, refs) if residual else ((outs,), (refs,))
    cot = [torch.randn_like(o) for o in outs]
    wrt = [x, w] + ([r] if residual else [])
    g = torch.autograd.grad(sum((o * c).sum() for o, c in zip(outs, cot)), wrt)
    g_ref = torch.autograd.grad(sum((o * c).sum() for o, c in zip(refs, cot)), wrt)
    for a, b in zip(list(outs) + list(g), list(refs) + list(g_ref)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    if not zero_centered and not residual:  # the model's own reference
        import qwen3
        torch.testing.assert_close(outs[0], qwen3.rms_norm(x, w, 1e-6), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- torch wrappers
def _attn_inputs(B=2, T=24, Hq=4, Hkv=2, D=16):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, T, h, D, generator=gen) for h in (Hq, Hkv, Hkv))
    seg = torch.tensor([[1] * 10 + [2] * 14, [5] * 24])
    mask = (seg[:, :, None] == seg[:, None, :]) & torch.ones(T, T, dtype=torch.bool).tril()
    return q, k, v, seg, mask


def test_attention_sdpa():
    import qwen3
    q, k, v, seg, mask = _attn_inputs()
    ref = kg.attention_ref(q, k, v, mask)
    torch.testing.assert_close(ref, qwen3.attention(q, k, v, mask), rtol=0, atol=1e-6)
    qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
    o = kg.attention(qs, ks, vs, mask)
    torch.testing.assert_close(o, ref, rtol=0, atol=1e-5)
    g = torch.autograd.grad((o ** 2).sum(), (qs, ks, vs))
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    g_ref = torch.autograd.grad((kg.attention_ref(qr, kr, vr, mask) ** 2).sum(), (qr, kr, vr))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    # decode-shaped call with a cache longer than the query (S > T) goes through SDPA too
    torch.testing.assert_close(kg.attention(q[:, -1:], k, v, mask[:, -1:]), ref[:, -1:], rtol=0, atol=1e-5)


def test_attention_segments_flex():
    q, k, v, seg, mask = _attn_inputs(T=24)
    with torch.no_grad():  # flex attention has no CPU backward in torch 2.13
        o = kg.attention_segments(q, k, v, seg)
    torch.testing.assert_close(o, kg.attention_ref(q, k, v, mask), rtol=0, atol=1e-5)


def test_moe_gmm():
    gen = torch.Generator().manual_seed(4)
    lhs = torch.randn(40, 32, generator=gen, requires_grad=True)
    rhs = (torch.randn(3, 32, 16, generator=gen) * 0.1).requires_grad_()
    sizes = torch.tensor([12, 0, 25])  # 3 rows past the groups come back as zeros
    out = kg.moe_gmm(lhs, rhs, sizes)
    ref = kg.moe_gmm_ref(lhs, rhs, sizes)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    g = torch.autograd.grad((out ** 2).sum(), (lhs, rhs))
    g_ref = torch.autograd.grad((ref ** 2).sum(), (lhs, rhs))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    f16 = kg.moe_gmm(lhs.detach().half(), rhs.detach().half(), sizes)  # guard: fp16 on CPU -> reference loop
    torch.testing.assert_close(f16, kg.moe_gmm_ref(lhs.detach().half(), rhs.detach().half(), sizes))


def test_select(monkeypatch):
    assert kg.select("ref") == {}
    if not kg.interpreting():
        assert kg.select("auto", platform="cpu") == {}
        with pytest.raises(ValueError, match="does not apply"):
            kg.select("gated_delta_rule", platform="cpu")
    with pytest.raises(ValueError, match="unknown kernel"):
        kg.select("flash", platform="cuda")
    if kg.triton is not None:
        ks = kg.select("auto", platform="cuda", dtype="bfloat16")
        assert set(ks) == set(kg.KEYS)
        assert ks["gated_delta_rule"] is kg.gated_delta_rule
        assert set(kg.select("cross_entropy, rms_norm", platform="cuda")) == {"cross_entropy", "rms_norm"}
        assert "gated_delta_rule" not in kg.select("auto", platform="cuda", dtype=torch.float64)
