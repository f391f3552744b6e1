"""Qwen3-MoE, one file, JAX and PyTorch.

Matches transformers' `Qwen3MoeForCausalLM`: Qwen3 attention (GQA, per-head RMSNorm on q and k before
rotate-half RoPE, head_dim 128) and, in place of the dense MLP, a sparse mixture of SwiGLU experts with no shared
expert. Layer i is sparse iff i not in `mlp_only_layers` and (i+1) % `decoder_sparse_step` == 0 (every layer in
the released checkpoints); the other layers keep a dense SwiGLU MLP of `intermediate_size`.
Sizes: 30b-a3b (30.5B total, 3.35B active), 235b-a22b (+ debug). The 2507 revisions differ only in rope_theta and
max_position_embeddings, which `Config.from_hf` reads from their config.json.

The MoE block, per token (HF `Qwen3MoeSparseMoeBlock`):
    p = softmax(x @ router) in fp32;  top-k of p (of p + router_bias when given);  w = p at the chosen experts,
    renormalised to sum 1 when norm_topk_prob, cast to the model dtype;  y = sum_k w_k * down_k(silu(gate_k x) * up_k x)
Dispatch is dropless by default: the B*T*k token-slots are sorted by expert and each projection is one grouped
matmul over the sorted rows (`jax.lax.ragged_dot`; `torch._grouped_mm`, or a per-expert loop over contiguous rows
where it cannot run). With `Config.capacity_factor` set (training, as MaxText), each expert takes at most
C = ceil(capacity_factor * B*T*k / experts) slots, earlier tokens first; the rest are dropped (they add nothing
to the output) and counted in aux["dropped"].

Load balancing: aux["router_aux_loss"] is transformers' `load_balancing_loss_func` over all sparse layers
(unweighted; the loss adds router_aux_loss_coef times it). The auxiliary-loss-free alternative (DeepSeek-V3,
torchtitan) passes `router_bias` [n_sparse, experts], added to the probabilities for the top-k choice only, and
moves it with `update_router_bias(bias, aux["expert_counts"], rate)` after each step.

Params are a nested dict of plain arrays (jax.Array or torch.Tensor), einsum-ready:
    embed [vocab, embed]; norm [embed]; lm_head [embed, vocab] (untied sizes)
    layers.*  attention and norms of all L layers, as qwen3: wq [L, embed, q_heads, head_dim], ...
    moe.router [S, embed, experts];  moe.w_gate, moe.w_up [S, experts, embed, moe_mlp]
    moe.w_down [S, experts, moe_mlp, embed]
    mlp.w_gate, mlp.w_up [D, embed, mlp];  mlp.w_down [D, mlp, embed]      (only when some layers are dense)
S = number of sparse layers, D = number of dense ones; logical axes as qwen3's plus "experts" and "moe_mlp".
When every layer is sparse, JAX scans over the layers; otherwise the layers run in a Python loop.
Checkpoints load from the hub's per-expert tensors (mlp.experts.E.gate_proj.weight ...) or from transformers 5's
fused ones (mlp.experts.gate_up_proj [E, 2I, H], gate rows first; mlp.experts.down_proj [E, H, I]); export
writes the hub layout.
The backend is picked from the arrays passed in; nothing here imports another project file.
"""
import json
import math
import re
from dataclasses import dataclass

import numpy as np

MODEL_TYPE = "qwen3_moe"


# ----------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class Config:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144  # dense layers only (none in the released checkpoints)
    moe_intermediate_size: int = 768
    num_hidden_layers: int = 48
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    head_dim: int = 128
    num_experts: int = 128
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple = ()
    router_aux_loss_coef: float = 0.001
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 151643
    eos_token_id: int | tuple | None = 151645
    capacity_factor: float | None = None  # ours, not HF's: None = dropless; a number = token dropping (training)
    hf_json: str = "{}"  # the config.json this came from, kept so export writes back every field

    @property
    def sparse_layers(self):
        """Indices of the MoE layers (HF `Qwen3MoeDecoderLayer`'s rule)."""
        return tuple(i for i in range(self.num_hidden_layers) if i not in self.mlp_only_layers
                     and self.num_experts > 0 and (i + 1) % self.decoder_sparse_step == 0)

    @property
    def dense_layers(self):
        return tuple(i for i in range(self.num_hidden_layers) if i not in self.sparse_layers)

    @classmethod
    def from_hf(cls, d, keys=None):
        """Reads a config.json dict: rope_theta at the top level or in rope_parameters (transformers 5), the expert
        count as `num_experts` (hub) or `num_local_experts` (transformers 5). `keys`, the checkpoint's tensor names,
        must show the same number of experts (ValueError naming both otherwise)."""
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if rope and rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ValueError(f"rope_type {rope.get('rope_type')!r} is not supported")
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        n_exp, n_local = d.get("num_experts"), d.get("num_local_experts")
        if n_exp is not None and n_local is not None and n_exp != n_local:
            raise ValueError(f"num_experts={n_exp} and num_local_experts={n_local} disagree")
        experts = n_exp if n_exp is not None else n_local if n_local is not None else 128  # HF's default
        heads = d["num_attention_heads"]
        eos = d.get("eos_token_id")
        cfg = cls(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                  intermediate_size=d.get("intermediate_size", 6144),
                  moe_intermediate_size=d.get("moe_intermediate_size", 768), num_hidden_layers=d["num_hidden_layers"],
                  num_attention_heads=heads, num_key_value_heads=d.get("num_key_value_heads") or heads,
                  head_dim=d.get("head_dim") or d["hidden_size"] // heads, num_experts=experts,
                  num_experts_per_tok=d.get("num_experts_per_tok", 8), norm_topk_prob=d.get("norm_topk_prob", False),
                  decoder_sparse_step=d.get("decoder_sparse_step", 1),
                  mlp_only_layers=tuple(d.get("mlp_only_layers") or ()),
                  router_aux_loss_coef=d.get("router_aux_loss_coef", 0.001), rms_norm_eps=d.get("rms_norm_eps", 1e-6),
                  rope_theta=float(theta), max_position_embeddings=d.get("max_position_embeddings", 40960),
                  tie_word_embeddings=d.get("tie_word_embeddings", False),
                  attention_bias=d.get("attention_bias", False),
                  initializer_range=d.get("initializer_range", 0.02), bos_token_id=d.get("bos_token_id"),
                  eos_token_id=tuple(eos) if isinstance(eos, list) else eos, hf_json=json.dumps(d, sort_keys=True))
        if keys is not None:
            for i, n in sorted(_checkpoint_experts(keys).items()):
                if n != cfg.num_experts:
                    raise ValueError(f"the checkpoint has {n} experts in layer {i} (model.layers.{i}.mlp.experts.*) "
                                     f"but config.json says num_experts={cfg.num_experts}")
        return cfg

    def to_hf(self):
        d = json.loads(self.hf_json)
        d.pop("rope_scaling", None)
        d.pop("num_local_experts", None)
        d.update(model_type=MODEL_TYPE, architectures=["Qwen3MoeForCausalLM"], vocab_size=self.vocab_size,
                 hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                 moe_intermediate_size=self.moe_intermediate_size, num_hidden_layers=self.num_hidden_layers,
                 num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
                 head_dim=self.head_dim, num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                 norm_topk_prob=self.norm_topk_prob, decoder_sparse_step=self.decoder_sparse_step,
                 mlp_only_layers=list(self.mlp_only_layers), router_aux_loss_coef=self.router_aux_loss_coef,
                 rms_norm_eps=self.rms_norm_eps, max_position_embeddings=self.max_position_embeddings,
                 tie_word_embeddings=self.tie_word_embeddings, attention_bias=self.attention_bias,
                 initializer_range=self.initializer_range, bos_token_id=self.bos_token_id,
                 eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
                 hidden_act="silu", rope_theta=self.rope_theta,
                 rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta})
        return d


def _checkpoint_experts(keys):
    """{layer: number of experts} as the hub's per-expert tensor names show it (highest index + 1)."""
    seen = {}
    for k in keys:
        m = re.match(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.", k)
        if m:
            seen[int(m[1])] = max(seen.get(int(m[1]), 0), int(m[2]) + 1)
    return seen


def _size(h, layers, heads, kv, experts, moe_inter, **kw):
    return Config(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                  num_experts=experts, moe_intermediate_size=moe_inter, **kw)


SIZES = {
    "debug": _size(64, 2, 4, 2, 16, 32, num_experts_per_tok=4, vocab_size=512, head_dim=32, intermediate_size=128),
    "30b-a3b": _size(2048, 48, 32, 4, 128, 768, intermediate_size=6144),
    "235b-a22b": _size(4096, 94, 64, 4, 128, 1536, intermediate_size=12288),
}


# ----------------------------------------------------------------------------------------------- backend shim
# same as qwen3._Jax
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


# same as qwen3._Torch
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


class _MoeJax(_Jax):
    """The MoE ops on top of the shared shim: routing, sorting and the grouped matmul."""

    def top_k(self, x, k):
        return self.jax.lax.top_k(x, k)

    def take_along(self, x, idx):
        return self.np.take_along_axis(x, idx, axis=-1)

    def argsort(self, x):
        return self.np.argsort(x, stable=True)

    def bincount(self, x, n, weights=None):
        return self.np.bincount(x, weights=weights, length=n)

    def cumsum(self, x):
        return self.np.cumsum(x)

    def grouped_mm(self, a, b, group_sizes):
        """a [M, K] rows sorted by group, b [G, K, N], group_sizes [G] -> [M, N]."""
        return self.jax.lax.ragged_dot(a, b, group_sizes.astype(self.np.int32))

    def rows_into(self, n, idx, rows):
        """[n, ...] zeros with rows[j] written at row idx[j] (duplicates: one of them wins)."""
        return self.np.zeros((n,) + rows.shape[1:], rows.dtype).at[idx].set(rows)

    def remat(self, f):
        return self.jax.checkpoint(f)


class _MoeTorch(_Torch):

    def top_k(self, x, k):
        return self.torch.topk(x, k, dim=-1)

    def take_along(self, x, idx):
        return self.torch.gather(x, -1, idx)

    def argsort(self, x):
        return self.torch.argsort(x, stable=True)

    def bincount(self, x, n, weights=None):  # scatter_add: a static shape (DTensor has a rule for it)
        w = self.torch.ones_like(x) if weights is None else weights
        return w.new_zeros(n).scatter_add(0, x, w)

    def cumsum(self, x):
        return self.torch.cumsum(x, 0)

    def grouped_mm(self, a, b, group_sizes):
        """a [M, K] rows sorted by group, b [G, K, N], group_sizes [G] -> [M, N]. torch._grouped_mm (offsets are
        int32 cumulative ends) where it runs: fp32/bf16 on CPU, bf16 on CUDA, rows 16-byte aligned; otherwise one
        matmul per group over its contiguous rows (a host sync for the offsets)."""
        torch = self.torch
        ends = torch.cumsum(group_sizes, 0)
        dt, size = a.dtype, a.element_size()
        if (hasattr(torch, "_grouped_mm") and b.dtype == dt and a.shape[1] * size % 16 == 0
                and b.shape[2] * size % 16 == 0
                and (dt == torch.bfloat16 or (dt == torch.float32 and a.device.type == "cpu"))):
            gmm = torch._grouped_mm
            if dt == torch.float32 and torch.compiler.is_compiling():  # its compile-time (meta) kernel takes bf16 only
                gmm = torch.compiler.disable(gmm)
            return gmm(a.contiguous(), b, offs=ends.to(torch.int32))
        ends = ends.tolist()
        return torch.cat([a[s:e] @ b[g] for g, (s, e) in enumerate(zip([0] + ends[:-1], ends))])

    def rows_into(self, n, idx, rows):
        return rows.new_zeros((n,) + tuple(rows.shape[1:])).index_copy(0, idx, rows)

    def remat(self, f):
        import torch.utils.checkpoint as ckpt
        return lambda *a: ckpt.checkpoint(f, *a, use_reentrant=False)


_SHIMS = {}  # same as qwen3._SHIMS


def shim(x_or_name):
    """The shim for a backend name ('jax'/'torch') or for the type of an array."""
    name = x_or_name if isinstance(x_or_name, str) else ("torch" if type(x_or_name).__module__.startswith("torch") else "jax")
    if name not in _SHIMS:
        _SHIMS[name] = {"jax": _MoeJax, "torch": _MoeTorch}[name]()
    return _SHIMS[name]


# same as qwen3._name_hash
def _name_hash(name):
    return int.from_bytes(name.encode()[-8:].rjust(8, b"\0"), "little") % (2**31 - 1) ^ len(name)


# same as qwen3._leaves
def _leaves(tree):
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _leaves(v)
    elif tree is not None:
        yield tree


# same as qwen3._tree_map
def _tree_map(f, tree):
    if isinstance(tree, dict):
        return {k: _tree_map(f, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_tree_map(f, v) for v in tree)
    return None if tree is None else f(tree)


# ----------------------------------------------------------------------------------------------- parameter table
# same as qwen3.P
@dataclass(frozen=True)
class P:
    """One weight: shape, logical axes (shard.py), init, HF name template ({i} = layer) and its transform."""
    shape: tuple
    axes: tuple
    init: str  # "normal" | "ones" | "zeros"
    hf: str
    tf: str = "id"  # how ours relates to HF's [out, in] tensor, see _TF


# same as qwen3._TF
_TF = {
    "id": (lambda a, s: a, lambda a: a),
    "T": (lambda a, s: a.T, lambda a: a.T),                                   # [out,in] -> [in,out]
    "in_heads": (lambda a, s: a.T.reshape(s), lambda a: a.reshape(a.shape[0], -1).T),  # [h*d, e] -> [e, h, d]
    "out_heads": (lambda a, s: a.T.reshape(s), lambda a: a.reshape(-1, a.shape[-1]).T),  # [e, h*d] -> [h, d, e]
    "heads": (lambda a, s: a.reshape(s), lambda a: a.reshape(-1)),            # bias [h*d] -> [h, d]
}


def param_table(cfg):
    """Flat name -> P. 'layers.*' entries carry a leading axis over all layers, 'moe.*' over the sparse layers and
    'mlp.*' over the dense ones; {i} in an HF name is the absolute layer index, {e} the expert. Init, sharding,
    loading, export and counts all derive from this table."""
    L, E, V, I = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    Hq, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    S, X, F, Ld = len(cfg.sparse_layers), cfg.num_experts, cfg.moe_intermediate_size, len(cfg.dense_layers)
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
        "norm": P((E,), ("norm",), "ones", "model.norm.weight"),
    }
    if cfg.attention_bias:
        t["layers.bq"] = P((L, Hq, D), ("layers", "q_heads", "head_dim"), "zeros", a + "q_proj.bias", "heads")
        t["layers.bk"] = P((L, Hkv, D), ("layers", "kv_heads", "head_dim"), "zeros", a + "k_proj.bias", "heads")
        t["layers.bv"] = P((L, Hkv, D), ("layers", "kv_heads", "head_dim"), "zeros", a + "v_proj.bias", "heads")
        t["layers.bo"] = P((L, E), ("layers", "norm"), "zeros", a + "o_proj.bias")
    if S:
        t["moe.router"] = P((S, E, X), ("layers", "embed", "experts"), "normal", m + "gate.weight", "T")
        t["moe.w_gate"] = P((S, X, E, F), ("layers", "experts", "embed", "moe_mlp"), "normal",
                            m + "experts.{e}.gate_proj.weight", "T")
        t["moe.w_up"] = P((S, X, E, F), ("layers", "experts", "embed", "moe_mlp"), "normal",
                          m + "experts.{e}.up_proj.weight", "T")
        t["moe.w_down"] = P((S, X, F, E), ("layers", "experts", "moe_mlp", "embed"), "normal",
                            m + "experts.{e}.down_proj.weight", "T")
    if Ld:
        t["mlp.w_gate"] = P((Ld, E, I), ("layers", "embed", "mlp"), "normal", m + "gate_proj.weight", "T")
        t["mlp.w_up"] = P((Ld, E, I), ("layers", "embed", "mlp"), "normal", m + "up_proj.weight", "T")
        t["mlp.w_down"] = P((Ld, I, E), ("layers", "mlp", "embed"), "normal", m + "down_proj.weight", "T")
    if not cfg.tie_word_embeddings:
        t["lm_head"] = P((E, V), ("embed", "vocab"), "normal", "lm_head.weight", "T")
    return t


def _stack_layers(cfg, name):
    """The absolute layer index of each slice of a stacked param (None: not stacked)."""
    group = name.split(".")[0]
    return {"layers": tuple(range(cfg.num_hidden_layers)), "moe": cfg.sparse_layers, "mlp": cfg.dense_layers}.get(group)


# transformers 5's fused expert tensors: name -> (HF name, ours <- hf [E, 2I, H] or [E, H, I]); load only
_FUSED = {
    "moe.w_gate": ("model.layers.{i}.mlp.experts.gate_up_proj", lambda a, F: a[:, :F].transpose(0, 2, 1)),
    "moe.w_up": ("model.layers.{i}.mlp.experts.gate_up_proj", lambda a, F: a[:, F:].transpose(0, 2, 1)),
    "moe.w_down": ("model.layers.{i}.mlp.experts.down_proj", lambda a, F: a.transpose(0, 2, 1)),
}


def _fused_to_hf(x):
    raise ValueError("the fused expert layout is read, never written: export with hf_entries(cfg) (keys=None)")


def hf_entries(cfg, keys=None):
    """How params and HF tensors correspond: a list of (name, stacked index or None, hf names, hf shapes,
    to_ours(list of np arrays) -> np array, to_hf(np array) -> list of np arrays). Experts come from the hub's
    per-expert tensors (one entry reads a layer's E tensors and stacks them), or, when `keys` (the checkpoint's
    tensor names) hold transformers 5's fused `mlp.experts.gate_up_proj`, from the fused ones. keys=None: the hub
    layout, as export writes it."""
    fused = keys is not None and any(k.endswith(".mlp.experts.gate_up_proj") for k in keys)
    X, F, E = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
    out = []
    for name, p in param_table(cfg).items():
        ours, theirs = _TF[p.tf]
        layers = _stack_layers(cfg, name)
        shape = p.shape[1:] if layers is not None else p.shape
        for j, i in (enumerate(layers) if layers is not None else [(None, None)]):
            if "{e}" in p.hf and fused:
                hf_name, to_ours = _FUSED[name]
                hf_shape = (X, 2 * F, E) if name != "moe.w_down" else (X, E, F)
                out.append((name, j, [hf_name.format(i=i)], [hf_shape],
                            lambda arrs, f=to_ours: np.ascontiguousarray(f(arrs[0], F)), _fused_to_hf))
            elif "{e}" in p.hf:  # one [out, in] tensor per expert
                hf_shape = theirs(np.zeros(shape[1:], np.int8)).shape
                out.append((name, j, [p.hf.format(i=i, e=e) for e in range(X)], [hf_shape] * X,
                            lambda arrs, f=ours, s=shape[1:]: np.stack([f(a, s) for a in arrs]),
                            lambda x, f=theirs: [f(a) for a in x]))
            else:
                hf_shape = theirs(np.zeros(shape, np.int8)).shape
                out.append((name, j, [p.hf.format(i=i)], [hf_shape],
                            lambda arrs, f=ours, s=shape: f(arrs[0], s), lambda x, f=theirs: [f(x)]))
    return out


def count_params(cfg, active=False):
    """Total parameters from the table (no allocation); active=True counts, of the experts, only the
    num_experts_per_tok that each token uses (router, attention, embeddings and dense layers count in full)."""
    def n(name, p):
        if active and name.startswith("moe.w_"):  # [S, X, ...]: k of the X experts
            return math.prod(p.shape) // cfg.num_experts * cfg.num_experts_per_tok
        return math.prod(p.shape)
    return sum(n(name, p) for name, p in param_table(cfg).items())


def active_params(cfg):
    return count_params(cfg, active=True)


# same as qwen3.unflatten
def unflatten(flat):
    out = {}
    for k, v in flat.items():
        *path, leaf = k.split(".")
        d = out
        for part in path:
            d = d.setdefault(part, {})
        d[leaf] = v
    return out


# same as qwen3.init
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


def init_router_bias(cfg, backend="jax"):
    """Zeros [n_sparse, experts] fp32: the starting routing bias of auxiliary-loss-free balancing."""
    return shim(backend).full((len(cfg.sparse_layers), cfg.num_experts), 0.0, "float32")


def update_router_bias(bias, expert_counts, rate):
    """One auxiliary-loss-free balancing step (DeepSeek-V3; torchtitan's `_update_expert_bias`): raise the bias of
    experts loaded below their layer's mean, lower it above, by `rate`, centred so each layer's bias sums to what it
    did. bias [n_sparse, E] fp32, expert_counts [n_sparse, E] (aux["expert_counts"], summed over micro-batches)."""
    xp = shim(bias)
    load = xp.cast(expert_counts, "float32")
    delta = rate * xp.np.sign(xp.mean(load, -1, keepdims=True) - load)
    return bias + (delta - xp.mean(delta, -1, keepdims=True))


# ----------------------------------------------------------------------------------------------- model
# same as qwen3.rms_norm
def rms_norm(x, w, eps):
    """HF Qwen2RMSNorm: normalise in fp32, cast back, then multiply by the weight in the input dtype."""
    xp = shim(x)
    x32 = xp.cast(x, "float32")
    y = x32 * xp.rsqrt(xp.mean(x32 * x32, -1, keepdims=True) + eps)
    return w * xp.cast(y, x.dtype)


# same as qwen3.rope_angles
def rope_angles(positions, dim, theta, dtype):
    """cos, sin [B, T, dim] for integer positions [B, T]: fp32 angles, cast to the model dtype as HF does."""
    xp = shim(positions)
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    freqs = xp.cast(positions, "float32")[..., None] * xp.asarray(inv_freq, "float32", like=positions)
    emb = xp.concat([freqs, freqs], -1)
    return xp.cast(xp.np.cos(emb), dtype), xp.cast(xp.np.sin(emb), dtype)


# same as qwen3.apply_rope
def apply_rope(x, cos, sin):
    """Rotate-half (NeoX) RoPE on x [B, T, H, D] with cos/sin [B, T, D]."""
    xp = shim(x)
    half = x.shape[-1] // 2
    rot = xp.concat([-x[..., half:], x[..., :half]], -1)
    return x * cos[:, :, None, :] + rot * sin[:, :, None, :]


# same as qwen3.attention
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


# same as qwen3.make_mask
def make_mask(q_pos, k_pos, q_seg, k_seg):
    """Causal + same-segment mask [B, T, S] from absolute slot indices q_pos [T], k_pos [S] and segment ids
    q_seg [B, T], k_seg [B, S] (packed documents never see each other; slots past the cache's end have k_pos > q_pos)."""
    causal = q_pos[:, None] >= k_pos[None, :]
    return causal[None] & (q_seg[:, :, None] == k_seg[:, None, :])


# same as qwen3.out_proj
def out_proj(o, w):
    """o [B, T, H, D] @ w [H, D, E], contracted as one [H*D, E] matrix: generate.decode_layout stores w in
    nn.Linear's [E, H*D] order, and a compiled decode step then reduces each output over contiguous memory (summed
    over (h, d) as two axes, inductor's CPU loop was slower in that order than in this one's)."""
    xp = shim(o)
    return xp.np.einsum("btf,fe->bte", o.reshape(*o.shape[:2], -1), w.reshape(-1, w.shape[-1]))


# same as qwen3.mlp
def mlp(x, w_gate, w_up, w_down):
    """SwiGLU: down(silu(gate(x)) * up(x))."""
    xp = shim(x)
    g = xp.np.einsum("bte,ef->btf", x, w_gate)
    u = xp.np.einsum("bte,ef->btf", x, w_up)
    return xp.np.einsum("btf,fe->bte", xp.silu(g) * u, w_down)


def route(x, router, cfg, bias=None):
    """x [N, E] -> (probs [N, X] fp32, chosen experts [N, k], their weights [N, k] in x's dtype), as HF's
    Qwen3MoeTopKRouter: logits in the model dtype, softmax in fp32, top-k, optional renormalisation. `bias` [X]
    (auxiliary-loss-free balancing) shifts the choice only; the weights stay the unbiased probabilities."""
    xp = shim(x)
    logits = xp.np.einsum("ne,ex->nx", x, router)
    probs = xp.softmax(xp.cast(logits, "float32"), -1)
    if bias is None:
        w, idx = xp.top_k(probs, cfg.num_experts_per_tok)
    else:
        _, idx = xp.top_k(probs + xp.cast(bias, "float32"), cfg.num_experts_per_tok)
        w = xp.take_along(probs, idx)
    if cfg.norm_topk_prob:
        w = w / w.sum(-1)[:, None]
    return probs, idx, xp.cast(w, x.dtype)


def experts_grouped(xs, mp, group_sizes, gmm):
    """Dropless expert SwiGLU on token-slots sorted by expert: xs [M, E], group_sizes [X] -> [M, E]."""
    xp = shim(xs)
    h = xp.silu(gmm(xs, mp["w_gate"], group_sizes)) * gmm(xs, mp["w_up"], group_sizes)
    return gmm(h, mp["w_down"], group_sizes)


def experts_capacity(xs, mp, group_sizes, expert, capacity):
    """Expert SwiGLU with a fixed capacity: slots sorted by expert (`expert` [M]) fill a [X, C, E] buffer, the first
    C of each expert in token order; the rest are dropped (zero output). Returns ([M, E], number dropped)."""
    xp = shim(xs)
    X, C = group_sizes.shape[0], capacity
    starts = xp.cumsum(group_sizes) - group_sizes
    rank = xp.arange(xs.shape[0], like=xs) - starts[expert]  # position of each slot within its expert
    keep = rank < C
    dest = xp.np.where(keep, expert * C + rank, X * C)  # row X*C: the dump for dropped slots
    buf = xp.rows_into(X * C + 1, dest, xs)[: X * C].reshape(X, C, -1)
    g = xp.np.einsum("xce,xef->xcf", buf, mp["w_gate"])
    u = xp.np.einsum("xce,xef->xcf", buf, mp["w_up"])
    y = xp.np.einsum("xcf,xfe->xce", xp.silu(g) * u, mp["w_down"]).reshape(X * C, -1)
    y = xp.concat([y, xp.np.zeros_like(y[:1])], 0)
    return y[dest], xp.cast(~keep, "int32").sum()


def moe(x, mp, cfg, bias=None, valid=None, kernels=None):
    """Sparse MoE block. x [B, T, E] -> (y [B, T, E], stats). mp: this layer's 'moe.*' slice; bias [X] or None;
    valid [B*T] fp32 (0 = padding), which weights the aux-loss statistics only. stats: counts [X] (token-slots
    routed to each expert), slots/probs [X] (mask-weighted assignment counts and probability sums) and dropped."""
    xp = shim(x)
    kernels = kernels or {}
    B, T, E = x.shape
    N, K, X = B * T, cfg.num_experts_per_tok, cfg.num_experts
    xf = x.reshape(N, E)
    probs, idx, w = route(xf, mp["router"], cfg, bias)
    flat = idx.reshape(-1)  # expert of each token-slot, token-major
    counts = xp.bincount(flat, X)
    gmm = kernels.get("grouped_mm", xp.grouped_mm)
    dropped = xp.asarray(0, "int32", like=x)
    if "moe_dispatch" in kernels and cfg.capacity_factor is None:  # expert parallelism (shard.moe_dispatch)
        weights = {n: mp[n] for n in ("w_gate", "w_up", "w_down")}
        y = kernels["moe_dispatch"](xf, idx, weights, lambda xs, ws, sizes: experts_grouped(xs, ws, sizes, gmm))
    else:
        order = xp.argsort(flat)  # stable: grouped by expert, token order within a group
        xs = xf[order // K]
        if cfg.capacity_factor is None:
            ys = experts_grouped(xs, mp, counts, gmm)
        else:
            capacity = max(1, math.ceil(cfg.capacity_factor * N * K / X))
            ys, dropped = experts_capacity(xs, mp, counts, flat[order], capacity)
        y = ys[xp.argsort(order)].reshape(N, K, E)  # back to token-major
    y = (y * w[..., None]).sum(1)  # routing weight applied after down_proj, as HF
    if valid is None:
        valid = xp.np.ones_like(probs[:, 0])
    slots = xp.bincount(flat, X, weights=xp.np.broadcast_to(valid[:, None], (N, K)).reshape(-1))
    stats = {"counts": xp.cast(counts, "int32"), "slots": xp.cast(slots, "float32"),
             "probs": (probs * valid[:, None]).sum(0), "dropped": dropped}
    return y.reshape(B, T, E), stats


def layer(h, lp, ffn, bias, cos, sin, mask, cache, slot, cfg, kernels, valid):
    """One decoder layer: qwen3's attention, then the MoE block (ffn = a 'moe.*' slice) or a dense MLP (ffn = an
    'mlp.*' slice). cache: None or this layer's {'k','v'}. Returns (h, (cache, MoE stats or None))."""
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
    x = norm(h, lp["mlp_norm"], cfg.rms_norm_eps)
    if "router" in ffn:
        y, stats = moe(x, ffn, cfg, bias, valid, kernels)
    else:
        y, stats = mlp(x, ffn["w_gate"], ffn["w_up"], ffn["w_down"]), None
    return h + y, (cache, stats)


# same as qwen3.init_cache
def init_cache(cfg, batch, max_len, dtype="float32", backend="jax"):
    """Preallocated decode cache: k/v [L, B, Hkv, S, D] (K after k_norm and RoPE), the segment id of each slot
    (0 = empty or padding), and `len`, the number of slots written."""
    xp = shim(backend)
    L, Hkv, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    return {"k": xp.full((L, batch, Hkv, max_len, D), 0, dtype), "v": xp.full((L, batch, Hkv, max_len, D), 0, dtype),
            "seg": xp.full((batch, max_len), 0, "int32"), "len": xp.asarray(0, "int32")}


def forward_hidden(params, tokens, cfg, cache=None, *, positions=None, segment_ids=None, router_bias=None,
                   kernels=None, remat=False):
    """tokens [B, T] -> (final-normed hidden [B, T, E], cache, aux). positions [B, T] default to the cache length
    + arange(T); segment_ids [B, T] (0 = padding) keep packed documents apart and leave padding out of the aux
    loss; router_bias [n_sparse, X] fp32 shifts the top-k choice (auxiliary-loss-free balancing).
    aux: router_aux_loss (transformers' load_balancing_loss_func over all sparse layers, before the coefficient),
    expert_counts [n_sparse, X] int32 (token-slots routed to each expert) and dropped (slots over capacity)."""
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
    else:
        seg = xp.update_slice(cache["seg"], xp.cast(segment_ids, "int32"), start, 1)
        S = seg.shape[1]
        k_idx = xp.arange(S, like=tokens)
        mask = make_mask(t_idx, k_idx, segment_ids, seg)
    valid = xp.cast(segment_ids != 0, "float32").reshape(-1)

    def step(h, x):
        lp, ffn, bias, lc = x
        h, y = layer(h, lp, ffn, bias, cos, sin, mask, lc, start, cfg, kernels, valid)
        return constrain(h, ("batch", "seq", "embed")), y

    kv = None if cache is None else {"k": cache["k"], "v": cache["v"]}
    sparse = cfg.sparse_layers
    if len(sparse) == cfg.num_hidden_layers:  # every layer sparse (all released checkpoints): scan
        h, ys = xp.scan_layers(step, h, (params["layers"], params["moe"], router_bias, kv), remat=remat)
        if xp.name == "jax":
            new_kv, stats = ys
        else:
            new_kv, stats = kv, _stack(xp, [y[1] for y in ys])
    else:  # a Python loop over mixed sparse and dense layers
        f = xp.remat(step) if remat else step
        outs = []
        for i in range(cfg.num_hidden_layers):
            lp = _tree_map(lambda a: a[i], params["layers"])
            if i in sparse:
                j = sparse.index(i)
                ffn = _tree_map(lambda a: a[j], params["moe"])
                bias = None if router_bias is None else router_bias[j]
            else:
                ffn, bias = _tree_map(lambda a: a[cfg.dense_layers.index(i)], params["mlp"]), None
            h, y = f(h, (lp, ffn, bias, _tree_map(lambda a: a[i], kv)))
            outs.append(y)
        stats = _stack(xp, [y[1] for y in outs if y[1] is not None]) if sparse else None
        new_kv = kv
        if cache is not None and xp.name == "jax":  # torch wrote the cache in place
            new_kv = {n: xp.np.stack([y[0][n] for y in outs]) for n in ("k", "v")}
    if cache is not None:
        cache = {**new_kv, "seg": seg, "len": cache["len"] + T}
    return rms_norm(h, params["norm"], cfg.rms_norm_eps), cache, _aux(xp, stats, valid, cfg)


def _stack(xp, stats):
    return {k: xp.np.stack([s[k] for s in stats]) for k in stats[0]}


def _aux(xp, stats, valid, cfg):
    """transformers' load_balancing_loss_func: with f_e the share of top-k slots and P_e the mean probability of
    expert e, both over every sparse layer's rows together, aux = X * sum_e f_e * P_e. Padding (segment 0) is left
    out, as HF's attention_mask does; with a router_bias, f counts the experts actually chosen."""
    if stats is None:
        zero = xp.asarray(0, "int32", like=valid)
        return {"router_aux_loss": xp.cast(zero, "float32"), "expert_counts": None, "dropped": zero}
    rows = len(cfg.sparse_layers) * valid.sum().clip(min=1.0)
    f = stats["slots"].sum(0) / rows
    p = stats["probs"].sum(0) / rows
    return {"router_aux_loss": cfg.num_experts * (f * p).sum(), "expert_counts": stats["counts"],
            "dropped": stats["dropped"].sum(),
            # the sums behind f and P, so a data-parallel trainer can add them over batch shards first
            "router_stats": xp.concat([stats["slots"].sum(0), stats["probs"].sum(0),
                                       xp.cast(rows, "float32")[None]], 0)}


# same as qwen3.lm_head
def lm_head(params, cfg):
    """The unembedding [E, V] (the embedding's transpose when tied)."""
    return params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]


# same as qwen3.forward
def forward(params, tokens, cfg, cache=None, **kw):
    """tokens int [B, T] -> (logits [B, T, V] in the params' dtype, cache). cache=None runs without one."""
    h, cache, _ = forward_hidden(params, tokens, cfg, cache, **kw)
    xp = shim(h)
    return xp.np.einsum("bte,ev->btv", h, lm_head(params, cfg)), cache
