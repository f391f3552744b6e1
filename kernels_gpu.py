"""GPU hot paths for nanoqwen: our own Triton kernels, and guarded wrappers around kernels torch ships.

Our own (Triton, forward and backward, interpreter-clean so they run on CPU under TRITON_INTERPRET=1):
  chunk_gated_delta_rule     chunked Gated DeltaNet, flash-linear-attention's layout and arguments
  fused_linear_cross_entropy linear + cross-entropy over token chunks; never holds [tokens, vocab] logits
  rms_norm                   RMSNorm (+ fused residual add); torch eager does not fuse it
Wrapped (torch ships them; each behind a guard that falls back to the local reference):
  attention                  F.scaled_dot_product_attention with the dense [B, T, S] mask (GQA native)
  attention_segments         flex attention with a causal + same-document block mask
  moe_gmm                    torch._grouped_mm (bf16, CUDA, SM>=90), else a per-group loop

`select(mode)` builds the `kernels` dict for `forward_hidden`; every entry has the model reference's signature:
  "attention":        f(q [B,T,Hq,D], k [B,S,Hkv,D], v [B,S,Hkv,D], mask [B,T,S] bool) -> [B,T,Hq,D]
  "gated_delta_rule": f(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                        use_qk_l2norm_in_kernel=False, chunk_size=64, segment_ids=None) -> (o, state [B,HV,K,V])
  "cross_entropy":    f(h [N,E], w [E,V], labels [N], ignore_index=-100, chunk=None) -> (loss_sum fp32, count)
  "rms_norm":         f(x, w, eps, *, residual=None, zero_centered=False) -> y, or (y, x + residual)
  "grouped_mm":       f(lhs [M,K], rhs [G,K,N], group_sizes [G]) -> [M,N] (rows of lhs sorted by group)

Interpret mode: TRITON_INTERPRET=1 must be set before triton is imported. NANOQWEN_INTERPRET=1 sets it when this
file is the first to import triton, and makes select("auto") on a CPU pick the kernels (run by the interpreter),
so tests can check that --kernels auto and --kernels ref give the same results. The interpreter runs programs
one after another in numpy: it checks the math, not TF32/bf16 rounding, races or speed.
"""
import math
import os
import warnings

import torch
import torch.nn.functional as F

if os.environ.get("NANOQWEN_INTERPRET") == "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
try:
    import triton
    import triton.language as tl
except ImportError:  # the reference paths and torch wrappers still work
    triton = tl = None

# the keys the model files look up (qwen3_moe calls kernels.get("grouped_mm", ...))
KEYS = ("attention", "gated_delta_rule", "cross_entropy", "rms_norm", "grouped_mm")


def interpreting():
    """True when Triton kernels run on CPU tensors through the interpreter."""
    return triton is not None and os.environ.get("TRITON_INTERPRET") == "1"


def _triton_ok(x):
    """Guard shared by our Triton kernels: CUDA tensors, or CPU tensors under the interpreter."""
    if triton is None:
        raise RuntimeError("kernels_gpu: triton is not installed (pip install triton)")
    if x.is_cuda or (x.device.type == "cpu" and interpreting()):
        return
    raise RuntimeError(f"kernels_gpu: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU), got {x.device}")


def _dot_prec(dtype):
    # fp32 inputs keep fp32 products; bf16/fp16 inputs (already rounded) may use TF32 tensor cores
    return "ieee" if dtype == torch.float32 else "tf32"


# ============================================================================================ Gated DeltaNet
# Per chunk of BT positions (G = cumsum(g) inside the chunk, Gam[i,j] = exp(G_i - G_j) for j <= i in one document):
#   A = strict_lower((k*beta) k^T * Gam);  M = (I + A)^-1 (block doubling, all matmuls)
#   U = M (v*beta);  W = M (k*beta*exp(G));  Vn = U - W S
#   O = scale * ((q*exp(G)) S + lower(q k^T * Gam) Vn);  S' = exp(G_last) S + (k*exp(G_last - G))^T Vn
# Segment ids (segment_ids form) restart the state at zero mid-row: the terms that carry the incoming state are
# masked to the incoming segment, and Gam to pairs in one segment. Every program owns one (sequence, value head,
# block of value columns): the value columns of S are independent, only A, M, W are recomputed per block.
if triton is not None:
    @triton.jit
    def _gdn_prep(k, b, g, segc, sp, offs_t, BT: tl.constexpr, LOG_BT: tl.constexpr, HAS_SEG: tl.constexpr,
                  PREC: tl.constexpr):
        G = tl.cumsum(g, 0)
        Gl = tl.sum(tl.where(offs_t == BT - 1, G, 0.0), 0)
        lower = offs_t[:, None] >= offs_t[None, :]
        if HAS_SEG:
            lower = lower & (segc[:, None] == segc[None, :])
            segL = tl.sum(tl.where(offs_t == BT - 1, segc, 0), 0)
            cm = tl.where(segc == sp, 1.0, 0.0)      # position continues the incoming state's segment
            mm = tl.where(segc == segL, 1.0, 0.0)    # position belongs to the outgoing state's segment
            cL = tl.where(segL == sp, 1.0, 0.0)      # the incoming state survives the chunk
        else:
            segL = sp
            cm = tl.full([BT], 1.0, tl.float32)
            mm = cm
            cL = 1.0
        Gam = tl.where(lower, tl.exp(tl.where(lower, G[:, None] - G[None, :], 0.0)), 0.0)
        kb = k * b[:, None]
        A = tl.dot(kb, tl.trans(k), input_precision=PREC) * Gam
        A = tl.where(offs_t[:, None] > offs_t[None, :], A, 0.0)
        # (I + A)^-1 by doubling: M_2s = M_s - M_s E_s M_s, E_s = A inside 2s-blocks but across s-blocks
        M = tl.where(offs_t[:, None] == offs_t[None, :], 1.0, 0.0)
        for lv in tl.static_range(LOG_BT):
            s = 1 << lv
            E = tl.where((offs_t[:, None] // (2 * s) == offs_t[None, :] // (2 * s))
                         & (offs_t[:, None] // s != offs_t[None, :] // s), A, 0.0)
            M = M - tl.dot(tl.dot(M, E, input_precision=PREC), M, input_precision=PREC)
        return G, Gl, Gam, cm, mm, cL, segL, kb, A, M

    @triton.jit
    def _gdn_fwd_kernel(q_ptr, k_ptr, v_ptr, g_ptr, b_ptr, seg_ptr, cu_ptr, h0_ptr, o_ptr, ht_ptr, hs_ptr,
                        T, H, HV, scale,
                        K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                        LOG_BT: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_SEG: tl.constexpr,
                        USE_H0: tl.constexpr, STORE_O: tl.constexpr, STORE_HT: tl.constexpr,
                        STORE_HS: tl.constexpr, PREC: tl.constexpr):
        i_v = tl.program_id(0)
        i_nh = tl.program_id(1)
        i_n = i_nh // HV
        i_hv = i_nh % HV
        i_h = i_hv // (HV // H)
        if IS_VARLEN:
            bos = tl.load(cu_ptr + i_n).to(tl.int64)
            eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
        else:
            bos = i_n.to(tl.int64) * T
            eos = bos + T
        cbase = bos // BT + i_n  # this sequence's first slot in hs (no overlap: see _gdn_states_len)
        offs_t = tl.arange(0, BT)
        offs_k = tl.arange(0, BK)
        offs_v = i_v * BV + tl.arange(0, BV)
        mk = offs_k < K
        mv = offs_v < V
        mS = mk[:, None] & mv[None, :]
        pS = offs_k[:, None] * V + offs_v[None, :]
        S = tl.zeros([BK, BV], dtype=tl.float32)
        if USE_H0:
            S += tl.load(h0_ptr + (i_n * HV + i_hv) * K * V + pS, mask=mS, other=0.0).to(tl.float32)
        if HAS_SEG:
            sp = tl.load(seg_ptr + bos)
        else:
            sp = 0
        NT = tl.cdiv(eos - bos, BT)
        for c in range(0, NT):
            t = bos + c * BT + offs_t
            mt = t < eos
            mtk = mt[:, None] & mk[None, :]
            mtv = mt[:, None] & mv[None, :]
            q = tl.load(q_ptr + (t[:, None] * H + i_h) * K + offs_k[None, :], mask=mtk, other=0.0).to(tl.float32)
            k = tl.load(k_ptr + (t[:, None] * H + i_h) * K + offs_k[None, :], mask=mtk, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + (t[:, None] * HV + i_hv) * V + offs_v[None, :], mask=mtv, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + t * HV + i_hv, mask=mt, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + t * HV + i_hv, mask=mt, other=0.0).to(tl.float32)
            if HAS_SEG:
                segc = tl.load(seg_ptr + tl.minimum(t, eos - 1))  # padding repeats the last segment id
            else:
                segc = offs_t
            G, Gl, Gam, cm, mm, cL, segL, kb, A, M = _gdn_prep(k, b, g, segc, sp, offs_t, BT, LOG_BT, HAS_SEG, PREC)
            ec = tl.exp(G) * cm
            U = tl.dot(M, v * b[:, None], input_precision=PREC)
            W = tl.dot(M, kb * ec[:, None], input_precision=PREC)
            Vn = U - tl.dot(W, S, input_precision=PREC)
            if STORE_O:
                qs = q * scale
                P = tl.dot(qs, tl.trans(k), input_precision=PREC) * Gam
                o = tl.dot(qs * ec[:, None], S, input_precision=PREC) + tl.dot(P, Vn, input_precision=PREC)
                tl.store(o_ptr + (t[:, None] * HV + i_hv) * V + offs_v[None, :], o.to(o_ptr.dtype.element_ty),
                         mask=mtv)
            if STORE_HS:
                tl.store(hs_ptr + ((cbase + c) * HV + i_hv) * K * V + pS, S, mask=mS)
            kd = k * (tl.exp(Gl - G) * mm)[:, None]
            S = S * (cL * tl.exp(Gl)) + tl.dot(tl.trans(kd), Vn, input_precision=PREC)
            if HAS_SEG:
                sp = segL
        if STORE_HT:
            tl.store(ht_ptr + (i_n * HV + i_hv) * K * V + pS, S, mask=mS)

    @triton.jit
    def _gdn_bwd_kernel(q_ptr, k_ptr, v_ptr, g_ptr, b_ptr, seg_ptr, cu_ptr, hs_ptr, do_ptr, dht_ptr,
                        dq_ptr, dk_ptr, dv_ptr, dg_ptr, db_ptr, dh0_ptr,
                        T, H, HV, NTOK, scale,
                        K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                        LOG_BT: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_SEG: tl.constexpr,
                        USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, PREC: tl.constexpr):
        i_v = tl.program_id(0)
        i_nh = tl.program_id(1)
        i_n = i_nh // HV
        i_hv = i_nh % HV
        i_h = i_hv // (HV // H)
        if IS_VARLEN:
            bos = tl.load(cu_ptr + i_n).to(tl.int64)
            eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
        else:
            bos = i_n.to(tl.int64) * T
            eos = bos + T
        cbase = bos // BT + i_n
        offs_t = tl.arange(0, BT)
        offs_k = tl.arange(0, BK)
        offs_v = i_v * BV + tl.arange(0, BV)
        mk = offs_k < K
        mv = offs_v < V
        mS = mk[:, None] & mv[None, :]
        pS = offs_k[:, None] * V + offs_v[None, :]
        strict = offs_t[:, None] > offs_t[None, :]
        dS = tl.zeros([BK, BV], dtype=tl.float32)
        if USE_DHT:
            dS += tl.load(dht_ptr + (i_n * HV + i_hv) * K * V + pS, mask=mS, other=0.0).to(tl.float32)
        NT = tl.cdiv(eos - bos, BT)
        for cc in range(0, NT):
            c = NT - 1 - cc
            t = bos + c * BT + offs_t
            mt = t < eos
            mtk = mt[:, None] & mk[None, :]
            mtv = mt[:, None] & mv[None, :]
            pk = (t[:, None] * H + i_h) * K + offs_k[None, :]
            pv = (t[:, None] * HV + i_hv) * V + offs_v[None, :]
            q = tl.load(q_ptr + pk, mask=mtk, other=0.0).to(tl.float32)
            k = tl.load(k_ptr + pk, mask=mtk, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + pv, mask=mtv, other=0.0).to(tl.float32)
            do = tl.load(do_ptr + pv, mask=mtv, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + t * HV + i_hv, mask=mt, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + t * HV + i_hv, mask=mt, other=0.0).to(tl.float32)
            if HAS_SEG:
                segc = tl.load(seg_ptr + tl.minimum(t, eos - 1))
                sp = tl.load(seg_ptr + bos + tl.maximum(c * BT - 1, 0))
            else:
                segc = offs_t
                sp = 0
            S = tl.load(hs_ptr + ((cbase + c) * HV + i_hv) * K * V + pS, mask=mS, other=0.0)
            G, Gl, Gam, cm, mm, cL, segL, kb, A, M = _gdn_prep(k, b, g, segc, sp, offs_t, BT, LOG_BT, HAS_SEG, PREC)
            # recompute the chunk's forward
            ec = tl.exp(G) * cm
            qs = q * scale
            qg = qs * ec[:, None]
            kbg = kb * ec[:, None]
            vb = v * b[:, None]
            U = tl.dot(M, vb, input_precision=PREC)
            W = tl.dot(M, kbg, input_precision=PREC)
            Vn = U - tl.dot(W, S, input_precision=PREC)
            P = tl.dot(qs, tl.trans(k), input_precision=PREC) * Gam
            ed = tl.exp(Gl - G) * mm
            kd = k * ed[:, None]
            eL = cL * tl.exp(Gl)
            # through O = qg S + P Vn and S' = eL S + kd^T Vn
            dVn = tl.dot(tl.trans(P), do, input_precision=PREC) + tl.dot(kd, dS, input_precision=PREC)
            dqg = tl.dot(do, tl.trans(S), input_precision=PREC)
            dS_in = (tl.dot(tl.trans(qg), do, input_precision=PREC) + eL * dS
                     - tl.dot(tl.trans(W), dVn, input_precision=PREC))
            dPr = tl.dot(do, tl.trans(Vn), input_precision=PREC)
            dPG = dPr * Gam
            X = dPr * P
            dqs = tl.dot(dPG, k, input_precision=PREC) + dqg * ec[:, None]
            dk = tl.dot(tl.trans(dPG), qs, input_precision=PREC)
            dG = tl.sum(X, 1) - tl.sum(X, 0) + tl.sum(dqg * qg, 1)
            dkd = tl.dot(Vn, tl.trans(dS), input_precision=PREC)
            dk += dkd * ed[:, None]
            r = tl.sum(dkd * kd, 1)
            dG -= r
            dGl = tl.sum(r, 0) + eL * tl.sum(tl.sum(S * dS, 1), 0)
            # through Vn = M vb - M kbg S and M = (I + A)^-1
            dvb = tl.dot(tl.trans(M), dVn, input_precision=PREC)
            dkbg = -tl.dot(tl.trans(M), tl.dot(dVn, tl.trans(S), input_precision=PREC), input_precision=PREC)
            dA = -(tl.dot(dvb, tl.trans(U), input_precision=PREC) + tl.dot(dkbg, tl.trans(W), input_precision=PREC))
            dA = tl.where(strict, dA, 0.0)
            dAG = dA * Gam
            dkb = tl.dot(dAG, k, input_precision=PREC)
            dk += tl.dot(tl.trans(dAG), kb, input_precision=PREC)
            Y = dA * A
            dG += tl.sum(Y, 1) - tl.sum(Y, 0) + tl.sum(dkbg * kbg, 1)
            dv = dvb * b[:, None]
            db = tl.sum(dvb * v, 1) + tl.sum(dkbg * k * ec[:, None], 1) + tl.sum(dkb * k, 1)
            dk += dkbg * (b * ec)[:, None] + dkb * b[:, None]
            dG += tl.where(offs_t == BT - 1, dGl, 0.0)
            dg = tl.sum(dG, 0) - tl.cumsum(dG, 0) + dG  # G = cumsum(g): reverse cumsum
            # dq, dk, dg, db are partial sums over value blocks: [NV, tokens, HV, ...]
            pk2 = i_v * NTOK * HV * K + (t[:, None] * HV + i_hv) * K + offs_k[None, :]
            tl.store(dq_ptr + pk2, dqs * scale, mask=mtk)
            tl.store(dk_ptr + pk2, dk, mask=mtk)
            tl.store(dv_ptr + pv, dv.to(dv_ptr.dtype.element_ty), mask=mtv)
            tl.store(dg_ptr + i_v * NTOK * HV + t * HV + i_hv, dg, mask=mt)
            tl.store(db_ptr + i_v * NTOK * HV + t * HV + i_hv, db, mask=mt)
            dS = dS_in
        if STORE_DH0:
            tl.store(dh0_ptr + (i_n * HV + i_hv) * K * V + pS, dS, mask=mS)


def _gdn_states_len(ntok, n, bt):
    # sequence i's chunks start at slot cu[i] // BT + i: floor(a/BT) + ceil(L/BT) <= floor((a+L)/BT) + 1, so no overlap
    return ntok // bt + n + 1


def _gdn_launch_args(q, v, cu_seqlens, chunk_size, block_v):
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    BT = chunk_size
    BK = max(16, triton.next_power_of_2(K))
    BV = block_v or min(64, max(16, triton.next_power_of_2(V)))
    NV = triton.cdiv(V, BV)
    meta = dict(K=K, V=V, BT=BT, BK=BK, BV=BV, LOG_BT=int(math.log2(BT)), IS_VARLEN=cu_seqlens is not None,
                PREC=_dot_prec(q.dtype))
    return B, T, H, K, HV, V, N, NV, meta


class _GatedDeltaRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, h0, scale, cu_seqlens, seg, output_final_state, chunk_size, block_v):
        B, T, H, K, HV, V, N, NV, meta = _gdn_launch_args(q, v, cu_seqlens, chunk_size, block_v)
        o = torch.empty_like(v)
        ht = torch.empty(N, HV, K, V, dtype=torch.float32, device=q.device) if output_final_state else None
        dummy = q.new_empty(1)
        _gdn_fwd_kernel[(NV, N * HV)](
            q, k, v, g, beta, seg if seg is not None else dummy, cu_seqlens if cu_seqlens is not None else dummy,
            h0 if h0 is not None else dummy, o, ht if ht is not None else dummy, dummy, T, H, HV, scale,
            HAS_SEG=seg is not None, USE_H0=h0 is not None, STORE_O=True, STORE_HT=ht is not None, STORE_HS=False,
            **meta)
        ctx.save_for_backward(q, k, v, g, beta, h0, cu_seqlens, seg)
        ctx.cfg = (scale, chunk_size, block_v)
        if ht is not None:
            return o, ht
        return o

    @staticmethod
    def backward(ctx, do, dht=None):
        q, k, v, g, beta, h0, cu_seqlens, seg = ctx.saved_tensors
        scale, chunk_size, block_v = ctx.cfg
        B, T, H, K, HV, V, N, NV, meta = _gdn_launch_args(q, v, cu_seqlens, chunk_size, block_v)
        ntok = B * T
        dummy = q.new_empty(1)
        segp = seg if seg is not None else dummy
        cup = cu_seqlens if cu_seqlens is not None else dummy
        # recompute the chunk-start states (cheaper in memory than keeping them from the forward, as fla does)
        hs = torch.empty(_gdn_states_len(ntok, N, chunk_size), HV, K, V, dtype=torch.float32, device=q.device)
        _gdn_fwd_kernel[(NV, N * HV)](
            q, k, v, g, beta, segp, cup, h0 if h0 is not None else dummy, dummy, dummy, hs, T, H, HV, scale,
            HAS_SEG=seg is not None, USE_H0=h0 is not None, STORE_O=False, STORE_HT=False, STORE_HS=True, **meta)
        f32 = dict(dtype=torch.float32, device=q.device)
        dq = torch.empty(NV, B, T, HV, K, **f32)
        dk = torch.empty(NV, B, T, HV, K, **f32)
        dv = torch.empty_like(v)
        dg = torch.empty(NV, B, T, HV, **f32)
        db = torch.empty(NV, B, T, HV, **f32)
        dh0 = torch.empty(N, HV, K, V, **f32) if h0 is not None else None
        do = do.contiguous()
        _gdn_bwd_kernel[(NV, N * HV)](
            q, k, v, g, beta, segp, cup, hs, do, dht.contiguous() if dht is not None else dummy,
            dq, dk, dv, dg, db, dh0 if dh0 is not None else dummy, T, H, HV, ntok, scale,
            HAS_SEG=seg is not None, USE_DHT=dht is not None, STORE_DH0=dh0 is not None, **meta)
        r = HV // H
        dq = dq.sum(0).view(B, T, H, r, K).sum(3).to(q.dtype)  # value heads -> their shared q/k head
        dk = dk.sum(0).view(B, T, H, r, K).sum(3).to(k.dtype)
        dg = dg.sum(0).to(g.dtype)
        db = db.sum(0).to(beta.dtype)
        if dh0 is not None:
            dh0 = dh0.to(h0.dtype)
        return dq, dk, dv, dg, db, dh0, None, None, None, None, None, None


def _l2norm(x):
    x32 = x.float()
    return (x32 * torch.rsqrt((x32 * x32).sum(-1, keepdim=True) + 1e-6)).to(x.dtype)


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           use_qk_l2norm_in_kernel=False, cu_seqlens=None, *, chunk_size=64, block_v=None,
                           segment_ids=None):
    """Gated delta rule, fla's layout: q, k [B,T,H,K]; v [B,T,HV,V] (value head j uses q/k head j // (HV/H));
    g (log decay, <= 0) and beta [B,T,HV]; initial_state [N,HV,K,V] (N = B, or len(cu_seqlens) - 1 with B == 1
    and documents concatenated). Returns (o [B,T,HV,V] in v's dtype, final state fp32 [N,HV,K,V] or None).
    segment_ids [B,T] (our extension): the state restarts at zero wherever the id changes inside a sequence; ids
    of one document must be contiguous. The l2 norm of q, k runs in torch before the kernel (autograd covers it).
    Guard: K <= 256, chunk_size a power of two >= 16; raises otherwise (no silent fallback)."""
    B, T, H, K = q.shape
    HV = v.shape[2]
    _triton_ok(q)
    if K > 256 or HV % H or chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_gated_delta_rule: unsupported K={K}, H={H}, HV={HV}, chunk_size={chunk_size}")
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError("chunk_gated_delta_rule: with cu_seqlens the batch must be 1 (documents concatenated)")
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    scale = K ** -0.5 if scale is None else float(scale)
    if use_qk_l2norm_in_kernel:
        q, k = _l2norm(q), _l2norm(k)
    seg = None if segment_ids is None else segment_ids.to(device=q.device, dtype=torch.int32).reshape(-1).contiguous()
    args = [x.contiguous() for x in (q, k, v, g, beta)]
    h0 = initial_state.contiguous() if initial_state is not None else None
    out = _GatedDeltaRule.apply(*args, h0, scale, cu_seqlens, seg, bool(output_final_state), chunk_size, block_v)
    return out if output_final_state else (out, None)


def gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                     use_qk_l2norm_in_kernel=False, chunk_size=64, segment_ids=None):
    """The model reference's signature (qwen3_next.chunk_gated_delta_rule_ref): one sequence per row, state
    [B,HV,K,V], segment_ids [B,T] restart the state at document boundaries. Output in q's dtype, state fp32."""
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state,
                                  use_qk_l2norm_in_kernel, chunk_size=chunk_size, segment_ids=segment_ids)
    return o.to(q.dtype), s


# ============================================================================================ cross-entropy
if triton is not None:
    @triton.jit
    def _ce_kernel(logits_ptr, stride, labels_ptr, loss_ptr, n_vocab, ignore_index, BLOCK: tl.constexpr):
        """One row: online logsumexp over vocab tiles, the loss, then d loss / d logits written over the logits."""
        row = tl.program_id(0).to(tl.int64)
        ptr = logits_ptr + row * stride
        label = tl.load(labels_ptr + row).to(tl.int64)
        m = float("-inf")
        d = 0.0
        for off in range(0, n_vocab, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            x = tl.load(ptr + cols, mask=cols < n_vocab, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        lse = m + tl.log(d)
        valid = label != ignore_index
        x_label = tl.load(ptr + label, mask=valid, other=0.0).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(valid, lse - x_label, 0.0))
        for off in range(0, n_vocab, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            cm = cols < n_vocab
            x = tl.load(ptr + cols, mask=cm, other=0.0).to(tl.float32)
            p = tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)
            p = tl.where(valid, p, 0.0)
            tl.store(ptr + cols, p.to(logits_ptr.dtype.element_ty), mask=cm)


class _FusedLinearCE(torch.autograd.Function):
    """Liger's scheme: per chunk of tokens, logits = h_c @ w (cuBLAS), the Triton kernel turns them into
    d loss/d logits in place, and the gradients of h and w are finished in the same pass; backward only scales."""

    @staticmethod
    def forward(ctx, h, w, labels, ignore_index, chunk):
        N, E = h.shape
        V = w.shape[1]
        loss = torch.empty(N, dtype=torch.float32, device=h.device)
        gh = torch.empty_like(h) if h.requires_grad else None
        gw = torch.zeros(E, V, dtype=torch.float32, device=h.device) if w.requires_grad else None
        block = min(4096 if h.is_cuda else 1024, triton.next_power_of_2(V))
        for s in range(0, N, chunk):
            hc = h[s:s + chunk]
            logits = hc @ w  # [c, V] in the activation dtype, as the unfused path
            _ce_kernel[(hc.shape[0],)](logits, logits.stride(0), labels[s:s + chunk], loss[s:s + chunk], V,
                                       ignore_index, BLOCK=block)
            if gh is not None:
                gh[s:s + chunk] = logits @ w.T
            if gw is not None:
                gw.addmm_(hc.T.float(), logits.float())
        ctx.save_for_backward(gh, gw)
        ctx.w_dtype = w.dtype
        count = (labels != ignore_index).sum()
        ctx.mark_non_differentiable(count)
        return loss.sum(), count

    @staticmethod
    def backward(ctx, dloss, dcount):
        gh, gw = ctx.saved_tensors
        gh = None if gh is None else gh * dloss.to(gh.dtype)
        gw = None if gw is None else (gw * dloss).to(ctx.w_dtype)
        return gh, gw, None, None, None


def _ce_chunk(N, E, V):
    # Liger's rule: chunks of about N / ceil(V / E) tokens, so one chunk of logits is about the size of h
    return max(16, min(1 << 14, triton.next_power_of_2(triton.cdiv(N, triton.cdiv(V, E)))))


def fused_linear_cross_entropy(h, w, labels, ignore_index=-100, chunk=None):
    """Sum over tokens of -log softmax(h @ w)[label] and the number of counted tokens: h [N,E], w [E,V] (the
    model's lm_head layout; a transposed embedding view is fine), labels int [N] (ignore_index is skipped).
    Returns (loss_sum fp32 scalar, count int64 scalar); mean = loss_sum / count. Never holds more than
    [chunk, V] logits; the gradients are computed in the forward pass (so memory is h + w-sized, not N x V)."""
    _triton_ok(h)
    N, E = h.shape
    chunk = chunk or _ce_chunk(N, E, w.shape[1])
    return _FusedLinearCE.apply(h, w, labels.contiguous(), int(ignore_index), int(chunk))


def cross_entropy_ref(h, w, labels, ignore_index=-100, chunk=None):
    """Unfused reference with the same API: full fp32 logits [N, V]."""
    logits = (h @ w).float()
    valid = labels != ignore_index
    nll = torch.logsumexp(logits, -1) - logits.gather(-1, labels.clamp(min=0)[:, None])[:, 0]
    return torch.where(valid, nll, 0.0).sum(), valid.sum()


# ============================================================================================ RMSNorm
if triton is not None:
    @triton.jit
    def _rms_fwd_kernel(x_ptr, r_ptr, w_ptr, y_ptr, z_ptr, rstd_ptr, n_cols, eps, BLOCK: tl.constexpr,
                        HAS_RES: tl.constexpr, ZERO_CENTERED: tl.constexpr, ROUND: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        cm = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=cm, other=0.0).to(tl.float32)
        if HAS_RES:
            z = x + tl.load(r_ptr + row * n_cols + cols, mask=cm, other=0.0).to(tl.float32)
            zs = z.to(z_ptr.dtype.element_ty)
            tl.store(z_ptr + row * n_cols + cols, zs, mask=cm)
            x = zs.to(tl.float32)  # the residual stream is kept in the activation dtype
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / n_cols + eps)
        tl.store(rstd_ptr + row, rstd)
        xh = x * rstd
        w = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
        if ZERO_CENTERED:
            y = xh * (1.0 + w)  # Qwen3-Next: multiply in fp32, then cast
        else:
            if ROUND:
                xh = xh.to(y_ptr.dtype.element_ty).to(tl.float32)  # HF: cast, then multiply in the input dtype
            y = xh * w
        tl.store(y_ptr + row * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=cm)

    @triton.jit
    def _rms_bwd_kernel(x_ptr, w_ptr, rstd_ptr, dy_ptr, dz_ptr, dx_ptr, dw_ptr, n_rows, n_cols, rows_per_prog,
                        BLOCK: tl.constexpr, HAS_DZ: tl.constexpr, ZERO_CENTERED: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        cm = cols < n_cols
        w = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
        if ZERO_CENTERED:
            w = w + 1.0
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, rows_per_prog):
            row = pid.to(tl.int64) * rows_per_prog + i
            m = cm & ((row + cols * 0) < n_rows)  # a vector: the interpreter rejects a scalar mask here
            x = tl.load(x_ptr + row * n_cols + cols, mask=m, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * n_cols + cols, mask=m, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + tl.minimum(row, n_rows - 1))  # rows past the end load zeros above
            xh = x * rstd
            dyw = dy * w
            dx = rstd * (dyw - xh * (tl.sum(dyw * xh, 0) / n_cols))
            if HAS_DZ:
                dx += tl.load(dz_ptr + row * n_cols + cols, mask=m, other=0.0).to(tl.float32)
            tl.store(dx_ptr + row * n_cols + cols, dx.to(dx_ptr.dtype.element_ty), mask=m)
            dw += dy * xh
        tl.store(dw_ptr + pid * n_cols + cols, dw, mask=cm)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, residual, eps, zero_centered):
        shape = x.shape
        E = shape[-1]
        x2 = x.reshape(-1, E).contiguous()
        R = x2.shape[0]
        y = torch.empty_like(x2)
        z = torch.empty_like(x2) if residual is not None else None
        rstd = torch.empty(R, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(E)
        _rms_fwd_kernel[(R,)](x2, residual.reshape(-1, E).contiguous() if residual is not None else x2, w, y,
                              z if z is not None else y, rstd, E, eps, BLOCK=block, HAS_RES=residual is not None,
                              ZERO_CENTERED=zero_centered, ROUND=x.dtype != torch.float32)
        ctx.save_for_backward(z if z is not None else x2, w, rstd)
        ctx.cfg = (shape, zero_centered, residual is not None)
        y = y.view(shape)
        if z is not None:
            return y, z.view(shape)
        return y

    @staticmethod
    def backward(ctx, dy, dz=None):
        x2, w, rstd = ctx.saved_tensors
        shape, zero_centered, has_res = ctx.cfg
        E = shape[-1]
        R = x2.shape[0]
        progs = min(R, 4 * (torch.cuda.get_device_properties(x2.device).multi_processor_count if x2.is_cuda else 2))
        rows_per_prog = triton.cdiv(R, progs)
        dx = torch.empty_like(x2)
        dw = torch.empty(progs, E, dtype=torch.float32, device=x2.device)
        dzc = dz.reshape(-1, E).contiguous() if (has_res and dz is not None) else None
        _rms_bwd_kernel[(progs,)](x2, w, rstd, dy.reshape(-1, E).contiguous(), dzc if dzc is not None else dx, dx,
                                  dw, R, E, rows_per_prog, BLOCK=triton.next_power_of_2(E),
                                  HAS_DZ=dzc is not None, ZERO_CENTERED=zero_centered)
        dx = dx.view(shape)
        return dx, dw.sum(0).to(w.dtype), (dx if has_res else None), None, None


def rms_norm(x, w, eps, *, residual=None, zero_centered=False):
    """Fused RMSNorm over the last axis, the model reference's signature (qwen3.rms_norm(x, w, eps)).
    zero_centered=False: HF Qwen2RMSNorm, w * (x * rstd).to(dtype); True: Qwen3-Next, (x * rstd * (1 + w)) in fp32.
    residual given: normalises z = x + residual and returns (y, z), one read of each input."""
    _triton_ok(x)
    if x.shape[-1] > 65536:
        raise ValueError(f"rms_norm: hidden size {x.shape[-1]} does not fit one program")
    return _RMSNorm.apply(x, w, residual, float(eps), bool(zero_centered))


def rms_norm_ref(x, w, eps, *, residual=None, zero_centered=False):
    """Reference with the same API (same as qwen3.rms_norm / the Qwen3-Next norm)."""
    z = x if residual is None else x + residual
    z32 = z.float()
    y = z32 * torch.rsqrt((z32 * z32).mean(-1, keepdim=True) + eps)
    y = (y * (1.0 + w.float())).to(x.dtype) if zero_centered else w * y.to(x.dtype)
    return y if residual is None else (y, z)


# ============================================================================================ wrapped kernels
def attention_ref(q, k, v, mask):
    """Same as qwen3.attention: q [B,T,Hq,D], k/v [B,S,Hkv,D], mask [B,T,S] bool; softmax in fp32."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    qg = q.reshape(B, T, Hkv, Hq // Hkv, D)
    s = torch.einsum("btkgd,bskd->bkgts", qg, k) * (D ** -0.5)
    s = torch.where(mask[:, None, None], s.float(), -1e30)
    p = torch.softmax(s, -1).to(q.dtype)
    return torch.einsum("bkgts,bskd->btkgd", p, v).reshape(B, T, Hq, D)


def _attn_guard(q, k, v, mask):
    B, T, Hq, D = q.shape
    ok = (k.shape[2] > 0 and Hq % k.shape[2] == 0 and D <= 256 and q.dtype in (torch.float16, torch.bfloat16,
                                                                            torch.float32))
    return ok and mask is not None and mask.dtype == torch.bool and tuple(mask.shape) == (B, T, k.shape[1])


def attention(q, k, v, mask):
    """SDPA with the boolean mask (efficient/cuDNN backends take arbitrary masks; GQA via enable_gqa).
    Every query row must see at least one key (true for the model's causal masks: a token sees itself).
    Guard: Hq % Hkv == 0, D <= 256, fp16/bf16/fp32, mask [B,T,S] bool; otherwise the reference."""
    if not _attn_guard(q, k, v, mask):
        return attention_ref(q, k, v, mask)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask[:, None], scale=q.shape[-1] ** -0.5, enable_gqa=True)
    return o.transpose(1, 2)


_flex_compiled = None


def attention_segments(q, k, v, segment_ids, causal=True):
    """Packed-document attention with flex attention: q [B,T,Hq,D], k/v [B,T,Hkv,D], segment_ids [B,T] (tokens
    attend within their segment, causally). The block mask skips whole tiles across documents, which a dense mask
    cannot. Compiled on CUDA; eager (forward only, torch's limit) on CPU. Guard as `attention`: otherwise the
    reference with the equivalent dense mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    global _flex_compiled
    B, T = segment_ids.shape
    seg = segment_ids

    def mask_mod(b, h, qi, ki):
        m = seg[b, qi] == seg[b, ki]
        return (m & (qi >= ki)) if causal else m

    dense = (seg[:, :, None] == seg[:, None, :])
    if causal:
        dense = dense & torch.ones(T, T, dtype=torch.bool, device=q.device).tril()[None]
    if not _attn_guard(q, k, v, dense):
        return attention_ref(q, k, v, dense)
    bm = create_block_mask(mask_mod, B, None, T, T, device=q.device.type)
    fn = flex_attention
    if q.is_cuda:
        _flex_compiled = _flex_compiled or torch.compile(flex_attention, dynamic=False)
        fn = _flex_compiled
    with warnings.catch_warnings():  # eager flex on CPU warns that it is unfused: known, it is the CPU path
        warnings.simplefilter("ignore", UserWarning)
        o = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=bm,
               scale=q.shape[-1] ** -0.5, enable_gqa=True)
    return o.transpose(1, 2)


def moe_gmm_ref(lhs, rhs, group_sizes):
    """Grouped matmul reference: rows of lhs [M,K] sorted by group, group g (group_sizes[g] rows) times rhs[g]."""
    sizes = [int(s) for s in group_sizes.tolist()]
    out = [x @ rhs[g] for g, x in enumerate(torch.split(lhs[:sum(sizes)], sizes, 0))]
    rest = lhs.shape[0] - sum(sizes)
    if rest:
        out.append(lhs.new_zeros(rest, rhs.shape[-1]))
    return torch.cat(out, 0)


def moe_gmm(lhs, rhs, group_sizes):
    """torch._grouped_mm: one launch for all experts, no host sync. Guard: bf16 on CUDA with compute capability
    >= 9.0 and K, N multiples of 16 (the fast path), or any CPU tensor (torch 2.13 runs it there too);
    otherwise the per-group reference (which syncs on group_sizes). Rows past sum(group_sizes) give zeros."""
    K, N = rhs.shape[1], rhs.shape[2]
    fast = (lhs.is_cuda and lhs.dtype == torch.bfloat16 and rhs.dtype == torch.bfloat16 and K % 16 == 0
            and N % 16 == 0 and torch.cuda.get_device_capability(lhs.device) >= (9, 0))
    if not (fast or (lhs.device.type == "cpu" and lhs.dtype in (torch.float32, torch.bfloat16)
                     and lhs.dtype == rhs.dtype)):
        return moe_gmm_ref(lhs, rhs, group_sizes)
    offs = torch.cumsum(group_sizes.to(torch.int32), 0, dtype=torch.int32)
    used = torch.arange(lhs.shape[0], device=lhs.device)[:, None] < offs[-1]
    # rows past the groups: _grouped_mm leaves them undefined in the output and in d lhs, so mask both ways
    out = torch._grouped_mm(torch.where(used, lhs, 0), rhs, offs=offs)
    return torch.where(used, out, 0)


# ============================================================================================ selection
def _platform():
    return "cuda" if torch.cuda.is_available() else "cpu"


def select(mode="auto", platform=None, dtype=None):
    """The `kernels` dict for forward_hidden / train / generate.
    mode: "ref" -> {} (the model's references); "auto" -> every kernel that applies to the platform and dtype;
    or a comma list of keys ("attention,cross_entropy") -> exactly those, raising if one does not apply.
    platform: "cuda" | "cpu" (default: cuda when available). dtype: the activation dtype (a name or torch dtype).
    On CPU "auto" is {} unless NANOQWEN_INTERPRET=1 (the Triton kernels then run in the interpreter)."""
    platform = platform or _platform()
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if mode == "ref":
        return {}
    triton_ok = triton is not None and (platform == "cuda" or (platform == "cpu" and interpreting()))
    why = {}
    table = {}
    if platform == "cuda" or interpreting():
        table["attention"] = attention
        table["grouped_mm"] = moe_gmm
    else:
        why["attention"] = why["grouped_mm"] = f"the torch kernels are not faster than the reference on {platform}"
    for key, fn in (("gated_delta_rule", gated_delta_rule), ("cross_entropy", fused_linear_cross_entropy),
                    ("rms_norm", rms_norm)):
        if triton_ok and dtype in (None, torch.float32, torch.bfloat16, torch.float16):
            table[key] = fn
        else:
            why[key] = ("triton is not installed" if triton is None else
                        f"Triton needs CUDA (or TRITON_INTERPRET=1) and fp32/bf16/fp16, got {platform}, {dtype}")
    if mode == "auto":
        return table
    out = {}
    for key in [s.strip() for s in mode.split(",") if s.strip()]:
        if key not in KEYS:
            raise ValueError(f"unknown kernel {key!r}; choose from {', '.join(KEYS)}, 'auto' or 'ref'")
        if key not in table:
            raise ValueError(f"kernel {key!r} does not apply here: {why[key]}")
        out[key] = table[key]
    return out
