"""Qwen2/Qwen2.5 and Qwen3 dense: parity with transformers, JAX == torch, configs, sizes, cache."""
import json

import numpy as np
import pytest
import torch
from conftest import as_backend, hf_logits, max_kl, save_hf, to_np

import convert
import qwen2
import qwen3


def hf_model(arch, **kw):
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM
    base = dict(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=False)
    base.update(kw)
    torch.manual_seed(0)
    if arch == "qwen2":
        m = Qwen2ForCausalLM(Qwen2Config(**base))
        with torch.no_grad():  # transformers initialises biases to zero: make them matter
            for layer in m.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    else:
        m = Qwen3ForCausalLM(Qwen3Config(**base))
        with torch.no_grad():
            for layer in m.model.layers:
                layer.self_attn.q_norm.weight.normal_(1, 0.3)
                layer.self_attn.k_norm.weight.normal_(1, 0.3)
    return m.eval()


def check(arch, tmp_path, backend, tokens, bound=1e-9, save_kw=None, **kw):
    m = hf_model(arch, **kw)
    folder = save_hf(m, tmp_path / arch, **(save_kw or {}))
    model, cfg, params = convert.load_hf(folder, backend=backend, dtype="float32")
    assert model.MODEL_TYPE == arch
    logits, cache = model.forward(params, as_backend(tokens, backend), cfg)
    assert cache is None and tuple(logits.shape) == tokens.shape + (m.config.vocab_size,)
    kl = max_kl(hf_logits(m, tokens), logits)
    assert kl <= bound, kl
    return m, model, cfg, params


CASES = {
    "untied": {},
    "tied": dict(tie_word_embeddings=True),
    "head_dim_not_hidden_over_heads": dict(head_dim=32),
    "gqa1": dict(num_key_value_heads=4),
    "gqa7": dict(num_attention_heads=7, num_key_value_heads=1, hidden_size=56),
    "theta": dict(rope_theta=5e6),
}


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
@pytest.mark.parametrize("case", list(CASES))
def test_parity(arch, case, tmp_path, backend):
    tokens = np.random.default_rng(1).integers(0, 300, (2, 37))
    check(arch, tmp_path, backend, tokens, **CASES[case])


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_parity_long_prompt_batch3_sharded_files(arch, tmp_path, backend):
    """600 tokens catch RoPE errors; batch of 3; a checkpoint split across several safetensors files."""
    tokens = np.random.default_rng(2).integers(0, 300, (3, 600))
    m, *_ = check(arch, tmp_path, backend, tokens, save_kw=dict(max_shard_size="40KB"))
    files = [p.name for p in (tmp_path / arch).iterdir()]
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2


def test_qwen3_attention_bias(tmp_path, backend):
    tokens = np.random.default_rng(3).integers(0, 300, (2, 20))
    check("qwen3", tmp_path, backend, tokens, attention_bias=True)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_bfloat16_bound(arch, tmp_path, backend):
    """bf16 end to end (ours and transformers both in bf16): stated bound max KL <= 1e-3 on a tiny model."""
    m = hf_model(arch).to(torch.bfloat16)
    folder = save_hf(m, tmp_path / arch)
    model, cfg, params = convert.load_hf(folder, backend=backend, dtype="bfloat16")
    tokens = np.random.default_rng(4).integers(0, 300, (2, 64))
    logits, _ = model.forward(params, as_backend(tokens, backend), cfg)
    assert "bfloat16" in str(logits.dtype)
    assert max_kl(hf_logits(m, tokens), logits) <= 1e-3


@pytest.mark.parametrize("mod", [qwen2, qwen3])
def test_jax_equals_torch(mod):
    cfg = mod.SIZES["debug"]
    pj = mod.init(cfg, backend="jax", seed=3)
    pt = convert.to_backend({k: np.asarray(v) for k, v in _flat(pj).items()}, "torch", mod.unflatten)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 50))
    lj, _ = mod.forward(pj, as_backend(tokens, "jax"), cfg)
    lt, _ = mod.forward(pt, as_backend(tokens, "torch"), cfg)
    assert np.abs(to_np(lj) - to_np(lt)).max() <= 1e-5


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


@pytest.mark.parametrize("mod", [qwen2, qwen3])
def test_init_same_values_and_layout(mod):
    """init gives the table's shapes on both backends, reproducible by seed."""
    cfg = mod.SIZES["debug"]
    a, b = _flat(mod.init(cfg, backend="torch", seed=1)), _flat(mod.init(cfg, backend="torch", seed=1))
    table = mod.param_table(cfg)
    assert set(a) == set(table)
    for k, p in table.items():
        assert tuple(a[k].shape) == p.shape and torch.equal(a[k], b[k])
    j = _flat(mod.init(cfg, backend="jax", seed=1))
    assert {k: tuple(v.shape) for k, v in j.items()} == {k: p.shape for k, p in table.items()}


@pytest.mark.parametrize("mod", [qwen2, qwen3])
def test_prefill_then_decode_equals_full_forward(mod, backend):
    cfg = mod.SIZES["debug"]
    params = mod.init(cfg, backend=backend, seed=0)
    tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 20))
    full, _ = mod.forward(params, as_backend(tokens, backend), cfg)
    cache = mod.init_cache(cfg, 2, 24, "float32", backend)
    outs = []
    logits, cache = mod.forward(params, as_backend(tokens[:, :12], backend), cfg, cache)
    outs.append(to_np(logits))
    for t in range(12, 20):
        logits, cache = mod.forward(params, as_backend(tokens[:, t:t + 1], backend), cfg, cache)
        outs.append(to_np(logits))
    assert np.abs(np.concatenate(outs, 1) - to_np(full)).max() <= 1e-5
    assert int(cache["len"]) == 20


def test_segment_ids_keep_documents_apart(backend):
    """Two documents packed in one row give each the logits it gets alone (positions restart per document)."""
    cfg = qwen3.SIZES["debug"]
    params = qwen3.init(cfg, backend=backend, seed=0)
    rng = np.random.default_rng(6)
    a, b = rng.integers(0, cfg.vocab_size, 9), rng.integers(0, cfg.vocab_size, 7)
    row = np.concatenate([a, b])[None]
    seg = np.array([[1] * 9 + [2] * 7])
    pos = np.array([list(range(9)) + list(range(7))])
    packed, _ = qwen3.forward(params, as_backend(row, backend), cfg, segment_ids=as_backend(seg, backend),
                              positions=as_backend(pos, backend))
    la, _ = qwen3.forward(params, as_backend(a[None], backend), cfg)
    lb, _ = qwen3.forward(params, as_backend(b[None], backend), cfg)
    assert np.abs(to_np(packed)[0, :9] - to_np(la)[0]).max() <= 1e-5
    assert np.abs(to_np(packed)[0, 9:] - to_np(lb)[0]).max() <= 1e-5


def test_from_hf_rope_theta_both_placements():
    d = qwen3.Config().to_hf()
    top = {k: v for k, v in d.items() if k != "rope_parameters"}
    top["rope_theta"] = 5e6
    assert qwen3.Config.from_hf(top).rope_theta == 5e6
    nested = {k: v for k, v in d.items() if k != "rope_theta"}
    nested["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e7}
    assert qwen3.Config.from_hf(nested).rope_theta == 1e7
    # explicit head_dim differs from hidden/heads (Qwen3-0.6B: 128 vs 64)
    assert qwen3.Config.from_hf(d).head_dim == 128 and d["hidden_size"] // d["num_attention_heads"] == 64
    with pytest.raises(ValueError):
        qwen3.Config.from_hf({**nested, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})


def test_from_hf_matches_transformers_config(tmp_path):
    """Our config.json round trip goes through transformers' own config class unchanged."""
    from transformers import Qwen3Config
    cfg = qwen3.SIZES["4b"]
    Qwen3Config(**cfg.to_hf()).save_pretrained(tmp_path)
    back = qwen3.Config.from_hf(json.load(open(tmp_path / "config.json")))
    for f in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
              "intermediate_size", "rope_theta", "tie_word_embeddings", "vocab_size", "rms_norm_eps"):
        assert getattr(back, f) == getattr(cfg, f), f


PUBLISHED = {  # parameter counts of released checkpoints (tied ones count the embedding once)
    (qwen3, "0.6b"): 596_049_920, (qwen3, "8b"): 8_190_735_360,
    (qwen2, "0.5b"): 494_032_768, (qwen2, "7b"): 7_615_616_512,
}


@pytest.mark.parametrize("mod,size", list(PUBLISHED))
def test_published_parameter_counts(mod, size):
    assert mod.count_params(mod.SIZES[size]) == PUBLISHED[(mod, size)]


@pytest.mark.parametrize("mod", [qwen2, qwen3])
def test_every_size_counts_by_hand(mod):
    """Every SIZES entry: the table's count equals a count written out from the architecture (no allocation)."""
    for name, c in mod.SIZES.items():
        E, L, D, Hq, Hkv, I, V = (c.hidden_size, c.num_hidden_layers, c.head_dim, c.num_attention_heads,
                                  c.num_key_value_heads, c.intermediate_size, c.vocab_size)
        attn = E * (Hq + 2 * Hkv) * D + Hq * D * E
        extra = (Hq + 2 * Hkv) * D if mod is qwen2 else 2 * D  # qkv biases vs q/k norms
        per_layer = attn + 3 * E * I + 2 * E + extra
        expected = V * E * (1 if c.tie_word_embeddings else 2) + L * per_layer + E
        assert mod.count_params(c) == expected, name
