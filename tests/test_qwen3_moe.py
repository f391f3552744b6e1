"""qwen3_moe against transformers' Qwen3MoeForCausalLM on tiny random checkpoints, both backends, fp32.

Checkpoints are saved with save_pretrained (the hub's per-expert layout; config.json rewritten to the hub's
`num_experts` spelling) and loaded through convert.load_hf. JAX runs jitted with the config static (one compile
per config and shape, shared between tests)."""
import dataclasses
import json
import math
import os

import numpy as np
import pytest
from conftest import as_backend, max_kl, save_hf, to_np

import convert
import qwen3_moe

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=16, initializer_range=0.2)
CASES = {  # name -> (config overrides, token batch shape)
    "norm_top4": (dict(norm_topk_prob=True, num_experts_per_tok=4), (1, 600)),
    "nonorm_top1": (dict(norm_topk_prob=False, num_experts_per_tok=1), (3, 40)),
    "step2_mlp_only": (dict(norm_topk_prob=True, num_experts_per_tok=4, num_hidden_layers=4, decoder_sparse_step=2,
                            mlp_only_layers=[1]), (2, 40)),
}


def hf_model(seed=0, **over):
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**{**TINY, **over})).eval()


def save_hub(model, folder):
    """save_pretrained, then config.json with the hub's `num_experts` in place of `num_local_experts`."""
    save_hf(model, folder)
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        d = json.load(f)
    d["num_experts"] = d.pop("num_local_experts")
    with open(path, "w") as f:
        json.dump(d, f)
    return str(folder)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """name -> (folder, tokens, transformers output with router logits)."""
    import torch
    out = {}
    for i, (name, (over, shape)) in enumerate(CASES.items()):
        m = hf_model(seed=i, **over)
        folder = save_hub(m, tmp_path_factory.mktemp(name))
        tokens = np.random.RandomState(i).randint(0, TINY["vocab_size"], shape)
        with torch.no_grad():
            ref = m(torch.as_tensor(tokens), output_router_logits=True)
        out[name] = (folder, tokens, ref)
    return out


def _run(params, tokens, cfg, router_bias=None):
    h, _, aux = qwen3_moe.forward_hidden(params, tokens, cfg, router_bias=router_bias)
    xp = qwen3_moe.shim(h)
    return xp.np.einsum("bte,ev->btv", h, qwen3_moe.lm_head(params, cfg)), aux


_jit = {}


def run(params, tokens, cfg, router_bias=None):
    """(logits, aux); jitted on JAX with the config static (hf_json dropped so equal models share a compile)."""
    if type(tokens).__module__.startswith("torch"):
        import torch
        with torch.no_grad():
            return _run(params, tokens, cfg, router_bias)
    import jax
    if "run" not in _jit:
        _jit["run"] = jax.jit(_run, static_argnums=2)
    return _jit["run"](params, tokens, dataclasses.replace(cfg, hf_json="{}"), router_bias)


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_transformers(ckpts, case, backend):
    folder, tokens, ref = ckpts[case]
    model, cfg, params = convert.load_hf(folder, backend=backend)
    assert model is qwen3_moe
    logits, aux = run(params, as_backend(tokens, backend), cfg)
    assert max_kl(ref.logits, logits) <= 1e-9
    # the aux loss is transformers' own, over the same batch
    np.testing.assert_allclose(float(aux["router_aux_loss"]), float(ref.aux_loss), rtol=1e-6)
    counts = to_np(aux["expert_counts"])
    assert counts.shape == (len(cfg.sparse_layers), cfg.num_experts)
    assert (counts.sum(-1) == tokens.size * cfg.num_experts_per_tok).all()
    assert int(aux["dropped"]) == 0


def test_config_layers():
    cfg = qwen3_moe.Config.from_hf({**TINY, **CASES["step2_mlp_only"][0]})
    assert cfg.sparse_layers == (3,) and cfg.dense_layers == (0, 1, 2)
    assert cfg.mlp_only_layers == (1,) and cfg.norm_topk_prob is True


def test_fused_layout(ckpts, tmp_path, backend):
    """The norm_top4 checkpoint rewritten as transformers 5 holds it in memory: fused experts.gate_up_proj and
    experts.down_proj, `num_local_experts` in config.json."""
    from safetensors.numpy import load_file, save_file
    src, tokens, ref = ckpts["norm_top4"]
    cfg = qwen3_moe.Config.from_hf(json.load(open(os.path.join(src, "config.json"))))
    flat = load_file(os.path.join(src, "model.safetensors"))
    out = {k: v for k, v in flat.items() if ".mlp.experts." not in k}
    for i in cfg.sparse_layers:
        e = f"model.layers.{i}.mlp.experts."
        gate = np.stack([flat[f"{e}{x}.gate_proj.weight"] for x in range(cfg.num_experts)])
        up = np.stack([flat[f"{e}{x}.up_proj.weight"] for x in range(cfg.num_experts)])
        out[e + "gate_up_proj"] = np.concatenate([gate, up], 1)  # [E, 2I, H], gate rows first
        out[e + "down_proj"] = np.stack([flat[f"{e}{x}.down_proj.weight"] for x in range(cfg.num_experts)])
    save_file(out, str(tmp_path / "model.safetensors"))
    d = cfg.to_hf()
    d["num_local_experts"] = d.pop("num_experts")
    (tmp_path / "config.json").write_text(json.dumps(d))

    _, cfg_f, flat_f = convert.load_numpy(str(tmp_path))
    _, _, flat_h = convert.load_numpy(src)
    assert cfg_f.num_experts == cfg.num_experts and flat_f.keys() == flat_h.keys()
    for k in flat_h:
        np.testing.assert_array_equal(flat_f[k], flat_h[k], err_msg=k)
    _, cfg_f, params = convert.load_hf(str(tmp_path), backend=backend)
    logits, _ = run(params, as_backend(tokens, backend), cfg_f)
    assert max_kl(ref.logits, logits) <= 1e-9


def test_jax_equals_torch(ckpts):
    folder, tokens, _ = ckpts["norm_top4"]
    (_, cfg, pj), (_, _, pt) = convert.load_hf(folder, backend="jax"), convert.load_hf(folder, backend="torch")
    lj, aj = run(pj, as_backend(tokens, "jax"), cfg)
    lt, at = run(pt, as_backend(tokens, "torch"), cfg)
    assert np.abs(to_np(lj) - to_np(lt)).max() <= 1e-5
    np.testing.assert_array_equal(to_np(aj["expert_counts"]), to_np(at["expert_counts"]))


@pytest.mark.parametrize("case", ["norm_top4", "step2_mlp_only"])
def test_prefill_decode_equals_forward(ckpts, case, backend):
    folder, tokens, _ = ckpts[case]
    _, cfg, params = convert.load_hf(folder, backend=backend)
    full, _ = run(params, as_backend(tokens, backend), cfg)
    B, T = tokens.shape
    n_decode = 2
    cache = qwen3_moe.init_cache(cfg, B, T, backend=backend)
    step = qwen3_moe.forward
    if backend == "jax":
        import jax
        step = jax.jit(qwen3_moe.forward, static_argnums=2)
        cfg = dataclasses.replace(cfg, hf_json="{}")
    outs = []
    logits, cache = step(params, as_backend(tokens[:, : T - n_decode], backend), cfg, cache)
    outs.append(to_np(logits))
    for t in range(T - n_decode, T):
        logits, cache = step(params, as_backend(tokens[:, t:t + 1], backend), cfg, cache)
        outs.append(to_np(logits))
    assert int(cache["len"]) == T
    assert np.abs(np.concatenate(outs, 1) - to_np(full)).max() <= 1e-5


# ----------------------------------------------------------------------------------------------- dispatch
def _one_expert_setup(backend, k=4, winner=5, seed=0, moe_mlp=16):
    """x [2, 24, 32] whose feature 0 is always positive and a router on which expert `winner` wins by a mile for
    every token: all B*T tokens go to one expert (their other k-1 slots spread over the rest)."""
    cfg = dataclasses.replace(qwen3_moe.SIZES["debug"], hidden_size=32, moe_intermediate_size=moe_mlp,
                              num_experts_per_tok=k, norm_topk_prob=True)
    rs = np.random.RandomState(seed)
    x = rs.randn(2, 24, 32).astype(np.float32)
    x[..., 0] = np.abs(x[..., 0]) + 2.0
    router = (0.1 * rs.randn(32, 16)).astype(np.float32)
    router[:, winner] = 0.0
    router[0, winner] = 5.0  # logit >= 10, the others about N(0, 0.6)
    mp = {"router": router, "w_gate": 0.3 * rs.randn(16, 32, moe_mlp), "w_up": 0.3 * rs.randn(16, 32, moe_mlp),
          "w_down": 0.3 * rs.randn(16, moe_mlp, 32)}
    mp = {n: np.asarray(a, np.float32) for n, a in mp.items()}
    return cfg, x, mp


def _reference_moe(x, mp, cfg, capacity=None):
    """float64 numpy: every expert on every token (a test-only dense einsum), combined by the routing weights;
    with a capacity, slots beyond the first `capacity` (token order) of each expert contribute nothing."""
    xf = x.reshape(-1, x.shape[-1]).astype(np.float64)
    logits = xf @ mp["router"]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    idx = np.argsort(-p, -1, kind="stable")[:, :cfg.num_experts_per_tok]
    w = np.take_along_axis(p, idx, -1)
    if cfg.norm_topk_prob:
        w /= w.sum(-1, keepdims=True)
    g = np.einsum("ne,xef->nxf", xf, mp["w_gate"])
    u = np.einsum("ne,xef->nxf", xf, mp["w_up"])
    every = np.einsum("nxf,xfe->nxe", g / (1 + np.exp(-g)) * u, mp["w_down"])
    keep = np.ones(idx.shape, bool)
    if capacity is not None:
        seen = np.zeros(cfg.num_experts, int)
        for n, s in np.ndindex(*idx.shape):  # token-major priority, as the sort by expert keeps it
            keep[n, s] = seen[idx[n, s]] < capacity
            seen[idx[n, s]] += 1
    y = (np.take_along_axis(every, idx[..., None], 1) * (w * keep)[..., None]).sum(1)
    return y.reshape(x.shape), np.bincount(idx.reshape(-1), minlength=cfg.num_experts), int((~keep).sum())


def _moe(x, mp, cfg, backend, bias=None):
    args = [as_backend(x, backend), {n: as_backend(a, backend) for n, a in mp.items()}]
    if backend == "jax":
        import jax
        fn = jax.jit(lambda x, mp, b: qwen3_moe.moe(x, mp, cfg, b))
        return fn(*args, None if bias is None else as_backend(bias, backend))
    return qwen3_moe.moe(*args, cfg, None if bias is None else as_backend(bias, backend))


def test_dropless_every_slot_computed(backend):
    cfg, x, mp = _one_expert_setup(backend)
    y, stats = _moe(x, mp, cfg, backend)
    ref, counts, _ = _reference_moe(x, mp, cfg)
    assert counts[5] == 48  # every token chose expert 5
    np.testing.assert_array_equal(to_np(stats["counts"]), counts)
    assert int(stats["dropped"]) == 0
    assert np.abs(to_np(y) - ref).max() <= 1e-5


def test_torch_grouped_mm_fallback():
    """moe_intermediate_size 6: rows of 24 bytes, which torch._grouped_mm refuses; the per-expert loop runs."""
    cfg, x, mp = _one_expert_setup("torch", moe_mlp=6)
    y, stats = _moe(x, mp, cfg, "torch")
    ref, counts, _ = _reference_moe(x, mp, cfg)
    np.testing.assert_array_equal(to_np(stats["counts"]), counts)
    assert np.abs(to_np(y) - ref).max() <= 1e-5


def test_capacity_drops_and_counts(backend):
    cfg, x, mp = _one_expert_setup(backend)
    cfg = dataclasses.replace(cfg, capacity_factor=1.0)
    capacity = math.ceil(48 * 4 / 16)  # 12 slots an expert
    y, stats = _moe(x, mp, cfg, backend)
    ref, counts, dropped = _reference_moe(x, mp, cfg, capacity)
    assert dropped == np.maximum(counts - capacity, 0).sum() >= 48 - capacity
    assert int(stats["dropped"]) == dropped
    np.testing.assert_array_equal(to_np(stats["counts"]), counts)  # routed, before dropping
    assert np.abs(to_np(y) - ref).max() <= 1e-5


def test_capacity_reported_in_aux(ckpts):
    """forward_hidden sums the dropped slots of all sparse layers into aux['dropped'] (torch; the op is shared)."""
    folder, tokens, _ = ckpts["nonorm_top1"]
    _, cfg, params = convert.load_hf(folder, backend="torch")
    cfg = dataclasses.replace(cfg, capacity_factor=0.5)
    _, aux = run(params, as_backend(tokens, "torch"), cfg)
    counts = to_np(aux["expert_counts"])
    capacity = math.ceil(0.5 * tokens.size * 1 / 16)
    assert int(aux["dropped"]) == np.maximum(counts - capacity, 0).sum() > 0


def test_router_bias(backend):
    """A bias steers the top-k choice only: a large bias on one expert takes every token, with the same weights."""
    cfg, x, mp = _one_expert_setup(backend)
    bias = np.zeros(16, np.float32)
    bias[9] = 10.0
    y, stats = _moe(x, mp, cfg, backend, bias)
    counts = to_np(stats["counts"])
    assert counts[9] == 48 and counts[5] == 48


def test_router_bias_in_forward(ckpts):
    """forward_hidden takes router_bias [n_sparse, E]: a large bias on expert 7 of the one sparse layer takes
    every token there (torch; the loop and the scan share moe())."""
    folder, tokens, _ = ckpts["step2_mlp_only"]
    _, cfg, params = convert.load_hf(folder, backend="torch")
    bias = np.zeros((1, 16), np.float32)
    bias[0, 7] = 10.0
    _, aux = run(params, as_backend(tokens, "torch"), cfg, as_backend(bias, "torch"))
    assert to_np(aux["expert_counts"])[0, 7] == tokens.size


def test_gradients_jax_equals_torch():
    """Training path: d(mean logits^2 + coef * aux loss)/d(every param), JAX (ragged_dot, scan) == torch
    (_grouped_mm autograd)."""
    import jax
    import torch
    cfg = dataclasses.replace(qwen3_moe.SIZES["debug"], hidden_size=32, num_attention_heads=4, head_dim=16,
                              moe_intermediate_size=16, vocab_size=128, initializer_range=0.2)
    pt = qwen3_moe.init(cfg, "torch", seed=1)
    pj = {k: to_backend_tree(v) for k, v in pt.items()}
    tokens = np.random.RandomState(0).randint(0, 128, (2, 16))

    def loss(p, t):
        logits, aux = _run(p, t, cfg)
        return (logits ** 2).mean() + cfg.router_aux_loss_coef * aux["router_aux_loss"]

    gj = jax.jit(jax.grad(loss))(pj, as_backend(tokens, "jax"))
    names = [k for k in qwen3_moe.param_table(cfg)]
    get = lambda tree, n: tree[n] if "." not in n else tree[n.split(".")[0]][n.split(".")[1]]  # noqa: E731
    leaves = [get(pt, n).requires_grad_(True) for n in names]
    gt = torch.autograd.grad(loss(pt, as_backend(tokens, "torch")), leaves)
    for n, g in zip(names, gt):
        assert np.abs(to_np(g) - to_np(get(gj, n))).max() <= 1e-6, n
    assert np.abs(to_np(gt[names.index("moe.w_gate")])).max() > 1e-3


def to_backend_tree(v):
    import jax.numpy as jnp
    return {k: jnp.asarray(a.numpy()) for k, a in v.items()} if isinstance(v, dict) else jnp.asarray(v.numpy())


def test_update_router_bias(backend):
    counts = np.array([[10, 0, 5, 5], [1, 2, 3, 6]])
    bias = as_backend(np.zeros((2, 4), np.float32), backend)
    new = to_np(qwen3_moe.update_router_bias(bias, as_backend(counts, backend), 0.01))
    sign = np.sign(counts.mean(-1, keepdims=True) - counts)
    np.testing.assert_allclose(new, 0.01 * (sign - sign.mean(-1, keepdims=True)), atol=1e-7)
    assert new[0, 1] > 0 > new[0, 0]  # the idle expert gains, the busy one loses


# ----------------------------------------------------------------------------------------------- loading and sizes
def test_expert_count_mismatch_is_an_error(tmp_path):
    folder = save_hub(hf_model(num_experts=8, num_experts_per_tok=2), tmp_path)
    path = os.path.join(folder, "config.json")
    d = json.load(open(path))
    d["num_experts"] = 16
    json.dump(d, open(path, "w"))
    with pytest.raises(convert.UserError) as e:
        convert.load_hf(folder, backend="torch")
    msg = str(e.value)
    assert "\n" not in msg and "8 experts" in msg and "num_experts=16" in msg


def test_both_expert_spellings():
    base = {**TINY, "num_experts_per_tok": 2}
    base.pop("num_experts")
    assert qwen3_moe.Config.from_hf({**base, "num_experts": 8}).num_experts == 8
    assert qwen3_moe.Config.from_hf({**base, "num_local_experts": 8}).num_experts == 8
    with pytest.raises(ValueError, match="num_experts=8 and num_local_experts=4"):
        qwen3_moe.Config.from_hf({**base, "num_experts": 8, "num_local_experts": 4})


def test_param_counts():
    cfg = qwen3_moe.SIZES["30b-a3b"]
    assert qwen3_moe.count_params(cfg) == 30_532_122_624  # published total
    assert float(f"{qwen3_moe.count_params(cfg):.3g}") == 3.05e10
    assert float(f"{qwen3_moe.count_params(cfg, active=True):.3g}") == 3.35e9  # "3.3B activated"
    assert qwen3_moe.active_params(cfg) == qwen3_moe.count_params(cfg, active=True)
    big = qwen3_moe.SIZES["235b-a22b"]
    assert float(f"{qwen3_moe.count_params(big):.3g}") == 2.35e11
    assert float(f"{qwen3_moe.count_params(big, active=True):.3g}") == 2.22e10


def test_export_names_round_trip(ckpts):
    """hf_entries(cfg) (no keys: the hub layout) names every tensor of a save_pretrained checkpoint, and to_hf
    inverts to_ours."""
    from safetensors.numpy import load_file
    folder, _, _ = ckpts["step2_mlp_only"]
    _, cfg, flat = convert.load_numpy(folder)
    hub = load_file(os.path.join(folder, "model.safetensors"))
    entries = qwen3_moe.hf_entries(cfg)
    assert {n for e in entries for n in e[2]} == set(hub)
    for name, i, names, _, _, to_hf in entries:
        for n, a in zip(names, to_hf(flat[name] if i is None else flat[name][i])):
            np.testing.assert_array_equal(a, hub[n], err_msg=n)


def test_init_shapes():
    cfg = qwen3_moe.Config.from_hf({**TINY, **CASES["step2_mlp_only"][0]})
    params = qwen3_moe.init(cfg, backend="torch")
    assert tuple(params["moe"]["w_gate"].shape) == (1, 16, 32, 16)
    assert tuple(params["mlp"]["w_down"].shape) == (3, 64, 32)
    assert sum(p.numel() for p in qwen3_moe._leaves(params)) == qwen3_moe.count_params(cfg)
