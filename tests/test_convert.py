"""Checkpoint conversion: HF -> Orbax / DCP -> HF round trips bit for bit (every tensor, name and dtype) for every
model, both dtypes and both layouts; transformers loads the export to the same logits; read_params works across
backends; sharded export; atomic output."""
import json
import os

import numpy as np
import pytest

import convert
from conftest import hf_logits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = [a for a in ("qwen2", "qwen3", "qwen3_moe", "qwen3_moe_fused", "qwen3_next")
         if os.path.exists(os.path.join(ROOT, a.replace("_fused", "") + ".py"))]
SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def _randomize(model, seed=0):
    """Every weight random (HF inits some norms to one/zero): a round trip that swaps two norms must show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _hf_model(arch):
    import transformers as tf
    torch.manual_seed(0)
    if arch == "qwen2":  # untied, QKV bias
        m = tf.Qwen2ForCausalLM(tf.Qwen2Config(tie_word_embeddings=False, **SMALL))
    elif arch == "qwen3":  # tied, head_dim != hidden / heads
        m = tf.Qwen3ForCausalLM(tf.Qwen3Config(head_dim=16, tie_word_embeddings=True, **SMALL))
    elif arch == "qwen3_moe":
        m = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(head_dim=16, num_experts=4, num_experts_per_tok=2,
                                                     moe_intermediate_size=16, norm_topk_prob=True, **SMALL))
    else:
        kw = {**SMALL, "num_hidden_layers": 4}
        m = tf.Qwen3NextForCausalLM(tf.Qwen3NextConfig(
            head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            shared_expert_intermediate_size=24, linear_conv_kernel_dim=4, linear_key_head_dim=8,
            linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4, **kw))
    return _randomize(m).eval()


def _rewrite(folder, fn_tensors, fn_config):
    """Rewrites an HF folder's single safetensors file and config.json in place."""
    from safetensors.torch import load_file, save_file
    path = os.path.join(folder, "model.safetensors")
    save_file(fn_tensors(load_file(path)), path, metadata={"format": "pt"})
    cpath = os.path.join(folder, "config.json")
    d = json.load(open(cpath))
    json.dump(fn_config(d), open(cpath, "w"))


def _add_mtp(folder, dtype):
    """Qwen3-Next with one MTP layer, added by hand (transformers neither makes nor loads mtp.* tensors)."""
    import qwen3_next
    d = json.load(open(os.path.join(folder, "config.json")))
    cfg = qwen3_next.Config.from_hf({**d, "num_nextn_predict_layers": 1})
    g = torch.Generator().manual_seed(1)
    mtp = {n: (0.1 * torch.randn(s, generator=g)).to(dtype)
           for e in qwen3_next.hf_entries(cfg, None) for n, s in zip(e[2], e[3]) if n.startswith("mtp.")}
    assert "mtp.fc.weight" in mtp and any(".experts.3." in n for n in mtp)
    _rewrite(folder, lambda t: {**t, **mtp}, lambda c: {**c, "num_nextn_predict_layers": 1})


def _fuse(src, folder):
    """The qwen3_moe checkpoint as transformers 5 holds it: experts fused into gate_up_proj [E, 2I, H] (gate rows
    first) and down_proj [E, H, I], config with num_local_experts."""
    import shutil
    shutil.copytree(src, folder)

    def fuse(t):
        out = {k: v for k, v in t.items() if ".mlp.experts." not in k}
        layers = sorted({int(k.split(".")[2]) for k in t if ".mlp.experts." in k})
        for i in layers:
            e = f"model.layers.{i}.mlp.experts."
            n = len({k for k in t if k.startswith(e) and k.endswith(".down_proj.weight")})
            gate = torch.stack([t[f"{e}{x}.gate_proj.weight"] for x in range(n)])
            up = torch.stack([t[f"{e}{x}.up_proj.weight"] for x in range(n)])
            out[e + "gate_up_proj"] = torch.cat([gate, up], 1).contiguous()
            out[e + "down_proj"] = torch.stack([t[f"{e}{x}.down_proj.weight"] for x in range(n)]).contiguous()
        return out

    def cfg(d):
        d["num_local_experts"] = d.pop("num_experts", None) or d["num_local_experts"]
        return d
    _rewrite(folder, fuse, cfg)
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """(arch, dtype) -> (HF folder to convert, HF folder the export must equal); made on first use."""
    made = {}

    def get(arch, dtype):
        if (arch, dtype) not in made:
            if arch == "qwen3_moe_fused":
                ref = get("qwen3_moe", dtype)[0]
                made[arch, dtype] = (_fuse(ref, str(tmp_path_factory.mktemp(f"fused_{dtype}") / "hf")), ref)
            else:
                folder = str(tmp_path_factory.mktemp(f"{arch}_{dtype}"))
                _hf_model(arch).to(getattr(torch, dtype)).save_pretrained(folder)
                if arch == "qwen3_next":
                    _add_mtp(folder, getattr(torch, dtype))
                with open(os.path.join(folder, "tokenizer.json"), "w") as f:  # stands in for a real tokenizer
                    json.dump({"version": "1.0", "model": {"type": "BPE"}}, f)
                made[arch, dtype] = (folder, folder)
        return made[arch, dtype]
    return get


def assert_same_tensors(a, b):
    """Every tensor of HF folder b equals a's: same names, dtypes, shapes and bytes."""
    ca, cb = convert.Checkpoint(a), convert.Checkpoint(b)
    assert ca.keys() == cb.keys()
    for k in ca.keys():
        assert ca.meta[k] == cb.meta[k], k
        assert ca.get(k).tobytes() == cb.get(k).tobytes(), k


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("fmt", ["orbax", "dcp"])
@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_bit_identical(sources, tmp_path, arch, fmt, dtype):
    src, ref = sources(arch, dtype)
    for layout in ("scanned", "unscanned"):
        mid, back = tmp_path / f"{fmt}_{layout}", tmp_path / f"back_{layout}"
        convert.hf_to_ckpt(src, str(mid), fmt, layout=layout)
        meta = json.load(open(mid / "nanoqwen.json"))
        assert (meta["format"], meta["layout"], meta["dtype"]) == (fmt, layout, dtype)
        assert (mid / "tokenizer.json").exists() and (mid / "generation_config.json").exists()
        convert.ckpt_to_hf(str(mid), str(back), fmt)
        assert_same_tensors(ref, str(back))
        for name in ("tokenizer.json", "generation_config.json"):
            assert (back / name).read_bytes() == open(os.path.join(src, name), "rb").read()
        d = json.load(open(back / "config.json"))
        assert d["model_type"] == arch.replace("_fused", "")


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "qwen3_moe_fused"])
def test_export_loads_in_transformers(sources, tmp_path, arch):
    """The round-tripped config.json + safetensors load in transformers to the same logits, exactly."""
    from transformers import AutoModelForCausalLM
    src, _ = sources(arch, "float32")
    convert.hf_to_ckpt(src, str(tmp_path / "ck"), "orbax")
    convert.ckpt_to_hf(str(tmp_path / "ck"), str(tmp_path / "hf"), "orbax")
    tokens = np.random.RandomState(0).randint(0, 128, (2, 17))
    a = hf_logits(_owned(AutoModelForCausalLM.from_pretrained(src)), tokens)
    b = hf_logits(_owned(AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))), tokens)
    assert torch.equal(a, b)


def _owned(model):
    """transformers 5 computes on the safetensors mmap itself, where each tensor's alignment depends on the file's
    layout, and the CPU matmul's last bits depend on that alignment; fresh copies compare the weights alone."""
    with torch.no_grad():
        for p in list(model.parameters()) + list(model.buffers()):
            p.data = p.data.clone()
    return model.eval()


def test_sharded_export_and_cast(sources, tmp_path):
    """--max-shard-size splits the safetensors with an index that transformers reads; --dtype casts."""
    from transformers import AutoModelForCausalLM
    src, _ = sources("qwen2", "float32")
    convert.hf_to_ckpt(src, str(tmp_path / "ck"), "dcp", dtype="bfloat16")
    assert json.load(open(tmp_path / "ck" / "nanoqwen.json"))["dtype"] == "bfloat16"
    convert.ckpt_to_hf(str(tmp_path / "ck"), str(tmp_path / "hf"), "dcp", dtype="float32", max_shard_size="20KB")
    files = sorted(f for f in os.listdir(tmp_path / "hf") if f.endswith(".safetensors"))
    index = json.load(open(tmp_path / "hf" / "model.safetensors.index.json"))
    assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files
    for f in files:  # each shard holds at most 20 kB unless one tensor is bigger
        sizes = [np.prod(s) * 4 for _, s in convert.read_header(str(tmp_path / "hf" / f)).values()]
        assert sum(sizes) <= 20_000 or len(sizes) == 1
    ref = convert.Checkpoint(src)
    got = convert.Checkpoint(str(tmp_path / "hf"))
    for k in ref.keys():  # float32 -> bfloat16 -> float32 is bfloat16 rounding
        want = ref.get(k).astype(convert.np_dtype("bfloat16")).astype(np.float32)
        assert got.get(k).dtype == np.float32 and got.get(k).tobytes() == want.tobytes(), k
    m = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert m.model.embed_tokens.weight.dtype == torch.float32


@pytest.mark.parametrize("fmt", ["orbax", "dcp"])
@pytest.mark.parametrize("layout", ["scanned", "unscanned"])
def test_read_params_across_backends(sources, tmp_path, fmt, layout):
    """read_params / load_checkpoint give load_hf's params on both backends, stacked whatever the layout; extra
    entries beside params/ (train's optimizer state) are ignored; write_params from jax and torch trees."""
    src, _ = sources("qwen3_moe" if "qwen3_moe" in ARCHS else "qwen3", "bfloat16")
    ck = tmp_path / "ck"
    convert.hf_to_ckpt(src, str(ck), fmt, layout=layout)
    (ck / "opt_state").mkdir()
    (ck / "opt_state" / "junk.bin").write_bytes(b"\0" * 10)
    (ck / "train_state.json").write_text("{}")
    _, _, ref = convert.load_numpy(src)
    for backend in ("jax", "torch"):
        model, cfg, params = convert.load_checkpoint(str(ck), backend)
        flat = convert._flatten(params)
        assert flat.keys() == ref.keys()
        for k, v in flat.items():
            assert convert._np(v).tobytes() == ref[k].tobytes() and convert._np(v).dtype == ref[k].dtype, k
        out = tmp_path / f"w_{backend}"
        convert.write_params(str(out), model, cfg, params, fmt, layout)
        _, _, again = convert.read_params(str(out), "torch", dtype="float32")
        for k, v in convert._flatten(again).items():
            assert v.dtype == torch.float32
            assert np.array_equal(v.numpy(), ref[k].astype(np.float32)), k


def test_orbax_params_restore_with_plain_orbax(sources, tmp_path):
    """params/ is an ordinary Orbax PyTree checkpoint."""
    import orbax.checkpoint as ocp
    src, _ = sources("qwen3", "bfloat16")
    convert.hf_to_ckpt(src, str(tmp_path / "ck"), "orbax")
    tree = ocp.PyTreeCheckpointer().restore(str(tmp_path / "ck" / "params"))
    _, _, ref = convert.load_numpy(src)
    for k, v in convert._flatten(tree).items():
        assert v.dtype == ref[k].dtype and v.tobytes() == ref[k].tobytes(), k


def test_atomic_dir(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with convert.atomic_dir(str(out)) as tmp:
            open(os.path.join(tmp, "x"), "w").write("half")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with convert.atomic_dir(str(out)) as tmp:
        open(os.path.join(tmp, "x"), "w").write("1")
    assert (out / "x").read_text() == "1"
    with pytest.raises(convert.UserError, match="not empty"):
        with convert.atomic_dir(str(out)):
            pass
    with convert.atomic_dir(str(out), overwrite=True) as tmp:
        open(os.path.join(tmp, "y"), "w").write("2")
        assert (out / "x").exists()  # replaced only at the end
    assert os.listdir(out) == ["y"] and sorted(os.listdir(tmp_path)) == ["out"]
    (tmp_path / "empty").mkdir()
    with convert.atomic_dir(str(tmp_path / "empty")) as tmp:  # an empty folder is fine
        open(os.path.join(tmp, "z"), "w").write("3")
    assert os.listdir(tmp_path / "empty") == ["z"]


def test_safetensors_writer_header(tmp_path):
    """Our incremental writer's files read back with the safetensors library; header padded to 8 bytes."""
    from safetensors.numpy import load_file
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(5, dtype=np.int64)
    w = convert.SafetensorsWriter(str(tmp_path), [("a", a.shape, a.dtype), ("b", b.shape, b.dtype)])
    w.write("a", a)
    w.write("b", b)
    w.close()
    raw = (tmp_path / "model.safetensors").read_bytes()
    assert int.from_bytes(raw[:8], "little") % 8 == 0
    got = load_file(str(tmp_path / "model.safetensors"))
    assert np.array_equal(got["a"], a) and np.array_equal(got["b"], b)
