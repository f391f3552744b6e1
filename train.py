"""Training loop for every model file, on JAX or PyTorch, with the same command and flags.

    python train.py --model qwen3 --size debug --backend jax --steps 30
    python train.py --model qwen3_moe --size 30b-a3b --backend jax --data corpus.jsonl --ckpt-dir runs/moe
    torchrun --nproc_per_node 4 train.py --model qwen3 --size debug --backend torch --mesh fsdp=2,tp=2

Models come through their module's interface only: `init`, `forward_hidden` (final-normed hidden states and an
aux dict), `lm_head`, `param_table` (logical axes and init, from which the no-decay rule derives), and for MoE /
MTP models `update_router_bias` and `mtp_forward`. Params are float32 master weights; `--dtype bfloat16` casts
them to bfloat16 inside the loss, so activations are bfloat16 while gradients and AdamW state stay float32.

The next-token cross-entropy never materialises float32 logits for the whole batch: it walks the tokens in
chunks and computes each chunk's loss and gradient together (one logits matmul forward, two backward, as an
unfused head would), so the [tokens, 151936] matrix exists one chunk at a time. A kernels module may replace it
(`kernels["cross_entropy"]`, same signature as `cross_entropy_ref_*`).

Data is packed into rows of `--seq-len` tokens with segment ids and per-document positions, so attention never
crosses documents. Order is a function of `--seed` alone; the loader's position is saved in each checkpoint,
so `--resume` continues bit for bit. MFU uses MaxText's FLOP count (see `flops_per_token`).

`--mesh` lays the run out with shard.py: JAX meshes in one process per host; torch runs one process per device
under torchrun (TorchMeshTrainer: DTensor params and AdamW state, sharded DCP checkpoints that resume on any mesh).
"""
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np

import convert

IGNORE = -100  # label of a token that is not a target (document end, padding, non-assistant SFT tokens)
MTP_WEIGHT = 0.1  # weight of Qwen3-Next's multi-token-prediction loss
DEFAULT_SIZES = {"qwen2": "0.5b", "qwen3": "0.6b", "qwen3_moe": "30b-a3b", "qwen3_next": "80b-a3b"}


# ----------------------------------------------------------------------------------------------- FLOPs and MFU
def flops_per_token(model, cfg, seq_len):
    """Training FLOPs per token (forward + backward = 3 x forward), MaxText's convention (KERNELS.md section 4):
    matmuls count 2 per multiply-add; causal attention is halved (2*S*Hq*hd per token forward); the embedding
    lookup is free and the unembedding counts 2*E*V; MoE counts the router, top-k experts and the shared expert;
    a Gated DeltaNet layer counts its projections, its short conv and 8*Hv*Dk*Dv for the recurrence.
    Qwen3-Next's full attention has a gated q projection (2*Hq*hd outputs); the MTP head is not counted."""
    E, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    Hq, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or E // Hq
    n_experts = getattr(cfg, "num_experts", 0) or 0
    gated_q = 2 if model.MODEL_TYPE == "qwen3_next" else 1

    def attn():
        return 2 * E * (gated_q * Hq + 2 * Hkv) * hd + 2 * E * Hq * hd + 2 * seq_len * Hq * hd

    def gdn():
        K = cfg.linear_num_key_heads * cfg.linear_key_head_dim
        Vd = cfg.linear_num_value_heads * cfg.linear_value_head_dim
        Hv = cfg.linear_num_value_heads
        return (2 * E * (2 * K + 2 * Vd + 2 * Hv) + 2 * Vd * E + 2 * cfg.linear_conv_kernel_dim * (2 * K + Vd)
                + 8 * Hv * cfg.linear_key_head_dim * cfg.linear_value_head_dim)

    def ffn(i):
        if n_experts and _is_sparse(cfg, i):
            f = 2 * E * n_experts + cfg.num_experts_per_tok * 6 * E * cfg.moe_intermediate_size
            shared = getattr(cfg, "shared_expert_intermediate_size", 0) or 0
            return f + (6 * E * shared + 2 * E if shared else 0)  # shared expert and its sigmoid gate
        return 6 * E * cfg.intermediate_size

    total = 2 * E * V
    for i in range(L):
        total += (gdn() if _layer_type(cfg, i) == "linear_attention" else attn()) + ffn(i)
    return 3 * total


def _is_sparse(cfg, i):
    step = getattr(cfg, "decoder_sparse_step", 1) or 1
    return i not in (getattr(cfg, "mlp_only_layers", ()) or ()) and (i + 1) % step == 0


def _layer_type(cfg, i):
    types = getattr(cfg, "layer_types", None)
    if types:
        return types[i]
    interval = getattr(cfg, "full_attention_interval", None)
    if interval:
        return "linear_attention" if (i + 1) % interval else "full_attention"
    return "full_attention"


PEAK_TFLOPS = {"h100": {"bfloat16": 989.0, "float32": 494.5}, "h200": {"bfloat16": 989.0, "float32": 494.5},
               "a100": {"bfloat16": 312.0, "float32": 156.0}, "v5p": {"bfloat16": 459.0, "float32": 459.0},
               "v5e": {"bfloat16": 197.0, "float32": 197.0}, "v6e": {"bfloat16": 918.0, "float32": 918.0}}


def peak_flops(backend, dtype):
    """(peak FLOP/s of one device, where it came from): the spec sheet's dense number for known GPUs/TPUs
    (float32 counts TF32 tensor cores); on a CPU, a measured float32 matmul rate, since CPUs publish none."""
    name = ""
    if backend == "torch":
        import torch
        if torch.cuda.is_available():
            name = torch.cuda.get_device_name().lower()
    else:
        import jax
        d = jax.devices()[0]
        if d.platform != "cpu":
            name = d.device_kind.lower()
    for k, v in PEAK_TFLOPS.items():
        if k in name.replace(" ", ""):
            return v[dtype] * 1e12, f"{k} spec"
    if name:
        return float("nan"), f"unknown device {name!r}"
    import torch
    a = torch.randn(1024, 1024)
    a @ a
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < 0.2:
        a @ a
        n += 1
    return 2 * 1024 ** 3 * n / (time.perf_counter() - t), "measured fp32 matmul on this CPU"


# ----------------------------------------------------------------------------------------------- schedule
def lr_at(step, lr, warmup, total, min_ratio=0.1):
    """Linear warm-up over `warmup` updates, then cosine decay to min_ratio*lr at `total`. step is 0-based;
    works on Python numbers and on traced JAX scalars alike."""
    import numpy as xnp
    if not isinstance(step, (int, float)):
        import jax.numpy as xnp
    warm = lr * (step + 1) / max(1, warmup)
    frac = xnp.clip((step - warmup) / max(1, total - warmup), 0.0, 1.0)
    cos = lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + xnp.cos(math.pi * frac)))
    return xnp.where(step < warmup, warm, cos)


def decays(p):
    """Weight decay applies to matrices only: not to norms, biases, or other zero/one-initialised vectors."""
    per_layer = [a for a in p.axes if not str(a).startswith("layers")]
    return p.init == "normal" and len(per_layer) >= 2


# ----------------------------------------------------------------------------------------------- chunked cross-entropy
def ce_chunk_size(vocab, budget=1 << 24):
    """Tokens per chunk so that one chunk's float32 logits stay within `budget` elements (64 MB)."""
    return max(8, min(4096, budget // vocab))


def cross_entropy_ref_jax(h, w, labels, ignore_index=IGNORE, chunk=None):
    """(sum over tokens of -log softmax(h @ w)[label], number of counted tokens); labels == IGNORE skipped.
    h [N, E], w [E, V], labels [N]. Forward and gradient are computed chunk by chunk in one pass (custom VJP).
    The signature of the kernels modules' "cross_entropy"."""
    assert ignore_index == IGNORE
    # internally the head is [V, E]: for a tied head that is the embedding itself (w.T.T cancels), so neither the
    # weight nor its gradient is ever copied transposed, and the lookup's gradient adds onto the same buffer
    return _ce_jax(chunk or ce_chunk_size(w.shape[-1]))(h, w.T, labels), (labels != IGNORE).sum()


_CE_JAX = {}


def _ce_jax(chunk):
    if chunk in _CE_JAX:
        return _CE_JAX[chunk]
    import jax
    import jax.numpy as jnp

    def chunks(h, labels):
        N, E = h.shape
        n = -(-N // chunk)
        h = jnp.pad(h, ((0, n * chunk - N), (0, 0)))
        labels = jnp.pad(labels, (0, n * chunk - N), constant_values=IGNORE)
        return h.reshape(n, chunk, E), labels.reshape(n, chunk)

    def one(hx, wt, lx, want_grad):
        logits = jnp.einsum("ce,ve->cv", hx, wt).astype(jnp.float32)  # [c, V]
        valid = lx != IGNORE
        tgt = jnp.where(valid, lx, 0)
        lse = jax.nn.logsumexp(logits, -1)
        picked = jnp.take_along_axis(logits, tgt[:, None], -1)[:, 0]
        loss = jnp.where(valid, lse - picked, 0.0)
        if not want_grad:
            return loss, None
        g = jnp.exp(logits - lse[:, None])
        g = g - jax.nn.one_hot(tgt, logits.shape[-1], dtype=g.dtype)
        g = jnp.where(valid[:, None], g, 0.0).astype(hx.dtype)  # d loss_sum / d logits
        return loss, g

    def token_losses(h, wt, labels):
        hc, lc = chunks(h, labels)
        losses = jax.lax.map(lambda xs: one(xs[0], wt, xs[1], False)[0], (hc, lc))
        return losses.reshape(-1)[: h.shape[0]]

    @jax.custom_vjp
    def ce(h, wt, labels):
        return token_losses(h, wt, labels).sum()

    def fwd(h, wt, labels):
        hc, lc = chunks(h, labels)
        V, E = wt.shape
        tile = -(-V // max(1, -(-V // chunk)))  # the vocab in tiles of about `chunk` columns

        def body(dwt, xs):
            hx, lx = xs
            loss, g = one(hx, wt, lx, True)
            dh = jnp.dot(g, wt)

            def add_tile(i, dwt):  # dw^T[tile i] += g[:, tile i]^T hx, in place: no second [V, E] buffer
                s = jnp.minimum(i * tile, V - tile)  # the last tile is shifted back; its overlap adds nothing
                gi = jax.lax.dynamic_slice_in_dim(g, s, tile, 1)
                new = jnp.dot(gi.T, hx, preferred_element_type=jnp.float32)
                new = jnp.where((jnp.arange(tile) + s >= i * tile)[:, None], new, 0)
                cur = jax.lax.dynamic_slice_in_dim(dwt, s, tile, 0)
                return jax.lax.dynamic_update_slice_in_dim(dwt, cur + new, s, 0)

            return jax.lax.fori_loop(0, -(-V // tile), add_tile, dwt), (loss.sum(), dh)

        dwt, (losses, dh) = jax.lax.scan(body, jnp.zeros((V, E), jnp.float32), (hc, lc))
        dh = dh.reshape(-1, h.shape[1])[: h.shape[0]]
        return losses.sum(), (dh, dwt.astype(wt.dtype), labels)

    def bwd(res, g):
        dh, dw, labels = res
        return (dh * g.astype(dh.dtype), dw * g.astype(dw.dtype), np.zeros(labels.shape, jax.dtypes.float0))

    ce.defvjp(fwd, bwd)
    ce.token_losses = token_losses
    _CE_JAX[chunk] = ce
    return ce


def cross_entropy_ref_torch(h, w, labels, ignore_index=IGNORE, chunk=None):
    """The torch twin of cross_entropy_ref_jax (an autograd.Function computing loss and gradients together)."""
    assert ignore_index == IGNORE
    return _CETorch.get().apply(h, w, labels, chunk or ce_chunk_size(w.shape[-1])), (labels != IGNORE).sum()


class _CETorch:
    fn = None

    @classmethod
    def get(cls):
        if cls.fn is None:
            import torch

            class CE(torch.autograd.Function):
                @staticmethod
                def forward(ctx, h, w, labels, chunk):
                    want = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
                    total = torch.zeros((), dtype=torch.float32, device=h.device)
                    dh = torch.empty_like(h) if want else None
                    # dw accumulates in place in w's memory layout: [V, E] for a tied head (w = embed.T), so the
                    # gradient reaches the embedding without a transposed copy
                    tied = not w.is_contiguous() and w.T.is_contiguous()
                    acc = torch.zeros(w.T.shape if tied else w.shape, dtype=torch.float32, device=w.device) \
                        if want else None
                    bufs = _ce_buffers(min(chunk, h.shape[0]), w.shape[1], h.dtype, h.device)
                    low = h.dtype != torch.float32
                    if want and low:  # a low-precision chunk's dw: one GEMM in h's dtype, added in fp32 by tiles
                        part = torch.empty(acc.shape, dtype=h.dtype, device=h.device)
                        scratch = torch.empty((min(4096, acc.shape[0]),) + acc.shape[1:], dtype=torch.float32,
                                              device=h.device)
                    for s in range(0, h.shape[0], chunk):
                        hx, lx = h[s:s + chunk], labels[s:s + chunk]
                        loss, g = _ce_chunk_torch(hx, w, lx, want, bufs)
                        total += loss.sum()
                        if not want:
                            continue
                        torch.mm(g, w.T, out=dh[s:s + chunk])
                        if not low:
                            acc.addmm_(g.T, hx) if tied else acc.addmm_(hx.T, g)
                            continue
                        torch.mm(g.T, hx, out=part) if tied else torch.mm(hx.T, g, out=part)
                        for r in range(0, acc.shape[0], scratch.shape[0]):
                            n = min(scratch.shape[0], acc.shape[0] - r)
                            scratch[:n].copy_(part[r:r + n])
                            acc[r:r + n].add_(scratch[:n])
                    if want:
                        acc = acc.to(w.dtype)
                        ctx.save_for_backward(dh, acc.T if tied else acc)
                    return total

                @staticmethod
                def backward(ctx, g):
                    dh, dw = ctx.saved_tensors  # used once: scaled in place, no second [V, E] buffer
                    return dh.mul_(g.to(dh.dtype)), dw.mul_(g.to(dw.dtype)), None, None

            cls.fn = CE
        return cls.fn


def _ce_buffers(chunk, vocab, dtype, device):
    """The [chunk, V] work buffers of the torch CE, allocated once per call and reused by every chunk (a fresh
    buffer per chunk costs its page faults each time): the logits in the compute dtype (also the gradient's
    buffer in low precision) and their float32 working copy (the same buffer in float32)."""
    import torch
    raw = torch.empty(chunk, vocab, dtype=dtype, device=device)
    return {"raw": raw, "f32": raw if dtype == torch.float32 else torch.empty(chunk, vocab, device=device)}


def _ce_chunk_torch(hx, w, lx, want_grad, bufs=None):
    """(losses [c], d loss_sum / d logits [c, V] in hx's dtype, or None) of one chunk. The float32 logits are
    worked on in one buffer, in place: shifted by the row max, exponentiated, summed, then scaled into the softmax;
    exp runs once, and the only dtype conversions are copies (fast), never mixed-dtype arithmetic (slow on CPU)."""
    import torch
    n = hx.shape[0]
    bufs = bufs or _ce_buffers(n, w.shape[1], hx.dtype, hx.device)
    raw, x = bufs["raw"][:n], bufs["f32"][:n]
    torch.mm(hx, w, out=raw)
    if x.data_ptr() != raw.data_ptr():
        x.copy_(raw)
    m = x.amax(-1, keepdim=True)
    x.sub_(m)
    valid = lx != IGNORE
    tgt = torch.where(valid, lx, 0).long()[:, None]
    picked = x.gather(-1, tgt)[:, 0]
    s = x.exp_().sum(-1)
    loss = torch.where(valid, s.log() - picked, 0.0)
    if not want_grad:
        return loss, None
    x.mul_((valid / s)[:, None])  # the softmax on counted rows, 0 on ignored ones
    x.scatter_add_(-1, tgt, -valid[:, None].to(x.dtype))
    if x.data_ptr() != raw.data_ptr():
        raw.copy_(x)
    return loss, raw


def token_losses(h, w, labels, chunk=None):
    """Per-token losses [N] (IGNORE tokens give 0), no gradient: for evaluation and tests."""
    chunk = chunk or ce_chunk_size(w.shape[-1])
    if _is_torch(h):
        import torch
        with torch.no_grad():
            return torch.cat([_ce_chunk_torch(h[s:s + chunk], w, labels[s:s + chunk], False)[0]
                              for s in range(0, h.shape[0], chunk)])
    return _ce_jax(chunk).token_losses(h, w.T, labels)


def _is_torch(x):
    return type(x).__module__.startswith("torch")


# ----------------------------------------------------------------------------------------------- vocab-parallel CE
def cross_entropy_tp(h, w, labels, ignore_index=IGNORE, chunk=None):
    """cross_entropy_ref_torch for a torch mesh with tensor parallelism: the head `w` is a DTensor whose vocabulary
    columns are split over tp, and each tp rank computes the logits of its columns only (the whole [tokens, vocab]
    logits exist nowhere). Per chunk, the row max and then the sum of exps and the target logit are all-reduced over
    tp; the gradient of h (partial per vocabulary block) is all-reduced once. Returns plain tensors."""
    from torch.distributed.tensor import DTensor, Replicate
    if isinstance(h, DTensor):
        h = h.redistribute(placements=[Replicate()] * h.device_mesh.ndim).to_local()
    if not isinstance(w, DTensor) or not w.placements[0].is_shard():
        w = w.full_tensor() if isinstance(w, DTensor) else w
        return cross_entropy_ref_torch(h, w, labels, chunk=chunk)
    assert ignore_index == IGNORE and w.device_mesh.ndim == 1 and w.placements[0].dim == 1
    local = w.to_local()
    start = w.device_mesh.get_local_rank() * local.shape[1]
    loss = _CETp.get().apply(h, local, labels, chunk or ce_chunk_size(w.shape[1]), start, w.device_mesh.get_group())
    return loss, (labels != IGNORE).sum()


def _token_losses_tp(h, w, labels):
    """token_losses for cross_entropy_tp's layout (no gradient)."""
    import torch
    from torch.distributed.tensor import DTensor, Replicate
    if not isinstance(w, DTensor) or not w.placements[0].is_shard():
        return token_losses(_plain(h), _plain(w), labels)
    if isinstance(h, DTensor):
        h = h.redistribute(placements=[Replicate()] * h.device_mesh.ndim).to_local()
    local, chunk = w.to_local(), ce_chunk_size(w.shape[1])
    start, group = w.device_mesh.get_local_rank() * local.shape[1], w.device_mesh.get_group()
    with torch.no_grad():
        return torch.cat([_ce_chunk_tp(h[s:s + chunk], local, labels[s:s + chunk], start, group, False)[0]
                          for s in range(0, h.shape[0], chunk)])


class _CETp:
    fn = None

    @classmethod
    def get(cls):
        if cls.fn is None:
            import torch
            import torch.distributed as dist

            class CE(torch.autograd.Function):
                @staticmethod
                def forward(ctx, h, w, labels, chunk, start, group):
                    want = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
                    total = torch.zeros((), dtype=torch.float32, device=h.device)
                    dh = torch.empty_like(h) if want else None
                    dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if want else None
                    for s in range(0, h.shape[0], chunk):
                        hx, lx = h[s:s + chunk], labels[s:s + chunk]
                        loss, g = _ce_chunk_tp(hx, w, lx, start, group, want)
                        total += loss.sum()
                        if want:
                            dh[s:s + chunk] = g @ w.T
                            dw += (hx.T @ g).float()
                    if want:
                        dist.all_reduce(dh, group=group)  # each vocabulary block's share of d loss / d h
                        ctx.save_for_backward(dh, dw.to(w.dtype))
                    return total

                @staticmethod
                def backward(ctx, g):
                    dh, dw = ctx.saved_tensors
                    return dh * g.to(dh.dtype), dw * g.to(dw.dtype), None, None, None, None

            cls.fn = CE
        return cls.fn


def _ce_chunk_tp(hx, w, lx, start, group, want_grad):
    """_ce_chunk_torch over this rank's vocabulary columns [start, start + w.shape[1])."""
    import torch
    import torch.distributed as dist
    logits = (hx @ w).float()
    valid = lx != IGNORE
    mine = valid & (lx >= start) & (lx < start + w.shape[1])
    tgt = torch.where(mine, lx - start, 0).long()
    m = logits.max(-1).values
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    both = torch.stack([torch.exp(logits - m[:, None]).sum(-1),
                        torch.where(mine, logits.gather(-1, tgt[:, None])[:, 0], 0.0)])
    dist.all_reduce(both, group=group)
    lse = m + torch.log(both[0])
    loss = torch.where(valid, lse - both[1], 0.0)
    if not want_grad:
        return loss, None
    g = torch.exp_(logits.sub_(lse[:, None]))
    g.scatter_add_(-1, tgt[:, None], -mine[:, None].to(g.dtype))
    g.mul_(valid[:, None])
    return loss, g.to(hx.dtype)


# ----------------------------------------------------------------------------------------------- data
def pack(docs, seq_len):
    """Packs documents into rows of seq_len tokens. docs: list of (ids, target_mask) where target_mask[j] says
    whether token j may be predicted (SFT: assistant tokens only). A document that does not fit continues in
    the next row as a new segment. Returns int32 arrays [R, T]: tokens, labels (next token of the same segment,
    else IGNORE), segment_ids (1, 2, ... within a row; 0 = padding) and positions (restarting at each segment)."""
    ids = np.concatenate([np.asarray(d, np.int64) for d, _ in docs]) if docs else np.zeros(0, np.int64)
    tmask = np.concatenate([np.asarray(m, bool) for _, m in docs]) if docs else np.zeros(0, bool)
    doc = np.concatenate([np.full(len(d), i, np.int64) for i, (d, _) in enumerate(docs)]) if docs else ids
    R = max(1, -(-len(ids) // seq_len))
    pad = R * seq_len - len(ids)
    ids = np.pad(ids, (0, pad)).reshape(R, seq_len)
    tmask = np.pad(tmask, (0, pad)).reshape(R, seq_len)
    doc = np.pad(doc, (0, pad), constant_values=-1).reshape(R, seq_len)
    start = np.ones_like(doc, bool)
    start[:, 1:] = doc[:, 1:] != doc[:, :-1]
    seg = np.where(doc >= 0, np.cumsum(start, 1), 0)
    idx = np.broadcast_to(np.arange(seq_len), doc.shape)
    first = np.maximum.accumulate(np.where(start, idx, 0), axis=1)
    labels = np.full_like(ids, IGNORE)
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0) & tmask[:, 1:]
    labels[:, :-1] = np.where(same, ids[:, 1:], IGNORE)
    return {"tokens": ids.astype(np.int32), "labels": labels.astype(np.int32),
            "segment_ids": seg.astype(np.int32), "positions": (idx - first).astype(np.int32)}


def synthetic_rows(seed, start, n, seq_len, vocab):
    """Rows of a fixed random Markov chain (the same for every seed): each token is followed by its successor in
    a fixed permutation of a small alphabet with probability 0.9, else by a random symbol. Learnable in a few
    dozen steps; row i depends only on (seed, i)."""
    A = min(vocab, 128)
    succ = np.random.default_rng(1234).permutation(A)
    out = np.empty((n, seq_len), np.int64)
    for r in range(n):
        rng = np.random.default_rng([seed, start + r])
        x = np.empty(seq_len, np.int64)
        x[0] = rng.integers(A)
        noise, rand = rng.random(seq_len) < 0.1, rng.integers(A, size=seq_len)
        for t in range(1, seq_len):
            x[t] = rand[t] if noise[t] else succ[x[t - 1]]
        out[r] = x
    return pack([(row, np.ones(seq_len, bool)) for row in out], seq_len)


def load_tokenizer(path):
    from tokenizers import Tokenizer
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.exists(path):
        raise convert.UserError(f"{path}: no tokenizer.json (pass --tokenizer FILE)")
    return Tokenizer.from_file(path)


def chatml(messages, tok):
    """ChatML ids and target mask for one conversation: the loss covers the assistant's content and its
    <|im_end|>, never the role headers or other turns."""
    ids, mask = [], []
    for m in messages:
        head = tok.encode(f"<|im_start|>{m['role']}\n", add_special_tokens=False).ids
        body = tok.encode(f"{m['content']}<|im_end|>", add_special_tokens=False).ids
        tail = tok.encode("\n", add_special_tokens=False).ids
        ids += head + body + tail
        mask += [False] * len(head) + [m["role"] == "assistant"] * len(body) + [False] * len(tail)
    return ids, mask


def load_docs(path, tokenizer_path):
    """Documents [(ids, target_mask)] from .txt (blank-line separated), .jsonl ({"text"} or {"messages"}),
    .npy (1-D stream split at <|endoftext|>, or 2-D rows) or .bin (uint32 stream)."""
    if not os.path.exists(path):
        raise convert.UserError(f"{path}: no such data file")
    ext = os.path.splitext(path)[1]
    if ext in (".npy", ".bin"):
        try:
            a = np.load(path) if ext == ".npy" else np.fromfile(path, np.uint32)
        except ValueError as e:
            raise convert.UserError(f"{path}: not a token file ({e})") from None
        if a.ndim == 2:
            return [(r.astype(np.int64), np.ones(len(r), bool)) for r in a]
        cuts = np.nonzero(a == ENDOFTEXT)[0] + 1
        return [(d.astype(np.int64), np.ones(len(d), bool)) for d in np.split(a, cuts) if len(d)]
    if ext not in (".txt", ".jsonl"):
        raise convert.UserError(f"{path}: unknown data format (synthetic, .txt, .jsonl, .npy or .bin)")
    if tokenizer_path is None:
        raise convert.UserError(f"{path}: text data needs a tokenizer (--tokenizer, or --init-from a folder with one)")
    tok = load_tokenizer(tokenizer_path)
    eot = tok.token_to_id("<|endoftext|>")
    docs = []
    with open(path, encoding="utf-8") as f:
        if ext == ".txt":
            records = [{"text": t} for t in f.read().split("\n\n") if t.strip()]
        else:
            records = []
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError:
                        raise convert.UserError(f"{path}:{n}: not valid JSON") from None
    for n, r in enumerate(records, 1):
        if "messages" in r:
            ids, mask = chatml(r["messages"], tok)
        elif "text" in r:
            ids = tok.encode(r["text"], add_special_tokens=False).ids + ([eot] if eot is not None else [])
            mask = [True] * len(ids)
        else:
            raise convert.UserError(f"{path}: record {n} has neither 'text' nor 'messages'")
        docs.append((ids, mask))
    return docs


ENDOFTEXT = 151643


class Loader:
    """Global batches [accum, batch, T] in an order fixed by the seed. State: (epoch, index) into the
    per-epoch permutation of the packed training rows (synthetic data: the row counter)."""

    def __init__(self, data, seq_len, batch, accum, seed, vocab, tokenizer=None, eval_rows=0):
        self.seq_len, self.batch, self.accum, self.seed, self.vocab = seq_len, batch, accum, seed, vocab
        self.epoch, self.index = 0, 0
        self.synthetic = data == "synthetic"
        self.eval = None
        if self.synthetic:
            if eval_rows:
                self.eval = synthetic_rows(seed + 7919, 0, eval_rows, seq_len, vocab)
            return
        rows = pack(load_docs(data, tokenizer), seq_len)
        R = len(rows["tokens"])
        big = int(max(rows["tokens"].max(initial=0), rows["labels"].max(initial=0)))
        if big >= vocab:
            raise convert.UserError(f"{data}: token id {big} is outside the model's vocabulary ({vocab})")
        n_eval = min(max(1, R // 20), R - 1) if eval_rows and R > 1 else 0
        self.rows = {k: v[: R - n_eval] for k, v in rows.items()}
        if n_eval:  # padded with empty rows (segment 0, no targets) to whole batches
            pad = -n_eval % batch
            self.eval = {k: np.pad(v[R - n_eval:], ((0, pad), (0, 0)), constant_values=IGNORE if k == "labels" else 0)
                         for k, v in rows.items()}

    def state(self):
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, s):
        self.epoch, self.index = int(s["epoch"]), int(s["index"])

    def next(self):
        n = self.accum * self.batch
        if self.synthetic:
            out = synthetic_rows(self.seed, self.index, n, self.seq_len, self.vocab)
            self.index += n
        else:
            R = len(self.rows["tokens"])
            take = []
            while len(take) < n:
                perm = np.random.default_rng([self.seed, self.epoch]).permutation(R)
                k = min(n - len(take), R - self.index)
                take += list(perm[self.index:self.index + k])
                self.index += k
                if self.index == R:
                    self.epoch, self.index = self.epoch + 1, 0
            out = {k: v[np.array(take)] for k, v in self.rows.items()}
        return {k: v.reshape(self.accum, self.batch, self.seq_len) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------- args
@dataclass
class Args:
    model: str = None
    size: str = None
    backend: str = "jax"
    steps: int = 30
    batch_size: int = 8
    global_batch_size: int = None
    seq_len: int = 128
    data: str = "synthetic"
    tokenizer: str = None
    init_from: str = None
    mesh: str = None
    ckpt_dir: str = None
    save_every: int = 0
    keep: int = 3
    resume: bool = False
    metrics: str = None
    dtype: str = "float32"
    seed: int = 0
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    remat: str = "none"
    kernels: str = "auto"
    moe_balance: str = "aux"
    bias_update_rate: float = 1e-3
    eval_every: int = 0
    eval_batches: int = 2
    compile: bool = False
    log_every: int = 1
    quiet: bool = False

    @property
    def accum(self):
        g = self.global_batch_size or self.batch_size
        if g % self.batch_size:
            raise convert.UserError(f"--global-batch-size {g} is not a multiple of --batch-size {self.batch_size}")
        return g // self.batch_size

    @property
    def warmup_steps(self):
        return self.warmup if self.warmup is not None else max(1, min(100, self.steps // 10))


def build_model(a):
    """(model module, cfg, numpy-or-backend params or None) from --init-from or --model/--size."""
    if a.init_from:
        model, cfg, params = convert.load_checkpoint(a.init_from, a.backend, "float32")
        if a.model and a.model != model.MODEL_TYPE:
            raise convert.UserError(f"{a.init_from}: is a {model.MODEL_TYPE} checkpoint, not {a.model}")
        return model, cfg, params
    if not a.model:
        raise convert.UserError("--model is required (or --init-from a checkpoint)")
    model = convert.model_module(a.model, "--model: ")
    size = a.size or DEFAULT_SIZES.get(a.model)
    if size not in model.SIZES:
        raise convert.UserError(f"--size {size!r} unknown for {a.model} (known: {', '.join(model.SIZES)})")
    return model, model.SIZES[size], None


def load_kernels(mode, backend, dtype):
    """The `kernels` dict: kernels_tpu.select (JAX) or kernels_gpu.select (torch) for --kernels auto (what applies
    to this platform and dtype; on a CPU usually nothing) or a comma list of names; ref: {} (the references)."""
    if mode == "ref":
        return {}
    try:
        mod = __import__("kernels_tpu" if backend == "jax" else "kernels_gpu")
    except ImportError as e:
        if mode == "auto":
            return {}
        raise convert.UserError(f"--kernels {mode}: the kernels module is unavailable ({e})") from None
    try:
        return dict(mod.select(mode, dtype=dtype))
    except ValueError as e:
        raise convert.UserError(f"--kernels {mode}: {e}") from None


# ----------------------------------------------------------------------------------------------- JAX trainer
class JaxTrainer:
    """Params, AdamW state (optax) and router bias as JAX arrays; one jitted step with donated state that scans
    over the micro-batches of a global batch."""

    def __init__(self, model, cfg, params, a, kernels):
        import jax
        import jax.numpy as jnp
        import optax
        self.jax, self.jnp, self.optax = jax, jnp, optax
        self.model, self.cfg, self.a, self.kernels = model, cfg, a, kernels
        if params is None:
            params = model.init(cfg, backend="jax", seed=a.seed, dtype="float32")
        self.params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
        table = model.param_table(cfg)
        mask = model.unflatten({k: decays(p) for k, p in table.items()})
        sched = lambda n: lr_at(n, a.lr, a.warmup_steps, a.steps, a.min_lr_ratio)  # noqa: E731
        self.tx = optax.chain(optax.clip_by_global_norm(a.grad_clip),
                              optax.adamw(sched, a.beta1, a.beta2, a.eps, weight_decay=a.weight_decay, mask=mask))
        self.opt_state = self.tx.init(self.params)
        self.extra = _init_extra(model, cfg, a, "jax")
        self._step = jax.jit(self._train_step, donate_argnums=(0, 1, 2))
        self._eval = jax.jit(self._eval_step)

    def loss_fn(self, params, extra, mb, n_tokens):
        """(loss, (ce_sum, aux metrics, expert counts)) for one micro-batch; loss is this micro-batch's share
        of the global batch's mean, so summing the gradients of all micro-batches gives the global gradient."""
        p = self.jax.tree.map(lambda x: x.astype(self.a.dtype), params)
        return _loss(self.model, self.cfg, self.a, self.kernels, p, extra, mb, n_tokens,
                     ce=self.kernels.get("cross_entropy", cross_entropy_ref_jax),
                     remat_all=self.jax.checkpoint if self.a.remat == "full" else None)

    def _train_step(self, params, opt_state, extra, batch):
        jax, jnp, optax = self.jax, self.jnp, self.optax
        n_tokens = jnp.maximum((batch["labels"] != IGNORE).sum(), 1)
        n_mtp = jnp.maximum((batch["labels"][..., 1:] != IGNORE).sum(), 1)
        grad_fn = jax.value_and_grad(self.loss_fn, has_aux=True)

        def micro(g_acc, mb):
            (loss, (metrics, counts)), g = grad_fn(params, extra, mb, (n_tokens, n_mtp))
            return jax.tree.map(jnp.add, g_acc, g), (loss, metrics, counts)

        if self.a.accum == 1:  # no accumulator: one gradient tree fewer in memory
            (loss, (metrics, counts)), grads = grad_fn(params, extra, {k: v[0] for k, v in batch.items()},
                                                       (n_tokens, n_mtp))
            losses, metrics, counts = loss[None], jax.tree.map(lambda x: x[None], metrics), jnp.asarray(counts)[None]
        else:
            zeros = jax.tree.map(jnp.zeros_like, params)
            grads, (losses, metrics, counts) = jax.lax.scan(micro, zeros, batch)
        gnorm = optax.global_norm(grads)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {k: v.sum() if k in ("ce", "mtp_loss") else v.mean() for k, v in metrics.items()}
        metrics["loss"], metrics["grad_norm"] = losses.sum(), gnorm
        if "router_bias" in extra:
            extra = {**extra, "router_bias": self.model.update_router_bias(extra["router_bias"], counts.sum(0),
                                                                            self.a.bias_update_rate)}
        return params, opt_state, extra, metrics

    def _eval_step(self, params, extra, batch):
        p = self.jax.tree.map(lambda x: x.astype(self.a.dtype), params)
        return _eval_sums(self.model, self.cfg, self.a, self.kernels, p, extra, batch)

    def shard(self, mesh):
        """Lays params, optimizer state and batches out on a shard.py mesh; jit propagates the rest."""
        import shard
        from jax.sharding import NamedSharding, PartitionSpec
        self.params = shard.shard_params(self.params, self.model, self.cfg, mesh)
        self.opt_state = shard.jit_init(self.tx.init, self.params, model=self.model, cfg=self.cfg, mesh=mesh)
        self.batch_sharding = NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp", "ep"), None))
        self.kernels = {**self.kernels, **shard.mesh_kernels(mesh, self.model, self.cfg)}  # read when _step traces

    batch_sharding = None

    def step(self, batch):
        batch = {k: self.jax.device_put(v, self.batch_sharding) if self.batch_sharding else self.jnp.asarray(v)
                 for k, v in batch.items()}
        self.params, self.opt_state, self.extra, m = self._step(self.params, self.opt_state, self.extra, batch)
        return {k: float(v) for k, v in m.items()}

    def loss_and_grads(self, mb):
        """(loss, metrics, {name: numpy gradient}) of one micro-batch [B, T] against its own token count."""
        jax, jnp = self.jax, self.jnp
        mb = {k: jnp.asarray(v) for k, v in mb.items()}
        n = (jnp.maximum((mb["labels"] != IGNORE).sum(), 1), jnp.maximum((mb["labels"][:, 1:] != IGNORE).sum(), 1))
        (loss, (metrics, _)), g = jax.value_and_grad(self.loss_fn, has_aux=True)(self.params, self.extra, mb, n)
        return float(loss), {k: float(v) for k, v in metrics.items()}, {k: np.asarray(v) for k, v in _flatten(g).items()}

    def evaluate(self, batch):
        s, n = self._eval(self.params, self.extra, {k: self.jnp.asarray(v) for k, v in batch.items()})
        return float(s), float(n)

    # checkpoint pieces: the optimizer state and router bias through orbax, beside the params
    def save_state(self, folder):
        import orbax.checkpoint as ocp
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.abspath(os.path.join(folder, "optimizer")), {"opt": self.opt_state, "extra": self.extra})
        ckptr.wait_until_finished()

    def load_state(self, folder, params):
        import orbax.checkpoint as ocp
        self.params = self.jax.tree.map(lambda x: self.jnp.asarray(x, self.jnp.float32), params)
        target = {"opt": self.opt_state, "extra": self.extra}
        abstract = self.jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        got = ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(folder, "optimizer")), abstract)
        self.opt_state = self.jax.tree.unflatten(self.jax.tree.structure(self.opt_state),
                                                  self.jax.tree.leaves(got["opt"]))
        self.extra = got["extra"]


def _init_extra(model, cfg, a, backend):
    """Training state that is not a param: the aux-loss-free router bias [n_sparse, num_experts]."""
    if a.moe_balance == "bias":
        if not hasattr(model, "update_router_bias"):
            raise convert.UserError(f"--moe-balance bias: {model.MODEL_TYPE} has no router bias (use aux)")
        return {"router_bias": model.init_router_bias(cfg, backend=backend)}
    return {}


def _forward_kw(model, a, kernels, extra, mb):
    kw = {"positions": mb["positions"], "segment_ids": mb["segment_ids"], "kernels": kernels,
          "remat": a.remat != "none"}
    if "router_bias" in extra:
        kw["router_bias"] = extra["router_bias"]
    return kw


def _loss(model, cfg, a, kernels, p, extra, mb, n, ce, remat_all=None, shards=1, aux_sum=None):
    """The training loss of one micro-batch: summed CE / global token count, + aux-loss coef * router aux loss
    (averaged over micro-batches by the caller's sum / accum, and over `shards` batch shards when each process
    holds a shard of the micro-batch), + MTP_WEIGHT * MTP CE when the model has MTP. aux_sum: a differentiable
    sum over the processes, which makes the aux loss that of the whole micro-batch (its routing statistics added
    over batch shards before the product, as on one device)."""
    n_tokens, n_mtp = n

    def body(p, mb):
        h, _, aux = model.forward_hidden(p, mb["tokens"], cfg, **_forward_kw(model, a, kernels, extra, mb))
        B, T, E = h.shape
        w = model.lm_head(p, cfg)
        ce_sum, _ = ce(h.reshape(B * T, E), w, mb["labels"].reshape(B * T))
        loss = ce_sum / n_tokens
        metrics = {"ce": loss}
        if a.moe_balance == "aux" and "router_aux_loss" in aux:
            coef = getattr(cfg, "router_aux_loss_coef", 0.001)
            r = aux["router_aux_loss"]
            if aux_sum is not None and "router_stats" in aux:  # f_e and P_e over the whole micro-batch
                st = aux_sum(aux["router_stats"])
                r = cfg.num_experts * (st[:-1].reshape(2, -1).prod(0)).sum() / st[-1] ** 2
            loss = loss + coef * r / (a.accum * shards)
            metrics["router_aux_loss"] = r
        if hasattr(model, "mtp_forward") and "mtp" in p:
            # slot t of the MTP head sees the hidden state at t and the embedding of token t+1, and predicts t+2
            hm, wm = _mtp_hidden(model, p, h[:, :-1], mb["tokens"][:, 1:], cfg, kernels,
                                 mb["positions"][:, :-1], mb["segment_ids"][:, :-1])
            lm = mtp_labels(mb["labels"][:, 1:], mb["labels"][:, :-1])
            mtp, _ = ce(hm.reshape(B * (T - 1), -1), wm, lm.reshape(B * (T - 1)))
            loss = loss + MTP_WEIGHT * mtp / n_mtp
            metrics["mtp_loss"] = mtp / n_mtp
        counts = aux.get("expert_counts")
        counts = 0.0 if counts is None else counts
        return loss, (metrics, counts)

    if remat_all is not None:
        body = remat_all(body)
    return body(p, mb)


def _mtp_hidden(model, p, h, next_tokens, cfg, kernels, positions, segment_ids):
    """(MTP hidden [B, T-1, E], lm_head [E, V]). mtp_forward returns logits; to keep the chunked loss, it runs with
    an identity lm_head (exact: one 1.0 per column) and the real head goes to the chunked CE. Tied models (none
    released with MTP) take the logits and an identity head instead."""
    kw = {"positions": positions, "segment_ids": segment_ids, "kernels": kernels}
    w = model.lm_head(p, cfg)
    if cfg.tie_word_embeddings:
        logits = model.mtp_forward(p, h, next_tokens, cfg, **kw)
        return logits, _eye(logits, logits.shape[-1])
    eye = _eye(w, w.shape[0])
    return model.mtp_forward({**p, "lm_head": eye}, h, next_tokens, cfg, **kw), w


def _eye(like, n):
    if _is_torch(like):
        import torch
        return torch.eye(n, dtype=like.dtype, device=like.device)
    import jax.numpy as jnp
    return jnp.eye(n, dtype=like.dtype)


def mtp_labels(later, earlier):
    """MTP labels: the token two ahead counts only where the next token is a target of the same document too."""
    if _is_torch(later):
        import torch
        return torch.where(earlier != IGNORE, later, torch.full_like(later, IGNORE))
    import jax.numpy as jnp
    return jnp.where(earlier != IGNORE, later, IGNORE)


def _eval_sums(model, cfg, a, kernels, p, extra, batch, losses=None):
    """(summed CE, target count) over a [n, B, T] batch, no gradients. losses: token_losses or a replacement."""
    losses = losses or token_losses
    total, count = 0.0, 0
    for i in range(batch["tokens"].shape[0]):
        mb = {k: v[i] for k, v in batch.items()}
        h, _, _ = model.forward_hidden(p, mb["tokens"], cfg, **{**_forward_kw(model, a, kernels, extra, mb),
                                                                 "remat": False})
        B, T, E = h.shape
        labels = mb["labels"].reshape(B * T)
        total = total + losses(h.reshape(B * T, E), model.lm_head(p, cfg), labels).sum()
        count = count + (labels != IGNORE).sum()
    return total, count


# ----------------------------------------------------------------------------------------------- torch trainer
class TorchTrainer:
    """Params as leaf tensors with requires_grad; .backward() per micro-batch accumulates the global gradient;
    torch.optim.AdamW with a no-decay group; clipping by the global norm (computed as optax does)."""
    _direct = False  # see __init__; the mesh trainer keeps autograd's lookup gradient

    def __init__(self, model, cfg, params, a, kernels):
        import torch
        self.torch = torch
        self.model, self.cfg, self.a, self.kernels = model, cfg, a, kernels
        if params is None:
            params = model.init(cfg, backend="torch", seed=a.seed, dtype="float32")
        flat = _flatten(params)
        self.flat = {k: v.detach().to(torch.float32).clone().requires_grad_(True) for k, v in flat.items()}
        self.params = model.unflatten(self.flat)
        table = model.param_table(cfg)
        groups = [{"params": [v for k, v in self.flat.items() if decays(table[k])], "weight_decay": a.weight_decay},
                  {"params": [v for k, v in self.flat.items() if not decays(table[k])], "weight_decay": 0.0}]
        # fused: one kernel per tensor, no temporaries the size of the model (foreach makes several)
        self.opt = torch.optim.AdamW(groups, lr=a.lr, betas=(a.beta1, a.beta2), eps=a.eps, fused=True)
        self.extra = _init_extra(model, cfg, a, "torch")
        self.n_updates = 0
        # the tied table's lookup gradient added in place onto the head's (see _DirectLookup): float32 only (there
        # the head's gradient reaches the table through views alone), and not with MTP (a second use of the table)
        self._direct, self._flight = False, []
        if (getattr(cfg, "tie_word_embeddings", False) and not a.compile and a.dtype == "float32"
                and not any(k.startswith("mtp") for k in self.flat)):
            lookup, leaf, flight = _DirectLookup.get(), self.flat["embed"], self._flight
            anchor = torch.empty(0, requires_grad=True)  # what puts the lookup in the graph
            self.kernels = {**kernels, "embed": lambda t, ids: lookup.apply(t.detach(), ids, leaf, anchor, flight)
                            if self._direct else t[ids]}
        self._loss = self.loss_fn
        if a.compile:
            self._loss = torch.compile(self.loss_fn)

    def loss_fn(self, params, extra, mb, n, shards=1, aux_sum=None):
        dt = getattr(self.torch, self.a.dtype)
        p = {k: v.to(dt) for k, v in _flatten(params).items()}
        remat_all = None
        if self.a.remat == "full":
            import torch.utils.checkpoint as ckpt
            remat_all = lambda f: (lambda *x: ckpt.checkpoint(f, *x, use_reentrant=False))  # noqa: E731
        ce = self.kernels.get("cross_entropy", cross_entropy_ref_torch)
        if self._direct and "embed" in self.kernels:
            ce = _catching_head_grad(ce, self._flight)
        return _loss(self.model, self.cfg, self.a, self.kernels, self.model.unflatten(p), extra, mb, n,
                     ce=ce, remat_all=remat_all, shards=shards, aux_sum=aux_sum)

    def backward(self, batch):
        """Accumulates the global batch's gradient ([accum, B, T] arrays) into the params' .grad; returns (loss,
        metric sums, expert counts)."""
        torch = self.torch
        batch = {k: torch.as_tensor(v).long() for k, v in batch.items()}
        n = ((batch["labels"] != IGNORE).sum().clamp(min=1), (batch["labels"][..., 1:] != IGNORE).sum().clamp(min=1))
        total, sums, counts = 0.0, {}, 0
        self._direct = True
        try:
            for i in range(self.a.accum):
                mb = {k: v[i] for k, v in batch.items()}
                loss, (metrics, c) = self._loss(self.params, self.extra, mb, n)
                loss.backward()
                total += loss.detach()
                counts = counts + (c.detach() if torch.is_tensor(c) else c)
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v.detach()
        finally:
            self._direct = False
        return total, sums, counts

    def step(self, batch):
        torch = self.torch
        total, sums, counts = self.backward(batch)
        with torch.no_grad():
            grads = [v.grad for v in self.flat.values() if v.grad is not None]
            gnorm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            if gnorm > self.a.grad_clip:
                torch._foreach_mul_(grads, self.a.grad_clip / gnorm)
            lr = float(lr_at(self.n_updates, self.a.lr, self.a.warmup_steps, self.a.steps, self.a.min_lr_ratio))
            for g in self.opt.param_groups:
                g["lr"] = lr
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            if "router_bias" in self.extra:
                self.extra["router_bias"] = self.model.update_router_bias(self.extra["router_bias"], counts,
                                                                          self.a.bias_update_rate)
        self.n_updates += 1
        out = {k: float(v) / (1 if k in ("ce", "mtp_loss") else self.a.accum) for k, v in sums.items()}
        out["loss"], out["grad_norm"] = float(total), float(gnorm)
        return out

    def loss_and_grads(self, mb):
        torch = self.torch
        mb = {k: torch.as_tensor(v).long() for k, v in mb.items()}
        n = ((mb["labels"] != IGNORE).sum().clamp(min=1), (mb["labels"][:, 1:] != IGNORE).sum().clamp(min=1))
        loss, (metrics, _) = self.loss_fn(self.params, self.extra, mb, n)
        grads = torch.autograd.grad(loss, list(self.flat.values()))
        return (float(loss), {k: float(v.detach()) for k, v in metrics.items()},
                {k: g.numpy() for k, g in zip(self.flat, grads)})

    def evaluate(self, batch):
        torch = self.torch
        with torch.no_grad():
            dt = getattr(torch, self.a.dtype)
            p = self.model.unflatten({k: v.to(dt) for k, v in self.flat.items()})
            s, n = _eval_sums(self.model, self.cfg, self.a, self.kernels, p, self.extra,
                              {k: torch.as_tensor(v).long() for k, v in batch.items()})
        return float(s), float(n)

    def _opt_template(self):
        """The optimizer's state_dict with every tensor allocated, as DCP loads in place."""
        torch = self.torch
        sd = self.opt.state_dict()
        params = [v for g in self.opt.param_groups for v in g["params"]]  # state_dict numbers them in this order
        for i, v in enumerate(params):
            sd["state"].setdefault(i, {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(v),
                                       "exp_avg_sq": torch.zeros_like(v)})
        return sd

    def save_state(self, folder):
        import torch.distributed.checkpoint as dcp
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save({"optimizer": self.opt.state_dict(), "extra": self.extra},
                     checkpoint_id=os.path.join(folder, "optimizer"), no_dist=True)

    def load_state(self, folder, params):
        import torch.distributed.checkpoint as dcp
        import warnings
        torch = self.torch
        with torch.no_grad():
            for k, v in _flatten(params).items():
                self.flat[k].copy_(v)
        sd = {"optimizer": self._opt_template(), "extra": self.extra}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(sd, checkpoint_id=os.path.join(folder, "optimizer"), no_dist=True)
        self.opt.load_state_dict(sd["optimizer"])
        self.extra = sd["extra"]


class _DirectLookup:
    """The embedding lookup of a tied float32 table whose gradient bypasses autograd: its backward adds the rows of
    d h in place (index_add_) into the head's [V, E] gradient, so the table has one gradient buffer; autograd's
    own lookup gradient would be a second dense [V, E] buffer summed into the first (311 MB at Qwen3's
    vocabulary, E = 512). The head's gradient is caught on its way (a hook on the head, _catching_head_grad): it
    reaches the table through views only (embed.T), so that tensor's storage is what becomes the table's .grad.
    Where .grad already exists (a later micro-batch, or autograd accumulated first) the rows go there; with
    neither, into fresh zeros. The table comes in detached (an edge to it would hold its AccumulateGrad back until
    this backward ran); an empty anchor tensor that requires grad is what puts this function in the graph."""
    fn = None

    @classmethod
    def get(cls):
        if cls.fn is None:
            import torch

            class Lookup(torch.autograd.Function):
                @staticmethod
                def forward(ctx, table, ids, leaf, anchor, flight):
                    ctx.save_for_backward(ids)
                    ctx.leaf, ctx.flight = leaf, flight
                    return table[ids]

                @staticmethod
                def backward(ctx, g):
                    ids, = ctx.saved_tensors
                    leaf, flight = ctx.leaf, ctx.flight
                    if leaf.grad is not None:
                        target = leaf.grad
                    elif len(flight) == 1:
                        target = flight[0].T  # the head's gradient [E, V], not yet in .grad
                    else:
                        leaf.grad = target = torch.zeros_like(leaf)
                    flight.clear()  # drop the reference, so that autograd moves the buffer into .grad uncopied
                    target.index_add_(0, ids.reshape(-1), g.reshape(-1, g.shape[-1]).to(target.dtype))
                    return None, None, None, None, None

            cls.fn = Lookup
        return cls.fn


def _catching_head_grad(ce, flight):
    """ce, with a hook that appends the head's gradient to `flight` as autograd computes it."""
    def caught(h, w, labels):
        if w.requires_grad:
            w.register_hook(flight.append)  # returns None: the gradient passes on unchanged
        return ce(h, w, labels)
    return caught


def _all_sum_grad(t):
    """Sum over the batch shards, differentiable (its backward sums the gradients likewise). Under tp the statistics
    are a DTensor replicated over tp: the ranks of a tp group hold the same rows, so the sum over all processes
    counts them tp times and is divided by tp. The result is a plain tensor (the same on every rank), so the loss
    it enters stays plain and the CE's backward gets a plain gradient."""
    import torch.distributed.nn.functional as dist_fn
    if not hasattr(t, "to_local"):
        return dist_fn.all_reduce(t)
    from torch.distributed.tensor import Replicate
    mesh, n = t.device_mesh, t.device_mesh.size()
    return dist_fn.all_reduce(t.redistribute(mesh, [Replicate()] * mesh.ndim).to_local()) / n


class TorchMeshTrainer(TorchTrainer):
    """The torch trainer on a shard.py DeviceMesh, one process per device under torchrun. Params and AdamW state are
    DTensors laid out by shard.RULES (each rank stores its shards; the optimizer updates them locally). Every rank
    builds the same global batch and takes its rows (shard.local_batch); the step computes with
    shard.compute_params (the batch axes all-gathered one layer at a time, in the forward and again in the backward,
    gradients reduce-scattered back onto the shards, tp through DTensor), and each rank's loss is its rows' summed CE over the global batch's token count, so the gradients
    add up to the one-process ones. The router aux loss is that of the whole micro-batch: its routing statistics are
    summed over the processes (differentiably) before the product, as on one device. MoE layers on ep > 1 keep
    each rank's experts and send tokens to them by all-to-all (shard.moe_dispatch)."""

    def __init__(self, model, cfg, params, a, kernels, mesh):
        import torch

        import shard
        self.torch, self.shard, self.mesh = torch, shard, mesh
        self.model, self.cfg, self.a, self.kernels = model, cfg, a, kernels
        if a.compile:
            raise convert.UserError("--compile: not supported with a multi-process torch mesh yet")
        try:
            if params is None:
                params = shard.init_params_torch(model, cfg, mesh, seed=a.seed)
            else:  # --init-from: every rank read the whole checkpoint; keep this rank's blocks
                params = shard.distribute_params({k: v.to(torch.float32) for k, v in _flatten(params).items()},
                                                 model, cfg, mesh)
        except ValueError as e:
            raise convert.UserError(f"mesh {shard.mesh_str(shard.mesh_sizes(mesh))}: {e}") from None
        self.flat = {k: v.requires_grad_(True) for k, v in _flatten(params).items()}
        self.params = model.unflatten(self.flat)
        table = model.param_table(cfg)
        groups = [{"params": [v for k, v in self.flat.items() if decays(table[k])], "weight_decay": a.weight_decay},
                  {"params": [v for k, v in self.flat.items() if not decays(table[k])], "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=a.lr, betas=(a.beta1, a.beta2), eps=a.eps, foreach=False)
        self.device = next(iter(self.flat.values())).device
        self.extra = {k: v.to(self.device) for k, v in _init_extra(model, cfg, a, "torch").items()}
        self.n_updates = 0
        sizes = shard.mesh_sizes(mesh)
        self.n_shards = shard.batch_shards(mesh)[1]
        self.tp = sizes["tp"]  # ranks of one tp group hold the same rows: their sums count once
        self.world = math.prod(sizes.values())
        if self.tp > 1:  # the head's vocabulary is split over tp: a CE that works on those blocks
            self.kernels = {**kernels, "cross_entropy": cross_entropy_tp}
        try:  # MoE on ep > 1: each rank keeps its experts and tokens travel to them by all-to-all; on tp > 1 each
            # rank runs its columns of every expert
            self.kernels = {**self.kernels, **shard.mesh_kernels(mesh, model, cfg)}
        except ValueError as e:
            raise convert.UserError(f"mesh {shard.mesh_str(sizes)}: {e}") from None
        self.experts_local = "moe_dispatch" in self.kernels
        self.layers = shard.stacked_names(model, cfg)  # gathered one layer at a time in forward and backward

    def _rows(self, x):
        """This rank's rows of a [B, T] (or [n, B, T]) global batch."""
        if x.ndim == 3:
            return self.torch.stack([self.shard.local_batch(r, self.mesh) for r in x])
        return self.shard.local_batch(x, self.mesh)

    def _reduce(self, values, sums):
        """All-reduces a list of floats: entries flagged in `sums` become sums over batch shards, the others means
        (tp ranks hold the same rows, so a sum over all ranks counts each shard tp times)."""
        t = _all_sum(values, self.device)
        return [v / (self.tp if s else self.world) for v, s in zip(t, sums)]

    def step(self, batch):
        torch, shard = self.torch, self.shard
        batch = {k: torch.as_tensor(v).long().to(self.device) for k, v in batch.items()}
        # token counts of the global batch (every rank has it), so that the shards' losses add up to its mean
        n = ((batch["labels"] != IGNORE).sum().clamp(min=1), (batch["labels"][..., 1:] != IGNORE).sum().clamp(min=1))
        total, sums, counts = 0.0, {}, 0
        for i in range(self.a.accum):
            mb = {k: self._rows(v[i]) for k, v in batch.items()}
            with shard.compute_context(self.params):
                cp = shard.compute_params(self.params, self.mesh, self.experts_local, self.layers)
                loss, (metrics, c) = self.loss_fn(cp, self.extra, mb, n, shards=self.n_shards, aux_sum=_all_sum_grad)
                loss = _plain(loss)
                loss.backward()
            total += loss.detach()
            counts = counts + (_plain(c).detach() if torch.is_tensor(c) else c)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + _plain(v).detach()
        with torch.no_grad():
            grads = []
            for p in self.flat.values():
                if p.grad is not None:
                    p.grad = shard.grads_like([p.grad], [p])[0]
                    grads.append(p.grad)
            gnorm = torch.tensor(math.sqrt(_all_sum([self._sum_sq(grads)], self.device)[0]), dtype=torch.float32)
            if gnorm > self.a.grad_clip:
                scale = float(self.a.grad_clip / gnorm)
                for g in grads:
                    g.mul_(scale)
            lr = float(lr_at(self.n_updates, self.a.lr, self.a.warmup_steps, self.a.steps, self.a.min_lr_ratio))
            for g in self.opt.param_groups:
                g["lr"] = lr
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            if "router_bias" in self.extra:
                import torch.distributed as dist
                counts = counts.to(torch.int64)
                dist.all_reduce(counts)
                self.extra["router_bias"] = self.model.update_router_bias(self.extra["router_bias"],
                                                                          counts // self.tp, self.a.bias_update_rate)
        self.n_updates += 1
        keys = list(sums)
        vals = self._reduce([float(total)] + [float(sums[k]) for k in keys],
                            [True] + [k in ("ce", "mtp_loss") for k in keys])
        out = {k: v / (1 if k in ("ce", "mtp_loss") else self.a.accum) for k, v in zip(keys, vals[1:])}
        out["loss"], out["grad_norm"] = vals[0], float(gnorm)
        return out

    def _sum_sq(self, grads):
        """This rank's share of the squared global norm: each local block's sum of squares, divided by the number
        of ranks holding a copy of it (mesh dims it is replicated over), so the all-reduced sum counts it once."""
        from torch.distributed.tensor import DTensor
        total = 0.0
        for g in grads:
            if isinstance(g, DTensor):
                copies = math.prod(n for n, pl in zip(g.device_mesh.mesh.shape, g.placements) if pl.is_replicate())
                total += float(g.to_local().double().square().sum()) / copies
            else:
                total += float(g.double().square().sum()) / self.world
        return total

    def loss_and_grads(self, mb):
        raise NotImplementedError("loss_and_grads: one process only")

    def evaluate(self, batch):
        torch, shard = self.torch, self.shard
        with torch.no_grad(), shard.compute_context(self.params):
            dt = getattr(torch, self.a.dtype)
            cp = shard.compute_params(self.params, self.mesh, self.experts_local, self.layers)
            p = {k: v.to(dt) for k, v in _flatten(cp).items()}
            s, n = _eval_sums(self.model, self.cfg, self.a, self.kernels, self.model.unflatten(p), self.extra,
                              {k: self._rows(torch.as_tensor(v).long().to(self.device)) for k, v in batch.items()},
                              losses=_token_losses_tp if self.tp > 1 else None)
        s, n = self._reduce([float(_plain(s)), float(_plain(n))], [True, True])
        return s, n

    def save_params(self, folder):
        """params/ as a DCP of the flat {name: tensor} dict, each rank writing its shards: the layout
        convert.write_params gives a torch checkpoint, so convert.read_params and --init-from read it."""
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.shard.save_checkpoint(os.path.join(folder, "params"), {k: v.detach() for k, v in self.flat.items()})

    def save_state(self, folder):
        import torch.distributed.checkpoint as dcp
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save({"optimizer": self.opt.state_dict(), "extra": self.extra},
                     checkpoint_id=os.path.join(folder, "optimizer"))

    def load_state(self, folder, params=None):
        """Params and optimizer state from a checkpoint written on any mesh (or by one process): DCP reads each
        rank's blocks."""
        import torch.distributed.checkpoint as dcp
        import warnings
        torch, shard = self.torch, self.shard
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = shard._flatten(shard.load_checkpoint(os.path.join(folder, "params"),
                                                       shard.empty_params_torch(self.model, self.cfg, self.mesh)))
            with torch.no_grad():
                for k, v in got.items():
                    self.flat[k].copy_(v)
            sd = {"optimizer": self._opt_template(), "extra": self.extra}
            dcp.load(sd, checkpoint_id=os.path.join(folder, "optimizer"))
        self.opt.load_state_dict(sd["optimizer"])
        self.extra = sd["extra"]


def _all_sum(values, device):
    """Sums a list of floats over all processes (float64; on `device`, where NCCL needs it)."""
    import torch
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _plain(x):
    """A tensor as a plain tensor: a DTensor (a loss under tp) is made whole, differentiably."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def _flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


TRAINERS = {"jax": JaxTrainer, "torch": TorchTrainer}


# ----------------------------------------------------------------------------------------------- checkpoints
def checkpoints(ckpt_dir):
    """Completed checkpoints [(step, path)], oldest first (temporary folders of interrupted saves ignored)."""
    if not ckpt_dir or not os.path.isdir(ckpt_dir):
        return []
    out = []
    for name in os.listdir(ckpt_dir):
        if name.startswith("step_") and name[5:].isdigit() and os.path.exists(os.path.join(ckpt_dir, name, "train_state.json")):
            out.append((int(name[5:]), os.path.join(ckpt_dir, name)))
    return sorted(out)


def remove_stale(ckpt_dir):
    """Temporary folders left by saves that were killed (atomic_dir names them .step_N.tmp-*)."""
    if ckpt_dir and os.path.isdir(ckpt_dir):
        for name in os.listdir(ckpt_dir):
            if name.startswith(".step_") and ".tmp-" in name:
                shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)


def save_checkpoint(trainer, loader, step, a):
    """step_NNNNNNNN/: a converted checkpoint (convert.write_params: Orbax for JAX, DCP for torch, so --init-from
    and `convert.py orbax2hf` take it as is) plus optimizer/ (the optimizer state and router bias, Orbax or DCP) and
    train_state.json (step, loader position, seed, args). Written into a temporary folder renamed into place, so a
    killed save leaves the previous checkpoints as they were."""
    out = os.path.join(a.ckpt_dir, f"step_{step:08d}")
    if isinstance(trainer, TorchMeshTrainer):
        _save_sharded(trainer, loader, step, a, out)
    else:
        with convert.atomic_dir(out, overwrite=True) as tmp:
            convert.write_params(tmp, trainer.model, trainer.cfg, trainer.params,
                                 "orbax" if a.backend == "jax" else "dcp")
            trainer.save_state(tmp)
            _write_train_state(tmp, trainer, loader, step, a)
    if _is_main():
        for _, old in checkpoints(a.ckpt_dir)[: -a.keep] if a.keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return out


def _write_train_state(folder, trainer, loader, step, a):
    with open(os.path.join(folder, "train_state.json"), "w") as f:
        json.dump({"step": step, "data": loader.state(), "seed": a.seed, "backend": a.backend,
                   "model": trainer.model.MODEL_TYPE, "args": dataclasses.asdict(a)}, f, indent=1)


def _save_sharded(trainer, loader, step, a, out):
    """A torchrun job's checkpoint, the same folder as one process writes: every rank writes its shards of params/
    and optimizer/ (DCP) into rank 0's temporary folder; rank 0 adds nanoqwen.json and train_state.json and, after
    a barrier (every rank done), renames it into place. --ckpt-dir must be one folder seen by every process."""
    import torch.distributed as dist

    def write(tmp):
        box = [tmp]
        dist.broadcast_object_list(box, src=0)
        trainer.save_params(box[0])
        trainer.save_state(box[0])
        if _is_main():
            convert._write_meta(box[0], trainer.model, trainer.cfg, "dcp", "float32", "scanned")
            _write_train_state(box[0], trainer, loader, step, a)
        dist.barrier()

    if _is_main():
        with convert.atomic_dir(out, overwrite=True) as tmp:
            write(tmp)
    else:
        write(None)
    dist.barrier()  # renamed before any rank looks for it


def restore_checkpoint(trainer, loader, path, a):
    with open(os.path.join(path, "train_state.json")) as f:
        st = json.load(f)
    if st["backend"] != a.backend:
        raise convert.UserError(f"{path}: written by --backend {st['backend']}, resuming with {a.backend}")
    if isinstance(trainer, TorchMeshTrainer):
        meta, model, cfg = convert._read_meta(path)
        shapes = lambda m, c: {n: tuple(p.shape) for n, p in m.param_table(c).items()}  # noqa: E731
        if model is not trainer.model or shapes(model, cfg) != shapes(trainer.model, trainer.cfg):
            raise convert.UserError(f"{path}: a checkpoint of another model or size ({meta['model_type']})")
        trainer.load_state(path)
    else:
        _, _, params = convert.read_params(path, a.backend, "float32")
        trainer.load_state(path, params)
    if hasattr(trainer, "n_updates"):
        trainer.n_updates = st["step"]
    loader.load_state(st["data"])
    return st["step"]


# ----------------------------------------------------------------------------------------------- the loop
class Diverged(convert.UserError):
    pass


def run(a, params=None, on_step=None, cfg=None, step_times=None):
    """Trains per `a` (an Args); returns {"losses", "trainer", "model", "cfg", "loader", ...}. `params` (a param
    tree on a.backend) overrides the initial params, `cfg` the size's config (benchmarks); on_step(step, trainer,
    loader) runs after each step (and its checkpoint); step_times, a list, receives each step's seconds."""
    if a.backend not in TRAINERS:
        raise convert.UserError(f"--backend {a.backend!r}: expected jax or torch")
    if a.dtype not in ("float32", "bfloat16"):
        raise convert.UserError(f"--dtype {a.dtype!r}: expected float32 or bfloat16")
    if a.remat not in ("none", "block", "full"):
        raise convert.UserError(f"--remat {a.remat!r}: expected none, block or full")
    if a.moe_balance not in ("aux", "bias"):
        raise convert.UserError(f"--moe-balance {a.moe_balance!r}: expected aux or bias")
    if (a.resume or a.save_every) and not a.ckpt_dir:
        raise convert.UserError("--resume and --save-every need --ckpt-dir")
    accum = a.accum
    model, size_cfg, loaded = build_model(a)
    cfg = cfg or size_cfg
    mesh = _mesh(a)
    if mesh is not None:
        import shard
        mesh_devices = math.prod(shard.mesh_sizes(mesh).values())
    else:
        mesh_devices = 1
    kernels = load_kernels(a.kernels, a.backend, a.dtype)
    tokenizer = a.tokenizer or (a.init_from if a.init_from and os.path.isdir(a.init_from) else None)
    loader = Loader(a.data, a.seq_len, a.batch_size, accum, a.seed, cfg.vocab_size, tokenizer,
                    eval_rows=a.batch_size * a.eval_batches if a.eval_every else 0)
    if mesh is not None and a.backend == "torch":
        trainer = TorchMeshTrainer(model, cfg, params if params is not None else loaded, a, kernels, mesh)
    else:
        trainer = TRAINERS[a.backend](model, cfg, params if params is not None else loaded, a, kernels)
        if mesh is not None:
            trainer.shard(mesh)
    start = 0
    if _is_main():
        remove_stale(a.ckpt_dir)
    _barrier()
    if a.resume:
        done = checkpoints(a.ckpt_dir)
        if done:
            start = restore_checkpoint(trainer, loader, done[-1][1], a)
            _say(a, f"resumed from {done[-1][1]} (step {start})")
        else:
            _say(a, f"--resume: no checkpoint in {a.ckpt_dir}, starting fresh")
    tokens_per_step = a.batch_size * accum * a.seq_len
    fpt = flops_per_token(model, cfg, a.seq_len)
    peak, peak_src = peak_flops(a.backend, a.dtype)
    n_params = sum(math.prod(p.shape) for p in model.param_table(cfg).values())
    _say(a, f"{model.MODEL_TYPE} {n_params / 1e6:.1f}M params, {a.backend} {a.dtype}, {tokens_per_step} tokens/step "
            f"({a.batch_size}x{accum}x{a.seq_len}), MFU: MaxText FLOP count vs {peak / 1e12:.2f} TFLOP/s ({peak_src})")
    mfile = open(a.metrics, "a" if a.resume else "w") if a.metrics and _is_main() else None
    losses, times, last = [], [], {}
    try:
        for step in range(start, a.steps):
            batch = loader.next()
            t0 = time.perf_counter()
            m = trainer.step(batch)
            dt = time.perf_counter() - t0
            if not math.isfinite(m["loss"]):
                raise Diverged(f"loss is {m['loss']} at step {step + 1}: stopping"
                               + (f"; the last good checkpoint in {a.ckpt_dir} is intact" if a.ckpt_dir else ""))
            times.append(dt)
            if step_times is not None:
                step_times.append(dt)
            losses.append(m["loss"])
            tps = tokens_per_step / dt
            last = {"step": step + 1, **m, "lr": float(lr_at(step, a.lr, a.warmup_steps, a.steps, a.min_lr_ratio)),
                    "tokens_per_s": tps, "mfu": fpt * tps / peak / mesh_devices, "step_time_s": dt}
            if a.eval_every and loader.eval is not None and ((step + 1) % a.eval_every == 0 or step + 1 == a.steps):
                ev = {k: v.reshape(-1, a.batch_size, a.seq_len) for k, v in loader.eval.items()}
                s, n = trainer.evaluate(ev)
                last["eval_loss"] = s / max(n, 1)
            if mfile:
                mfile.write(json.dumps(last) + "\n")
                mfile.flush()
            if (step + 1) % a.log_every == 0 or step + 1 == a.steps:
                ev = f" eval {last['eval_loss']:.4f}" if "eval_loss" in last else ""
                _say(a, f"step {step + 1:5d}/{a.steps} loss {m['loss']:.4f}{ev} lr {last['lr']:.2e} "
                        f"gnorm {m['grad_norm']:.3f} {tps:,.0f} tok/s MFU {100 * last['mfu']:.2f}%")
            if a.ckpt_dir and a.save_every and ((step + 1) % a.save_every == 0 or step + 1 == a.steps):
                save_checkpoint(trainer, loader, step + 1, a)
            if on_step:
                on_step(step + 1, trainer, loader)
    finally:
        if mfile:
            mfile.close()
    steady = times[1:] or times
    tps = tokens_per_step * len(steady) / max(sum(steady), 1e-9)
    if losses:
        _say(a, f"done: {len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}, {tps:,.0f} tok/s "
                f"(after the first step), MFU {100 * fpt * tps / peak / mesh_devices:.2f}%")
    return {"losses": losses, "trainer": trainer, "model": model, "cfg": cfg, "loader": loader,
            "tokens_per_s": tps, "mfu": fpt * tps / peak / mesh_devices, "last": last}


def _say(a, msg):
    if not a.quiet and _is_main():
        print(msg, flush=True)


def _is_main():
    """False on the processes of a torchrun job other than rank 0 (which alone prints and writes files)."""
    dist = sys.modules.get("torch.distributed")
    return dist is None or not dist.is_initialized() or dist.get_rank() == 0


def _barrier():
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_initialized():
        dist.barrier()


def parse_mesh(spec):
    """'fsdp=2,tp=2' -> {'fsdp': 2, 'tp': 2} over the axes data, fsdp, tp, ep (-1: the devices left over)."""
    out = {}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        k, _, v = part.partition("=")
        v = v.strip()
        if k.strip() not in ("data", "fsdp", "tp", "ep") or not (v.isdigit() and int(v) >= 1 or v == "-1"):
            raise convert.UserError(f"--mesh {spec!r}: expected axis=N pairs over data, fsdp, tp, ep")
        out[k.strip()] = int(v)
    return out


def _mesh(a):
    """None on one device; else shard.py's JAX mesh (shard.parse_mesh's rules: every device is used), or for
    --backend torch under torchrun its DeviceMesh over the job's processes (no --mesh: fsdp over all of them)."""
    sizes = parse_mesh(a.mesh)
    if a.backend == "torch" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _torch_mesh(a, sizes)
    if not sizes or all(v == 1 for v in sizes.values()):
        return None
    try:
        import shard
    except ImportError:
        raise convert.UserError(f"--mesh {a.mesh!r}: more than one device needs shard.py, not built yet") from None
    if a.backend == "torch":
        return _torch_mesh(a, sizes)
    import jax
    try:
        sizes = shard.parse_mesh(a.mesh, len(jax.devices()))
        if math.prod(sizes.values()) == 1:
            return None
        shard.check_batch(a.batch_size, sizes)
        return shard.make_mesh(sizes)
    except ValueError as e:
        raise convert.UserError(f"--mesh {a.mesh!r}: {e}") from None


def _torch_mesh(a, sizes):
    """The torch DeviceMesh of a torchrun job (one process per device, WORLD_SIZE of them); outside torchrun a mesh
    of more than one device is refused with the command to run instead."""
    import shard
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        n = math.prod(v for v in sizes.values() if v > 0)
        if n == 1:
            return None
        raise convert.UserError(f"--mesh {a.mesh!r}: torch runs one process per device; launch with "
                                f"`torchrun --nproc_per_node {n} train.py ...`")
    try:
        sizes = shard.parse_mesh(a.mesh, world)
        shard.check_batch(a.batch_size, sizes)
    except ValueError as e:
        raise convert.UserError(f"--mesh {a.mesh!r} on {world} torchrun processes: {e}" if a.mesh else
                                f"{world} torchrun processes: {e}") from None
    shard.init_torch_distributed()
    return shard.torch_mesh(sizes)


# ----------------------------------------------------------------------------------------------- command line
def _click_main():
    import click

    fields = {f.name: f for f in dataclasses.fields(Args)}
    helps = {
        "model": "qwen2 | qwen3 | qwen3_moe | qwen3_next (optional with --init-from)",
        "size": "a released size (0.6b, 30b-a3b, 80b-a3b, ...) or debug",
        "backend": "jax | torch", "steps": "optimizer updates", "batch_size": "rows per micro-batch",
        "global_batch_size": "rows per update (a multiple of --batch-size: gradient accumulation)",
        "seq_len": "tokens per row", "data": "synthetic | FILE.txt | FILE.jsonl (text or chat messages) | FILE.npy | FILE.bin",
        "tokenizer": "tokenizer.json (default: the --init-from folder's)",
        "init_from": "HF folder, hub id or converted checkpoint to start from",
        "mesh": "e.g. fsdp=2,tp=2,ep=2 (torch: one process per device, under torchrun)",
        "ckpt_dir": "checkpoint folder", "save_every": "save every N steps (and at the end)",
        "keep": "checkpoints to keep", "resume": "continue from the newest checkpoint in --ckpt-dir",
        "metrics": "JSONL file, one record per step", "dtype": "float32 | bfloat16 (activations; fp32 master weights)",
        "seed": "init and data order", "lr": "peak learning rate", "warmup": "warm-up steps (default steps/10, <= 100)",
        "remat": "none | block | full", "kernels": "auto | ref", "moe_balance": "aux (aux loss) | bias (aux-loss-free)",
        "eval_every": "validation loss on the held-out split every N steps (0: never)",
        "compile": "torch.compile the torch loss", "quiet": "no progress lines",
    }

    @click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
    def main(**kw):
        """Train a Qwen model on one device (or a mesh, with shard.py), JAX or PyTorch."""
        a = Args(**kw)
        try:
            run(a)
            if "torch.distributed" in sys.modules:  # a torchrun job: every rank leaves once all are done
                import shard
                shard.finish_torch_distributed()
        except Diverged as e:
            if _is_main():
                print(f"error: {e}", file=sys.stderr)
            sys.exit(3)
        except convert.UserError:
            if os.environ.get("RANK", "0") != "0":  # under torchrun every rank fails alike; rank 0 says why
                sys.exit(2)
            raise

    for name in reversed(list(fields)):
        f = fields[name]
        opt = "--" + name.replace("_", "-")
        if f.type in ("bool", bool):
            main = click.option(opt, is_flag=True, help=helps.get(name, ""))(main)
        else:
            typ = {"int": int, "float": float}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            main = click.option(opt, type=typ, default=f.default, show_default=f.default is not None,
                                help=helps.get(name, ""))(main)
    main.callback = convert.main_guard(main.callback)
    return main


main = _click_main()

if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    main()
