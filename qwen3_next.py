"""Qwen3-Next (hybrid Gated DeltaNet + gated attention, sparse MoE), one file, JAX and PyTorch.

Matches transformers' `Qwen3NextForCausalLM`:
- every norm is zero-centred RMSNorm, `y * (1 + w)` in fp32 (input/post-attention/final/q/k norms);
- `layer_types` mixes `linear_attention` (Gated DeltaNet) and `full_attention` layers, by default three of the
  first to one of the second (`full_attention_interval` = 4);
- full attention: `q_proj` yields a query and an output gate per head, QK-norm, partial rotary (the first
  `int(head_dim * partial_rotary_factor)` channels of each head), `o = attn * sigmoid(gate)`;
- Gated DeltaNet: grouped q/k/v/z and b/a projections, causal depthwise conv1d + SiLU, L2-normalised q/k,
  `beta = sigmoid(b)`, `g = -exp(A_log) * softplus(a + dt_bias)`, the delta rule in fp32 (chunked for prefill and
  training, recurrent for one-token decode steps), gated RMSNorm (plain `w`, SiLU(z) gate), out projection;
- every layer's MLP is a sparse MoE (softmax router, top-k, optional renormalisation) plus a shared expert scaled
  by `sigmoid(x @ shared_expert_gate)`;
- untied lm_head; the multi-token-prediction module (`mtp.*` tensors, ignored by transformers) when present.
Sizes: 80b-a3b (+ debug).

Params are a nested dict of plain arrays. Linear-attention layers are stacked under `lin`, full-attention layers
under `full`, each on a leading layer axis, so JAX scans over the repeating block of `layer_types` (3 linear +
1 full in the release) and compile time does not grow with depth. Weights are einsum-ready.

Packed documents: `segment_ids` [B, T] (equal ids = same document, documents are contiguous runs) keep documents
apart everywhere: attention is masked, and the Gated DeltaNet state and the causal-conv window restart at each
document start, so a row holding several documents gives each the logits it gets alone.
"""
import dataclasses
import json
import math
from dataclasses import dataclass

import numpy as np

MODEL_TYPE = "qwen3_next"
LINEAR, FULL = "linear_attention", "full_attention"


# ----------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class Config:
    vocab_size: int = 151936
    hidden_size: int = 2048
    num_hidden_layers: int = 48
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e7
    partial_rotary_factor: float = 0.25
    max_position_embeddings: int = 262144
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    initializer_range: float = 0.02
    layer_types: tuple = tuple(FULL if (i + 1) % 4 == 0 else LINEAR for i in range(48))
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    num_experts: int = 512
    num_experts_per_tok: int = 10
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.001
    num_mtp_layers: int = 0  # `num_nextn_predict_layers`; 0 when the checkpoint has no mtp.* tensors
    chunk_size: int = 64  # Gated DeltaNet chunk length (not an HF field)
    bos_token_id: int | None = 151643
    eos_token_id: int | tuple | None = 151645
    hf_json: str = "{}"

    @property
    def rotary_dim(self):
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_hf(cls, d, keys=None):
        """Reads a config.json dict. `keys` (the checkpoint's tensor names) decides whether MTP layers are loaded:
        their count is the number of distinct `mtp.layers.N.` prefixes; without keys, `num_nextn_predict_layers`."""
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if rope and rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ValueError(f"rope_type {rope.get('rope_type')!r} is not supported")
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        prf = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.25))
        L = d["num_hidden_layers"]
        types = d.get("layer_types")
        if not types:
            every = d.get("full_attention_interval", 4)
            types = [LINEAR if (i + 1) % every else FULL for i in range(L)]
        if len(types) != L or set(types) - {LINEAR, FULL}:
            raise ValueError(f"layer_types must list {L} of {LINEAR!r}/{FULL!r}")
        experts = d.get("num_experts", d.get("num_local_experts", 0))
        if d.get("mlp_only_layers") or d.get("decoder_sparse_step", 1) != 1 or not experts:
            raise ValueError("only all-MoE layers are supported (mlp_only_layers=[], decoder_sparse_step=1)")
        if keys is not None:
            n_mtp = len({k.split(".")[2] for k in keys if k.startswith("mtp.layers.")})
        else:
            n_mtp = d.get("num_nextn_predict_layers", 0)
        heads = d["num_attention_heads"]
        eos = d.get("eos_token_id")
        return cls(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_hidden_layers=L,
                   num_attention_heads=heads, num_key_value_heads=d.get("num_key_value_heads") or heads,
                   head_dim=d.get("head_dim") or d["hidden_size"] // heads, rms_norm_eps=d.get("rms_norm_eps", 1e-6),
                   rope_theta=float(theta), partial_rotary_factor=float(prf),
                   max_position_embeddings=d.get("max_position_embeddings", 32768),
                   tie_word_embeddings=d.get("tie_word_embeddings", False),
                   attention_bias=d.get("attention_bias", False), initializer_range=d.get("initializer_range", 0.02),
                   layer_types=tuple(types), linear_conv_kernel_dim=d.get("linear_conv_kernel_dim", 4),
                   linear_key_head_dim=d.get("linear_key_head_dim", 128),
                   linear_value_head_dim=d.get("linear_value_head_dim", 128),
                   linear_num_key_heads=d.get("linear_num_key_heads", 16),
                   linear_num_value_heads=d.get("linear_num_value_heads", 32), num_experts=experts,
                   num_experts_per_tok=d.get("num_experts_per_tok", 10),
                   moe_intermediate_size=d.get("moe_intermediate_size", 512),
                   shared_expert_intermediate_size=d.get("shared_expert_intermediate_size", 512),
                   norm_topk_prob=d.get("norm_topk_prob", True),
                   router_aux_loss_coef=d.get("router_aux_loss_coef", 0.001), num_mtp_layers=n_mtp,
                   bos_token_id=d.get("bos_token_id"), eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
                   hf_json=json.dumps(d, sort_keys=True))

    def to_hf(self):
        d = json.loads(self.hf_json)
        d.pop("rope_scaling", None)
        d.pop("full_attention_interval", None)
        rope = {"rope_type": "default", "rope_theta": self.rope_theta,
                "partial_rotary_factor": self.partial_rotary_factor}
        d.update(model_type=MODEL_TYPE, architectures=["Qwen3NextForCausalLM"], vocab_size=self.vocab_size,
                 hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
                 num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
                 head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps,
                 max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=self.tie_word_embeddings,
                 attention_bias=self.attention_bias, initializer_range=self.initializer_range,
                 layer_types=list(self.layer_types), linear_conv_kernel_dim=self.linear_conv_kernel_dim,
                 linear_key_head_dim=self.linear_key_head_dim, linear_value_head_dim=self.linear_value_head_dim,
                 linear_num_key_heads=self.linear_num_key_heads, linear_num_value_heads=self.linear_num_value_heads,
                 num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                 moe_intermediate_size=self.moe_intermediate_size,
                 shared_expert_intermediate_size=self.shared_expert_intermediate_size,
                 norm_topk_prob=self.norm_topk_prob, router_aux_loss_coef=self.router_aux_loss_coef,
                 decoder_sparse_step=1, mlp_only_layers=[], bos_token_id=self.bos_token_id,
                 eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
                 hidden_act="silu", rope_theta=self.rope_theta, partial_rotary_factor=self.partial_rotary_factor,
                 rope_parameters=rope)
        d.setdefault("intermediate_size", 5120)
        if self.num_mtp_layers:
            d["num_nextn_predict_layers"] = self.num_mtp_layers
        return d


SIZES = {
    "debug": Config(vocab_size=512, hidden_size=64, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=32, rope_theta=1e6, max_position_embeddings=4096,
                    layer_types=tuple(FULL if (i + 1) % 4 == 0 else LINEAR for i in range(8)),
                    linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                    linear_num_value_heads=4, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                    shared_expert_intermediate_size=32, num_mtp_layers=1),
    "80b-a3b": Config(num_mtp_layers=1),
}


# ----------------------------------------------------------------------------------------------- backend shim
class _Jax:
    """The ops that differ between jax.numpy and torch; everything else is written once below."""
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

    def sum(self, x, axis, keepdims=False):
        return x.sum(axis, keepdims=keepdims)

    def cumsum(self, x, axis):
        return self.np.cumsum(x, axis=axis)

    def arange(self, n, like=None):
        return self.np.arange(n)

    def softmax(self, x, axis=-1):
        return self.jax.nn.softmax(x, axis=axis)

    def silu(self, x):
        return self.jax.nn.silu(x)

    def sigmoid(self, x):
        return self.jax.nn.sigmoid(x)

    def softplus(self, x):
        return self.jax.nn.softplus(x)

    def concat(self, xs, axis):
        return self.np.concatenate(xs, axis=axis)

    def repeat(self, x, n, axis):
        """Each slice repeated n times in place (torch.repeat_interleave)."""
        return self.np.repeat(x, n, axis=axis)

    def top_k(self, x, k):
        return self.jax.lax.top_k(x, k)

    def argsort(self, x):
        return self.np.argsort(x, stable=True)

    def bincount(self, x, n, weights=None):
        return self.np.bincount(x, weights=weights, length=n)

    def index_add(self, n, idx, vals):
        """zeros [n, ...] with vals added at rows idx."""
        return self.np.zeros((n,) + vals.shape[1:], vals.dtype).at[idx].add(vals)

    def grouped_mm(self, x, w, sizes):
        """Rows of x sorted by group, w [G, K, N], sizes [G] rows per group -> [rows, N]."""
        return self.jax.lax.ragged_dot(x, w, sizes.astype(self.np.int32))

    def solve_unit_lower(self, a, b):
        """Solves (I + L) x = b over the last two axes, L = strict_lower(a) (the diagonal of a is ignored). L is
        nilpotent, so (I + L)^-1 = (I - L)(I + L^2)(I + L^4)...: log2(C) batched matmuls instead of LAPACK's trsm,
        whose CPU kernel deadlocks when several devices of one process run it at once (8 virtual devices), and
        which is a serial loop on accelerators."""
        jnp, hi = self.np, self.jax.lax.Precision.HIGHEST
        n = a.shape[-1]
        m = -jnp.tril(a, -1)
        eye = jnp.eye(n, dtype=a.dtype)
        inv, p = eye + m, m
        for _ in range(max(0, (n - 1).bit_length() - 1)):
            p = jnp.matmul(p, p, precision=hi)
            inv = jnp.matmul(inv, eye + p, precision=hi)
        return jnp.matmul(inv, b, precision=hi)

    def update_slice(self, buf, new, start, axis):
        """Writes `new` into `buf` at `start` along `axis`; returns the buffer (functional on JAX)."""
        return self.jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), start, axis)

    def store(self, buf, new):
        """Replaces a small cache entry (conv / recurrent state): a new array on JAX, in place on torch."""
        return new.astype(buf.dtype)

    def scan(self, f, h, xs, remat=False):
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

    def sum(self, x, axis, keepdims=False):
        return x.sum(axis, keepdim=keepdims)

    def cumsum(self, x, axis):
        return self.torch.cumsum(x, dim=axis)

    def arange(self, n, like=None):
        return self.torch.arange(n, device=None if like is None else like.device)

    def softmax(self, x, axis=-1):
        return self.torch.softmax(x, dim=axis)

    def silu(self, x):
        return self.torch.nn.functional.silu(x)

    def sigmoid(self, x):
        return self.torch.sigmoid(x)

    def softplus(self, x):
        return self.torch.nn.functional.softplus(x)

    def concat(self, xs, axis):
        return self.torch.cat(xs, dim=axis)

    def repeat(self, x, n, axis):
        return self.torch.repeat_interleave(x, n, dim=axis)

    def top_k(self, x, k):
        return self.torch.topk(x, k, dim=-1)

    def argsort(self, x):
        return self.torch.argsort(x, stable=True)

    def bincount(self, x, n, weights=None):  # scatter_add: a static shape (DTensor has a rule for it)
        w = self.torch.ones_like(x) if weights is None else weights
        return w.new_zeros(n).scatter_add(0, x, w)

    def index_add(self, n, idx, vals):
        return vals.new_zeros((n,) + tuple(vals.shape[1:])).index_add(0, idx, vals)

    def grouped_mm(self, x, w, sizes):
        """torch._grouped_mm (CPU fp32/bf16 with autograd, CUDA bf16); its strides must be 16-byte multiples, so
        odd K / N are zero-padded (exact)."""
        F = self.torch.nn.functional
        m = 16 // x.element_size()
        pk, pn = -x.shape[1] % m, -w.shape[2] % m
        if pk or pn:
            x, w = F.pad(x, (0, pk)), F.pad(w, (0, pn, 0, pk))
        gmm = self.torch._grouped_mm
        if x.dtype == self.torch.float32 and self.torch.compiler.is_compiling():  # compile's (meta) kernel: bf16 only
            gmm = self.torch.compiler.disable(gmm)
        out = gmm(x, w, offs=self.torch.cumsum(sizes, 0).to(self.torch.int32))
        return out[:, :out.shape[1] - pn] if pn else out

    def solve_unit_lower(self, a, b):
        return self.torch.linalg.solve_triangular(a, b, upper=False, unitriangular=True)

    def update_slice(self, buf, new, start, axis):
        """In place (`index_copy_`), so a decode step never copies the cache."""
        idx = self.torch.arange(new.shape[axis], device=buf.device) + start
        return buf.index_copy_(axis, idx, new.to(buf.dtype))

    def store(self, buf, new):
        return buf.copy_(new)

    def scan(self, f, h, xs, remat=False):
        n = next(iter(_leaves(xs))).shape[0]
        ys = []
        for i in range(n):
            fi = lambda h, i=i: f(h, _tree_map(lambda a: a[i], xs))  # noqa: E731  (slice inside the checkpoint)
            if remat:
                import torch.utils.checkpoint as ckpt
                h, y = ckpt.checkpoint(fi, h, use_reentrant=False)
            else:
                h, y = fi(h)
            ys.append(y)
        return h, _tree_map_n(lambda *a: self.torch.stack(a), ys)

    def normal(self, seed, name, shape, std, dtype):
        g = self.torch.Generator().manual_seed((seed * 1000003 + _name_hash(name)) % 2**63)
        return (std * self.torch.randn(shape, generator=g, dtype=self.torch.float32)).to(self.dtype(dtype))

    def full(self, shape, value, dtype):
        return self.torch.full(shape, value, dtype=self.dtype(dtype))


_SHIMS = {}


# same as qwen3.shim
def shim(x_or_name):
    """The shim for a backend name ('jax'/'torch') or for the type of an array."""
    name = x_or_name if isinstance(x_or_name, str) else ("torch" if type(x_or_name).__module__.startswith("torch") else "jax")
    if name not in _SHIMS:
        _SHIMS[name] = {"jax": _Jax, "torch": _Torch}[name]()
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


def _tree_map_n(f, trees):
    """f over corresponding leaves of a list of identically shaped trees."""
    t = trees[0]
    if isinstance(t, dict):
        return {k: _tree_map_n(f, [x[k] for x in trees]) for k in t}
    if isinstance(t, (list, tuple)):
        return type(t)(_tree_map_n(f, [x[i] for x in trees]) for i in range(len(t)))
    return None if t is None else f(*trees)


# ----------------------------------------------------------------------------------------------- parameter table
@dataclass(frozen=True)
class P:
    """One weight: shape, logical axes (shard.py), init, HF name template ({i} = HF layer index, {e} = expert:
    one HF tensor per expert, stacked) and its transform."""
    shape: tuple
    axes: tuple
    init: str  # "normal" | "ones" | "zeros" | "a_log"
    hf: str
    tf: str = "id"


# ours <- hf (list of arrays, one per HF name) and hf <- ours, on numpy arrays, for one layer's slice
_TF = {
    "id": (lambda a, s: a[0], lambda a: [a]),
    "T": (lambda a, s: a[0].T, lambda a: [a.T]),                                              # [out,in] -> [in,out]
    "in_heads": (lambda a, s: a[0].T.reshape(s), lambda a: [a.reshape(a.shape[0], -1).T]),    # [h*d, e] -> [e, h, d]
    "out_heads": (lambda a, s: a[0].T.reshape(s), lambda a: [a.reshape(-1, a.shape[-1]).T]),  # [e, h*d] -> [h, d, e]
    "heads": (lambda a, s: a[0].reshape(s), lambda a: [a.reshape(-1)]),                       # [h*d] -> [h, d]
    "conv": (lambda a, s: a[0].reshape(s), lambda a: [a[:, None, :]]),                        # [c, 1, k] -> [c, k]
    "row": (lambda a, s: a[0].reshape(s), lambda a: [a[None]]),                               # [1, e] -> [e]
    "experts_T": (lambda a, s: np.stack([x.T for x in a]), lambda a: [x.T for x in a]),       # n x [out,in] -> [n,in,out]
}


def _stacks(cfg):
    """Stack name -> the HF layer index of each entry on its leading axis."""
    out = {"lin": [i for i, t in enumerate(cfg.layer_types) if t == LINEAR],
           "full": [i for i, t in enumerate(cfg.layer_types) if t == FULL]}
    if cfg.num_mtp_layers:
        out["mtp.layers"] = list(range(cfg.num_mtp_layers))
    return {k: v for k, v in out.items() if v}


def _layer_table(cfg, stack, n, hf_prefix, kind):
    """One stack of decoder layers (norms, token mixer, MoE), n on the leading axis."""
    E, X = cfg.hidden_size, cfg.num_experts
    Hq, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    Hk, Hv, dk, dv = cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    I, Is, C = cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size, 2 * Hk * dk + Hv * dv
    s, h, m = stack + ".", hf_prefix, hf_prefix + "mlp."
    t = {s + "attn_norm": P((n, E), ("layers", "norm"), "zeros", h + "input_layernorm.weight"),
         s + "mlp_norm": P((n, E), ("layers", "norm"), "zeros", h + "post_attention_layernorm.weight")}
    if kind == FULL:
        a = h + "self_attn."
        t.update({
            s + "wq": P((n, E, Hq, 2 * D), ("layers", "embed", "q_heads", "head_dim"), "normal", a + "q_proj.weight", "in_heads"),
            s + "wk": P((n, E, Hkv, D), ("layers", "embed", "kv_heads", "head_dim"), "normal", a + "k_proj.weight", "in_heads"),
            s + "wv": P((n, E, Hkv, D), ("layers", "embed", "kv_heads", "head_dim"), "normal", a + "v_proj.weight", "in_heads"),
            s + "wo": P((n, Hq, D, E), ("layers", "q_heads", "head_dim", "embed"), "normal", a + "o_proj.weight", "out_heads"),
            s + "q_norm": P((n, D), ("layers", "norm"), "zeros", a + "q_norm.weight"),
            s + "k_norm": P((n, D), ("layers", "norm"), "zeros", a + "k_norm.weight"),
        })
        if cfg.attention_bias:
            t[s + "bq"] = P((n, Hq, 2 * D), ("layers", "q_heads", "head_dim"), "zeros", a + "q_proj.bias", "heads")
            t[s + "bk"] = P((n, Hkv, D), ("layers", "kv_heads", "head_dim"), "zeros", a + "k_proj.bias", "heads")
            t[s + "bv"] = P((n, Hkv, D), ("layers", "kv_heads", "head_dim"), "zeros", a + "v_proj.bias", "heads")
            t[s + "bo"] = P((n, E), ("layers", "norm"), "zeros", a + "o_proj.bias")
    else:
        a = h + "linear_attn."
        r = Hv // Hk
        t.update({  # group-major, as HF: per key head g, [q dk | k dk | v r*dv | z r*dv] and [b r | a r]
            s + "w_qkvz": P((n, E, Hk, 2 * dk + 2 * r * dv), ("layers", "embed", "lin_k_heads", "lin_qkvz"), "normal",
                            a + "in_proj_qkvz.weight", "in_heads"),
            s + "w_ba": P((n, E, Hk, 2 * r), ("layers", "embed", "lin_k_heads", "lin_ba"), "normal",
                          a + "in_proj_ba.weight", "in_heads"),
            s + "conv": P((n, C, cfg.linear_conv_kernel_dim), ("layers", "lin_conv", "conv_k"), "normal",
                          a + "conv1d.weight", "conv"),  # channels [q Hk*dk | k Hk*dk | v Hv*dv]
            s + "A_log": P((n, Hv), ("layers", "lin_v_heads"), "a_log", a + "A_log"),
            s + "dt_bias": P((n, Hv), ("layers", "lin_v_heads"), "ones", a + "dt_bias"),
            s + "gnorm": P((n, dv), ("layers", "norm"), "ones", a + "norm.weight"),
            s + "wo": P((n, Hv, dv, E), ("layers", "lin_v_heads", "head_dim", "embed"), "normal",
                        a + "out_proj.weight", "out_heads"),
        })
    t.update({
        s + "router": P((n, E, X), ("layers", "embed", "experts_r"), "normal", m + "gate.weight", "T"),
        s + "w_gate": P((n, X, E, I), ("layers", "experts", "embed", "moe_mlp"), "normal",
                        m + "experts.{e}.gate_proj.weight", "experts_T"),
        s + "w_up": P((n, X, E, I), ("layers", "experts", "embed", "moe_mlp"), "normal",
                      m + "experts.{e}.up_proj.weight", "experts_T"),
        s + "w_down": P((n, X, I, E), ("layers", "experts", "moe_mlp", "embed"), "normal",
                        m + "experts.{e}.down_proj.weight", "experts_T"),
        s + "sw_gate": P((n, E, Is), ("layers", "embed", "mlp"), "normal", m + "shared_expert.gate_proj.weight", "T"),
        s + "sw_up": P((n, E, Is), ("layers", "embed", "mlp"), "normal", m + "shared_expert.up_proj.weight", "T"),
        s + "sw_down": P((n, Is, E), ("layers", "mlp", "embed"), "normal", m + "shared_expert.down_proj.weight", "T"),
        s + "shared_gate": P((n, E), ("layers", "embed"), "normal", m + "shared_expert_gate.weight", "row"),
    })
    return t


def param_table(cfg):
    """Flat name -> P. Entries of the stacks `lin.*`, `full.*` and `mtp.layers.*` carry a leading layer axis
    (see _stacks for the HF layer each slot holds). mtp.* entries exist only when cfg.num_mtp_layers > 0."""
    E, V = cfg.hidden_size, cfg.vocab_size
    t = {"embed": P((V, E), ("vocab", "embed"), "normal", "model.embed_tokens.weight")}
    stacks = _stacks(cfg)
    if "lin" in stacks:
        t.update(_layer_table(cfg, "lin", len(stacks["lin"]), "model.layers.{i}.", LINEAR))
    if "full" in stacks:
        t.update(_layer_table(cfg, "full", len(stacks["full"]), "model.layers.{i}.", FULL))
    t["norm"] = P((E,), ("norm",), "zeros", "model.norm.weight")
    if not cfg.tie_word_embeddings:
        t["lm_head"] = P((E, V), ("embed", "vocab"), "normal", "lm_head.weight", "T")
    if cfg.num_mtp_layers:
        t["mtp.fc"] = P((2 * E, E), ("mtp_fc", "embed"), "normal", "mtp.fc.weight", "T")  # input = [emb | hidden]
        t["mtp.pre_fc_norm_embedding"] = P((E,), ("norm",), "zeros", "mtp.pre_fc_norm_embedding.weight")
        t["mtp.pre_fc_norm_hidden"] = P((E,), ("norm",), "zeros", "mtp.pre_fc_norm_hidden.weight")
        t.update(_layer_table(cfg, "mtp.layers", cfg.num_mtp_layers, "mtp.layers.{i}.", FULL))
        t["mtp.norm"] = P((E,), ("norm",), "zeros", "mtp.norm.weight")
    return t


def hf_entries(cfg, keys=None):
    """How params and HF tensors correspond: a list of (name, slot on the leading axis or None, hf names, hf shapes,
    to_ours(list of np arrays) -> np array, to_hf(np array) -> list of np arrays). Experts are one HF tensor each
    (the hub layout, also what save_pretrained writes); `keys` is unused (Config.from_hf reads the MTP count)."""
    out = []
    stacks = _stacks(cfg)
    for name, p in param_table(cfg).items():
        ours, theirs = _TF[p.tf]
        stack = next((s for s in stacks if name.startswith(s + ".")), None)
        shape = p.shape[1:] if stack else p.shape
        hf_shapes = [a.shape for a in theirs(np.zeros(shape, np.int8))]
        n_names = cfg.num_experts if "{e}" in p.hf else 1
        for slot, layer in (enumerate(stacks[stack]) if stack else [(None, None)]):
            names = [p.hf.format(i=layer, e=e) for e in range(n_names)]
            out.append((name, slot, names, hf_shapes,
                        lambda arrs, f=ours, s=shape: f(arrs, s), lambda x, f=theirs: f(x)))
    return out


# same as qwen3.count_params
def count_params(cfg):
    """Total parameters, from the table (no allocation)."""
    return sum(math.prod(p.shape) for p in param_table(cfg).values())


def count_active_params(cfg):
    """Parameters used per token (top-k of the routed experts)."""
    total = 0
    for name, p in param_table(cfg).items():
        n = math.prod(p.shape)
        if name.split(".")[-1] in ("w_gate", "w_up", "w_down"):
            n = n * cfg.num_experts_per_tok // cfg.num_experts
        total += n
    return total


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


def init(cfg, backend="jax", seed=0, dtype="float32"):
    """Random params on the named backend: normal(0, initializer_range) matrices, zeros for the (1 + w) norms, ones
    for the gated norm and dt_bias, A_log = log(linspace(1, 16)) per value head."""
    xp = shim(backend)
    flat = {}
    for name, p in param_table(cfg).items():
        if p.init == "normal":
            flat[name] = xp.normal(seed, name, p.shape, cfg.initializer_range, dtype)
        elif p.init == "a_log":
            a = np.broadcast_to(np.log(np.linspace(1.0, 16.0, p.shape[-1])), p.shape).astype(np.float32)
            flat[name] = xp.cast(xp.asarray(a), dtype)
        else:
            flat[name] = xp.full(p.shape, 1.0 if p.init == "ones" else 0.0, dtype)
    return unflatten(flat)


# ----------------------------------------------------------------------------------------------- small blocks
def rms_norm(x, w, eps):
    """Qwen3NextRMSNorm, zero-centred: normalise in fp32, multiply by (1 + w) in fp32, cast back."""
    xp = shim(x)
    x32 = xp.cast(x, "float32")
    y = x32 * xp.rsqrt(xp.mean(x32 * x32, -1, keepdims=True) + eps)
    return xp.cast(y * (1.0 + xp.cast(w, "float32")), x.dtype)


def gated_rms_norm(x, z, w, eps):
    """Qwen3NextRMSNormGated: normalise in fp32, cast back, times the plain weight w, times silu(z) in fp32, cast."""
    xp = shim(x)
    x32 = xp.cast(x, "float32")
    y = w * xp.cast(x32 * xp.rsqrt(xp.mean(x32 * x32, -1, keepdims=True) + eps), x.dtype)
    return xp.cast(y * xp.silu(xp.cast(z, "float32")), x.dtype)


def rope_angles(positions, dim, theta, dtype):  # same as qwen3.rope_angles
    """cos, sin [B, T, dim] for integer positions [B, T]: fp32 angles, cast to the model dtype as HF does."""
    xp = shim(positions)
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    freqs = xp.cast(positions, "float32")[..., None] * xp.asarray(inv_freq, "float32", like=positions)
    emb = xp.concat([freqs, freqs], -1)
    return xp.cast(xp.np.cos(emb), dtype), xp.cast(xp.np.sin(emb), dtype)


def apply_partial_rope(x, cos, sin):
    """Rotate-half RoPE on the first cos.shape[-1] channels of each head of x [B, T, H, D]; the rest pass through."""
    xp = shim(x)
    r = cos.shape[-1]
    xr, rest = x[..., :r], x[..., r:]
    rot = xp.concat([-xr[..., r // 2:], xr[..., :r // 2]], -1)
    return xp.concat([xr * cos[:, :, None, :] + rot * sin[:, :, None, :], rest], -1)


def attention(q, k, v, mask):  # same as qwen3.attention
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


def make_mask(q_pos, k_pos, q_seg, k_seg):  # same as qwen3.make_mask
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


def mlp(x, w_gate, w_up, w_down):
    """SwiGLU on rows x [N, E]: down(silu(gate(x)) * up(x))."""
    xp = shim(x)
    g = xp.np.einsum("ne,ef->nf", x, w_gate)
    u = xp.np.einsum("ne,ef->nf", x, w_up)
    return xp.np.einsum("nf,fe->ne", xp.silu(g) * u, w_down)


def _doc_index(segment_ids, B, T, xp, like):
    """Document index [B, T] within this call: 0 for the first token's document, +1 at every change of segment id."""
    if segment_ids is None:
        return xp.full((B, T), 0, "int32")
    change = xp.cast(segment_ids[:, 1:] != segment_ids[:, :-1], "int32")
    return xp.cumsum(xp.concat([xp.cast(segment_ids[:, :1] * 0, "int32"), change], 1), 1)


# ----------------------------------------------------------------------------------------------- Gated DeltaNet core
def _l2norm(x, xp):
    return x * xp.rsqrt(xp.sum(x * x, -1, keepdims=True) + 1e-6)


def _gdn_inputs(q, k, v, g, beta, scale, use_qk_l2norm_in_kernel):
    """fp32, q/k heads repeated to the value heads (head j uses key head j // r), optional L2 norm, q scaled."""
    xp = shim(q)
    H, HV = q.shape[2], v.shape[2]
    q, k, v, g, beta = (xp.cast(a, "float32") for a in (q, k, v, g, beta))
    if HV != H:
        q, k = xp.repeat(q, HV // H, 2), xp.repeat(k, HV // H, 2)
    if use_qk_l2norm_in_kernel:
        q, k = _l2norm(q, xp), _l2norm(k, xp)
    return q * (q.shape[-1] ** -0.5 if scale is None else scale), k, v, g, beta


def chunk_gated_delta_rule_ref(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                               use_qk_l2norm_in_kernel=False, chunk_size=64, segment_ids=None):
    """The gated delta rule, chunked (flash-linear-attention's `chunk_gated_delta_rule` layout and semantics).

    q, k [B, T, H, K]; v [B, T, HV, V] (HV a multiple of H; value head j reads q/k head j // (HV/H)); g (log decay,
    <= 0) and beta [B, T, HV]; initial_state [B, HV, K, V]. Per value head, with state S [K, V]:
        S = S * exp(g_t);  S = S + k_t (beta_t (v_t - S^T k_t))^T;  o_t = S^T (scale * q_t)
    computed in fp32 in chunks of `chunk_size` (WY / UT transform within a chunk, a scan over chunks).
    segment_ids [B, T]: the state restarts from zero wherever the id changes from the previous token; the
    initial state belongs to token 0's document (zero it to start a new one). Returns (o [B, T, HV, V] in q's dtype,
    final state [B, HV, K, V] fp32 or None)."""
    xp = shim(q)
    dtype = q.dtype
    B, T, _, K = q.shape
    HV, Vd = v.shape[2], v.shape[3]
    q, k, v, g, beta = _gdn_inputs(q, k, v, g, beta, scale, use_qk_l2norm_in_kernel)
    doc = _doc_index(segment_ids, B, T, xp, q)
    C = chunk_size
    pad = -T % C
    if pad:  # padded steps have k = 0, beta = 0, g = 0 and continue the last document: they change nothing
        z = lambda a: xp.concat([a, xp.full((B, pad) + tuple(a.shape[2:]), 0, a.dtype)], 1)
        q, k, v, g, beta = z(q), z(k), z(v), z(g), z(beta)
        doc = xp.concat([doc, xp.np.broadcast_to(doc[:, -1:], (B, pad))], 1)
    N = (T + pad) // C
    ch = lambda a: a.reshape((B, N, C) + tuple(a.shape[2:]))
    q, k, v, g, beta, doc = ch(q), ch(k), ch(v), ch(g), ch(beta), ch(doc)      # [B, N, C, HV, ...]
    G = xp.np.einsum("bnch->bnhc", xp.cumsum(g, 2))                             # [B, N, HV, C] log decay since chunk start
    ninf = float("-inf")
    tril = xp.asarray(np.tril(np.ones((C, C), bool)), like=q)
    same = (doc[:, :, :, None] == doc[:, :, None, :]) & tril                   # [B, N, C, C] i >= j, one document
    D = xp.np.exp(xp.np.where(same[:, :, None], G[..., :, None] - G[..., None, :], ninf))  # [B, N, HV, C, C]
    prev = xp.concat([xp.full((B, 1), 0, doc.dtype), doc[:, :-1, -1]], 1)      # document before each chunk
    cont = doc == prev[:, :, None]                                             # [B, N, C] still the incoming document
    d_in = xp.np.exp(xp.np.where(cont[:, :, None], G, ninf))                   # decay from the incoming state
    last_same = doc == doc[:, :, -1:]
    d_out = xp.np.exp(xp.np.where(last_same[:, :, None], G[..., -1:] - G, ninf))  # decay to the chunk's end
    d_chunk = xp.np.exp(xp.np.where(cont[:, :, -1:], G[..., -1], ninf))       # [B, N, HV]
    kb, vb = k * beta[..., None], v * beta[..., None]
    A = xp.np.einsum("bnihd,bnjhd->bnhij", kb, k) * D                           # solve ignores the diagonal
    U = xp.solve_unit_lower(A, xp.np.einsum("bnchv->bnhcv", vb))                # [B, N, HV, C, V]
    W = xp.solve_unit_lower(A, xp.np.einsum("bnchk,bnhc->bnhck", kb, d_in))     # [B, N, HV, C, K]
    Aqk = xp.np.einsum("bnihd,bnjhd->bnhij", q, k) * D
    qd = xp.np.einsum("bnchk,bnhc->bnhck", q, d_in)
    kd = xp.np.einsum("bnchk,bnhc->bnhck", k, d_out)
    S = xp.full((B, HV, K, Vd), 0, "float32") if initial_state is None else xp.cast(initial_state, "float32")

    def step(S, x):
        U_n, W_n, Aqk_n, qd_n, kd_n, dc_n = x
        v_new = U_n - xp.np.einsum("bhck,bhkv->bhcv", W_n, S)
        o = xp.np.einsum("bhck,bhkv->bhcv", qd_n, S) + xp.np.einsum("bhij,bhjv->bhiv", Aqk_n, v_new)
        S = S * dc_n[..., None, None] + xp.np.einsum("bhck,bhcv->bhkv", kd_n, v_new)
        return S, o

    first = lambda a: xp.np.moveaxis(a, 1, 0)
    S, o = xp.scan(step, S, tuple(first(a) for a in (U, W, Aqk, qd, kd, d_chunk)))   # o [N, B, HV, C, V]
    o = xp.np.einsum("nbhcv->bnchv", o).reshape(B, N * C, HV, Vd)[:, :T]
    return xp.cast(o, dtype), (S if output_final_state else None)


def recurrent_gated_delta_rule_ref(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                                   use_qk_l2norm_in_kernel=False, segment_ids=None, **unused):
    """The gated delta rule one token at a time (fla's `fused_recurrent_gated_delta_rule`): same arguments and
    results as chunk_gated_delta_rule_ref. Used for decode steps."""
    xp = shim(q)
    dtype = q.dtype
    B, T, _, K = q.shape
    HV, Vd = v.shape[2], v.shape[3]
    q, k, v, g, beta = _gdn_inputs(q, k, v, g, beta, scale, use_qk_l2norm_in_kernel)
    doc = _doc_index(segment_ids, B, T, xp, q)
    keep = xp.cast(doc == xp.concat([doc[:, :1], doc[:, :-1]], 1), "float32")  # 0 where a document starts
    S = xp.full((B, HV, K, Vd), 0, "float32") if initial_state is None else xp.cast(initial_state, "float32")

    def step(S, x):
        q_t, k_t, v_t, g_t, b_t, keep_t = x
        S = S * (xp.np.exp(g_t) * keep_t[:, None])[..., None, None]
        delta = (v_t - xp.np.einsum("bhkv,bhk->bhv", S, k_t)) * b_t[..., None]
        S = S + k_t[..., :, None] * delta[..., None, :]
        return S, xp.np.einsum("bhkv,bhk->bhv", S, q_t)

    first = lambda a: xp.np.moveaxis(a, 1, 0)
    S, o = xp.scan(step, S, tuple(first(a) for a in (q, k, v, g, beta, keep)))        # o [T, B, HV, V]
    return xp.cast(first(o), dtype), (S if output_final_state else None)


# ----------------------------------------------------------------------------------------------- layers
def causal_conv(x, w, prev, doc):
    """Depthwise causal conv + SiLU. x [B, T, C] new inputs, w [C, K], prev [B, K-1, C] the K-1 inputs before them
    (zeros before the start), doc [B, K-1+T] the document of each column of cat(prev, x): taps never reach into
    another document. Sums in fp32, cast back, then SiLU (HF: conv in the weight dtype, SiLU, cast).
    Returns (out [B, T, C], new prev = the last K-1 inputs)."""
    xp = shim(x)
    K, T = w.shape[1], x.shape[1]
    xe = xp.concat([xp.cast(prev, x.dtype), x], 1)
    w32 = xp.cast(w, "float32")
    out = 0.0
    for j in range(K):  # tap j reads the input K-1-j steps back
        same = doc[:, j:j + T] == doc[:, K - 1:]
        out = out + xp.np.where(same[..., None], xp.cast(xe[:, j:j + T], "float32") * w32[:, j], 0.0)
    return xp.silu(xp.cast(out, x.dtype)), xe[:, T:]


def linear_attention(x, lp, cfg, kernels, cache, ctx):
    """Qwen3NextGatedDeltaNet on x [B, T, E]. cache: None or this layer's {'conv' [B, K-1, C], 'rec' [B, HV, dk, dv]}.
    Returns (out [B, T, E], new cache entries or None)."""
    xp = shim(x)
    B, T, _ = x.shape
    Hk, Hv, dk, dv = cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    r = Hv // Hk
    qkvz = xp.np.einsum("bte,egc->btgc", x, lp["w_qkvz"])                   # [B, T, Hk, 2dk + 2r dv]
    ba = xp.np.einsum("bte,egc->btgc", x, lp["w_ba"])                       # [B, T, Hk, 2r]
    z = qkvz[..., 2 * dk + r * dv:].reshape(B, T, Hv, dv)
    b, a = ba[..., :r].reshape(B, T, Hv), ba[..., r:].reshape(B, T, Hv)
    mixed = xp.concat([qkvz[..., :dk].reshape(B, T, Hk * dk), qkvz[..., dk:2 * dk].reshape(B, T, Hk * dk),
                       qkvz[..., 2 * dk:2 * dk + r * dv].reshape(B, T, Hv * dv)], -1)
    K1 = cfg.linear_conv_kernel_dim - 1
    prev = cache["conv"] if cache is not None else xp.full((B, K1, mixed.shape[-1]), 0, x.dtype)
    mixed, conv_state = causal_conv(mixed, lp["conv"], prev, ctx["conv_doc"])
    q = mixed[..., :Hk * dk].reshape(B, T, Hk, dk)
    k = mixed[..., Hk * dk:2 * Hk * dk].reshape(B, T, Hk, dk)
    v = mixed[..., 2 * Hk * dk:].reshape(B, T, Hv, dv)
    beta = xp.sigmoid(b)
    g = -xp.np.exp(xp.cast(lp["A_log"], "float32")) * xp.softplus(xp.cast(a, "float32") + lp["dt_bias"])
    state = None
    if cache is not None:  # the cached state carries over only if token 0 continues the cached document
        state = cache["rec"] * xp.cast(ctx["cont0"], "float32")[:, None, None, None]
    if cache is not None and T == 1:
        core = kernels.get("gated_delta_rule_recurrent", recurrent_gated_delta_rule_ref)
        o, state = core(q, k, v, g, beta, initial_state=state, output_final_state=True,
                        use_qk_l2norm_in_kernel=True, segment_ids=ctx["seg"])
    else:
        core = kernels.get("gated_delta_rule", chunk_gated_delta_rule_ref)
        o, state = core(q, k, v, g, beta, initial_state=state, output_final_state=cache is not None,
                        use_qk_l2norm_in_kernel=True, chunk_size=cfg.chunk_size, segment_ids=ctx["seg"])
    y = gated_rms_norm(o, z, lp["gnorm"], cfg.rms_norm_eps)
    out = out_proj(y, lp["wo"])
    if cache is not None:
        cache = {"conv": xp.store(cache["conv"], conv_state), "rec": xp.store(cache["rec"], state)}
    return out, cache


def full_attention(x, lp, cfg, kernels, cache, ctx):
    """Qwen3NextAttention: per-head query + output gate from q_proj, (1 + w) QK-norm, partial RoPE, GQA,
    o * sigmoid(gate). cache: None or this layer's {'k', 'v'} [B, Hkv, S, D]."""
    xp = shim(x)
    D = cfg.head_dim
    qg = xp.np.einsum("bte,ehd->bthd", x, lp["wq"])
    k = xp.np.einsum("bte,ehd->bthd", x, lp["wk"])
    v = xp.np.einsum("bte,ehd->bthd", x, lp["wv"])
    if cfg.attention_bias:
        qg, k, v = qg + lp["bq"], k + lp["bk"], v + lp["bv"]
    q, gate = qg[..., :D], qg[..., D:]
    q = apply_partial_rope(rms_norm(q, lp["q_norm"], cfg.rms_norm_eps), ctx["cos"], ctx["sin"])
    k = apply_partial_rope(rms_norm(k, lp["k_norm"], cfg.rms_norm_eps), ctx["cos"], ctx["sin"])
    if cache is not None:
        # heads-major cache [B, Hkv, S, D]: each head's keys one contiguous block, which the CPU bmm reads as is
        # (a [B, S, Hkv, D] view makes it copy the whole cache per call); attention sees the [B, S, Hkv, D] view
        cache = {"k": xp.update_slice(cache["k"], xp.np.swapaxes(k, 1, 2), ctx["start"], 2),
                 "v": xp.update_slice(cache["v"], xp.np.swapaxes(v, 1, 2), ctx["start"], 2)}
        k, v = xp.np.swapaxes(cache["k"], 1, 2), xp.np.swapaxes(cache["v"], 1, 2)
    o = kernels.get("attention", attention)(q, k, v, ctx["mask"]) * xp.sigmoid(gate)
    o = out_proj(o, lp["wo"])
    if cfg.attention_bias:
        o = o + lp["bo"]
    return o, cache


def experts_grouped(xs, mp, sizes):
    """Dropless expert SwiGLU on token copies sorted by expert: xs [M, E], sizes [X] -> [M, E]."""
    xp = shim(xs)
    h = xp.silu(xp.grouped_mm(xs, mp["w_gate"], sizes)) * xp.grouped_mm(xs, mp["w_up"], sizes)
    return xp.grouped_mm(h, mp["w_down"], sizes)


def moe(x, lp, cfg, row_mask, kernels=None):
    """Qwen3NextSparseMoeBlock on x [B, T, E]: softmax router (fp32), top-k, optional renormalisation, dropless
    grouped matmul over the token copies sorted by expert (or kernels["moe_dispatch"], expert parallelism from
    shard.moe_dispatch), plus the sigmoid-gated shared expert.
    Returns (y [B, T, E], stats [2, X]: top-k counts and summed router probabilities over the rows in row_mask)."""
    xp = shim(x)
    kernels = kernels or {}
    B, T, E = x.shape
    X, k = cfg.num_experts, cfg.num_experts_per_tok
    xf = x.reshape(B * T, E)
    logits = xp.np.einsum("ne,ex->nx", xf, lp["router"])
    probs = xp.softmax(xp.cast(logits, "float32"), -1)
    top_p, top_i = xp.top_k(probs, k)
    if cfg.norm_topk_prob:
        top_p = top_p / xp.sum(top_p, -1, keepdims=True)
    top_p = xp.cast(top_p, x.dtype)
    flat = top_i.reshape(-1)
    if "moe_dispatch" in kernels:
        weights = {n: lp[n] for n in ("w_gate", "w_up", "w_down")}
        y = (kernels["moe_dispatch"](xf, top_i, weights, experts_grouped) * top_p[..., None]).sum(1)
    else:
        order = xp.argsort(flat)                                   # token copies grouped by expert
        tok = order // k
        out = experts_grouped(xf[tok], lp, xp.bincount(flat, X)) * top_p.reshape(-1)[order][:, None]
        y = xp.index_add(B * T, tok, out)
    shared = mlp(xf, lp["sw_gate"], lp["sw_up"], lp["sw_down"])
    y = y + xp.sigmoid(xp.np.einsum("ne,e->n", xf, lp["shared_gate"]))[:, None] * shared
    m = xp.cast(row_mask.reshape(-1), "float32")
    counts = xp.bincount(flat, X, weights=xp.repeat(m, k, 0))
    psum = xp.sum(probs * m[:, None], 0)
    return y.reshape(B, T, E), xp.np.stack([xp.cast(counts, "float32"), psum])


def decoder_layer(h, lp, kind, cfg, kernels, cache, ctx):
    """Pre-norm residual layer: token mixer (linear or full attention) then MoE. Returns (h, cache, stats)."""
    fused = kernels.get("rms_norm")  # a fused kernel where one is selected (its zero-centred form)
    norm = (lambda x, w, eps: fused(x, w, eps, zero_centered=True)) if fused else rms_norm
    x = norm(h, lp["attn_norm"], cfg.rms_norm_eps)
    mix = linear_attention if kind == LINEAR else full_attention
    o, cache = mix(x, lp, cfg, kernels, cache, ctx)
    h = h + o
    y, stats = moe(norm(h, lp["mlp_norm"], cfg.rms_norm_eps), lp, cfg, ctx["row_mask"], kernels)
    return h + y, cache, stats


# ----------------------------------------------------------------------------------------------- cache and forward
def init_cache(cfg, batch, max_len, dtype="float32", backend="jax"):
    """Preallocated decode cache: k/v [n_full, B, Hkv, S, D] for the full-attention layers (K after k_norm and RoPE);
    conv [n_lin, B, K-1, conv_dim] (the last K-1 pre-conv inputs, model dtype) and rec [n_lin, B, HV, dk, dv] (the
    delta-rule state, float32) for the linear-attention layers; the segment id of each slot (0 = empty or padding);
    and `len`, the number of slots written."""
    xp = shim(backend)
    st = _stacks(cfg)
    nf, nl = len(st.get("full", [])), len(st.get("lin", []))
    Hkv, D = cfg.num_key_value_heads, cfg.head_dim
    Hk, Hv, dk, dv = cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    C = 2 * Hk * dk + Hv * dv
    return {"k": xp.full((nf, batch, Hkv, max_len, D), 0, dtype), "v": xp.full((nf, batch, Hkv, max_len, D), 0, dtype),
            "conv": xp.full((nl, batch, cfg.linear_conv_kernel_dim - 1, C), 0, dtype),
            "rec": xp.full((nl, batch, Hv, dk, dv), 0, "float32"),
            "seg": xp.full((batch, max_len), 0, "int32"), "len": xp.asarray(0, "int32")}


def block_pattern(cfg):
    """(pattern, repeats): the shortest tuple of layer types whose repetition is layer_types. The release gives
    ((linear,) * 3 + (full,), 12); an irregular list is one block of all its layers (a plain loop)."""
    L, types = cfg.num_hidden_layers, tuple(cfg.layer_types)
    for p in range(1, L + 1):
        if L % p == 0 and types[:p] * (L // p) == types:
            return types[:p], L // p


def _context(tokens, cfg, cache, positions, segment_ids, dtype):
    """What every layer of one call shares: RoPE cos/sin, the attention mask, the documents of the conv window,
    whether token 0 continues the cached document, and the updated slot segments."""
    xp = shim(tokens)
    B, T = tokens.shape
    start = cache["len"] if cache is not None else 0
    t_idx = xp.arange(T, like=tokens) + start
    if positions is None:
        positions = xp.np.broadcast_to(t_idx[None], (B, T))
    seg = xp.cast(segment_ids, "int32") if segment_ids is not None else xp.full((B, T), 1, "int32")
    cos, sin = rope_angles(positions, cfg.rotary_dim, cfg.rope_theta, dtype)
    K1 = cfg.linear_conv_kernel_dim - 1
    ctx = {"cos": cos, "sin": sin, "start": start, "seg": seg, "row_mask": seg != 0}
    if cache is None:
        ctx["mask"] = make_mask(t_idx, t_idx, seg, seg)
        prev = xp.full((B, K1 + 1), -1, "int32")
        ctx["cont0"] = None
    else:
        idx = xp.arange(K1 + 1, like=tokens) + start - (K1 + 1)      # the K1 + 1 slots before this call
        prev = xp.np.where((idx >= 0)[None], cache["seg"][:, xp.np.clip(idx, 0, None)], -1)
        ctx["cont0"] = seg[:, 0] == prev[:, -1]
        ctx["new_seg"] = xp.update_slice(cache["seg"], seg, start, 1)
        ctx["mask"] = make_mask(t_idx, xp.arange(ctx["new_seg"].shape[1], like=tokens), seg, ctx["new_seg"])
    ext = xp.concat([prev, seg], 1)                                   # documents of [K1+1 earlier slots | new]
    ctx["conv_doc"] = _doc_index(ext, B, K1 + 1 + T, xp, ext)[:, 1:]
    return ctx


def forward_hidden(params, tokens, cfg, cache=None, *, positions=None, segment_ids=None, kernels=None, remat=False):
    """tokens [B, T] -> (final-normed hidden [B, T, E], cache, aux). positions [B, T] default to the cache length
    + arange(T); segment_ids [B, T] (0 = padding) keep packed documents apart in attention, conv and delta rule.
    aux: "router_aux_loss" (transformers' load_balancing_loss_func, unweighted; rows with segment 0 excluded) and
    "expert_counts" [num_hidden_layers, num_experts] (top-k assignments per layer, HF layer order). The returned
    hidden is also what mtp_forward takes (vLLM feeds the MTP module the hidden after model.norm)."""
    xp = shim(tokens)
    kernels = kernels or {}
    B, T = tokens.shape
    emb = params["embed"]
    constrain = kernels.get("constrain", lambda x, axes: x)  # activation shardings on a shard.py mesh
    lookup = kernels.get("embed", lambda table, ids: table[ids])  # train.py's in-place gradient for a tied table
    h = constrain(lookup(emb, tokens), ("batch", "seq", "embed"))
    ctx = _context(tokens, cfg, cache, positions, segment_ids, emb.dtype)
    pattern, n_blocks = block_pattern(cfg)
    blk = lambda a: a.reshape((n_blocks, a.shape[0] // n_blocks) + tuple(a.shape[1:]))
    xs = {s: _tree_map(blk, params[s]) for s in ("lin", "full") if s in params}
    if cache is not None:
        if "lin" in xs:
            xs["lin_c"] = _tree_map(blk, {"conv": cache["conv"], "rec": cache["rec"]})
        if "full" in xs:
            xs["full_c"] = _tree_map(blk, {"k": cache["k"], "v": cache["v"]})

    def step(h, x):
        slot = {"lin": 0, "full": 0}
        new = {"lin_c": [], "full_c": []}
        stats = []
        for kind in pattern:
            s = "lin" if kind == LINEAR else "full"
            j = slot[s]
            slot[s] += 1
            lp = _tree_map(lambda a: a[j], x[s])
            lc = _tree_map(lambda a: a[j], x[s + "_c"]) if cache is not None else None
            h, lc, st = decoder_layer(h, lp, kind, cfg, kernels, lc, ctx)
            h = constrain(h, ("batch", "seq", "embed"))
            new[s + "_c"].append(lc)
            stats.append(st)
        ys = {"stats": xp.np.stack(stats)}
        if cache is not None and xp.name == "jax":  # torch wrote its cache in place
            ys.update({c: _tree_map_n(lambda *a: xp.np.stack(a), v) for c, v in new.items() if v})
        return h, ys

    h, ys = xp.scan(step, h, xs, remat=remat)
    stats = ys["stats"].reshape((cfg.num_hidden_layers, 2, cfg.num_experts))
    rows = xp.sum(xp.cast(ctx["row_mask"], "float32"), (0, 1)) * cfg.num_hidden_layers
    f, p = xp.sum(stats[:, 0], 0) / rows, xp.sum(stats[:, 1], 0) / rows
    aux = {"router_aux_loss": xp.sum(f * p, 0) * cfg.num_experts, "expert_counts": xp.cast(stats[:, 0], "int32"),
           # the sums behind f and p, so a data-parallel trainer can add them over batch shards first
           "router_stats": xp.concat([xp.sum(stats[:, 0], 0), xp.sum(stats[:, 1], 0),
                                      xp.cast(rows, "float32")[None]], 0)}
    if cache is not None:
        unblk = lambda a: a.reshape((a.shape[0] * a.shape[1],) + tuple(a.shape[2:]))
        new = dict(cache)
        if xp.name == "jax":
            for c in ("lin_c", "full_c"):
                if c in ys:
                    new.update(_tree_map(unblk, ys[c]))
        cache = {**new, "seg": ctx["new_seg"], "len": cache["len"] + T}
    return rms_norm(h, params["norm"], cfg.rms_norm_eps), cache, aux


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


# ----------------------------------------------------------------------------------------------- multi-token prediction
def _mtp(params, hidden, next_tokens, cfg, cache, layer, positions, segment_ids, kernels):
    xp = shim(hidden)
    mp = params["mtp"]
    e = rms_norm(params["embed"][next_tokens], mp["pre_fc_norm_embedding"], cfg.rms_norm_eps)
    hn = rms_norm(hidden, mp["pre_fc_norm_hidden"], cfg.rms_norm_eps)
    h = xp.np.einsum("btf,fe->bte", xp.concat([e, hn], -1), mp["fc"])
    ctx = _context(next_tokens, cfg, cache, positions, segment_ids, h.dtype)
    lp = _tree_map(lambda a: a[layer], mp["layers"])
    lc = {"k": cache["k"][layer], "v": cache["v"][layer]} if cache is not None else None
    h, lc, _ = decoder_layer(h, lp, FULL, cfg, kernels or {}, lc, ctx)
    if cache is not None:
        k, v = cache["k"], cache["v"]
        if xp.name == "jax":
            k, v = k.at[layer].set(lc["k"]), v.at[layer].set(lc["v"])
        cache = {"k": k, "v": v, "seg": ctx["new_seg"], "len": cache["len"] + next_tokens.shape[1]}
    h = rms_norm(h, mp["norm"], cfg.rms_norm_eps)
    return xp.np.einsum("bte,ev->btv", h, lm_head(params, cfg)), cache


def mtp_forward(params, hidden, next_tokens, cfg, *, layer=0, positions=None, segment_ids=None, kernels=None):
    """Multi-token prediction (vLLM's Qwen3NextMultiTokenPredictor), without a cache -> logits [B, T, V].

    Convention: `hidden` [B, T, E] is forward_hidden's output (after model.norm) at positions 0..T-1, and
    next_tokens[:, i] is the token at position i+1 (the one hidden[:, i] predicts). Slot i computes
        x_i = fc([pre_fc_norm_embedding(embed(next_tokens[:, i])) | pre_fc_norm_hidden(hidden[:, i])])
    then one full-attention decoder layer (causal over the slots, RoPE position i, its own MoE + shared expert),
    mtp.norm and the shared lm_head; logits[:, i] predict the token at position i+2.
    Training: mtp_forward(params, h[:, :-1], tokens[:, 1:], ...) against targets tokens[:, 2:] (Megatron-Bridge
    weights this loss by 0.1). `layer` picks the MTP layer (speculative step k uses layer k % num_mtp_layers)."""
    return _mtp(params, hidden, next_tokens, cfg, None, layer, positions, segment_ids, kernels)[0]


def init_mtp_cache(cfg, batch, max_len, dtype="float32", backend="jax"):
    """KV cache for the MTP layers: k/v [num_mtp_layers, B, Hkv, S, D], seg, len."""
    xp = shim(backend)
    shape = (cfg.num_mtp_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
    return {"k": xp.full(shape, 0, dtype), "v": xp.full(shape, 0, dtype),
            "seg": xp.full((batch, max_len), 0, "int32"), "len": xp.asarray(0, "int32")}


def mtp_step(params, hidden, next_tokens, cfg, cache, *, layer=0, positions=None, segment_ids=None, kernels=None):
    """mtp_forward with a cache from init_mtp_cache, for speculative decoding -> (logits, cache)."""
    return _mtp(params, hidden, next_tokens, cfg, cache, layer, positions, segment_ids, kernels)
