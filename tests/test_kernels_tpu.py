"""kernels_tpu against references, in Pallas interpret mode on CPU (forward and gradients).

Tolerances (fp32): Gated DeltaNet output and state within 2e-5 of a float64 recurrent oracle, gradients within
1e-4 of the largest gradient entry of a recurrent JAX oracle; cross-entropy 1e-5 relative; wrapped kernels 1e-5.
The GDN kernels compile slowly in interpret mode (about 20 s a pallas_call on 2 cores), so the grid is few cases
that each cover several switches: GQA-style value heads, value blocks, lengths off the chunk size, initial and
final state, packed documents (one empty), segment restarts, the in-kernel l2 norm.
"""
import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import kernels_tpu as kt  # noqa: E402


def gdn_oracle(q, k, v, g, beta, scale=None, h0=None, cu=None, seg=None, l2=False):
    """Recurrent gated delta rule in float64 numpy, fla layout; per token: S = S*exp(g); u = S^T k;
    S += k (beta (v - u))^T; o = S^T q * scale. Returns (o [B,T,HV,V], final [N,HV,K,V])."""
    q, k, v, g, beta = [np.asarray(a, np.float64) for a in (q, k, v, g, beta)]
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    if l2:
        q = q / np.sqrt((q * q).sum(-1, keepdims=True) + 1e-6)
        k = k / np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
    scale = K ** -0.5 if scale is None else scale
    spans = [(b, 0, T) for b in range(B)] if cu is None else [(0, cu[i], cu[i + 1]) for i in range(len(cu) - 1)]
    o = np.zeros((B, T, HV, V))
    fin = np.zeros((len(spans), HV, K, V))
    for n, (b, s, e) in enumerate(spans):
        for hv in range(HV):
            S = np.zeros((K, V)) if h0 is None else np.asarray(h0, np.float64)[n, hv].copy()
            for t in range(s, e):
                if seg is not None and t > s and seg[b, t] != seg[b, t - 1]:
                    S = np.zeros((K, V))
                kt_, qt = k[b, t, hv * H // HV], q[b, t, hv * H // HV]
                S = S * np.exp(g[b, t, hv])
                S = S + np.outer(kt_, beta[b, t, hv] * (v[b, t, hv] - S.T @ kt_))
                o[b, t, hv] = S.T @ qt * scale
            fin[n, hv] = S
    return o, fin


def gdn_jax_oracle(q, k, v, g, beta, h0, cu, seg, l2):
    """The same recurrence in JAX (a scan per document), for gradients. B == 1, documents by cu."""
    if l2:
        q, k = kt._l2norm(q), kt._l2norm(k)
    H, HV, K = q.shape[2], v.shape[2], q.shape[3]
    r = HV // H
    outs, fins = [], []
    for n in range(len(cu) - 1):
        s, e = cu[n], cu[n + 1]
        if s == e:  # an empty document keeps its initial state
            fins.append(h0[n])
            continue
        reset = np.zeros(e - s, bool)
        reset[1:] = seg[0, s + 1:e] != seg[0, s:e - 1]

        def step(S, x):
            qt, kt_, vt, gt, bt, rs = x
            S = jnp.where(rs, 0.0, S) * jnp.exp(gt)[:, None, None]
            kr, qr = jnp.repeat(kt_, r, 0), jnp.repeat(qt, r, 0)  # [HV, K]
            u = jnp.einsum("hkv,hk->hv", S, kr)
            S = S + kr[:, :, None] * (bt[:, None] * (vt - u))[:, None, :]
            return S, jnp.einsum("hkv,hk->hv", S, qr) * K ** -0.5

        S, o = jax.lax.scan(step, h0[n], (q[0, s:e], k[0, s:e], v[0, s:e], g[0, s:e], beta[0, s:e],
                                          jnp.asarray(reset)))
        outs.append(o)
        fins.append(S)
    return jnp.concatenate(outs)[None], jnp.stack(fins)


def _inputs(rng, B, T, H, HV, K, V, N):
    q = rng.standard_normal((B, T, H, K)).astype(np.float32)
    k = rng.standard_normal((B, T, H, K)).astype(np.float32)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((B, T, HV, V)).astype(np.float32)
    g = (-rng.random((B, T, HV)) * 0.5).astype(np.float32)
    beta = rng.random((B, T, HV)).astype(np.float32)
    h0 = rng.standard_normal((N, HV, K, V)).astype(np.float32)
    return q, k, v, g, beta, h0


def test_gdn_batch_forward():
    """B=2 rows, T=21 (not a multiple of the chunk), 1 q/k head for 2 value heads, initial state, a document
    restart in row 1, the in-kernel l2 norm; the float64 oracle and, once it exists, qwen3_next's reference."""
    rng = np.random.default_rng(0)
    q, k, v, g, beta, h0 = _inputs(rng, 2, 21, 1, 2, 16, 16, 2)
    seg = np.ones((2, 21), np.int32)
    seg[1, 9:] = 2
    args = [jnp.asarray(x) for x in (q, k, v, g, beta)]
    kw = dict(initial_state=jnp.asarray(h0), output_final_state=True, use_qk_l2norm_in_kernel=True, chunk_size=16,
              segment_ids=jnp.asarray(seg))
    o, s = kt.gated_delta_rule(*args, **kw, interpret=True)  # the kernels-dict entry (model signature)
    o_ref, s_ref = gdn_oracle(q, k, v, g, beta, h0=h0, seg=seg, l2=True)
    np.testing.assert_allclose(np.asarray(o), o_ref, atol=2e-5)
    np.testing.assert_allclose(np.asarray(s), s_ref, atol=2e-5)
    try:
        import qwen3_next
    except ImportError:
        return
    o_m, s_m = qwen3_next.chunk_gated_delta_rule_ref(*args, **kw)
    np.testing.assert_allclose(np.asarray(o), np.asarray(o_m), atol=1e-4)
    np.testing.assert_allclose(np.asarray(s), np.asarray(s_m), atol=1e-4)


def test_gdn_varlen_segments_grad():
    """Packed documents [0, 0, 13, 45) (one empty), a segment restart inside the last, initial state per document,
    value blocks of 16 (2 per head), GQA 1 -> 2 heads, the in-kernel l2 norm: output, state and all gradients."""
    rng = np.random.default_rng(1)
    cu = [0, 0, 13, 45]
    q, k, v, g, beta, h0 = _inputs(rng, 1, 45, 1, 2, 16, 32, 3)
    seg = np.zeros((1, 45), np.int32)
    seg[0, 13:30], seg[0, 30:] = 1, 2
    wo = rng.standard_normal((1, 45, 2, 32)).astype(np.float32)
    wf = rng.standard_normal((3, 2, 16, 32)).astype(np.float32)

    kern = lambda *a: kt.chunk_gated_delta_rule(*a[:5], initial_state=a[5], output_final_state=True,  # noqa: E731
                                                use_qk_l2norm_in_kernel=True, cu_seqlens=jnp.asarray(cu),
                                                chunk_size=16, block_v=16, segment_ids=jnp.asarray(seg),
                                                interpret=True)
    ref = lambda *a: gdn_jax_oracle(*a, cu, seg, True)  # noqa: E731
    args = (q, k, v, g, beta, h0)
    (o, ht), vjp = jax.vjp(kern, *args)  # one forward compile serves both checks
    o_ref, ht_ref = gdn_oracle(q, k, v, g, beta, h0=h0, cu=cu, seg=seg, l2=True)
    np.testing.assert_allclose(np.asarray(o), o_ref, atol=2e-5)
    np.testing.assert_allclose(np.asarray(ht), ht_ref, atol=2e-5)
    grads = vjp((jnp.asarray(wo), jnp.asarray(wf)))
    grads_ref = jax.vjp(ref, *args)[1]((jnp.asarray(wo), jnp.asarray(wf)))
    for name, a, b in zip("q k v g beta h0".split(), grads, grads_ref):
        b = np.asarray(b)
        np.testing.assert_allclose(np.asarray(a), b, atol=1e-4 * np.abs(b).max(), err_msg=name)


def test_gdn_guard_raises():
    x = jnp.zeros((1, 8, 1, 300))
    with pytest.raises(ValueError):
        kt.chunk_gated_delta_rule(x, x, x, x[..., 0], x[..., 0], interpret=True)


def test_cross_entropy():
    N, chunk = 37, 16
    rng = np.random.default_rng(2)
    E, V = 24, 1000
    h = jnp.asarray(rng.standard_normal((N, E)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((E, V)) * 0.3, jnp.float32)
    labels = jnp.asarray(rng.integers(0, V, N)).at[3].set(-100).at[10].set(-100)
    loss, count = kt.fused_linear_cross_entropy(h, w, labels, chunk=chunk)
    loss_ref, count_ref = kt.cross_entropy_ref(h, w, labels)
    assert int(count) == int(count_ref) == N - 2
    np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-5)
    f = lambda fn: (lambda h, w: 2.0 * fn(h, w, labels, chunk=chunk)[0])  # noqa: E731
    gh, gw = jax.grad(f(kt.fused_linear_cross_entropy), argnums=(0, 1))(h, w)
    gh_ref, gw_ref = jax.grad(f(kt.cross_entropy_ref), argnums=(0, 1))(h, w)
    np.testing.assert_allclose(np.asarray(gh), np.asarray(gh_ref), atol=1e-5)
    np.testing.assert_allclose(np.asarray(gw), np.asarray(gw_ref), atol=1e-5)
    loss_jit, _ = jax.jit(lambda h, w: kt.fused_linear_cross_entropy(h, w, labels))(h, w)  # default chunk
    np.testing.assert_allclose(float(loss_jit), float(loss_ref), rtol=1e-5)


def _attn_inputs(rng, B=1, T=128, Hq=4, Hkv=2, D=32):
    q = jnp.asarray(rng.standard_normal((B, T, Hq, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, T, Hkv, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, T, Hkv, D)), jnp.float32)
    seg = jnp.asarray(np.repeat([1, 2, 3], [50, 40, 38])[None], jnp.int32)
    mask = (seg[:, :, None] == seg[:, None, :]) & jnp.tril(jnp.ones((T, T), bool))[None]
    return q, k, v, seg, mask


def test_attention_flash_interpret():
    """flash attention (packed documents, GQA) == the reference == qwen3.attention, forward and gradient."""
    import qwen3
    q, k, v, seg, mask = _attn_inputs(np.random.default_rng(3))
    ref = kt.attention_ref(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(ref), np.asarray(qwen3.attention(q, k, v, mask)), atol=1e-6)
    o_seg, vjp = jax.vjp(lambda q, k, v: kt.attention_segments(q, k, v, seg, interpret=True), q, k, v)
    o_mask = kt.attention(q, k, v, mask, interpret=True)
    np.testing.assert_allclose(np.asarray(o_seg), np.asarray(ref), atol=1e-5)
    np.testing.assert_allclose(np.asarray(o_mask), np.asarray(ref), atol=1e-5)
    ct = 2 * o_seg
    gs = vjp(ct)
    gr = jax.vjp(lambda q, k, v: kt.attention_ref(q, k, v, mask), q, k, v)[1](ct)
    for a, b in zip(gs, gr):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)
    # the guard: T = 5 is not a multiple of the block, so the reference runs
    small = [x[:, :5] for x in (q, k, v)]
    np.testing.assert_allclose(np.asarray(kt.attention(*small, mask[:, :5, :5], interpret=True)),
                               np.asarray(kt.attention_ref(*small, mask[:, :5, :5])), atol=0)


def test_moe_gmm_interpret():
    rng = np.random.default_rng(4)
    lhs = jnp.asarray(rng.standard_normal((256, 128)), jnp.float32)
    rhs = jnp.asarray(rng.standard_normal((3, 128, 128)) * 0.1, jnp.float32)
    sizes = jnp.asarray([100, 0, 156], jnp.int32)
    out = kt.moe_gmm(lhs, rhs, sizes, interpret=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(kt.moe_gmm_ref(lhs, rhs, sizes)), atol=1e-4)
    g = jax.grad(lambda a, b: jnp.sum(kt.moe_gmm(a, b, sizes, interpret=True) ** 2), argnums=(0, 1))(lhs, rhs)
    g_ref = jax.grad(lambda a, b: jnp.sum(kt.moe_gmm_ref(a, b, sizes) ** 2), argnums=(0, 1))(lhs, rhs)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-3, rtol=1e-4)
    odd = lhs[:100, :64], rhs[:, :64, :32], jnp.asarray([30, 30, 40], jnp.int32)  # guard: falls back
    np.testing.assert_allclose(np.asarray(kt.moe_gmm(*odd)), np.asarray(kt.moe_gmm_ref(*odd)), atol=0)


def test_select(monkeypatch):
    monkeypatch.delenv("NANOQWEN_INTERPRET", raising=False)
    assert kt.select("ref") == {}
    assert kt.select("auto", platform="cpu") == {}
    assert set(kt.select("cross_entropy", platform="cpu")) == {"cross_entropy"}
    assert set(kt.select("auto", platform="tpu")) == {"attention", "gated_delta_rule", "cross_entropy", "grouped_mm"}
    assert set(kt.select("auto", platform="tpu", dtype="float16")) == {"cross_entropy"}
    with pytest.raises(ValueError, match="XLA fuses"):
        kt.select("rms_norm", platform="tpu")
    with pytest.raises(ValueError, match="need a TPU"):
        kt.select("attention", platform="cpu")
    with pytest.raises(ValueError, match="unknown kernel"):
        kt.select("flash", platform="tpu")
    monkeypatch.setenv("NANOQWEN_INTERPRET", "1")
    ks = kt.select("auto", platform="cpu")
    assert set(ks) == {"attention", "gated_delta_rule", "cross_entropy", "grouped_mm"}
    assert ks["gated_delta_rule"].keywords == {"interpret": True}
