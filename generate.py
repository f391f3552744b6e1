"""Generation for every model file, JAX and PyTorch: tokenizer, ChatML prompt, prefill + compiled decode, sampling.

    new_ids = generate.generate(model, cfg, params, [prompt_ids, ...], max_new_tokens=32, temperature=0.0)
    python generate.py --hf Qwen/Qwen3-0.6B --prompt "Why is the sky blue?" --no-think --max-new-tokens 64

A batch of prompts of different lengths is left-padded: padding gets segment id 0 (never attended to) and positions
are cumsum(mask) - 1, as transformers' `generate` does. The prompt runs once (prefill) into a cache preallocated by
`model.init_cache`, then one token per step. Only `model.forward` (or `forward_hidden` + `lm_head`, to skip the
logits of all but the last prompt token), `model.init_cache` and the returned cache are used: the cache is opaque
here (Qwen3-Next's also holds conv and recurrent state). On JAX the step is one `jit` with the cache donated; on
torch the cache is written in place. The host reads only the sampled ids, one step behind the device, to stream.

Rows stop at an EOS id, which is included in the returned row (what transformers' `generate` returns, minus the
padding it appends after EOS). With `eos_ids=None` the model config's `eos_token_id` is used.
"""
import json
import os
import sys
import time

import numpy as np

from qwen3 import _leaves, _tree_map  # the model files' tree helpers (dicts, tuples, None)

# ----------------------------------------------------------------------------------------------- tokens and chat
THINK_OFF = "<think>\n\n</think>\n\n"
QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def _user_error(msg):
    import convert
    return convert.UserError(msg)


def load_tokenizer(folder):
    """The folder's tokenizer.json, loaded with `tokenizers` (no transformers)."""
    from tokenizers import Tokenizer
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(path):
        raise _user_error(f"{path}: missing (generation needs the checkpoint's tokenizer.json)")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:
        raise _user_error(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0][:120]})") from None


def _read_json(folder, name):
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _user_error(f"{path}: not valid JSON ({getattr(e, 'msg', e)})") from None


def _ids(v):
    return [] if v is None else [int(x) for x in (v if isinstance(v, (list, tuple)) else [v])]


def eos_ids_of(folder, tok):
    """Every EOS id the checkpoint names: generation_config.json and config.json `eos_token_id` (int or list),
    tokenizer_config.json `eos_token` (a string or an AddedToken dict). Generation stops on any of them."""
    ids = _ids(_read_json(folder, "generation_config.json").get("eos_token_id"))
    ids += _ids(_read_json(folder, "config.json").get("eos_token_id"))
    t = _read_json(folder, "tokenizer_config.json").get("eos_token")
    t = t.get("content") if isinstance(t, dict) else t
    if isinstance(t, str) and tok.token_to_id(t) is not None:
        ids.append(tok.token_to_id(t))
    return sorted(set(ids))


def chat_text(messages, think=None, template=""):
    """ChatML for a conversation plus the generation prompt, as the Qwen chat templates render it.
    messages: a list of {"role", "content"} dicts, or one user message as a string. Assistant turns before the last
    user message lose their <think>...</think> reasoning (Qwen3). template: the checkpoint's `chat_template`
    (tokenizer_config.json), read only for three Qwen habits: Qwen2.5's default system prompt, Qwen3-Thinking-2507's
    forced `<think>\\n`, and the hybrid Qwen3 `enable_thinking` switch. think=False appends the empty think block
    (hybrid Qwen3); None or True leaves the model free to think."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if messages[0]["role"] != "system" and QWEN25_DEFAULT_SYSTEM in template:
        messages = [{"role": "system", "content": QWEN25_DEFAULT_SYSTEM}] + list(messages)
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    text = ""
    for i, m in enumerate(messages):
        content = m["content"]
        if m["role"] == "assistant" and i < last_user:
            content = content.split("</think>")[-1].lstrip("\n")
        text += f"<|im_start|>{m['role']}\n{content}<|im_end|>\n"
    text += "<|im_start|>assistant\n"
    if "<|im_start|>assistant\\n<think>\\n" in template.replace("\n", "\\n") and "enable_thinking" not in template:
        text += "<think>\n"  # Thinking-2507: always thinks
    elif think is False:
        text += THINK_OFF
    return text


def encode(tok, text):
    """Token ids, no BOS (Qwen tokenizers have none; special tokens in the text are matched as such)."""
    return tok.encode(text, add_special_tokens=False).ids


# ----------------------------------------------------------------------------------------------- backends
def _float_leaf(params):
    for x in _leaves(params):
        if "float" in str(x.dtype):
            return x
    raise ValueError("params hold no floating-point array")


def _is_torch(x):
    return type(x).__module__.startswith("torch")


def _last_logits(model, params, tokens, cfg, cache, kw):
    """Logits [B, V] of the last position only (transformers' logits_to_keep=1): with forward_hidden + lm_head the
    prompt's other positions never meet the (large) unembedding."""
    if hasattr(model, "forward_hidden") and hasattr(model, "lm_head"):
        out = model.forward_hidden(params, tokens, cfg, cache, **kw)
        h, cache = out[0], out[1]
        return _unembed(h[:, -1], model.lm_head(params, cfg)), cache
    logits, cache = model.forward(params, tokens, cfg, cache, **kw)
    return logits[:, -1], cache


def _unembed(h, w):
    """h [B, E] @ w [E, V]. torch, when w is the transpose of a row-major [V, E] table (the tied embedding, or an
    untied head in decode_layout): eager as (table @ h.T).T, the order in which the CPU GEMM streams the table
    fastest at small B (2.2x at B = 8 on the 2-core machine of bench_generate.py); inside a compiled step at B = 1
    as a multiply-and-sum over E, which inductor turns into one vectorised pass over the table (48 GB/s against
    the GEMM's 27 GB/s in bf16 on that machine, 56 against 14 in fp32), accumulated in fp32 and rounded as the
    GEMM's output is (to w's dtype: the compiled step hands a bf16 model's h over in fp32, see _Decoder).
    fp32 at B > 1 on a CPU: oneDNN's GEMM on the table reordered into its blocked layout, made on first use and
    cached while the table lives (one more copy of the head: V x E x 4 bytes, so batch-1 decodes never make it):
    the CPU GEMMs run an fp32 matmul with 2-16 rows far below their peak, and on the plain table (MKL, or oneDNN
    unpacked) they took 22.9-23.1 and 19.4-19.8 ms at B = 8 for the bench model's 311 MB table, packed 15.0-15.2 ms
    (12.4 against 26.2 ms at B = 2; a batch-1 pass over the table takes 11.3-11.7 ms)."""
    if not _is_torch(h):
        return h @ w
    import torch
    strided = w.ndim == 2 and w.stride(0) == 1 and w.shape[0] > 1
    if strided and h.shape[0] == 1 and torch.compiler.is_compiling():
        return (w.T[None] * h[:, None]).sum(-1, dtype=torch.float32).to(w.dtype)
    h = h.to(w.dtype)
    if h.shape[0] > 1 and w.dtype == torch.float32 and w.device.type == "cpu" and _ONEDNN_LINEAR[0]:
        try:
            packed = _cached_copy(w if w._base is None else w._base,
                                  lambda _: torch.ops.mkldnn._reorder_linear_weight(w.T.contiguous()))
            return torch.ops.mkldnn._linear_pointwise(h.contiguous(), packed, None, "none", [], "")
        except (RuntimeError, AttributeError, NotImplementedError):  # a build without oneDNN: MKL from now on
            _ONEDNN_LINEAR[0] = False
    return (w.T @ h.T).T if strided else h @ w


_ONEDNN_LINEAR = [True]


def _cpu_attention(reference):
    """torch, on a CPU: _fp32_gemm_attention for bf16/fp16 in a decode step (one query) on every CPU, and over more
    queries (a prefill) where oneDNN has no GEMM in that dtype (no AVX-512: the CPU's own bf16 bmm is then a slow
    fallback, 1.2 GFLOP/s against 103 in fp32 on an AVX2 2-core EPYC). A decode step's bf16 bmm is a small call that
    costs more than its fp32 copies even where oneDNN runs bf16 on AMX (q.K^T of the bench_generate model at 256
    slots: 60-72 us a call on a 2-core AMX Xeon; its compiled bf16 step at batch 1: 10.2 against 10.6-10.8 ms, and
    the same within noise at 2,048 slots). In fp32 over more than one query, torch's SDPA with the boolean mask and
    GQA: the same math in another summation order (within 6e-7 of the reference at 256 tokens), without the
    [B, Hkv, G, T, S] fp32 scores in memory (the AVX2 machine: 2.1 against 3.9 ms a layer at 256 tokens, 29 against
    158 ms at 1,024). Every query of a prefill attends at least its own slot, so no row is fully masked (where SDPA
    would give NaN). Otherwise, and on other devices, the model's reference."""
    import torch
    slow = {torch.bfloat16: not torch.ops.mkldnn._is_mkldnn_bf16_supported(),  # asked here, outside any compile
            torch.float16: not torch.ops.mkldnn._is_mkldnn_fp16_supported()}

    def attention(q, k, v, mask):
        if q.device.type == "cpu" and q.dtype in slow and (q.shape[1] == 1 or slow[q.dtype]):
            return _fp32_gemm_attention(q, k, v, mask)
        if q.device.type == "cpu" and q.dtype == torch.float32 and q.shape[1] > 1:
            o = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None], enable_gqa=True)
            return o.transpose(1, 2)
        return reference(q, k, v, mask)
    return attention


def _jax_cpu_attention(reference):
    """JAX on a CPU: over more than one query (a prefill), the reference attention with each GEMM as one batched
    dot over (batch x kv head) of heads-major operands, [B*Hkv, G*T, D] x [B*Hkv, S, D]: the same values, dtypes and
    rounding points, but XLA:CPU ran the reference's 'btkgd,bskd->bkgts' dot of a 256-token prefill (bench_generate
    model) in 1.2-1.4 ms and this in 0.56, and the whole fp32 prefill took 85.2-85.9 against 89.5-91.1 ms (median
    of 15, alternating processes). One query (a decode step): the reference."""
    import jax
    import jax.numpy as jnp

    def attention(q, k, v, mask):
        B, T, Hq, D = q.shape
        S, Hkv = k.shape[1:3]
        if T == 1:
            return reference(q, k, v, mask)
        G = Hq // Hkv
        qh = q.reshape(B, T, Hkv, G, D).transpose(0, 2, 3, 1, 4).reshape(B * Hkv, G * T, D)
        kh, vh = (x.transpose(0, 2, 1, 3).reshape(B * Hkv, S, D) for x in (k, v))
        s = jnp.einsum("hqd,hsd->hqs", qh, kh).reshape(B, Hkv, G, T, S) * (D ** -0.5)
        s = jnp.where(mask[:, None, None], s.astype(jnp.float32), -1e30)
        p = jax.nn.softmax(s, -1).astype(q.dtype).reshape(B * Hkv, G * T, S)
        o = jnp.einsum("hqs,hsd->hqd", p, vh).reshape(B, Hkv, G, T, D)
        return o.transpose(0, 3, 1, 2, 4).reshape(B, T, Hq, D)
    return attention


def _fp32_gemm_attention(q, k, v, mask):
    """The reference attention (GQA, mask, fp32 softmax) with its two GEMMs in fp32 on the same bf16/fp16 values,
    each result rounded where the reference rounds it (scores, probabilities and output to q's dtype). Over a
    decode step's query and a 256-slot cache it was closer to the fp32 result (max error 0.00097) than the CPU's
    bf16 bmm (0.0019), which rounds partial sums. On the AVX2 machine, compiled, the bench_generate model's 8 layers
    at batch 1 took 7.6 against 9.1 ms at 256 slots and 10.2 against 18.4 ms at 2,048 (min of 30, interleaved)."""
    import torch
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1:3]
    G = Hq // Hkv
    # heads-major fp32 operands [B, Hkv, ., D] (a decode cache's k/v are views of such buffers): the bmm then reads
    # each head's block contiguously; fp32 copies in the [B, S, Hkv, D] order made it copy them again
    qh = q.reshape(B, T, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * T, D).float()
    kh, vh = (x.transpose(1, 2).float().contiguous() for x in (k, v))
    s = (qh @ kh.transpose(-1, -2)).to(q.dtype).reshape(B, Hkv, G, T, S) * (D ** -0.5)
    s = torch.where(mask[:, None, None], s.float(), -1e30)
    p = torch.softmax(s, -1).to(q.dtype)
    o = (p.float().reshape(B, Hkv, G * T, S) @ vh).to(q.dtype).reshape(B, Hkv, G, T, D)
    return o.permute(0, 3, 1, 2, 4).reshape(B, T, Hq, D)


_LAYOUTS = {}  # id(weight) -> (weakref to the weight, its _version when copied, the copy)


def _linear_order(p):
    """The permutation that puts a weight's input axes last (nn.Linear's [out, in] memory order), or None: dense
    projections stored [in, out] of HF's [out, in] (tf 'T' or 'in_heads': the input axis is the first after the
    layer axis) and the output projections [heads, head_dim, embed] (tf 'out_heads', contracted by the model's
    out_proj as one [heads x head_dim, embed] matrix: the output axis comes first); no experts axis."""
    if p.tf not in ("T", "in_heads", "out_heads") or any(a.startswith("experts") and a != "experts_r" for a in p.axes):
        return None
    i = 1 if p.axes[0] == "layers" else 0
    if p.tf == "out_heads":
        return list(range(i)) + [len(p.shape) - 1] + list(range(i, len(p.shape) - 1))
    return [a for a in range(len(p.shape)) if a != i] + [i]


def _huge_page_copy(x):
    """A contiguous copy of torch tensor x; on Linux, for a CPU tensor of 2 MiB or more, in anonymous memory
    aligned to 2 MiB and advised for transparent huge pages (MADV_HUGEPAGE; torch's own allocator asks only when
    THP_MEM_ALLOC_ENABLE is set). A decode step streams every weight once per token, and from 4 KiB pages the
    compiled matvecs ran slower: the bench_generate model's bf16 batch-1 step on a 2-core AMX Xeon, interleaved
    A/B, 10.82 against 11.38 ms (median of 8 rounds each); numpy's allocator, which the loaded weights come from,
    asks for huge pages at 4 MiB and up."""
    import mmap
    import torch
    nbytes, huge = x.numel() * x.element_size(), 1 << 21
    if x.device.type != "cpu" or nbytes < huge or not hasattr(mmap, "MADV_HUGEPAGE"):
        return x.contiguous()
    try:
        m = mmap.mmap(-1, nbytes + huge)
        m.madvise(mmap.MADV_HUGEPAGE)  # EINVAL on a kernel built without transparent huge pages
    except OSError:
        return x.contiguous()
    buf = torch.frombuffer(m, dtype=torch.uint8)  # the tensor keeps the mapping alive
    off = -buf.data_ptr() % huge
    return buf[off:off + nbytes].view(x.dtype).view(x.shape).copy_(x)


def decode_layout(model, cfg, params):
    """torch: params with every dense projection weight stored in nn.Linear's memory order (input axis last) and
    viewed back to our shapes: the same values, shapes and einsums, but a compiled decode step's matvecs then
    reduce along contiguous memory, which inductor's CPU code streams at about 2.7x the rate of the einsum-ready
    order (an 8-layer SwiGLU stack of the bench_generate model in bf16: 45 against 17 GB/s); that includes the
    attention output projection, which the model contracts as one [heads x head_dim, embed] matrix (out_proj):
    the bench model's bf16 batch-1 step, interleaved A/B, 10.53 against 10.82 ms relaid (median of 8 rounds).
    The copies are in huge pages where the OS has them (_huge_page_copy). Copies are cached per weight
    and redone after an in-place change; a weight already in that order is returned as is, so a caller that keeps
    only the result (generate.py) holds one copy of the weights, and steps/generate call this itself where
    `relays` says so.
    JAX: a tied float32 embedding [V, E] is stored transposed, as "embed_t" [E, V] in place of "embed", and the
    decode programs take it back as embed_t.T (_from_layout), a transpose XLA folds into the unembedding's dot,
    which then streams the table in the order XLA:CPU's fp32 dot reads fastest (on the bench_generate machine: 10.4
    against 14.1 ms at batch 8, 4.5 against 5.5 at batch 1), and into the embedding's gather of B rows. In bfloat16
    the [V, E] order is the fast one (XLA turns that dot into a fused multiply-and-reduce: 2.9 against 86 ms at
    batch 1), so a bf16 table is kept. The other weights keep their order (relaid and transposed back, the layer
    scan copied them: 47 against 7 ms in fp32). steps/generate take either layout; from Python, pass the result
    (and drop the original) to hold one copy."""
    if not _is_torch(_float_leaf(params)):
        if not cfg.tie_word_embeddings or "embed" not in params or params["embed"].dtype != np.float32:
            return params
        import jax.numpy as jnp
        embed_t = _cached_copy(params["embed"], lambda w: jnp.asarray(w.T, copy=True))
        return {**{k: v for k, v in params.items() if k != "embed"}, "embed_t": embed_t}
    table = model.param_table(cfg)
    out = _tree_map(lambda a: a, params)  # new dicts, same leaves
    for name, p in table.items():
        perm = _linear_order(p)
        *path, leaf = name.split(".")
        d = out
        for part in path:
            d = d.get(part) if isinstance(d, dict) else None
        if perm is None or not isinstance(d, dict) or leaf not in d:
            continue
        w = d[leaf]
        if w.permute(perm).is_contiguous():
            continue
        inv = [perm.index(a) for a in range(w.ndim)]
        d[leaf] = _cached_copy(w, lambda w: _huge_page_copy(w.detach().permute(perm)).permute(inv))
    return out


def relays(backend, dtype, compile=False):
    """Whether a decode on `backend` in `dtype` runs on decode_layout's params: always, except torch eager in a
    16-bit dtype where oneDNN has a GEMM in it (AVX512-BF16, AMX): there its bmm copies a weight in the relaid order
    to a contiguous one on every call (the bench model's eager bf16 step on a 2-core AMX Xeon: 19.7-20.4 ms in the
    caller's order, 35-37 ms relaid). Without it (AVX2) the CPU's own bf16 matvec over our [in, out] order is a slow
    loop ([1, 512] @ [512, 1536]: 1,133 us, against 105 us in nn.Linear's order, on a 2-core EPYC). Eager fp32: the
    MKL GEMMs at batch 8 are faster in nn.Linear's order (the bench model's step on the AMX Xeon: 28.4 against 30.2
    ms) and the same at batch 1 (20.4-20.5 against 20.5-21.1 ms)."""
    if backend == "jax" or compile or dtype not in ("bfloat16", "float16"):
        return True
    import torch
    return not (torch.ops.mkldnn._is_mkldnn_bf16_supported() if dtype == "bfloat16"
                else torch.ops.mkldnn._is_mkldnn_fp16_supported())


def _cached_copy(w, make):
    """make(w), cached per array until w is freed or (torch) changed in place (its _version moves)."""
    import weakref
    version = getattr(w, "_version", None)
    hit = _LAYOUTS.get(id(w))
    if hit is None or hit[0]() is not w or hit[1] != version:
        hit = (weakref.ref(w, lambda _, k=id(w): _LAYOUTS.pop(k, None)), version, make(w))
        _LAYOUTS[id(w)] = hit
    return hit[2]


def _from_layout(params):
    """Inside a decode program: decode_layout's JAX storage back to the model's params (embed = embed_t.T)."""
    if isinstance(params, dict) and "embed_t" in params:
        params = dict(params)
        params["embed"] = params.pop("embed_t").T
    return params


def _argmax_jax(x, chunk=128):
    """jnp.argmax(x, -1) of [B, V] as the max of each `chunk`-wide block, the first block holding the largest, and
    the argmax inside it: the same index (ties to the first; a NaN is the largest, as in argmax, unless a +inf comes
    before it), but XLA:CPU's argmax, a variadic reduce, reads the [8, 151936] fp32 logits of bench_generate in
    2.8 ms, and this in 0.2 ms (a plain max, then argmaxes over 1,187 and 128 values)."""
    import jax.numpy as jnp
    B, V = x.shape
    n = -(-V // chunk)
    if n * chunk != V:
        x = jnp.pad(x, ((0, 0), (0, n * chunk - V)), constant_values=-jnp.inf)
    blocks = x.reshape(B, n, chunk)
    c = jnp.argmax(jnp.where(jnp.isnan(blocks), jnp.inf, blocks).max(-1), -1)  # the CPU max may drop NaN
    inside = jnp.take_along_axis(blocks, c[:, None, None], 1)[:, 0]
    return (c * chunk + jnp.argmax(inside, -1)).astype(jnp.int32)


def _argmax_torch(x, chunk=128):
    """torch.argmax(x, -1) of [B, V] the way _argmax_jax takes it, block maxima first: the same index (ties to
    the first; NaN is the largest, as amax propagates it), but torch's CPU argmax read the [8, 151936] fp32 logits
    of bench_generate in 0.85 ms and this in 0.13 ms (0.21 against 0.03 ms at B = 1). Inside a compiled program
    inductor's own argmax is kept."""
    import torch
    if torch.compiler.is_compiling() or x.shape[-1] < 2 * chunk:
        return torch.argmax(x, -1)
    B, V = x.shape
    n = -(-V // chunk)
    if n * chunk != V:
        x = torch.nn.functional.pad(x, (0, n * chunk - V), value=-float("inf"))
    blocks = x.reshape(B, n, chunk)
    c = torch.argmax(blocks.amax(-1), -1)
    return c * chunk + torch.argmax(blocks[torch.arange(B, device=x.device), c], -1)


def filter_logits(logits, top_k=None, top_p=None):
    """logits [B, V] float32 -> the same with -inf outside the top-k and outside the top-p nucleus: the smallest
    set of most likely tokens whose probability reaches top_p (a token is kept if the mass before it is < top_p),
    as transformers' TopK/TopP warpers. Either backend."""
    if _is_torch(logits):
        import torch
        if top_k is not None and top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -float("inf"))
        if top_p is not None and top_p < 1.0:
            srt, idx = torch.sort(logits, dim=-1, descending=True)
            p = torch.softmax(srt, dim=-1)
            drop = (torch.cumsum(p, dim=-1) - p) >= top_p
            drop[:, 0] = False
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, idx, drop), -float("inf"))
        return logits
    import jax
    import jax.numpy as jnp
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:
        idx = jnp.argsort(-logits, axis=-1)
        srt = jnp.take_along_axis(logits, idx, -1)
        p = jax.nn.softmax(srt, -1)
        drop = ((jnp.cumsum(p, -1) - p) >= top_p).at[:, 0].set(False)
        drop = jnp.zeros_like(drop).at[jnp.arange(drop.shape[0])[:, None], idx].set(drop)
        logits = jnp.where(drop, -jnp.inf, logits)
    return logits


def _greedy(temperature, top_k):
    return top_k == 1 or (isinstance(temperature, (int, float)) and temperature == 0.0)


def _sample(logits, rng, temperature, top_k, top_p):
    """Next ids [B] from float32 logits [B, V]: argmax when temperature is 0 (or top_k is 1), else
    temperature -> top-k -> top-p -> categorical. rng: a jax key or a torch.Generator."""
    if _is_torch(logits):
        import torch
        if _greedy(temperature, top_k):
            return _argmax_torch(logits)
        probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), -1)
        return torch.multinomial(probs, 1, generator=rng)[:, 0]
    import jax
    import jax.numpy as jnp
    if _greedy(temperature, top_k):
        return _argmax_jax(logits)
    # jax.random.categorical's own draw (argmax of logits + Gumbel noise from rng), through the faster argmax
    logits = filter_logits(logits / temperature, top_k, top_p)
    return _argmax_jax(logits + jax.random.gumbel(rng, logits.shape, logits.dtype))


class _Decoder:
    """The two compiled programs of a decode, for one (model, cfg, sampling kind, kernels) and one backend:
    prefill(params, cache, tokens, positions, segs, rng, temperature) -> (ids [B], logits [B, V] fp32, cache, rng)
    and step(params, cache, ids, positions, rng, temperature) -> (ids, logits, cache, rng).
    sampling: (greedy, top_k, top_p), static; the temperature is an input. compile (torch): the step goes through
    torch.compile (inductor: one fused program per cache shape, no per-op Python dispatch), the prefill stays
    eager; both run under no_grad, as inference tensors cannot enter a compiled graph."""

    def __init__(self, model, cfg, sampling, kernels, backend, compile=False):
        self.backend = backend
        greedy, top_k, top_p = sampling
        if backend == "torch" and not (kernels and "attention" in kernels):
            kernels = dict(kernels or {}, attention=_cpu_attention(model.attention))
        if backend == "jax" and not (kernels and "attention" in kernels):
            import jax
            if jax.default_backend() == "cpu":
                kernels = dict(kernels or {}, attention=_jax_cpu_attention(model.attention))
        kw = {"kernels": kernels} if kernels else {}

        def prefill(params, cache, tokens, positions, segs, rng, temperature):
            params = _from_layout(params)
            logits, cache = _last_logits(model, params, tokens, cfg, cache,
                                         dict(kw, positions=positions, segment_ids=segs))
            return self._pick(logits, cache, rng, 0.0 if greedy else temperature, top_k, top_p)

        def step(params, cache, ids, positions, rng, temperature):
            params = _from_layout(params)
            tokens = ids[:, None]
            segs = (tokens * 0 + 1)
            logits, cache = _last_logits(model, params, tokens, cfg, cache,
                                         dict(kw, positions=positions[:, None], segment_ids=segs))
            return self._pick(logits, cache, rng, 0.0 if greedy else temperature, top_k, top_p)

        if backend == "jax":
            import jax
            self.prefill = jax.jit(prefill, donate_argnums=(1,))
            self.step = jax.jit(step, donate_argnums=(1,))
        elif compile:
            import torch
            self.prefill = torch.no_grad()(prefill)
            self.step = torch.no_grad()(torch.compile(step, dynamic=False))
            if hasattr(model, "forward_hidden") and hasattr(model, "lm_head"):
                # two programs, layers then unembedding + sampling: in one, inductor inlines the final norm into
                # the unembedding's loop and recomputes it for each of the V rows (1.1 ms of a 5.9 ms unembedding
                # in bf16 on the bench machine); one that also returns h keeps it in a buffer and saved a guard
                # check and a call per token (10.55 against 10.71 ms, interleaved A/B), but a program has one
                # rounding setting, and with the head's (below) its layer kernels took twice as long (the step
                # 14-15 ms against 10.1).
                # The head rounds its logits to the model's dtype as the eager step and transformers do: inductor
                # otherwise drops a fused bf16/fp16 round trip, and the compiled bf16 head returned and argmaxed the
                # unrounded fp32 sums (up to 0.24 off the eager logits on a debug model), so a near-tie could pick
                # another id than transformers (emulate_precision_casts; the bench model's bf16 step, interleaved
                # A/B medians: 10.92 against 10.84 ms). The layers are left to inductor's precision: emulated there,
                # their kernels took 14-15 ms a step against 10.1.
                # Both programs' C++ is built with multiply-adds contracted to FMAs (-ffp-contract=fast): a dot
                # product then skips the rounding of each product. The bench model's bf16 step, interleaved A/B
                # (medians of 8-10 rounds of 64 steps): FMAs in the head 10.27 against 10.73 ms (a hand-written
                # AVX-512 matvec as the head ran 10.40 in the same A/B, so the head stays inductor's), and in the
                # layers as well 10.27 against 10.37 and 10.24 against 10.40
                def layers(params, cache, ids, positions):
                    tokens = ids[:, None]
                    out = model.forward_hidden(params, tokens, cfg, cache,
                                               **dict(kw, positions=positions[:, None], segment_ids=tokens * 0 + 1))
                    h = out[0][:, -1]
                    # batch 1: h goes to the head in fp32 (exact), so the head's loop over the table converts
                    # only the table's values, not h's again for each of its V rows
                    return (h.float() if h.shape[0] == 1 else h), out[1]

                def head(params, h, cache, rng, temperature):
                    logits = _unembed(h, model.lm_head(params, cfg))
                    return self._pick(logits, cache, rng, 0.0 if greedy else temperature, top_k, top_p)
                # the head is compiled at batch 1 only: at B > 1 inductor rewrites (table @ h.T).T back into
                # h @ table.T, the order the CPU GEMM streams 2.2x slower (34 against 15 ms at B = 8 in fp32)
                layers = torch.compile(layers, dynamic=False, options=_fma_options())
                head1 = torch.compile(head, dynamic=False, options=_head_options())
                self.step = torch.no_grad()(lambda params, cache, ids, positions, rng, temperature: (
                    head1 if ids.shape[0] == 1 else head)(params, *layers(params, cache, ids, positions), rng,
                                                           temperature))
        else:
            import torch
            self.prefill = torch.inference_mode()(prefill)
            self.step = torch.inference_mode()(step)

    def _pick(self, logits, cache, rng, temperature, top_k, top_p):
        if self.backend == "jax":
            import jax
            logits = logits.astype("float32")
            rng, sub = jax.random.split(rng)
            return _sample(logits, sub, temperature, top_k, top_p), logits, cache, rng
        logits = logits.float()
        return _sample(logits, rng, temperature, top_k, top_p), logits, cache, rng


def _fma_options():
    """inductor's options for a compiled decode program's C++ (see _Decoder): multiply-adds contracted to FMAs
    (-ffp-contract=fast), where this torch has the switch."""
    import torch._inductor.config as icfg
    if hasattr(getattr(icfg, "cpp", None), "enable_floating_point_contract_flag"):
        return {"cpp.enable_floating_point_contract_flag": "fast"}
    return {}


def _head_options():
    """inductor's options for the compiled batch-1 head (see _Decoder): logits rounded to the model's dtype, FMAs."""
    return {"emulate_precision_casts": True, **_fma_options()}


_DECODERS = {}


def _decoder(model, cfg, sampling, kernels, backend, compile=False):
    compile = compile and backend == "torch"  # a JAX step is always compiled (jit)
    key = (model.__name__, cfg, sampling, id(kernels) if kernels else None, backend, compile)
    if key not in _DECODERS:
        _DECODERS[key] = _Decoder(model, cfg, sampling, kernels, backend, compile)
    return _DECODERS[key]


class _Layers:
    """A stacked [L, ...] cache leaf as L buffers of its own behind the same a[i] the model's layer scan uses."""

    def __init__(self, bufs):
        self.bufs = list(bufs)

    def __getitem__(self, i):
        return self.bufs[i]


def _compiled_cache(cache, slots):
    """compile (torch): the prefilled cache grown to `slots` slots (a multiple of CACHE_BUCKET; the new slots are
    empty, segment 0, so masked), with k/v as one buffer per layer. The prefill runs into a cache of only the slots
    it needs and this copies it (the bench's 256-token prefill: 111.6 ms into a 257-slot cache, 125.8 ms into the
    512 slots of the bucket). Per layer: a layer's in-place write into a view of one stacked tensor makes the
    compiled program copy that layer's slice and write the whole stack back every step, a cost that grows with the
    cache length (the bench model's layers, bf16 B=1, 2,048 slots: 11.3 ms stacked against 6.0 per layer); into a
    buffer of its own the write is a mutation of a program input, done in place. A cache with other leaves (Qwen3-
    Next's conv and recurrent states, which the model reshapes into blocks) keeps k/v stacked."""
    def grown(a, axis):  # a copy of `a` with `slots` along `axis`, zeros past its own
        out = a.new_zeros(a.shape[:axis] + (slots,) + a.shape[axis + 1:])
        out.narrow(axis, 0, a.shape[axis]).copy_(a)
        return out
    out = dict(cache, seg=grown(cache["seg"], 1))
    for name in ("k", "v"):  # heads-major [L, B, Hkv, S, D]
        if set(cache) == {"k", "v", "seg", "len"}:
            out[name] = _Layers(grown(a, 2) for a in cache[name])
        else:
            out[name] = grown(cache[name], 3)
    return out


CACHE_BUCKET = 256  # a compiled torch step's cache length is rounded up to this, so lengths share one compile


def left_pad(prompts):
    """tokens [B, T] (0 on padding), positions [B, T] (cumsum(mask) - 1, 1 on padding as transformers),
    segment ids [B, T] (1 on tokens, 0 on padding), as int32 numpy."""
    T = max(len(p) for p in prompts)
    mask = np.array([[0] * (T - len(p)) + [1] * len(p) for p in prompts], np.int32)
    tokens = np.array([[0] * (T - len(p)) + list(p) for p in prompts], np.int32)
    positions = np.where(mask == 1, np.cumsum(mask, -1) - 1, 1).astype(np.int32)
    return tokens, positions, mask


def steps(model, cfg, params, prompts, max_new_tokens=32, temperature=0.0, top_k=None, top_p=None, seed=0,
          kernels=None, stats=None, compile=False):
    """Yields (ids: numpy int [B], logits [B, V] float32 on the device) for each new token position, as the
    device produces them; the step after has already been dispatched when ids are read. stats (a dict), if given,
    receives prefill/decode token counts and seconds. compile: torch.compile the torch decode step (its first
    call per batch size and cache bucket compiles, tens of seconds on a CPU); the cache then has a multiple of
    CACHE_BUCKET slots (the slots past the end are masked: the same results)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (Qwen has no BOS to start from)")
    if max_new_tokens <= 0:
        return
    leaf = _float_leaf(params)
    backend = "torch" if _is_torch(leaf) else "jax"
    dtype = str(leaf.dtype).replace("torch.", "")
    top_k = None if top_k in (None, 0) else int(top_k)
    greedy = not temperature or top_k == 1
    sampling = (greedy, None if greedy else top_k, None if greedy or top_p is None or top_p >= 1.0 else float(top_p))
    dec = _decoder(model, cfg, sampling, kernels, backend, compile)  # one per sampling kind; temperature is an input
    tokens, positions, segs = left_pad(prompts)
    B, T = tokens.shape
    S = T + max_new_tokens
    if backend == "torch" and relays(backend, dtype, compile):
        params = decode_layout(model, cfg, params)
    cache = model.init_cache(cfg, B, S, dtype=dtype, backend=backend)
    next_pos = positions[:, -1] + 1
    if backend == "jax":
        import jax
        import jax.numpy as jnp
        arr = jnp.asarray
        rng = jax.random.PRNGKey(seed)

        def read(x):
            return np.asarray(x)
    else:
        import torch
        dev = leaf.device

        def arr(x):
            return torch.as_tensor(x, device=dev, dtype=torch.long)
        if dev.type != "cpu":  # init_cache allocates on the CPU; move every leaf, whatever the cache holds
            cache = _tree_map(lambda a: a.to(dev), cache)
        rng = torch.Generator(device=dev).manual_seed(seed)

        def read(x):
            return x.cpu().numpy()
    t0 = time.perf_counter()
    temp = np.float32(1.0 if greedy else temperature)
    temp = jnp.asarray(temp) if backend == "jax" else torch.as_tensor(temp, device=leaf.device)
    ids, logits, cache, rng = dec.prefill(params, cache, arr(tokens), arr(positions), arr(segs), rng, temp)
    if compile and backend == "torch":  # the compiled step's cache: its slots rounded up to the bucket
        cache = _compiled_cache(cache, -(-S // CACHE_BUCKET) * CACHE_BUCKET)
    first = read(ids)
    t1 = time.perf_counter()
    if stats is not None:
        stats.update(prefill_tokens=int(segs.sum()), prefill_s=t1 - t0, decode_tokens=0, decode_s=0.0)
    pos = arr(next_pos)
    pending, pending_logits, host = ids, logits, first
    for i in range(max_new_tokens):
        nxt = None
        if i + 1 < max_new_tokens:  # dispatch step i+1 before reading step i's ids (JAX runs it meanwhile)
            nxt = dec.step(params, cache, pending, pos, rng, temp)
            cache, rng = nxt[2], nxt[3]
            pos = pos + 1
        if host is None:
            host = read(pending)
            if stats is not None:
                stats["decode_tokens"] += B
                stats["decode_s"] = time.perf_counter() - t1
        yield host, pending_logits
        if nxt is None:
            break
        pending, pending_logits, host = nxt[0], nxt[1], None


def generate(model, cfg, params, prompts, max_new_tokens=32, temperature=0.0, top_k=None, top_p=None, seed=0,
             eos_ids=None, kernels=None, stream=None, stats=None, compile=False):
    """New ids for each prompt (a list of lists of ints): greedy when temperature is 0, else sampled with
    temperature, top-k and top-p from `seed`. A row ends after its first EOS id (included) or max_new_tokens.
    eos_ids: ids to stop on; None takes cfg.eos_token_id. stream(row, id) is called for each new id as it is
    produced. stats (a dict), if given, receives prefill/decode token counts and seconds. compile: see steps."""
    if eos_ids is None:
        eos_ids = _ids(getattr(cfg, "eos_token_id", None))
    eos = set(int(e) for e in eos_ids)
    out = [[] for _ in prompts]
    done = [False] * len(prompts)
    it = steps(model, cfg, params, prompts, max_new_tokens, temperature, top_k, top_p, seed, kernels, stats, compile)
    for ids, _ in it:
        for r, t in enumerate(ids.tolist()):
            if done[r]:
                continue
            out[r].append(t)
            done[r] = t in eos
            if stream is not None:
                stream(r, t)
        if all(done):
            it.close()
            break
    return out


# ----------------------------------------------------------------------------------------------- command line
def _kernels(choice, backend, dtype):
    """The `kernels` dict: kernels_tpu.select (JAX) or kernels_gpu.select (torch); `auto` takes what applies to
    this machine and dtype (on a CPU: nothing, the model files' references), `ref` nothing."""
    if choice == "ref":
        return None
    import importlib
    import convert
    try:
        mod = importlib.import_module("kernels_tpu" if backend == "jax" else "kernels_gpu")
        return mod.select(choice, dtype=dtype) or None
    except (ImportError, AttributeError) as e:
        if choice == "auto":
            return None
        raise convert.UserError(f"--kernels {choice}: the kernels module is unavailable ({e})") from None
    except ValueError as e:
        raise convert.UserError(f"--kernels {choice}: {e}") from None


class _Printer:
    """Streams the decoded text of row 0: decodes everything so far and prints the new suffix once it is whole
    (byte-level BPE can split a character across tokens)."""

    def __init__(self, tok, out=sys.stdout):
        self.tok, self.out, self.ids, self.shown = tok, out, [], ""

    def __call__(self, row, t):
        if row != 0:
            return
        self.ids.append(t)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[len(self.shown):])
        self.out.flush()
        self.shown = text

    def finish(self):
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        self.out.write(text[len(self.shown):] + "\n")
        self.out.flush()


def _cli(hf, ckpt, prompt, chat, think, system, max_new_tokens, temperature, top_k, top_p, seed, backend, dtype,
         kernels, compile=False):
    import convert
    if (hf is None) == (ckpt is None):
        raise convert.UserError("give exactly one of --hf SRC and --ckpt DIR")
    if max_new_tokens < 0:
        raise convert.UserError(f"--max-new-tokens {max_new_tokens}: must be >= 0")
    if temperature < 0 or (top_p is not None and not 0 < top_p <= 1) or (top_k is not None and top_k < 0):
        raise convert.UserError("--temperature must be >= 0, --top-k >= 0, --top-p in (0, 1]")
    if hf is not None:
        folder = convert.resolve(hf)
        convert.read_config(folder)
        tok = load_tokenizer(folder)
        load = lambda: convert.load_hf(folder, backend=backend, dtype=dtype)  # noqa: E731
    else:
        folder = ckpt
        if not os.path.isdir(folder):
            raise convert.UserError(f"{folder}: no such folder")
        if not hasattr(convert, "load_checkpoint"):
            raise convert.UserError("--ckpt: this build's convert.py has no load_checkpoint")
        tok = load_tokenizer(folder)
        load = lambda: convert.load_checkpoint(folder, backend, dtype)  # noqa: E731
    template = _read_json(folder, "tokenizer_config.json").get("chat_template") or ""
    template = template if isinstance(template, str) else json.dumps(template)
    if chat:
        if think is False and tok.token_to_id("<think>") is None:
            raise convert.UserError(f"--no-think: {os.path.join(folder, 'tokenizer.json')} has no <think> token "
                                    "(not a Qwen3 model)")
        msgs = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": prompt}]
        text = chat_text(msgs, think, template)
    else:
        text = prompt if system is None else f"{system}\n\n{prompt}"
    ids = encode(tok, text)
    if not ids:
        raise convert.UserError("--prompt: encodes to no tokens")
    model, cfg, params = load()
    if max(ids) >= cfg.vocab_size:
        raise convert.UserError(f"{os.path.join(folder, 'tokenizer.json')}: token id {max(ids)} is outside the "
                                f"model's vocabulary ({cfg.vocab_size}); tokenizer and checkpoint do not match")
    eos = sorted(set(eos_ids_of(folder, tok)) | set(_ids(cfg.eos_token_id)))
    if relays(backend, dtype, compile):
        params = decode_layout(model, cfg, params)  # keeps only the relaid copy: one copy of the weights in memory
    printer = _Printer(tok)
    stats = {}
    generate(model, cfg, params, [ids], max_new_tokens, temperature, top_k, top_p, seed, eos_ids=eos,
             kernels=_kernels(kernels, backend, dtype), stream=printer, stats=stats, compile=compile)
    printer.finish()
    if stats:
        p, d = stats["prefill_tokens"], stats["decode_tokens"]
        print(f"prefill: {p} tokens in {stats['prefill_s']:.3f} s ({p / max(stats['prefill_s'], 1e-9):.1f} tok/s, "
              f"compile included on the first call); decode: {d} tokens in {stats['decode_s']:.3f} s "
              f"({d / max(stats['decode_s'], 1e-9):.1f} tok/s)", file=sys.stderr)


def _command():
    import click
    import convert

    @click.command(name="generate")
    @click.option("--hf", default=None, metavar="SRC", help="Hugging Face checkpoint folder or hub id.")
    @click.option("--ckpt", default=None, metavar="DIR", help="Converted or trained checkpoint folder.")
    @click.option("--prompt", required=True, help="The user message (chat) or the text to continue (--no-chat).")
    @click.option("--chat/--no-chat", default=True, show_default=True, help="Wrap the prompt in ChatML.")
    @click.option("--think/--no-think", default=None,
                  help="Qwen3 hybrid thinking switch; --no-think adds the empty think block. Default: model's own.")
    @click.option("--system", default=None, help="System message (chat), or text put before the prompt.")
    @click.option("--max-new-tokens", default=256, show_default=True, type=int)
    @click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy.")
    @click.option("--top-k", default=None, type=int)
    @click.option("--top-p", default=None, type=float)
    @click.option("--seed", default=0, show_default=True, type=int)
    @click.option("--backend", type=click.Choice(["jax", "torch"]), default="jax", show_default=True)
    @click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
    @click.option("--kernels", type=click.Choice(["auto", "ref"]), default="auto", show_default=True)
    @click.option("--compile/--no-compile", default=False, show_default=True,
                  help="torch: torch.compile the decode step (pays off over many tokens; JAX always compiles).")
    @convert.main_guard
    def main(hf, ckpt, prompt, chat, think, system, max_new_tokens, temperature, top_k, top_p, seed, backend,
             dtype, kernels, compile):
        """Generate text from a prompt; the completion is streamed to stdout, speeds go to stderr."""
        _cli(hf, ckpt, prompt, chat, think, system, max_new_tokens, temperature, top_k, top_p, seed, backend,
             dtype, kernels, compile)
    return main


main = _command()

if __name__ == "__main__":
    main()
