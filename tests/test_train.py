"""train.py: the README command, JAX == torch, loss and gradients == transformers for every architecture, exact
resume (also after a SIGKILL mid-save), packing, SFT masking, divergence handling, the FLOP count."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT

import convert
import train

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SMALL = dict(size="debug", batch_size=2, seq_len=32, quiet=True)


def tiny_hf(arch, seed=0):
    """A tiny random transformers model of each architecture, every weight random (HF zero-inits some norms and
    routers, which would leave their gradients untested)."""
    from transformers import (Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig,
                              Qwen3MoeForCausalLM, Qwen3NextConfig, Qwen3NextForCausalLM)
    base = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    torch.manual_seed(seed)
    if arch == "qwen2":
        m = Qwen2ForCausalLM(Qwen2Config(**{**base, "tie_word_embeddings": True}))
    elif arch == "qwen3":
        m = Qwen3ForCausalLM(Qwen3Config(**base))
    elif arch == "qwen3_moe":
        m = Qwen3MoeForCausalLM(Qwen3MoeConfig(**base, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                               norm_topk_prob=True, router_aux_loss_coef=0.01))
    else:
        m = Qwen3NextForCausalLM(Qwen3NextConfig(
            **{**base, "num_hidden_layers": 4}, linear_num_key_heads=2, linear_num_value_heads=4,
            linear_key_head_dim=8, linear_value_head_dim=8, num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=16, shared_expert_intermediate_size=24, router_aux_loss_coef=0.01,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "A_log" in n:
                p.copy_(torch.log(1 + 15 * torch.rand(p.shape, generator=g)))
            elif p.ndim == 1:
                centred = arch == "qwen3_next" and "linear_attn.norm" not in n
                p.copy_(0.1 * r + (0.0 if centred else 1.0))
            else:
                p.copy_((1.0 if "embed" in n else 0.1) * r)
    return m.float()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for arch in ("qwen2", "qwen3", "qwen3_moe", "qwen3_next"):
        out[arch] = str(root / arch)
        tiny_hf(arch).save_pretrained(out[arch])
    return out


def batch_of(tokens):
    """One micro-batch of unpacked rows: labels are the next tokens, the last position has none."""
    B, T = tokens.shape
    labels = np.full_like(tokens, train.IGNORE)
    labels[:, :-1] = tokens[:, 1:]
    return {"tokens": tokens, "labels": labels, "segment_ids": np.ones_like(tokens),
            "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()}


# ----------------------------------------------------------------------------------------------- the README command
def test_readme_command_runs_fast_and_learns(tmp_path):
    metrics = tmp_path / "m.jsonl"
    t = time.time()
    r = subprocess.run([sys.executable, "train.py", "--model", "qwen3", "--size", "debug", "--backend", "jax",
                        "--steps", "30", "--metrics", str(metrics)], cwd=ROOT, capture_output=True, text=True)
    took = time.time() - t
    assert r.returncode == 0, r.stderr[-2000:]
    recs = [json.loads(x) for x in open(metrics)]
    assert [x["step"] for x in recs] == list(range(1, 31))
    assert {"loss", "ce", "grad_norm", "lr", "tokens_per_s", "mfu"} <= set(recs[0])
    first, last = np.mean([x["loss"] for x in recs[:3]]), np.mean([x["loss"] for x in recs[-3:]])
    assert last < first - 0.8, (first, last)
    assert "done: 30 steps" in r.stdout and "MFU" in r.stdout
    assert took < 120, f"the README command took {took:.0f} s"


# ----------------------------------------------------------------------------------------------- parity
def test_jax_and_torch_agree_for_five_steps(hf_dirs):
    """Same initial params (one HF checkpoint) and data, float32, with gradient accumulation."""
    losses = {}
    for b in ("jax", "torch"):
        a = train.Args(init_from=hf_dirs["qwen3"], backend=b, steps=5, batch_size=2, global_batch_size=4,
                       seq_len=32, lr=3e-3, warmup=2, quiet=True)
        losses[b] = np.array(train.run(a)["losses"])
    np.testing.assert_allclose(losses["torch"], losses["jax"], rtol=1e-4)
    assert losses["jax"][-1] < losses["jax"][0]


GRAD_CASES = [(arch, b) for arch in ("qwen2", "qwen3", "qwen3_moe", "qwen3_next") for b in ("jax", "torch")
              if (arch, b) != ("qwen3_next", "jax")] + [pytest.param("qwen3_next", "jax", marks=pytest.mark.slow)]


@pytest.mark.parametrize("arch,backend", GRAD_CASES)
def test_loss_and_grads_match_transformers(hf_dirs, tmp_path, arch, backend):
    """train.py's loss (CE + router_aux_loss_coef * aux for MoE) and its gradients == transformers' `labels=` loss
    and autograd gradients, float32. HF's gradients are saved as a checkpoint and read back by convert.load_numpy,
    which puts them in our layout whatever HF's in-memory layout (fused experts)."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs[arch], dtype=torch.float32)
    tokens = np.random.default_rng(0).integers(0, 128, (2, 24)).astype(np.int32)
    ids = torch.as_tensor(tokens).long()
    kw = {"output_router_logits": True} if arch in ("qwen3_moe", "qwen3_next") else {}
    ref = hf(ids, labels=ids, **kw).loss
    ref.backward()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.grad)
    hf.save_pretrained(tmp_path / "grads")
    _, _, want = convert.load_numpy(str(tmp_path / "grads"))

    model, cfg, params = convert.load_hf(hf_dirs[arch], backend=backend, dtype="float32")
    a = train.Args(backend=backend, steps=1, quiet=True)
    trainer = train.TRAINERS[backend](model, cfg, params, a, {})
    loss, metrics, grads = trainer.loss_and_grads(batch_of(tokens))
    if kw:
        assert metrics["router_aux_loss"] > 0
    assert abs(loss - ref.item()) < 1e-5 * abs(ref.item()), (loss, ref.item())
    assert grads.keys() == want.keys()
    for name in grads:
        scale = np.abs(want[name]).max() + 1e-12
        err = np.abs(grads[name] - want[name]).max()
        assert err <= 2e-4 * scale + 1e-7, (name, err, scale)


# ----------------------------------------------------------------------------------------------- resume
class Stop(Exception):
    pass


def _params_np(trainer):
    return {k: (v.detach().numpy() if hasattr(v, "detach") else np.asarray(v)).copy()
            for k, v in train._flatten(trainer.params).items()}


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_resume_is_bit_exact(tmp_path, backend):
    kw = dict(model="qwen3", backend=backend, steps=20, lr=3e-3, **SMALL)
    straight = train.run(train.Args(**kw))

    def preempt(step, trainer, loader):
        if step == 10:
            raise Stop

    ck = dict(ckpt_dir=str(tmp_path / "ck"), save_every=5, keep=2)
    with pytest.raises(Stop):
        train.run(train.Args(**kw, **ck), on_step=preempt)
    assert [s for s, _ in train.checkpoints(ck["ckpt_dir"])] == [5, 10]
    resumed = train.run(train.Args(**kw, **ck, resume=True))
    assert len(resumed["losses"]) == 10
    assert resumed["losses"] == straight["losses"][10:]
    a, b = _params_np(straight["trainer"]), _params_np(resumed["trainer"])
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert [s for s, _ in train.checkpoints(ck["ckpt_dir"])] == [15, 20]  # --keep 2


KILL = """
import os, signal, sys
sys.path.insert(0, {root!r})
import convert, train
orig, calls = convert.write_params, []
def write_then_die(*a, **kw):
    orig(*a, **kw)
    calls.append(1)
    if len(calls) == 2:  # the second save: params written, optimizer state and train_state.json not yet
        os.kill(os.getpid(), signal.SIGKILL)
convert.write_params = write_then_die
train.main(sys.argv[1:])
"""


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    ck, m1, m2 = str(tmp_path / "ck"), str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    args = ["--model", "qwen3", "--size", "debug", "--backend", "torch", "--steps", "8", "--batch-size", "2",
            "--seq-len", "32", "--ckpt-dir", ck, "--save-every", "4"]
    r = subprocess.run([sys.executable, "-c", KILL.format(root=ROOT)] + args + ["--metrics", m1], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == -9, r.stderr[-2000:]
    assert [s for s, _ in train.checkpoints(ck)] == [4]
    assert any(n.startswith(".step_00000008.tmp-") for n in os.listdir(ck))  # the half-written one
    model, cfg, params = convert.read_params(os.path.join(ck, "step_00000004"), "torch")
    assert model.MODEL_TYPE == "qwen3"
    r = subprocess.run([sys.executable, "train.py"] + args + ["--resume", "--metrics", m2], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout and "(step 4)" in r.stdout
    assert [s for s, _ in train.checkpoints(ck)] == [4, 8]
    assert not any(".tmp-" in n for n in os.listdir(ck))
    killed = [json.loads(x) for x in open(m1)]
    resumed = [json.loads(x) for x in open(m2)]
    assert [x["step"] for x in resumed] == [5, 6, 7, 8]
    assert [x["loss"] for x in resumed[:4]] == [x["loss"] for x in killed[4:8]]  # same as the uninterrupted steps


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    ck = str(tmp_path / "ck")
    r = subprocess.run([sys.executable, "train.py", "--model", "qwen3", "--size", "debug", "--backend", "torch",
                        "--steps", "6", "--batch-size", "2", "--seq-len", "16", "--lr", "1e30", "--warmup", "0",
                        "--ckpt-dir", ck, "--save-every", "1"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: loss is nan") or last.startswith("error: loss is inf"), r.stderr[-1000:]
    assert "Traceback" not in r.stderr
    done = train.checkpoints(ck)
    assert done, "no checkpoint before the divergence"
    convert.read_params(done[-1][1], "torch")


# ----------------------------------------------------------------------------------------------- data
@pytest.mark.parametrize("arch,backend", [("qwen3", "jax"), ("qwen3", "torch"), ("qwen3_next", "torch")])
def test_packed_documents_get_their_own_loss(arch, backend):
    import importlib
    model = importlib.import_module(arch)
    cfg = model.SIZES["debug"]
    params = model.init(cfg, backend=backend, seed=0)
    rng = np.random.default_rng(0)
    d1, d2 = rng.integers(0, cfg.vocab_size, 13), rng.integers(0, cfg.vocab_size, 9)
    ones = lambda d: np.ones(len(d), bool)  # noqa: E731
    T = 24

    def losses(docs):
        rows = train.pack(docs, T)
        assert len(rows["tokens"]) == 1
        arr = {k: _as(v, backend) for k, v in rows.items()}
        h, _, _ = model.forward_hidden(params, arr["tokens"], cfg, positions=arr["positions"],
                                       segment_ids=arr["segment_ids"])
        per = train.token_losses(h.reshape(T, -1), model.lm_head(params, cfg), arr["labels"].reshape(T))
        return np.asarray(per.detach() if backend == "torch" else per), rows

    both, rows = losses([(d1, ones(d1)), (d2, ones(d2))])
    assert rows["segment_ids"][0].tolist() == [1] * 13 + [2] * 9 + [0] * 2
    assert rows["positions"][0, 13] == 0 and rows["labels"][0, 12] == train.IGNORE
    alone1, _ = losses([(d1, ones(d1))])
    alone2, _ = losses([(d2, ones(d2))])
    np.testing.assert_allclose(both[:13], alone1[:13], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(both[13:22], alone2[:9], rtol=1e-5, atol=1e-6)


def _as(a, backend):
    if backend == "torch":
        return torch.as_tensor(a).long()
    import jax.numpy as jnp
    return jnp.asarray(a)


def word_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["[UNK]", "system", "user", "assistant", "be", "nice", "hi", "there", "what", "now", "yes", "sure",
             "ok", "fine", "the", "cat", "sat"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.save(str(path))
    return tok


def test_sft_loss_only_on_assistant_tokens(tmp_path):
    tok = word_tokenizer(tmp_path / "tokenizer.json")
    conv = {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi there"},
                         {"role": "assistant", "content": "yes sure"}, {"role": "user", "content": "what now"},
                         {"role": "assistant", "content": "ok fine"}]}
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(conv) for _ in range(6)) + "\n")
    docs = train.load_docs(str(data), str(tmp_path / "tokenizer.json"))
    ids, mask = docs[0]
    v = tok.token_to_id
    assert [i for i, m in zip(ids, mask) if m] == [v("yes"), v("sure"), v("<|im_end|>"), v("ok"), v("fine"),
                                                   v("<|im_end|>")]
    rows = train.pack(docs[:1], len(ids))
    targets = rows["labels"][0][rows["labels"][0] != train.IGNORE].tolist()
    assert targets == [v("yes"), v("sure"), v("<|im_end|>"), v("ok"), v("fine"), v("<|im_end|>")]
    # the whole pipeline: held-out split, eval loss, a run on both backends
    for b in ("jax", "torch"):
        r = train.run(train.Args(model="qwen3", size="debug", backend=b, steps=2, batch_size=2, seq_len=16,
                                 data=str(data), tokenizer=str(tmp_path / "tokenizer.json"), eval_every=1,
                                 eval_batches=1, quiet=True))
        assert np.isfinite(r["last"]["eval_loss"])


def test_text_and_token_files(tmp_path):
    word_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "a.txt").write_text("the cat sat\n\nthe cat\n\nsat sat sat the\n")
    docs = train.load_docs(str(tmp_path / "a.txt"), str(tmp_path / "tokenizer.json"))
    assert len(docs) == 3 and docs[1][0][-1] == 17  # <|endoftext|> closes every document
    np.save(tmp_path / "t.npy", np.array([5, 6, train.ENDOFTEXT, 7, 8, 9], np.uint32))
    docs = train.load_docs(str(tmp_path / "t.npy"), None)
    assert [list(d) for d, _ in docs] == [[5, 6, train.ENDOFTEXT], [7, 8, 9]]
    loader = train.Loader(str(tmp_path / "t.npy"), 4, 1, 1, 0, 151936)
    first = loader.next()
    again = train.Loader(str(tmp_path / "t.npy"), 4, 1, 1, 0, 151936)
    assert np.array_equal(again.next()["tokens"], first["tokens"])
    with pytest.raises(convert.UserError):
        train.load_docs(str(tmp_path / "a.txt"), None)


# ----------------------------------------------------------------------------------------------- FLOPs
def test_flops_per_token_hand_count():
    import qwen3
    import qwen3_moe
    S = 128
    # qwen3 debug: E=64, L=2, Hq=4, Hkv=2, hd=32, I=128, V=512 (forward, per token)
    qkv = 2 * 64 * (4 + 2 * 2) * 32
    out = 2 * 64 * 4 * 32
    attn = 4 * S * 4 * 32 / 2  # causal, halved
    mlp = 3 * 2 * 64 * 128
    head = 2 * 64 * 512
    assert train.flops_per_token(qwen3, qwen3.SIZES["debug"], S) == 3 * (2 * (qkv + out + attn + mlp) + head)
    # qwen3_moe debug: 16 experts, top 4, moe_mlp 32: router + 4 experts in place of the MLP
    c = qwen3_moe.SIZES["debug"]
    moe = 2 * 64 * 16 + 4 * 3 * 2 * 64 * 32
    assert train.flops_per_token(qwen3_moe, c, S) == 3 * (2 * (qkv + out + attn + moe) + head)


def test_bad_flags_are_one_line_errors(tmp_path):
    for extra in (["--size", "nope"], ["--data", str(tmp_path / "missing.jsonl")], ["--mesh", "fsdp=x"],
                  ["--global-batch-size", "3"]):
        r = subprocess.run([sys.executable, "train.py", "--model", "qwen3", "--backend", "torch", "--steps", "1",
                            "--batch-size", "2"] + extra, cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, (extra, r.stderr)


def test_mesh_run_equals_one_device():
    """--mesh lays params, optimizer state and batch out with shard.py (8 virtual CPU devices, conftest)."""
    pytest.importorskip("shard")
    import jax
    if len(jax.devices()) != 8:
        pytest.skip("needs the 8 virtual CPU devices of conftest")
    kw = dict(model="qwen3", size="debug", backend="jax", steps=3, batch_size=4, seq_len=32, quiet=True)
    one = train.run(train.Args(**kw))["losses"]
    r = train.run(train.Args(**kw, mesh="data=2,fsdp=2,tp=2"))
    assert len(r["trainer"].params["layers"]["wq"].sharding.device_set) == 8
    np.testing.assert_allclose(r["losses"], one, rtol=1e-5)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_bf16_and_remat_give_the_same_loss(backend):
    """bfloat16 activations over float32 master weights, and recomputation (block, full), change no math beyond
    bf16 rounding; gradients stay float32."""
    kw = dict(model="qwen3", backend=backend, steps=2, **SMALL)
    ref = train.run(train.Args(**kw))["losses"]
    full = train.run(train.Args(**kw, remat="full"))["losses"]
    np.testing.assert_allclose(full, ref, rtol=1e-5)
    r = train.run(train.Args(**kw, dtype="bfloat16", remat="block"))
    np.testing.assert_allclose(r["losses"], ref, rtol=2e-2)
    leaves = train._flatten(r["trainer"].params).values()
    assert all(str(v.dtype).endswith("float32") for v in leaves)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_torch_tied_table_gradient_in_place(remat, monkeypatch):
    """The torch trainer adds the tied table's lookup gradient into the head's [V, E] gradient in place: over two
    accumulated micro-batches with repeated tokens the table's .grad equals plain autograd's, and it is the CE's
    own gradient buffer of the first micro-batch (no second [V, E] buffer)."""
    import qwen3
    cfg = qwen3.Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    a = train.Args(model="qwen3", backend="torch", batch_size=2, global_batch_size=4, seq_len=16, remat=remat,
                   quiet=True)
    t = train.TorchTrainer(qwen3, cfg, None, a, {})
    rng = np.random.default_rng(0)
    mbs = [batch_of(rng.integers(0, 8, (2, 16)).astype(np.int32)) for _ in range(2)]  # 8 of 64 ids: repeats
    n = sum(int((mb["labels"] != train.IGNORE).sum()) for mb in mbs)
    want = {}
    for mb in mbs:  # each micro-batch's gradient against its own count, rescaled to the global count
        m = int((mb["labels"] != train.IGNORE).sum())
        for k, g in t.loss_and_grads(mb)[2].items():
            want[k] = want.get(k, 0) + g * m / n
    ce, ptrs = train._CETorch.get(), []
    backward = ce.backward

    def spy(ctx, g):
        out = backward(ctx, g)
        ptrs.append(out[1].data_ptr())
        return out
    monkeypatch.setattr(ce, "backward", staticmethod(spy))
    t.backward({k: np.stack([mb[k] for mb in mbs]) for k in mbs[0]})
    got = {k: v.grad.numpy() for k, v in t.flat.items()}
    assert set(got) == set(want) and t._direct is False and not t._flight
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7, err_msg=k)
    assert np.abs(got["embed"]).sum() > 0
    assert len(ptrs) == 2 and t.flat["embed"].grad.data_ptr() == ptrs[0]
