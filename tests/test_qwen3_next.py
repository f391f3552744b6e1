"""qwen3_next.py against transformers' Qwen3NextForCausalLM on tiny random checkpoints, both backends."""
import json
import os

import numpy as np
import pytest

import convert
import qwen3_next
from conftest import as_backend, hf_logits, max_kl, save_hf, to_np

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=128, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4,
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24,
            rms_norm_eps=1e-6)
CONFIGS = {  # value/key head ratio, partial rotary, layer pattern
    "r2_p25": dict(num_hidden_layers=4, linear_num_value_heads=4, partial_rotary_factor=0.25),
    "r1_p50": dict(num_hidden_layers=4, linear_num_value_heads=2, partial_rotary_factor=0.5, rope_theta=1e5),
    "r3_custom": dict(num_hidden_layers=5, linear_num_value_heads=6, partial_rotary_factor=0.25, norm_topk_prob=False,
                      layer_types=["full_attention", "linear_attention", "linear_attention", "full_attention",
                                   "linear_attention"]),
}


def randomize(model, seed=0, std=0.1):
    """Every weight random (HF inits the (1 + w) norms to zero and the router to zero): norms near their neutral
    value, A_log = log(U(1, 16)) as released, matrices normal(std)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "A_log" in n:
                p.copy_(torch.log(1 + 15 * torch.rand(p.shape, generator=g)))
            elif p.ndim == 1 or n.endswith("norm.weight"):
                p.copy_(0.1 * r + (1.0 if "linear_attn.norm" in n else 0.0))
            elif "embed" in n:
                p.copy_(r)
            else:
                p.copy_(std * r)
    return model


def make_hf(name, **extra):
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM
    kw = {**BASE, **CONFIGS[name], **extra}
    prf, theta = kw.pop("partial_rotary_factor"), kw.pop("rope_theta", 10000.0)
    cfg = Qwen3NextConfig(rope_parameters={"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": prf},
                          **kw)
    return randomize(Qwen3NextForCausalLM(cfg).eval())


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    out = {}
    for name in CONFIGS:
        model = make_hf(name)
        out[name] = (model, save_hf(model, tmp_path_factory.mktemp(name)))
    return out


def tokens(B, T, seed=0, vocab=128):
    return np.random.RandomState(seed).randint(0, vocab, (B, T))


_JIT = {}
_CFG_ARG = {"forward": 2, "forward_hidden": 2, "mtp_forward": 3, "mtp_step": 3}


def fn(mod, name, backend):
    """mod.<name>, jitted on JAX with cfg static: an eager JAX call re-traces and compiles every lax.scan it meets,
    a jitted one compiles once per shape."""
    if backend != "jax":
        return getattr(mod, name)
    if name not in _JIT:
        import jax
        _JIT[name] = jax.jit(getattr(mod, name), static_argnums=(_CFG_ARG[name],))
    return _JIT[name]


def core(name, backend):
    """A delta-rule reference (chunk_/recurrent_gated_delta_rule_ref), jitted on JAX."""
    f = getattr(qwen3_next, name + "_gated_delta_rule_ref")
    if backend != "jax":
        return f
    if name not in _JIT:
        import jax
        _JIT[name] = jax.jit(f, static_argnames=("output_final_state", "use_qk_l2norm_in_kernel", "chunk_size"))
    return _JIT[name]


# ----------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_transformers(ckpts, name, backend):
    model, path = ckpts[name]
    mod, cfg, params = convert.load_hf(path, backend=backend, dtype="float32")
    assert mod is qwen3_next and cfg.num_mtp_layers == 0 and "mtp" not in params
    assert cfg.layer_types == tuple(model.config.layer_types)
    # chunk boundaries (chunk 64) on both backends
    lengths = (1, 63, 64, 65, 300)
    lengths = lengths if name == "r2_p25" else (1, 130)
    for T in lengths:
        toks = tokens(2, T, seed=T)
        ref = hf_logits(model, toks)
        ours, _ = fn(mod, "forward", backend)(params, as_backend(toks, backend), cfg)
        kl = max_kl(ref, ours)
        assert kl <= 1e-8, (name, T, kl)
        assert np.abs(to_np(ref) - to_np(ours)).max() < 1e-3


def test_router_aux_loss_matches_transformers(ckpts, backend):
    model, path = ckpts["r3_custom"]
    mod, cfg, params = convert.load_hf(path, backend=backend)
    toks = tokens(2, 20)
    with torch.no_grad():
        out = model(torch.as_tensor(toks), output_router_logits=True)
    _, _, aux = fn(mod, "forward_hidden", backend)(params, as_backend(toks, backend), cfg)
    np.testing.assert_allclose(to_np(aux["router_aux_loss"]), out.aux_loss.item(), rtol=1e-5)
    counts = to_np(aux["expert_counts"])
    assert counts.shape == (5, 4) and (counts.sum(1) == 2 * 20 * 2).all()
    for i, logits in enumerate(out.router_logits):  # layer order is HF's
        top = torch.topk(logits, 2, dim=-1).indices.reshape(-1)
        np.testing.assert_array_equal(counts[i], torch.bincount(top, minlength=4).numpy())


# ----------------------------------------------------------------------------------------------- delta rule forms
def _gdn_inputs(backend, B=2, T=150, H=2, HV=6, K=8, V=8, seed=0):
    r = np.random.RandomState(seed)
    arrs = [r.randn(B, T, H, K), r.randn(B, T, H, K), r.randn(B, T, HV, V), -2 * r.rand(B, T, HV), r.rand(B, T, HV),
            r.randn(B, HV, K, V)]
    return [as_backend(a.astype(np.float32), backend) for a in arrs]


def test_chunked_equals_recurrent(backend):
    q, k, v, g, beta, s0 = _gdn_inputs(backend)
    kw = dict(initial_state=s0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    o_r, s_r = core("recurrent", backend)(q, k, v, g, beta, **kw)
    for C in (16, 64):
        o_c, s_c = core("chunk", backend)(q, k, v, g, beta, chunk_size=C, **kw)
        np.testing.assert_allclose(to_np(o_c), to_np(o_r), atol=2e-5)
        np.testing.assert_allclose(to_np(s_c), to_np(s_r), atol=2e-5)
    # the prompt fed at once vs token by token (recurrent steps carrying the state)
    s, outs = s0, []
    for t in range(12):
        o, s = core("recurrent", backend)(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], g[:, t:t + 1],
                                                         beta[:, t:t + 1], initial_state=s, output_final_state=True,
                                                         use_qk_l2norm_in_kernel=True)
        outs.append(to_np(o))
    o_c, s_c = core("chunk", backend)(q[:, :12], k[:, :12], v[:, :12], g[:, :12], beta[:, :12], **kw)
    np.testing.assert_allclose(np.concatenate(outs, 1), to_np(o_c), atol=2e-5)
    np.testing.assert_allclose(to_np(s), to_np(s_c), atol=2e-5)


def test_chunked_matches_transformers_reference():
    from transformers.models.qwen3_next import modeling_qwen3_next as M
    ref = getattr(M.torch_chunk_gated_delta_rule, "__wrapped__", M.torch_chunk_gated_delta_rule)
    q, k, v, g, beta, s0 = _gdn_inputs("torch", T=130)
    o1, s1 = ref(q, k, v, g=g, beta=beta, initial_state=s0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    o2, s2 = core("chunk", "torch")(q, k, v, g, beta, initial_state=s0, output_final_state=True,
                                                   use_qk_l2norm_in_kernel=True)
    np.testing.assert_allclose(to_np(o2), to_np(o1), atol=1e-6)
    np.testing.assert_allclose(to_np(s2), to_np(s1), atol=1e-6)


def test_segments_restart_the_delta_rule(backend):
    """Both forms with segment_ids equal each document run alone (from a zero state)."""
    q, k, v, g, beta, _ = _gdn_inputs(backend, T=90)
    bounds = [(0, 40), (40, 41), (41, 90)]
    seg = np.concatenate([np.full(b - a, i + 1) for i, (a, b) in enumerate(bounds)])[None].repeat(2, 0)
    for f in (core("chunk", backend), core("recurrent", backend)):
        o, s = f(q, k, v, g, beta, output_final_state=True, use_qk_l2norm_in_kernel=True,
                 segment_ids=as_backend(seg, backend))
        for a, b in bounds:
            o1, s1 = f(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b], output_final_state=True,
                       use_qk_l2norm_in_kernel=True)
            np.testing.assert_allclose(to_np(o)[:, a:b], to_np(o1), atol=2e-5)
        np.testing.assert_allclose(to_np(s), to_np(s1), atol=2e-5)


# ----------------------------------------------------------------------------------------------- cache, backends
@pytest.mark.parametrize("name", ["r2_p25", "r3_custom"])
def test_prefill_then_decode_equals_full_forward(ckpts, name, backend):
    _, path = ckpts[name]
    mod, cfg, params = convert.load_hf(path, backend=backend)
    T, N = 66, 5
    toks = tokens(2, T + N, seed=3)
    full, _ = fn(mod, "forward", backend)(params, as_backend(toks, backend), cfg)
    cache = mod.init_cache(cfg, 2, 80, backend=backend)
    # prefill, a 3-token continuation (torch; JAX would compile one more shape), then single-token steps
    parts = [(0, T - 3), (T - 3, T)] if backend == "torch" else [(0, T)]
    parts += [(t, t + 1) for t in range(T, T + N)]
    got = []
    for a, b in parts:
        lg, cache = fn(mod, "forward", backend)(params, as_backend(toks[:, a:b], backend), cfg, cache)
        got.append(to_np(lg))
    assert int(to_np(cache["len"])) == T + N
    np.testing.assert_allclose(np.concatenate(got, 1), to_np(full), atol=1e-5)


def test_jax_equals_torch_on_same_params():
    cfg = qwen3_next.SIZES["debug"]
    pt = qwen3_next.init(cfg, backend="torch", seed=1)
    g = torch.Generator().manual_seed(0)
    flat = {}

    def perturb(prefix, tree):
        for k, v in tree.items():
            if isinstance(v, dict):
                perturb(prefix + k + ".", v)
            else:
                flat[prefix + k] = (v + 0.02 * torch.randn(v.shape, generator=g)).numpy()
    perturb("", pt)
    pt = qwen3_next.unflatten({k: torch.as_tensor(v) for k, v in flat.items()})
    import jax.numpy as jnp
    pj = qwen3_next.unflatten({k: jnp.asarray(v) for k, v in flat.items()})
    toks = tokens(2, 70, vocab=cfg.vocab_size)
    seg = np.repeat([[1] * 30 + [2] * 40], 2, 0)
    lt, _ = qwen3_next.forward(pt, torch.as_tensor(toks), cfg, segment_ids=torch.as_tensor(seg))
    lj, _ = fn(qwen3_next, "forward", "jax")(pj, jnp.asarray(toks), cfg, segment_ids=jnp.asarray(seg))
    np.testing.assert_allclose(to_np(lj), to_np(lt), atol=1e-5)
    ht, _, _ = qwen3_next.forward_hidden(pt, torch.as_tensor(toks), cfg)
    hj, _, _ = fn(qwen3_next, "forward_hidden", "jax")(pj, jnp.asarray(toks), cfg)
    nt = torch.as_tensor(np.roll(toks, -1, 1))
    mt = qwen3_next.mtp_forward(pt, ht, nt, cfg)
    mj = fn(qwen3_next, "mtp_forward", "jax")(pj, hj, jnp.asarray(np.roll(toks, -1, 1)), cfg)
    np.testing.assert_allclose(to_np(mj), to_np(mt), atol=1e-5)


def test_scan_jaxpr_does_not_grow_with_depth():
    import dataclasses
    import jax
    import jax.numpy as jnp
    sizes = []
    for L in (4, 12):
        cfg = dataclasses.replace(qwen3_next.SIZES["debug"], num_hidden_layers=L, num_mtp_layers=0,
                                  layer_types=tuple("full_attention" if (i + 1) % 4 == 0 else "linear_attention"
                                                    for i in range(L)))
        p = qwen3_next.init(cfg, backend="jax")
        jaxpr = jax.make_jaxpr(lambda p, t: qwen3_next.forward(p, t, cfg)[0])(p, jnp.zeros((1, 8), jnp.int32))
        sizes.append(len(jaxpr.eqns))
    assert sizes[0] == sizes[1]
    assert qwen3_next.block_pattern(cfg) == (("linear_attention",) * 3 + ("full_attention",), 3)


# ----------------------------------------------------------------------------------------------- packing
def test_packed_documents_equal_separate_runs(ckpts, backend):
    _, path = ckpts["r2_p25"]
    mod, cfg, params = convert.load_hf(path, backend=backend)
    lens = [50, 2, 45]  # crosses a chunk boundary; a document shorter than the conv window
    toks = tokens(2, sum(lens), seed=7)
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lens)])[None].repeat(2, 0)
    packed, _ = fn(mod, "forward", backend)(params, as_backend(toks, backend), cfg, segment_ids=as_backend(seg, backend))
    unpacked, _ = fn(mod, "forward", backend)(params, as_backend(toks, backend), cfg)
    a = 0
    for n in lens:
        alone, _ = fn(mod, "forward", backend)(params, as_backend(toks[:, a:a + n], backend), cfg)
        np.testing.assert_allclose(to_np(packed)[:, a:a + n], to_np(alone), atol=2e-5)
        a += n
    assert np.abs(to_np(packed)[:, 50:] - to_np(unpacked)[:, 50:]).max() > 1e-2  # the segments did something


def test_packed_decode_restarts_state(ckpts, backend):
    """A cache whose next token starts a new segment: the new document sees nothing of the old one."""
    _, path = ckpts["r2_p25"]
    mod, cfg, params = convert.load_hf(path, backend=backend)
    toks = tokens(1, 12, seed=9)
    cache = mod.init_cache(cfg, 1, 16, backend=backend)
    _, cache = fn(mod, "forward", backend)(params, as_backend(toks[:, :7], backend), cfg, cache)
    seg2 = as_backend(np.full((1, 1), 2), backend)
    got = []
    for t in range(7, 12):
        lg, cache = fn(mod, "forward", backend)(params, as_backend(toks[:, t:t + 1], backend), cfg, cache, segment_ids=seg2)
        got.append(to_np(lg))
    alone, _ = fn(mod, "forward", backend)(params, as_backend(toks[:, 7:], backend), cfg)
    np.testing.assert_allclose(np.concatenate(got, 1), to_np(alone), atol=2e-5)


# ----------------------------------------------------------------------------------------------- MTP
def _add_mtp(model, path, seed=0):
    """Writes mtp.* tensors (vLLM's names: fc, the two pre-fc norms, one full-attention decoder layer, norm) next to
    the checkpoint; returns them by name."""
    from safetensors.numpy import load_file, save_file
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextDecoderLayer
    cfg = model.config
    layer = randomize(Qwen3NextDecoderLayer(cfg, layer_idx=[i for i, t in enumerate(cfg.layer_types)
                                                             if t == "full_attention"][0]), seed=seed + 1)
    r = np.random.RandomState(seed)
    E = cfg.hidden_size
    mtp = {"mtp.fc.weight": (0.1 * r.randn(E, 2 * E)).astype(np.float32)}
    for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        mtp[f"mtp.{n}.weight"] = (0.1 * r.randn(E)).astype(np.float32)
    experts = layer.mlp.experts
    for n, p in layer.state_dict().items():
        if n.startswith("mlp.experts."):
            continue
        mtp["mtp.layers.0." + n] = p.numpy().copy()
    I = cfg.moe_intermediate_size
    for e in range(cfg.num_experts):  # the hub layout: one tensor per expert
        mtp[f"mtp.layers.0.mlp.experts.{e}.gate_proj.weight"] = experts.gate_up_proj[e, :I].detach().numpy().copy()
        mtp[f"mtp.layers.0.mlp.experts.{e}.up_proj.weight"] = experts.gate_up_proj[e, I:].detach().numpy().copy()
        mtp[f"mtp.layers.0.mlp.experts.{e}.down_proj.weight"] = experts.down_proj[e].detach().numpy().copy()
    f = os.path.join(path, "model.safetensors")
    save_file({**load_file(f), **mtp}, f, metadata={"format": "pt"})
    return layer, mtp


@pytest.fixture(scope="module")
def mtp_ckpt(tmp_path_factory):
    model = make_hf("r2_p25")
    path = save_hf(model, tmp_path_factory.mktemp("mtp"))
    layer, mtp = _add_mtp(model, path)
    return model, path, layer, mtp


def _mtp_reference(model, layer, mtp, hidden, next_tokens):
    """vLLM's formula written out with transformers' modules: h = fc([norm_e(embed(next)) | norm_h(hidden)]),
    one full-attention decoder layer (causal, RoPE at the slot's position), mtp.norm, lm_head."""
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNorm
    E, eps = model.config.hidden_size, model.config.rms_norm_eps

    def norm(name, x):
        n = Qwen3NextRMSNorm(E, eps)
        n.weight.data = torch.as_tensor(mtp[f"mtp.{name}.weight"])
        return n(x)
    with torch.no_grad():
        e = norm("pre_fc_norm_embedding", model.model.embed_tokens(next_tokens))
        h = torch.cat([e, norm("pre_fc_norm_hidden", hidden)], -1) @ torch.as_tensor(mtp["mtp.fc.weight"]).T
        T = h.shape[1]
        pos = torch.arange(T)[None]
        mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
        h = layer(h, position_embeddings=model.model.rotary_emb(h, pos), attention_mask=mask, position_ids=pos)
        return model.lm_head(norm("norm", h))


def test_mtp_loads_and_matches_reference(mtp_ckpt, backend):
    model, path, layer, mtp = mtp_ckpt
    mod, cfg, params = convert.load_hf(path, backend=backend)
    assert cfg.num_mtp_layers == 1 and "mtp" in params
    toks = tokens(2, 40, seed=11)
    ref_main = hf_logits(model, toks)  # transformers ignores mtp.*: the main model is unchanged
    lg, _ = fn(mod, "forward", backend)(params, as_backend(toks, backend), cfg)
    assert max_kl(ref_main, lg) <= 1e-8
    hidden, _, _ = fn(mod, "forward_hidden", backend)(params, as_backend(toks, backend), cfg)
    ours = fn(mod, "mtp_forward", backend)(params, hidden[:, :-1], as_backend(toks[:, 1:], backend), cfg)
    with torch.no_grad():
        h_ref = model.model(torch.as_tensor(toks)).last_hidden_state
    ref = _mtp_reference(model, layer, mtp, h_ref[:, :-1], torch.as_tensor(toks[:, 1:]))
    assert max_kl(ref, ours) <= 1e-8
    np.testing.assert_allclose(to_np(ours), to_np(ref), atol=1e-4)


def test_mtp_weights_are_used(mtp_ckpt, tmp_path, backend):
    import shutil
    from safetensors.numpy import load_file, save_file
    model, path, _, _ = mtp_ckpt
    other = str(tmp_path / "changed")
    shutil.copytree(path, other)
    f = os.path.join(other, "model.safetensors")
    t = load_file(f)
    t["mtp.fc.weight"] = t["mtp.fc.weight"] * 1.5
    t["mtp.layers.0.mlp.experts.1.down_proj.weight"] = t["mtp.layers.0.mlp.experts.1.down_proj.weight"] + 0.5
    save_file(t, f, metadata={"format": "pt"})
    toks = as_backend(tokens(1, 20, seed=2), backend)
    out = []
    for p in (path, other):
        mod, cfg, params = convert.load_hf(p, backend=backend)
        h, _, _ = fn(mod, "forward_hidden", backend)(params, toks, cfg)
        out.append(to_np(fn(mod, "mtp_forward", backend)(params, h[:, :-1], toks[:, 1:], cfg)))
    assert np.abs(out[0] - out[1]).max() > 1e-3


def test_mtp_cache_steps_equal_full(mtp_ckpt, backend):
    _, path, _, _ = mtp_ckpt
    mod, cfg, params = convert.load_hf(path, backend=backend)
    toks = as_backend(tokens(2, 12, seed=4), backend)
    h, _, _ = fn(mod, "forward_hidden", backend)(params, toks, cfg)
    full = fn(mod, "mtp_forward", backend)(params, h[:, :-1], toks[:, 1:], cfg)
    cache = mod.init_mtp_cache(cfg, 2, 16, backend=backend)
    lg, cache = fn(mod, "mtp_step", backend)(params, h[:, :6], toks[:, 1:7], cfg, cache)
    got = [to_np(lg)]
    for t in range(6, 11):
        lg, cache = fn(mod, "mtp_step", backend)(params, h[:, t:t + 1], toks[:, t + 1:t + 2], cfg, cache)
        got.append(to_np(lg))
    np.testing.assert_allclose(np.concatenate(got, 1), to_np(full), atol=1e-5)


def test_config_round_trip_and_sizes(ckpts):
    _, path = ckpts["r3_custom"]
    with open(os.path.join(path, "config.json")) as f:
        d = json.load(f)
    cfg = qwen3_next.Config.from_hf(d, keys=set())
    again = qwen3_next.Config.from_hf(cfg.to_hf())
    assert again.layer_types == cfg.layer_types and again.partial_rotary_factor == cfg.partial_rotary_factor
    assert cfg.num_mtp_layers == 0
    big = qwen3_next.SIZES["80b-a3b"]
    assert big.layer_types.count("full_attention") == 12 and big.rotary_dim == 64
    assert 79e9 < qwen3_next.count_params(big) < 82e9 and 2.5e9 < qwen3_next.count_active_params(big) < 4e9
    dbg = qwen3_next.SIZES["debug"]
    assert dbg.layer_types.count("full_attention") >= 2 and dbg.layer_types.count("linear_attention") >= 6
    assert dbg.linear_num_value_heads % dbg.linear_num_key_heads == 0 < dbg.num_mtp_layers
    assert dbg.linear_num_value_heads > dbg.linear_num_key_heads
    d2 = {k: v for k, v in d.items() if k != "layer_types"}
    d2["full_attention_interval"] = 2
    assert qwen3_next.Config.from_hf(d2).layer_types[:2] == ("linear_attention", "full_attention")
