"""Qwen3 dense, one file, JAX and PyTorch.

Matches transformers' `Qwen3ForCausalLM`: pre-norm decoder, GQA attention with per-head RMSNorm on q and k
(applied before RoPE, weights shared by all heads), rotate-half RoPE, SwiGLU MLP, no biases unless
`attention_bias`, tied embeddings for the small sizes. Sizes: 0.6b 1.7b 4b 8b 14b 32b (+ debug).

Params are a nested dict of plain arrays (jax.Array or torch.Tensor), layers stacked on a leading axis so JAX
can scan them. Weights are einsum-ready: wq [embed, q_heads, head_dim], wo [q_heads, head_dim, embed].
The backend is picked from the arrays passed in; nothing here imports another project file.
"""
import dataclasses
import json
import math
from dataclasses import dataclass

import numpy as np

MODEL_TYPE = "qwen3"


# ----------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class Config:
    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 151643
    eos_token_id: int | tuple | None = 151645
    hf_json: str = "{}"  # the config.json this came from, kept so export writes back every field

    @classmethod
    def from_hf(cls, d, keys=None):
        """Reads a config.json dict; rope_theta at the top level or in rope_parameters (transformers 5).
        `keys`, the checkpoint's tensor names, matters only to files whose checkpoints vary in layout."""
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if rope and rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ValueError(f"rope_type {rope.get('rope_type')!r} is not supported")
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        heads = d["num_attention_heads"]
        eos = d.get("eos_token_id")
        return cls(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                   intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
                   num_attention_heads=heads, num_key_value_heads=d.get("num_key_value_heads") or heads,
                   head_dim=d.get("head_dim") or d["hidden_size"] // heads, rms_norm_eps=d.get("rms_norm_eps", 1e-6),
                   rope_theta=float(theta), max_position_embeddings=d.get("max_position_embeddings", 40960),
                   tie_word_embeddings=d.get("tie_word_embeddings", False),
                   attention_bias=d.get("attention_bias", False),
                   initializer_range=d.get("initializer_range", 0.02), bos_token_id=d.get("bos_token_id"),
                   eos_token_id=tuple(eos) if isinstance(eos, list) else eos, hf_json=json.dumps(d, sort_keys=True))

    def to_hf(self):
        d = json.loads(self.hf_json)
        d.pop("rope_scaling", None)
        d.update(model_type=MODEL_TYPE, architectures=["Qwen3ForCausalLM"], vocab_size=self.vocab_size,
                 hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                 num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                 num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
                 rms_norm_eps=self.rms_norm_eps, max_position_embeddings=self.max_position_embeddings,
                 tie_word_embeddings=self.tie_word_embeddings, attention_bias=self.attention_bias,
                 initializer_range=self.initializer_range, bos_token_id=self.bos_token_id,
                 eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
                 hidden_act="silu", rope_theta=self.rope_theta,
                 rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta})
        return d


def _size(h, layers, heads, kv, inter, tie, **kw):
    return Config(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                  intermediate_size=inter, tie_word_embeddings=tie, **kw)


SIZES = {
    "debug": _size(64, 2, 4, 2, 128, True, vocab_size=512, head_dim=32),
    "0.6b": _size(1024, 28, 16, 8, 3072, True),
    "1.7b": _size(2048, 28, 16, 8, 6144, True),
    "4b": _size(2560, 36, 32, 8, 9728, True),
    "8b": _size(4096, 36, 32, 8, 12288, False),
    "14b": _size(5120, 40, 40, 8, 17408, False),
    "32b": _size(5120, 64, 64, 8, 25600, False),
}


# ----------------------------------------------------------------------------------------------- backend shim
class _Jax:
    """The dozen ops that differ between jax.numpy and torch; everything else is written once below."""
    name = "jax"

    def __init__(self):
        import jax
        import jax.numpy as jnp
        self.jax, self.np = jax, jnp

    def dtype(self, name):
        return getattr(self.np, name) if isinstance(name, str) else name

    def cast(self, x, dtype):
        return x.astype(self.dtype(dtype))

    def asarray(self, x, dtype=None, like=None):
        return self.np.asarray(x, dtype=self.dtype(dtype) if dtype is not None else None)

    def rsqrt(self, x):
        return self.jax.lax.rsqrt(x)

    def mean(self, x, axis, keepdims=False):
        return x.mean(axis, keepdims=keepdims)

    def arange(self, n, like=None):
        return self.np.arange(n)

    def softmax(self, x, axis=-1):
        return self.jax.nn.softmax(x, axis=axis)

    def silu(self, x):
        return self.jax.nn.silu(x)

    def sigmoid(self, x):
        return self.jax.nn.sigmoid(x)

    def concat(self, xs, axis):
        return self.np.concatenate(xs, axis=axis)

    def update_slice(self, buf, new, start, axis):
        """Writes `new` into `buf` at `start` along `axis`; returns the buffer (functional on JAX)."""
        return self.jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), start, axis)

    def scan_layers(self, f, h, xs, remat=False):
        """h, ys = f(h, x) over the leading axis of every leaf of xs; returns (h, stacked ys)."""
        return self.jax.lax.scan(self.jax.checkpoint(f) if remat else f, h, xs)

    def normal(self, seed, name, shape, std, dtype):
        key = self.jax.random.fold_in(self.jax.random.PRNGKey(seed), _name_hash(name))
        return (std * self.jax.random.normal(key, shape, self.np.float32)).astype(self.dtype(dtype))

    def full(self, shape, value, dtype):
        return self.np.full(shape, value, self.dtype(dtype))


class _Torch:
    name = "torch"

    def __init__(self):
        import torch
        self.torch = self.np = torch

    def dtype(self, name):
        return getattr(self.torch, name) if isinstance(name, str) else name

    def cast(self, x, dtype):
        return x.to(self.dtype(dtype))

    def asarray(self, x, dtype=None, like=None):
        return self.torch.as_tensor(x, dtype=self.dtype(dtype) if dtype is not None else None,
                                    device=None if like is None else like.device)

    def rsqrt(self, x):
        return self.torch.rsqrt(x)

    def mean(self, x, axis, keepdims=False):
        return x.mean(axis, keepdim=keepdims)

    def arange(self, n, like=None):
        return self.torch.arange(n, device=None if like is None else like.device)

    def softmax(self, x, axis=-1):
        return self.torch.softmax(x, dim=axis)

    def silu(self, x):
        return self.torch.nn.functional.silu(x)

    def sigmoid(self, x):
        return self.torch.sigmoid(x)

    def concat(self, xs, axis):
        return self.torch.cat(xs, dim=axis)

    def update_slice(self, buf, new, start, axis):
        """In place (`index_copy_`), so a decode step never copies the cache."""
        idx = self.torch.arange(new.shape[axis], device=buf.device) + start
        return buf.index_copy_(axis, idx, new.to(buf.dtype))

    def scan_layers(self, f, h, xs, remat=False):
        n = next(iter(_leaves(xs))).shape[0]
        ys = []
        for i in range(n):
            # layer i's slice is taken inside the checkpoint, so whatever taking it costs (an FSDP all-gather of
            # the layer's weights) is redone in the backward instead of kept
            fi = lambda h, i=i: f(h, _tree_map(lambda a: a[i], xs))  # noqa: E731
            if remat:
                import torch.utils.checkpoint as ckpt
                h, y = ckpt.checkpoint(fi, h, use_reentrant=False)
            else:
                h, y = fi(h)
            ys.append(y)
        # ys hold views of the cache updated in place; restack only what is not a cache view
        return h, ys

    def normal(self, seed, name, shape, std, dtype):
        g = self.torch.Generator().manual_seed((seed * 1000003 + _name_hash(name)) % 2**63)
        return (std * self.torch.randn(shape, generator=g, dtype=self.torch.float32)).to(self.dtype(dtype))

    def full(self, shape, value, dtype):
        return self.torch.full(shape, value, dtype=self.dtype(dtype))


_SHIMS = {}


def shim(x_or_name):
    """The shim for a backend name ('jax'/'torch') or for the type of an array."""
    name = x_or_name if isinstance(x_or_name, str) else ("torch" if type(x_or_name).__module__.startswith("torch") else "jax")
    if name not in _SHIMS:
        _SHIMS[name] = {"jax": _Jax, "torch": _Torch}[name]()
    return _SHIMS[name]


def _name_hash(name):
    return int.from_bytes(name.encode()[-8:].rjust(8, b"\0"), "little") % (2**31 - 1) ^ len(name)


def _leaves(tree):
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _leaves(v)
    elif tree is not None:
        yield tree


def _tree_map(f, tree):
    if isinstance(tree, dict):
        return {k: _tree_map(f, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_tree_map(f, v) for v in tree)
    return None if tree is None else f(tree)


# ----------------------------------------------------------------------------------------------- parameter table
@dataclass(frozen=True)
class P:
    """One weight: shape, logical axes (shard.py), init, HF name template ({i} = layer) and its transform."""
    shape: tuple
    axes: tuple
    init: str  # "normal" | "ones" | "zeros"
    hf: str
    tf: str = "id"  # how ours relates to HF's [out, in] tensor, see _TF


# ours <- hf and hf <- ours, on numpy arrays, for one layer's slice
_TF = {
    "id": (lambda a, s: a, lambda a: a),
    "T": (lambda a, s: a.T, lambda a: a.T),                                   # [out,in] -> [in,out]
    "in_heads": (lambda a, s: a.T.reshape(s), lambda a: a.reshape(a.shape[0], -1).T),  # [h*d, e] -> [e, h, d]
    "out_heads": (lambda a, s: a.T.reshape(s), lambda a: a.reshape(-1, a.shape[-1]).T),  # [e, h*d] -> [h, d, e]
    "heads": (lambda a, s: a.reshape(s), lambda a: a.reshape(-1)),            # bias [h*d] -> [h, d]
}


def param_table(cfg):
    """Flat name -> P. 'layers.*' entries carry a leading layer axis. Init, sharding, loading, export and counts
    all derive from this table."""
    L, E, V, I = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    Hq, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    a = "model.layers.{i}.self_attn."
    m = "model.layers.{i}.mlp."
    t = {
        "embed": P((V, E), ("vocab", "embed"), "normal", "model.embed_tokens.weight"),
        "layers.attn_norm": P((L, E), ("layers", "norm"), "ones", "model.layers.{i}.input_layernorm.weight"),
        "layers.wq": P((L, E, Hq, D), ("layers", "embed", "q_heads", "head_dim"), "normal", a + "q_proj.weight", "in_heads"),
        "layers.wk": P((L, E, Hkv, D), ("layers", "embed", "kv_heads", "head_dim"), "normal", a + "k_proj.weight", "in_heads"),
        "layers.wv": P((L, E, Hkv, D), ("layers", "embed", "kv_heads", "head_dim"), "normal", a + "v_proj.weight", "in_heads"),
        "layers.wo": P((L, Hq, D, E), ("layers", "q_heads", "head_dim", "embed"), "normal", a + "o_proj.weight", "out_heads"),
        "layers.q_norm": P((L, D), ("layers", "norm"), "ones", a + "q_norm.weight"),
        "layers.k_norm": P((L, D), ("layers", "norm"), "ones", a + "k_norm.weight"),
        "layers.mlp_norm": P((L, E), ("layers", "norm"), "ones", "model.layers.{i}.post_attention_layernorm.weight"),
        "layers.w_gate": P((L, E, I), ("layers", "embed", "mlp"), "normal", m + "gate_proj.weight", "T"),
        "layers.w_up": P((L, E, I), ("layers", "embed", "mlp"), "normal", m + "up_proj.weight", "T"),
        "layers.w_down": P((L, I, E), ("layers", "mlp", "embed"), "normal", m + "down_proj.weight", "T"),
        "norm": P((E,), ("norm",), "ones", "model.norm.weight"),
    }
    if cfg.attention_bias:
        t["layers.bq"] = P((L, Hq, D), ("layers", "q_heads", "head_dim"), "zeros", a + "q_proj.bias", "heads")
        t["layers.bk"] = P((L, Hkv, D), ("layers", "kv_heads", "head_dim"), "zeros", a + "k_proj.bias", "heads")
        t["layers.bv"] = P((L, Hkv, D), ("layers", "kv_heads", "head_dim"), "zeros", a + "v_proj.bias", "heads")
        t["layers.bo"] = P((L, E), ("layers", "norm"), "zeros", a + "o_proj.bias")
    if not cfg.tie_word_embeddings:
        t["lm_head"] = P((E, V), ("embed", "vocab"), "normal", "lm_head.weight", "T")
    return t


def hf_entries(cfg, keys=None):
    """How params and HF tensors correspond: a list of (name, layer index or None, hf names, hf shapes,
    to_ours(list of np arrays) -> np array, to_hf(np array) -> list of np arrays). `keys` (the checkpoint's tensor
    names) is unused here; files whose checkpoints come in several layouts pick one from it."""
    out = []
    for name, p in param_table(cfg).items():
        ours, theirs = _TF[p.tf]
        stacked = name.startswith("layers.")
        shape = p.shape[1:] if stacked else p.shape
        hf_shape = theirs(np.zeros(shape, np.int8)).shape
        for i in (range(p.shape[0]) if stacked else [None]):
            out.append((name, i, [p.hf.format(i=i)], [hf_shape],
                        lambda arrs, f=ours, s=shape: f(arrs[0], s), lambda x, f=theirs: [f(x)]))
    return out


def count_params(cfg):
    """Total parameters, from the table (no allocation)."""
    return sum(math.prod(p.shape) for p in param_table(cfg).values())


def unflatten(flat):
    out = {}
    for k, v in flat.items():
        *path, leaf = k.split(".")
        d = out
        for part in path:
            d = d.setdefault(part, {})
        d[leaf] = v
    return out


def init(cfg, backend="jax", seed=0, dtype="float32"):
    """Random params on the named backend: normal(0, initializer_range) matrices, ones for norms, zeros for biases."""
    xp = shim(backend)
    flat = {}
    for name, p in param_table(cfg).items():
        if p.init == "normal":
            flat[name] = xp.normal(seed, name, p.shape, cfg.initializer_range, dtype)
        else:
            flat[name] = xp.full(p.shape, 1.0 if p.init == "ones" else 0.0, dtype)
    return unflatten(flat)


# ----------------------------------------------------------------------------------------------- model
def rms_norm(x, w, eps):
    """HF Qwen2RMSNorm: normalise in fp32, cast back, then multiply by the weight in the input dtype."""
    xp = shim(x)
    x32 = xp.cast(x, "float32")
    y = x32 * xp.rsqrt(xp.mean(x32 * x32, -1, keepdims=True) + eps)
    return w * xp.cast(y, x.dtype)


def rope_angles(positions, dim, theta, dtype):
    """cos, sin [B, T, dim] for integer positions [B, T]: fp32 angles, cast to the model dtype as HF does."""
    xp = shim(positions)
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    freqs = xp.cast(positions, "float32")[..., None] * xp.asarray(inv_freq, "float32", like=positions)
    emb = xp.concat([freqs, freqs], -1)
    return xp.cast(xp.np.cos(emb), dtype), xp.cast(xp.np.sin(emb), dtype)


def apply_rope(x, cos, sin):
    """Rotate-half (NeoX) RoPE on x [B, T, H, D] with cos/sin [B, T, D]."""
    xp = shim(x)
    half = x.shape[-1] // 2
    rot = xp.concat([-x[..., half:], x[..., :half]], -1)
    return x * cos[:, :, None, :] + rot * sin[:, :, None, :]


def attention(q, k, v, mask):
    """Reference GQA attention. q [B, T, Hq, D], k/v [B, S, Hkv, D], mask [B, T, S] bool (True = attend).
    Query head h uses kv head h // (Hq/Hkv), as HF's repeat_kv. Softmax in fp32, cast back."""
    xp = shim(q)
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    qg = q.reshape(B, T, Hkv, Hq // Hkv, D)
    s = xp.np.einsum("btkgd,bskd->bkgts", qg, k) * (D ** -0.5)
    s = xp.np.where(mask[:, None, None], xp.cast(s, "float32"), -1e30)
    p = xp.cast(xp.softmax(s, -1), q.dtype)
    o = xp.np.einsum("bkgts,bskd->btkgd", p, v)
    return o.reshape(B, T, Hq, D)


def make_mask(q_pos, k_pos, q_seg, k_seg):
    """Causal + same-segment mask [B, T, S] from absolute slot indices q_pos [T], k_pos [S] and segment ids
    q_seg [B, T], k_seg [B, S] (packed documents never see each other; slots past the cache's end have k_pos > q_pos)."""
    causal = q_pos[:, None] >= k_pos[None, :]
    return causal[None] & (q_seg[:, :, None] == k_seg[:, None, :])


def out_proj(o, w):
    """o [B, T, H, D] @ w [H, D, E], contracted as one [H*D, E] matrix: generate.decode_layout stores w in
    nn.Linear's [E, H*D] order, and a compiled decode step then reduces each output over contiguous memory (summed
    over (h, d) as two axes, inductor's CPU loop was slower in that order than in this one's)."""
    xp = shim(o)
    return xp.np.einsum("btf,fe->bte", o.reshape(*o.shape[:2], -1), w.reshape(-1, w.shape[-1]))


def mlp(x, w_gate, w_up, w_down):
    """SwiGLU: down(silu(gate(x)) * up(x))."""
    xp = shim(x)
    g = xp.np.einsum("bte,ef->btf", x, w_gate)
    u = xp.np.einsum("bte,ef->btf", x, w_up)
    return xp.np.einsum("btf,fe->bte", xp.silu(g) * u, w_down)


def layer(h, lp, cos, sin, mask, cache, slot, cfg, kernels):
    """One decoder layer. lp: this layer's params; cache: None or this layer's {'k','v'} [B, Hkv, S, D];
    slot: where the T new tokens go in the cache."""
    xp = shim(h)
    attn = kernels.get("attention", attention)
    norm = kernels.get("rms_norm", rms_norm)  # a fused kernel where one is selected
    x = norm(h, lp["attn_norm"], cfg.rms_norm_eps)
    q = xp.np.einsum("bte,ehd->bthd", x, lp["wq"])
    k = xp.np.einsum("bte,ehd->bthd", x, lp["wk"])
    v = xp.np.einsum("bte,ehd->bthd", x, lp["wv"])
    if cfg.attention_bias:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    q = apply_rope(rms_norm(q, lp["q_norm"], cfg.rms_norm_eps), cos, sin)
    k = apply_rope(rms_norm(k, lp["k_norm"], cfg.rms_norm_eps), cos, sin)
    if cache is not None:
        # heads-major cache [B, Hkv, S, D]: each head's keys one contiguous block, which the CPU bmm reads as is
        # (a [B, S, Hkv, D] view makes it copy the whole cache per call); attention sees the [B, S, Hkv, D] view
        cache = {"k": xp.update_slice(cache["k"], xp.np.swapaxes(k, 1, 2), slot, 2),
                 "v": xp.update_slice(cache["v"], xp.np.swapaxes(v, 1, 2), slot, 2)}
        k, v = xp.np.swapaxes(cache["k"], 1, 2), xp.np.swapaxes(cache["v"], 1, 2)
    o = attn(q, k, v, mask)
    o = out_proj(o, lp["wo"])
    if cfg.attention_bias:
        o = o + lp["bo"]
    h = h + o
    h = h + mlp(norm(h, lp["mlp_norm"], cfg.rms_norm_eps), lp["w_gate"], lp["w_up"], lp["w_down"])
    return h, cache


def init_cache(cfg, batch, max_len, dtype="float32", backend="jax"):
    """Preallocated decode cache: k/v [L, B, Hkv, S, D] (K after k_norm and RoPE), the segment id of each slot
    (0 = empty or padding), and `len`, the number of slots written."""
    xp = shim(backend)
    L, Hkv, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    return {"k": xp.full((L, batch, Hkv, max_len, D), 0, dtype), "v": xp.full((L, batch, Hkv, max_len, D), 0, dtype),
            "seg": xp.full((batch, max_len), 0, "int32"), "len": xp.asarray(0, "int32")}


def forward_hidden(params, tokens, cfg, cache=None, *, positions=None, segment_ids=None, kernels=None, remat=False):
    """tokens [B, T] -> (final-normed hidden [B, T, E], cache, aux). positions [B, T] default to the cache length
    + arange(T); segment_ids [B, T] (0 = padding) keep packed documents apart. aux is {} for a dense model."""
    xp = shim(tokens)
    kernels = kernels or {}
    B, T = tokens.shape
    emb = params["embed"]
    constrain = kernels.get("constrain", lambda x, axes: x)  # activation shardings on a shard.py mesh
    lookup = kernels.get("embed", lambda table, ids: table[ids])  # train.py's in-place gradient for a tied table
    h = constrain(lookup(emb, tokens), ("batch", "seq", "embed"))
    start = cache["len"] if cache is not None else 0
    t_idx = xp.arange(T, like=tokens) + start
    if positions is None:
        positions = xp.np.broadcast_to(t_idx[None], (B, T))
    if segment_ids is None:
        segment_ids = xp.np.ones_like(tokens)
    cos, sin = rope_angles(positions, cfg.head_dim, cfg.rope_theta, emb.dtype)
    if cache is None:
        mask = make_mask(t_idx, t_idx, segment_ids, segment_ids)
        xs = params["layers"]
    else:
        seg = xp.update_slice(cache["seg"], xp.cast(segment_ids, "int32"), start, 1)
        S = seg.shape[1]
        k_idx = xp.arange(S, like=tokens)
        mask = make_mask(t_idx, k_idx, segment_ids, seg)
        xs = (params["layers"], {"k": cache["k"], "v": cache["v"]})

    def step(h, x):
        lp, lc = x if cache is not None else (x, None)
        h, y = layer(h, lp, cos, sin, mask, lc, start, cfg, kernels)
        return constrain(h, ("batch", "seq", "embed")), y

    h, ys = xp.scan_layers(step, h, xs, remat=remat)
    if cache is not None:
        kv = {"k": ys["k"], "v": ys["v"]} if xp.name == "jax" else {"k": cache["k"], "v": cache["v"]}
        cache = {**kv, "seg": seg, "len": cache["len"] + T}
    return rms_norm(h, params["norm"], cfg.rms_norm_eps), cache, {}


def lm_head(params, cfg):
    """The unembedding [E, V] (the embedding's transpose when tied)."""
    return params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]


def forward(params, tokens, cfg, cache=None, **kw):
    """tokens int [B, T] -> (logits [B, T, V] in the params' dtype, cache). cache=None runs without one."""
    h, cache, _ = forward_hidden(params, tokens, cfg, cache, **kw)
    xp = shim(h)
    return xp.np.einsum("bte,ev->btv", h, lm_head(params, cfg)), cache
