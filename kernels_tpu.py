"""TPU hot paths for nanoqwen: our own Pallas kernels, and guarded wrappers around kernels jax ships.

Our own:
  chunk_gated_delta_rule     chunked Gated DeltaNet in Pallas (forward and backward kernels, custom_vjp),
                             flash-linear-attention's layout and arguments, plus `interpret`
  fused_linear_cross_entropy chunked linear + cross-entropy in plain JAX with a custom_vjp that computes the
                             gradients in the forward pass (Liger's scheme). Not Pallas: XLA already fuses the
                             logsumexp epilogue into the chunk's matmul; the win is memory (no [N, V] logits),
                             and chunking gets all of it.
  (no RMSNorm kernel: XLA fuses the fp32 upcast, mean of squares, rsqrt and scale into one loop fusion per norm,
   and into the neighbouring residual add; a Pallas kernel would only block fusion with the next matmul.)
Wrapped (jax ships them; each behind a guard that falls back to the reference):
  attention / attention_segments   jax.experimental.pallas.ops.tpu.flash_attention (custom_vjp inside)
  moe_gmm                          megablox gmm (custom_vjp: gmm + tgmm), else jax.lax.ragged_dot

`select(mode)` builds the `kernels` dict for `forward_hidden`; every entry has the model reference's signature:
  "attention":        f(q [B,T,Hq,D], k [B,S,Hkv,D], v [B,S,Hkv,D], mask [B,T,S] bool) -> [B,T,Hq,D]
  "gated_delta_rule": f(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                        use_qk_l2norm_in_kernel=False, chunk_size=64, segment_ids=None) -> (o, state [B,HV,K,V])
  "cross_entropy":    f(h [N,E], w [E,V], labels [N], ignore_index=-100, chunk=None) -> (loss_sum fp32, count)
  "grouped_mm":       f(lhs [M,K], rhs [G,K,N], group_sizes [G] int) -> [M,N] (rows of lhs sorted by group)

Off TPU, Pallas runs only in interpret mode: `interpret=True` here, or NANOQWEN_INTERPRET=1 for select("auto") on
CPU. Interpret mode checks the math; it does not enforce Mosaic's tiling rules, so the TPU lowering of the Gated
DeltaNet kernels is unverified until a TPU runs them (blocks are laid out for it: K, V lanes; 64-row chunks).
"""
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

# the keys the model files look up (qwen3_moe calls kernels.get("grouped_mm", ...))
KEYS = ("attention", "gated_delta_rule", "cross_entropy", "rms_norm", "grouped_mm")
_HI = jax.lax.Precision.HIGHEST
_F32 = jnp.float32


def _mm(a, b):  # a @ b
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=_HI, preferred_element_type=_F32)


def _mt(a, b):  # a @ b.T
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_HI, preferred_element_type=_F32)


def _tm(a, b):  # a.T @ b
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=_HI, preferred_element_type=_F32)


# ============================================================================================ Gated DeltaNet
# The math is the same as kernels_gpu (see there). Layout: every document starts on a chunk boundary of a "slot"
# array (gathered in the wrapper), so each chunk belongs to one document; the grid is (value head, value block,
# chunk) with the chunk axis sequential and the state S [K, BV] in VMEM scratch. Per-chunk scalars (first/last
# chunk of its document, the segment id entering the chunk, the document) are scalar-prefetched; the document
# index picks the initial/final state block. Vectors over positions are columns [C, 1]; rows [1, C] where needed.
def _iota(C):
    return jax.lax.broadcasted_iota(jnp.int32, (C, C), 0), jax.lax.broadcasted_iota(jnp.int32, (C, C), 1)


def _r2c(row, ri, ci):  # [1, C] -> [C, 1]
    return jnp.sum(jnp.where(ri == ci, row, 0.0), axis=1, keepdims=True)


def _prep(k, b, g_col, g_row, seg_col, seg_row, sp, C, has_seg):
    ri, ci = _iota(C)
    G_col = jnp.sum(jnp.where(ri >= ci, g_row, 0.0), axis=1, keepdims=True)  # cumsum(g) as [C, 1]
    G_row = jnp.sum(jnp.where(ri <= ci, g_col, 0.0), axis=0, keepdims=True)  # and as [1, C]
    Gl = jnp.sum(g_row, axis=1, keepdims=True)  # [1, 1]
    lower = ri >= ci
    if has_seg:
        lower = lower & (seg_col == seg_row)
        segL = seg_row[:, C - 1:]
        cm = (seg_col == sp).astype(_F32)
        mm = (seg_col == segL).astype(_F32)
        cL = (segL == sp).astype(_F32)
    else:
        cm = mm = jnp.ones((C, 1), _F32)
        cL = jnp.ones((1, 1), _F32)
    Gam = jnp.where(lower, jnp.exp(jnp.where(lower, G_col - G_row, 0.0)), 0.0)
    kb = k * b
    A = jnp.where(ri > ci, _mt(kb, k) * Gam, 0.0)
    M = (ri == ci).astype(_F32)  # (I + A)^-1 by block doubling, as kernels_gpu
    for lv in range(int(math.log2(C))):
        s = 1 << lv
        E = jnp.where((ri // (2 * s) == ci // (2 * s)) & (ri // s != ci // s), A, 0.0)
        M = M - _mm(_mm(M, E), M)
    return G_col, Gl, Gam, cm, mm, cL, kb, A, M


def _fwd_kernel(first_ref, last_ref, sp_ref, doc_ref, q_ref, k_ref, v_ref, gc_ref, gr_ref, b_ref, sc_ref, sr_ref,
                h0_ref, *refs, scale, C, has_seg, states_only):
    if states_only:
        hs_ref, S_ref = refs
    else:
        o_ref, ht_ref, S_ref = refs
    c = pl.program_id(2)

    @pl.when(first_ref[c] == 1)
    def _():
        S_ref[...] = h0_ref[...].astype(_F32)

    S = S_ref[...]
    if states_only:
        hs_ref[...] = S
    k = k_ref[...].astype(_F32)
    v = v_ref[...].astype(_F32)
    b = b_ref[...].astype(_F32)
    G, Gl, Gam, cm, mm, cL, kb, A, M = _prep(k, b, gc_ref[...].astype(_F32), gr_ref[...].astype(_F32),
                                             sc_ref[...], sr_ref[...], sp_ref[c], C, has_seg)
    ec = jnp.exp(G) * cm
    Vn = _mm(M, v * b) - _mm(_mm(M, kb * ec), S)
    if not states_only:
        qs = q_ref[...].astype(_F32) * scale
        o = _mm(qs * ec, S) + _mm(_mt(qs, k) * Gam, Vn)
        o_ref[...] = o.astype(o_ref.dtype)
    S = S * (cL * jnp.exp(Gl)) + _tm(k * (jnp.exp(Gl - G) * mm), Vn)
    S_ref[...] = S
    if not states_only:
        ht_ref[...] = S  # written every chunk; the last write of a document's block is its final state


def _bwd_kernel(first_ref, last_ref, sp_ref, doc_ref, q_ref, k_ref, v_ref, gc_ref, gr_ref, b_ref, sc_ref, sr_ref,
                hs_ref, do_ref, dht_ref, dq_ref, dk_ref, dv_ref, dg_ref, db_ref, dh0_ref, dS_ref, *, scale, C,
                has_seg, nc):
    c = nc - 1 - pl.program_id(2)  # chunks in reverse

    @pl.when((pl.program_id(2) == 0) | (last_ref[c] == 1))
    def _():
        dS_ref[...] = dht_ref[...].astype(_F32)

    dS = dS_ref[...]
    S = hs_ref[...]
    q = q_ref[...].astype(_F32)
    k = k_ref[...].astype(_F32)
    v = v_ref[...].astype(_F32)
    b = b_ref[...].astype(_F32)
    do = do_ref[...].astype(_F32)
    G, Gl, Gam, cm, mm, cL, kb, A, M = _prep(k, b, gc_ref[...].astype(_F32), gr_ref[...].astype(_F32),
                                             sc_ref[...], sr_ref[...], sp_ref[c], C, has_seg)
    ri, ci = _iota(C)
    ec = jnp.exp(G) * cm
    qs = q * scale
    qg = qs * ec
    kbg = kb * ec
    vb = v * b
    U = _mm(M, vb)
    W = _mm(M, kbg)
    Vn = U - _mm(W, S)
    P = _mt(qs, k) * Gam
    ed = jnp.exp(Gl - G) * mm
    kd = k * ed
    eL = cL * jnp.exp(Gl)
    dVn = _tm(P, do) + _mm(kd, dS)
    dqg = _mt(do, S)
    dS_in = _tm(qg, do) + eL * dS - _tm(W, dVn)
    dPr = _mt(do, Vn)
    dPG = dPr * Gam
    X = dPr * P
    dqs = _mm(dPG, k) + dqg * ec
    dk = _tm(dPG, qs)
    dG = jnp.sum(X, 1, keepdims=True) - _r2c(jnp.sum(X, 0, keepdims=True), ri, ci) + jnp.sum(dqg * qg, 1,
                                                                                              keepdims=True)
    dkd = _mt(Vn, dS)
    dk = dk + dkd * ed
    r = jnp.sum(dkd * kd, 1, keepdims=True)
    dG = dG - r
    dGl = jnp.sum(r, 0, keepdims=True) + eL * jnp.sum(jnp.sum(S * dS, 1, keepdims=True), 0, keepdims=True)
    dvb = _tm(M, dVn)
    dkbg = -_tm(M, _mt(dVn, S))
    dA = jnp.where(ri > ci, -(_mt(dvb, U) + _mt(dkbg, W)), 0.0)
    dAG = dA * Gam
    dkb = _mm(dAG, k)
    dk = dk + _tm(dAG, kb)
    Y = dA * A
    dG = dG + jnp.sum(Y, 1, keepdims=True) - _r2c(jnp.sum(Y, 0, keepdims=True), ri, ci) + jnp.sum(dkbg * kbg, 1,
                                                                                                 keepdims=True)
    db = jnp.sum(dvb * v, 1, keepdims=True) + jnp.sum(dkbg * k * ec, 1, keepdims=True) + jnp.sum(dkb * k, 1,
                                                                                                 keepdims=True)
    dk = dk + dkbg * (b * ec) + dkb * b
    dG = dG + jnp.where(jax.lax.broadcasted_iota(jnp.int32, (C, 1), 0) == C - 1, dGl, 0.0)
    dq_ref[...] = dqs * scale
    dk_ref[...] = dk
    dv_ref[...] = (dvb * b).astype(dv_ref.dtype)
    dg_ref[...] = _r2c(jnp.sum(jnp.where(ri >= ci, dG, 0.0), 0, keepdims=True), ri, ci)  # reverse cumsum
    db_ref[...] = db
    dS_ref[...] = dS_in
    dh0_ref[...] = dS_in  # the last write of a document's block (reverse order) is after its first chunk


def _specs(H, HV, K, V, C, BV, N):
    r = HV // H
    tok_k = pl.BlockSpec((None, C, K), lambda hv, iv, c, *s: (hv // r, c, 0))
    tok_v = pl.BlockSpec((None, C, BV), lambda hv, iv, c, *s: (hv, c, iv))
    col = pl.BlockSpec((None, C, 1), lambda hv, iv, c, *s: (hv, c, 0))
    row = pl.BlockSpec((None, None, 1, C), lambda hv, iv, c, *s: (hv, c, 0, 0))
    seg_col = pl.BlockSpec((C, 1), lambda hv, iv, c, *s: (c, 0))
    seg_row = pl.BlockSpec((None, 1, C), lambda hv, iv, c, *s: (c, 0, 0))
    state = pl.BlockSpec((None, None, K, BV), lambda hv, iv, c, first, last, sp, doc: (doc[c], hv, 0, iv))
    hs = pl.BlockSpec((None, None, K, BV), lambda hv, iv, c, *s: (hv, c, 0, iv))
    return tok_k, tok_v, col, row, seg_col, seg_row, state, hs


def _rev(spec, nc):
    """The same block spec with the chunk axis walked backwards."""
    f = spec.index_map
    return pl.BlockSpec(spec.block_shape, lambda hv, iv, c, *s: f(hv, iv, nc - 1 - c, *s))


def _run_fwd(cfg, q, k, v, g, b, seg, h0, meta, states_only):
    scale, C, BV, has_seg, interpret = cfg
    H, TS, K = q.shape
    HV, _, V = v.shape
    N = h0.shape[0]
    nc = TS // C
    tok_k, tok_v, col, row, seg_col, seg_row, state, hs = _specs(H, HV, K, V, C, BV, N)
    if states_only:
        out_specs = [hs]
        out_shape = [jax.ShapeDtypeStruct((HV, nc, K, V), _F32)]
    else:
        out_specs = [tok_v, state]
        out_shape = [jax.ShapeDtypeStruct((HV, TS, V), v.dtype), jax.ShapeDtypeStruct((N, HV, K, V), _F32)]
    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4, grid=(HV, V // BV, nc),
        in_specs=[tok_k, tok_k, tok_v, col, row, col, seg_col, seg_row, state], out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((K, BV), _F32)])
    kern = functools.partial(_fwd_kernel, scale=scale, C=C, has_seg=has_seg, states_only=states_only)
    return pl.pallas_call(kern, grid_spec=spec, out_shape=out_shape, interpret=interpret,
                          compiler_params=pltpu.CompilerParams(
                              dimension_semantics=("parallel", "parallel", "arbitrary")))(
        *meta, q, k, v, g[..., None], g.reshape(HV, nc, 1, C), b[..., None], seg[:, None], seg.reshape(nc, 1, C), h0)


def _run_bwd(cfg, q, k, v, g, b, seg, h0, meta, do, dht):
    scale, C, BV, has_seg, interpret = cfg
    H, TS, K = q.shape
    HV, _, V = v.shape
    N = h0.shape[0]
    nc = TS // C
    NV = V // BV
    (hs,) = _run_fwd(cfg, q, k, v, g, b, seg, h0, meta, states_only=True)  # recompute chunk-start states
    tok_k, tok_v, col, row, seg_col, seg_row, state, hs_spec = [_rev(s, nc) for s in _specs(H, HV, K, V, C, BV, N)]
    part_k = pl.BlockSpec((None, None, C, K), lambda hv, iv, c, *s: (iv, hv, nc - 1 - c, 0))
    part_c = pl.BlockSpec((None, None, C, 1), lambda hv, iv, c, *s: (iv, hv, nc - 1 - c, 0))
    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4, grid=(HV, NV, nc),
        in_specs=[tok_k, tok_k, tok_v, col, row, col, seg_col, seg_row, hs_spec, tok_v, state],
        out_specs=[part_k, part_k, tok_v, part_c, part_c, state],
        scratch_shapes=[pltpu.VMEM((K, BV), _F32)])
    out_shape = [jax.ShapeDtypeStruct((NV, HV, TS, K), _F32), jax.ShapeDtypeStruct((NV, HV, TS, K), _F32),
                 jax.ShapeDtypeStruct((HV, TS, V), v.dtype), jax.ShapeDtypeStruct((NV, HV, TS, 1), _F32),
                 jax.ShapeDtypeStruct((NV, HV, TS, 1), _F32), jax.ShapeDtypeStruct((N, HV, K, V), _F32)]
    kern = functools.partial(_bwd_kernel, scale=scale, C=C, has_seg=has_seg, nc=nc)
    dq, dk, dv, dg, db, dh0 = pl.pallas_call(
        kern, grid_spec=spec, out_shape=out_shape, interpret=interpret,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")))(
        *meta, q, k, v, g[..., None], g.reshape(HV, nc, 1, C), b[..., None], seg[:, None], seg.reshape(nc, 1, C),
        hs, do, dht)
    r = HV // H
    dq = dq.sum(0).reshape(H, r, TS, K).sum(1)  # value heads -> their shared q/k head
    dk = dk.sum(0).reshape(H, r, TS, K).sum(1)
    return dq, dk, dv, dg.sum(0)[..., 0], db.sum(0)[..., 0], dh0


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gdn_core(cfg, q, k, v, g, b, seg, h0, meta):
    o, ht = _run_fwd(cfg, q, k, v, g, b, seg, h0, meta, states_only=False)
    return o, ht


def _gdn_core_fwd(cfg, q, k, v, g, b, seg, h0, meta):
    return _gdn_core(cfg, q, k, v, g, b, seg, h0, meta), (q, k, v, g, b, seg, h0, meta)


def _gdn_core_bwd(cfg, res, cts):
    q, k, v, g, b, seg, h0, meta = res
    do, dht = cts
    dq, dk, dv, dg, db, dh0 = _run_bwd(cfg, q, k, v, g, b, seg, h0, meta, do, dht)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv, dg.astype(g.dtype), db.astype(b.dtype), None,
            dh0.astype(h0.dtype), None)


_gdn_core.defvjp(_gdn_core_fwd, _gdn_core_bwd)


def _layout(cu, ntok, n, C, nc):
    """Slot layout: document i owns chunks [start_i, start_i + max(ceil(L_i / C), 1)); chunks past the last
    document are empty. Returns the slot -> token gather, its validity, the token -> slot map and per-chunk
    scalars (first, last, document)."""
    L = cu[1:] - cu[:-1]
    nch = jnp.maximum((L + C - 1) // C, 1)
    start = jnp.cumsum(nch) - nch
    c = jnp.arange(nc)
    doc = jnp.clip(jnp.searchsorted(start, c, side="right") - 1, 0, n - 1)
    rel = c - start[doc]
    pos = rel[:, None] * C + jnp.arange(C)[None]
    valid = pos < L[doc][:, None]
    tok = jnp.clip(cu[doc][:, None] + pos, 0, ntok - 1)
    last_tok = jnp.clip(cu[doc] + L[doc] - 1, 0, ntok - 1)
    seg_tok = jnp.where(valid, tok, last_tok[:, None])  # padding repeats the document's last segment id
    t = jnp.arange(ntok)
    d = jnp.clip(jnp.searchsorted(cu, t, side="right") - 1, 0, n - 1)
    slot = start[d] * C + t - cu[d]
    first = (rel == 0).astype(jnp.int32)
    last = (rel == nch[doc] - 1).astype(jnp.int32)
    return tok.reshape(-1), valid.reshape(-1), seg_tok.reshape(-1), slot, first, last, doc.astype(jnp.int32)


def _l2norm(x):
    x32 = x.astype(_F32)
    return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, -1, keepdims=True) + 1e-6)).astype(x.dtype)


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           use_qk_l2norm_in_kernel=False, cu_seqlens=None, *, chunk_size=64, block_v=None,
                           segment_ids=None, interpret=False):
    """Gated delta rule, fla's layout: q, k [B,T,H,K]; v [B,T,HV,V] (value head j uses q/k head j // (HV/H));
    g (log decay, <= 0) and beta [B,T,HV]; initial_state [N,HV,K,V] (N = B, or len(cu_seqlens) - 1 with B == 1
    and documents concatenated). Returns (o [B,T,HV,V] in v's dtype, final state fp32 [N,HV,K,V] or None).
    segment_ids [B,T] (our extension): the state restarts at zero where the id changes inside a sequence; ids of
    one document must be contiguous. The l2 norm of q, k runs in JAX before the kernel (autodiff covers it).
    interpret=True runs the Pallas kernels on any backend (CPU tests). Guard: K <= 256, HV % H == 0, chunk_size
    a power of two; raises otherwise."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    C = chunk_size
    if K > 256 or HV % H or C < 8 or C & (C - 1):
        raise ValueError(f"chunk_gated_delta_rule: unsupported K={K}, H={H}, HV={HV}, chunk_size={C}")
    BV = block_v or (V if V <= 128 else 128)
    if V % BV:
        raise ValueError(f"chunk_gated_delta_rule: V={V} is not a multiple of block_v={BV}")
    ntok = B * T
    if cu_seqlens is None:
        n = B
        cu = jnp.arange(B + 1, dtype=jnp.int32) * T
        nc = B * (-(-T // C))
    else:
        if B != 1:
            raise ValueError("chunk_gated_delta_rule: with cu_seqlens the batch must be 1 (documents concatenated)")
        n = cu_seqlens.shape[0] - 1
        cu = jnp.asarray(cu_seqlens, jnp.int32)
        nc = T // C + n
    scale = K ** -0.5 if scale is None else float(scale)
    if use_qk_l2norm_in_kernel:
        q, k = _l2norm(q), _l2norm(k)
    tok, valid, seg_tok, slot, first, last, doc = _layout(cu, ntok, n, C, nc)

    def to_slots(x):  # [B, T, heads, ...] -> [heads, slots, ...], zeros off the documents
        x = x.reshape((ntok,) + x.shape[2:])[tok]
        x = jnp.where(valid.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0)
        return jnp.moveaxis(x, 0, 1)

    has_seg = segment_ids is not None
    segs = (segment_ids.reshape(ntok).astype(jnp.int32)[seg_tok] if has_seg
            else jnp.zeros((nc * C,), jnp.int32)).reshape(nc, C)
    sp = jnp.where(first == 1, segs[:, 0], jnp.concatenate([segs[:1, 0], segs[:-1, -1]]))
    h0 = (jnp.zeros((n, HV, K, V), _F32) if initial_state is None else initial_state)
    cfg = (scale, C, BV, has_seg, interpret)
    o, ht = _gdn_core(cfg, to_slots(q), to_slots(k), to_slots(v), to_slots(g), to_slots(beta), segs.reshape(-1),
                      h0, (first, last, sp.astype(jnp.int32), doc))
    o = jnp.moveaxis(o[:, slot], 0, 1).reshape(B, T, HV, V)
    return o, (ht if output_final_state else None)


def gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                     use_qk_l2norm_in_kernel=False, chunk_size=64, segment_ids=None, *, interpret=False):
    """The model reference's signature (qwen3_next.chunk_gated_delta_rule_ref): one sequence per row, state
    [B,HV,K,V], segment_ids [B,T] restart the state at document boundaries. Output in q's dtype, state fp32."""
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state,
                                  use_qk_l2norm_in_kernel, chunk_size=chunk_size, segment_ids=segment_ids,
                                  interpret=interpret)
    return o.astype(q.dtype), s


# ============================================================================================ cross-entropy
def _ce_chunk(N, E, V):
    c = -(-N // -(-V // E))  # Liger's rule: about N / ceil(V / E) tokens a chunk
    return int(min(2048, max(128, 1 << max(0, (c - 1).bit_length()))))


def _ce_scan(h, w, labels, ignore_index, chunk, with_grads):
    N, E = h.shape
    n = -(-N // chunk)
    pad = n * chunk - N
    hp = jnp.pad(h, ((0, pad), (0, 0))).reshape(n, chunk, E)
    lp = jnp.pad(labels, (0, pad), constant_values=ignore_index).reshape(n, chunk)

    def body(gw, xs):
        hc, lc = xs
        logits = jnp.einsum("ce,ev->cv", hc, w, preferred_element_type=_F32)
        lse = jax.nn.logsumexp(logits, -1)
        valid = lc != ignore_index
        picked = jnp.take_along_axis(logits, jnp.where(valid, lc, 0)[:, None], -1)[:, 0]
        loss = jnp.sum(jnp.where(valid, lse - picked, 0.0))
        if not with_grads:
            return gw, (loss, None)
        dl = jnp.exp(logits - lse[:, None]) - jax.nn.one_hot(jnp.where(valid, lc, -1), w.shape[1], dtype=_F32)
        dl = jnp.where(valid[:, None], dl, 0.0)
        gh = jnp.einsum("cv,ev->ce", dl.astype(w.dtype), w, preferred_element_type=_F32).astype(h.dtype)
        gw = gw + jnp.einsum("ce,cv->ev", hc, dl.astype(hc.dtype), preferred_element_type=_F32)
        return gw, (loss, gh)

    gw0 = jnp.zeros(w.shape, _F32) if with_grads else jnp.zeros((), _F32)
    gw, (losses, gh) = jax.lax.scan(body, gw0, (hp, lp))
    count = jnp.sum(labels != ignore_index).astype(jnp.int32)
    if not with_grads:
        return jnp.sum(losses), count
    return jnp.sum(losses), count, gh.reshape(n * chunk, E)[:N], gw


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _flce(h, w, labels, ignore_index, chunk):
    return _ce_scan(h, w, labels, ignore_index, chunk, with_grads=False)


def _flce_fwd(h, w, labels, ignore_index, chunk):
    loss, count, gh, gw = _ce_scan(h, w, labels, ignore_index, chunk, with_grads=True)
    return (loss, count), (gh, gw.astype(w.dtype), labels)


def _flce_bwd(ignore_index, chunk, res, cts):
    gh, gw, labels = res
    dloss = cts[0]
    return (gh * dloss.astype(gh.dtype), gw * dloss.astype(gw.dtype),
            np.zeros(labels.shape, jax.dtypes.float0))


_flce.defvjp(_flce_fwd, _flce_bwd)


def fused_linear_cross_entropy(h, w, labels, ignore_index=-100, chunk=None):
    """Sum over tokens of -log softmax(h @ w)[label] and the number of counted tokens: h [N,E], w [E,V] (the
    model's lm_head layout), labels int [N] (ignore_index is skipped). Returns (loss_sum fp32 scalar, count int32
    scalar); mean = loss_sum / count. A scan over token chunks holds [chunk, V] fp32 logits at a time; under
    differentiation the gradients are computed in the same scan (Liger's scheme), so no [N, V] array exists."""
    N, E = h.shape
    chunk = int(chunk or _ce_chunk(N, E, w.shape[1]))
    return _flce(h, w, labels, int(ignore_index), chunk)


def cross_entropy_ref(h, w, labels, ignore_index=-100, chunk=None):
    """Unfused reference with the same API: full fp32 logits [N, V]."""
    logits = jnp.einsum("ne,ev->nv", h, w, preferred_element_type=_F32)
    valid = labels != ignore_index
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, jnp.where(valid, labels, 0)[:, None], -1)[:, 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid).astype(jnp.int32)


# ============================================================================================ wrapped kernels
def attention_ref(q, k, v, mask):
    """Same as qwen3.attention: q [B,T,Hq,D], k/v [B,S,Hkv,D], mask [B,T,S] bool; softmax in fp32."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    qg = q.reshape(B, T, Hkv, Hq // Hkv, D)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k) * (D ** -0.5)
    s = jnp.where(mask[:, None, None], s.astype(_F32), -1e30)
    p = jax.nn.softmax(s, -1).astype(q.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", p, v).reshape(B, T, Hq, D)


_BLOCK = 128  # flash_attention's default block sizes


def _flash_ok(q, k):
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    return (T % _BLOCK == 0 and S % _BLOCK == 0 and Hq % Hkv == 0 and q.dtype in (jnp.float32, jnp.bfloat16))


def _flash(q, k, v, ab, segment_ids, causal, interpret):
    from jax.experimental.pallas.ops.tpu import flash_attention as fa
    G = q.shape[2] // k.shape[2]
    qh, kh, vh = (jnp.moveaxis(x, 2, 1) for x in (q, jnp.repeat(k, G, 2), jnp.repeat(v, G, 2)))  # [B, H, T, D]
    seg = None if segment_ids is None else fa.SegmentIds(q=segment_ids, kv=segment_ids)
    call = functools.partial(fa.flash_attention, segment_ids=seg, causal=causal, sm_scale=q.shape[-1] ** -0.5)
    o = (_interpreted(call) if interpret else call)(qh, kh, vh, ab)
    return jnp.moveaxis(o, 1, 2)


def _interpreted(fn):
    """fn under pltpu.force_tpu_interpret_mode(), its backward included (traced later, outside a `with` block)."""
    @jax.custom_vjp
    def f(*args):
        with pltpu.force_tpu_interpret_mode():
            return fn(*args)

    def fwd(*args):
        with pltpu.force_tpu_interpret_mode():
            return jax.vjp(fn, *args)

    def bwd(vjp, ct):
        with pltpu.force_tpu_interpret_mode():
            return vjp(ct)

    f.defvjp(fwd, bwd)
    return f


def attention(q, k, v, mask, *, interpret=False):
    """jax's Pallas TPU flash attention with the mask as an additive bias [B, Hq, T, S] (the reference holds
    scores of that size too). Prefer attention_segments for packed training rows: it skips masked blocks.
    Guard: T and S multiples of 128, Hq % Hkv == 0, fp32/bf16; otherwise the reference (decode steps, T = 1)."""
    if not _flash_ok(q, k):
        return attention_ref(q, k, v, mask)
    bias = jnp.where(mask, 0.0, -1e30).astype(_F32)[:, None]
    bias = jnp.broadcast_to(bias, (q.shape[0], q.shape[2]) + mask.shape[1:])
    return _flash(q, k, v, jax.lax.stop_gradient(bias), None, False, interpret)


def attention_segments(q, k, v, segment_ids, causal=True, *, interpret=False):
    """Packed-document attention: q [B,T,Hq,D], k/v [B,T,Hkv,D], segment_ids [B,T] int (tokens attend within
    their segment, causally), via flash attention's segment ids. Guard as `attention`, else the reference."""
    T = q.shape[1]
    mask = segment_ids[:, :, None] == segment_ids[:, None, :]
    if causal:
        mask = mask & jnp.tril(jnp.ones((T, T), bool))[None]
    if not _flash_ok(q, k):
        return attention_ref(q, k, v, mask)
    return _flash(q, k, v, None, segment_ids.astype(jnp.int32), causal, interpret)


def moe_gmm_ref(lhs, rhs, group_sizes):
    """Grouped matmul reference: rows of lhs [M,K] sorted by group, group g (group_sizes[g] rows) times rhs[g]."""
    return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32))


def moe_gmm(lhs, rhs, group_sizes, *, interpret=False):
    """megablox gmm (custom_vjp: gmm for d lhs, tgmm for d rhs). Guard: fp32/bf16, M, K, N multiples of 128
    (the tiling); otherwise jax.lax.ragged_dot."""
    from jax.experimental.pallas.ops.tpu.megablox import gmm
    M, K = lhs.shape
    N = rhs.shape[2]
    if (M % 128 or K % 128 or N % 128 or lhs.dtype not in (jnp.float32, jnp.bfloat16) or lhs.dtype != rhs.dtype):
        return moe_gmm_ref(lhs, rhs, group_sizes)
    return gmm(lhs, rhs, group_sizes.astype(jnp.int32), preferred_element_type=lhs.dtype, tiling=(128, 128, 128),
               interpret=interpret)


# ============================================================================================ selection
def interpreting():
    """NANOQWEN_INTERPRET=1: select('auto') off TPU picks the Pallas kernels in interpret mode (tests)."""
    return os.environ.get("NANOQWEN_INTERPRET") == "1"


def select(mode="auto", platform=None, dtype=None):
    """The `kernels` dict for forward_hidden / train / generate.
    mode: "ref" -> {} (the model's references); "auto" -> every kernel that applies to the platform and dtype;
    or a comma list of keys ("attention,cross_entropy") -> exactly those, raising if one does not apply.
    platform: "tpu" | "cpu" | "gpu" (default: jax.default_backend()). dtype: activation dtype (name or dtype).
    On CPU "auto" is {} unless NANOQWEN_INTERPRET=1 (the Pallas kernels then run in interpret mode). "rms_norm"
    never applies (XLA fuses it, see the module docstring)."""
    platform = platform or jax.default_backend()
    dtype = None if dtype is None else jnp.dtype(dtype)
    if mode == "ref":
        return {}
    interp = platform != "tpu" and interpreting()
    why = {"rms_norm": "XLA fuses RMSNorm on TPU; there is no kernel to select"}
    table = {}
    if platform == "tpu" or interp:
        if dtype in (None, jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
            table["attention"] = functools.partial(attention, interpret=interp)
            table["gated_delta_rule"] = functools.partial(gated_delta_rule, interpret=interp)
            table["grouped_mm"] = functools.partial(moe_gmm, interpret=interp)
        else:
            for key in ("attention", "gated_delta_rule", "grouped_mm"):
                why[key] = f"Pallas kernels take fp32/bf16, not {dtype}"
    else:
        why["attention"] = why["gated_delta_rule"] = why["grouped_mm"] = (
            f"the Pallas TPU kernels need a TPU (or NANOQWEN_INTERPRET=1), not {platform}")
    table["cross_entropy"] = fused_linear_cross_entropy  # plain JAX: applies everywhere
    if mode == "auto":
        if platform == "cpu" and not interp:
            table.pop("cross_entropy")  # on CPU auto means the references; name it to use it there
        return table
    out = {}
    for key in [s.strip() for s in mode.split(",") if s.strip()]:
        if key not in KEYS:
            raise ValueError(f"unknown kernel {key!r}; choose from {', '.join(KEYS)}, 'auto' or 'ref'")
        if key not in table:
            raise ValueError(f"kernel {key!r} does not apply here: {why[key]}")
        out[key] = table[key]
    return out
