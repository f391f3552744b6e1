"""Checkpoints in and out, without transformers: Hugging Face safetensors <-> our param trees.

    model, cfg, params = convert.load_hf("path/or/hub-id", backend="jax", dtype="float32")

Every model file describes its weights in `hf_entries(cfg, keys)`; loading reads each HF tensor with `safe_open`,
checks its shape and turns it into our einsum-ready layout. Every expected tensor must be there and every
tensor in the checkpoint must be used (an lm_head equal to a tied embedding is fine).
"""
import importlib
import json
import os
import struct
import sys

import numpy as np

MODELS = {"qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3_moe", "qwen3_next": "qwen3_next"}


class UserError(Exception):
    """A user's mistake: reported as one line on stderr with a non-zero exit, never a traceback."""


def model_module(model_type, where=""):
    if model_type not in MODELS:
        raise UserError(f"{where}unknown model_type {model_type!r} (known: {', '.join(MODELS)})")
    return importlib.import_module(MODELS[model_type])


# ----------------------------------------------------------------------------------------------- reading HF folders
def resolve(src):
    """A local folder, or a hub id resolved with huggingface_hub (which honours HF_HUB_OFFLINE and its cache)."""
    if os.path.isdir(src):
        return src
    if os.path.exists(src):
        raise UserError(f"{src}: not a folder (expected a Hugging Face checkpoint folder)")
    if src.count("/") != 1 or src.startswith((".", "/")):
        raise UserError(f"{src}: no such folder")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(src, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"])
    except Exception as e:  # offline, unknown repo, no network
        raise UserError(f"{src}: not a local folder and not fetchable from the hub ({type(e).__name__})") from None


def read_config(folder):
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise UserError(f"{path}: missing (not a Hugging Face checkpoint folder)")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None


def safetensors_files(folder):
    """The checkpoint's safetensors files: those named by model.safetensors.index.json, else every *.safetensors."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise UserError(f"{folder}: no *.safetensors files")
    paths = [os.path.join(folder, f) for f in files]
    for p in paths:
        if not os.path.exists(p):
            raise UserError(f"{p}: missing (named in model.safetensors.index.json)")
    return paths


def read_header(path):
    """The safetensors header {name: (dtype, shape)}, validated against the file size (catches truncation)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise UserError(f"{path}: truncated or not a safetensors file")
        n = struct.unpack("<Q", raw)[0]
        if n > size - 8 or n > 1 << 30:
            raise UserError(f"{path}: corrupt safetensors header")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{path}: corrupt safetensors header") from None
    end = 0
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        end = max(end, v["data_offsets"][1])
        out[k] = (v["dtype"], tuple(v["shape"]))
    if 8 + n + end > size:
        raise UserError(f"{path}: truncated ({size} bytes, header promises {8 + n + end})")
    return out


class Checkpoint:
    """The tensors of an HF folder by name, read one at a time (safe_open, numpy, no torch needed)."""

    def __init__(self, folder):
        self.folder = folder
        self.where = {}
        self.meta = {}
        for p in safetensors_files(folder):
            for k, v in read_header(p).items():
                self.where[k] = p
                self.meta[k] = v

    def keys(self):
        return set(self.where)

    def get(self, name):
        from safetensors import safe_open
        try:
            with safe_open(self.where[name], framework="numpy") as f:
                return f.get_tensor(name)
        except Exception as e:
            if self.meta[name][0] == "BF16":
                return self._get_bf16(name)
            raise UserError(f"{self.where[name]}: cannot read {name} ({e})") from None

    def _get_bf16(self, name):
        """numpy has no bfloat16: read the raw bytes and view them as ml_dtypes.bfloat16."""
        import ml_dtypes
        path = self.where[name]
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
            a, b = header[name]["data_offsets"]
            f.seek(8 + n + a)
            data = f.read(b - a)
        return np.frombuffer(data, dtype=ml_dtypes.bfloat16).reshape(header[name]["shape"])


# ----------------------------------------------------------------------------------------------- load_hf
def np_dtype(name):
    if name in ("bfloat16", "bf16"):
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def load_numpy(src, dtype=None):
    """(model module, cfg, flat numpy params {name: array}) from an HF folder or hub id."""
    folder = resolve(src)
    d = read_config(folder)
    model = model_module(d.get("model_type"), f"{os.path.join(folder, 'config.json')}: ")
    ckpt = Checkpoint(folder)
    keys = ckpt.keys()
    try:
        cfg = model.Config.from_hf(d, keys=keys)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{os.path.join(folder, 'config.json')}: {type(e).__name__}: {e}") from None
    # tie_word_embeddings with both tensors present and different: transformers does not tie them
    if getattr(cfg, "tie_word_embeddings", False) and "lm_head.weight" in keys:
        if not np.array_equal(ckpt.get("lm_head.weight"), ckpt.get("model.embed_tokens.weight")):
            import dataclasses
            cfg = dataclasses.replace(cfg, tie_word_embeddings=False)
    table = model.param_table(cfg)
    entries = model.hf_entries(cfg, keys)
    want = {n for e in entries for n in e[2]}
    missing = sorted(want - keys)
    if missing:
        raise UserError(f"{folder}: {len(missing)} tensors missing, e.g. {missing[0]}")
    unused = sorted(keys - want - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()))
    unused = [k for k in unused if not _ignored(model, k)]
    if unused:
        raise UserError(f"{ckpt.where[unused[0]]}: {len(unused)} tensors not used by {model.MODEL_TYPE}, e.g. {unused[0]}")
    for _, _, names, shapes, _, _ in entries:
        for n, s in zip(names, shapes):
            if tuple(ckpt.meta[n][1]) != tuple(s):
                raise UserError(f"{ckpt.where[n]}: {n} has shape {list(ckpt.meta[n][1])}, expected {list(s)}")
    out_dtype = np_dtype(dtype) if dtype else None
    flat = {}
    for name, i, names, _, to_ours, _ in entries:
        arr = to_ours([ckpt.get(n) for n in names])
        p = table[name]
        if name not in flat:
            flat[name] = np.empty(p.shape, out_dtype or arr.dtype)
        if i is None:
            flat[name][...] = arr
        else:
            flat[name][i] = arr
    return model, cfg, flat


def _ignored(model, key):
    return any(key.startswith(p) for p in getattr(model, "HF_IGNORED_PREFIXES", ()))


def to_backend(flat, backend, unflatten):
    """numpy leaves -> jax or torch arrays (bfloat16 kept), nested by the model's unflatten."""
    if backend == "jax":
        import jax.numpy as jnp
        conv = jnp.asarray
    elif backend == "torch":
        import torch

        def conv(a):
            if a.dtype.name == "bfloat16":
                return torch.from_numpy(a.view(np.uint16).astype(np.int16)).view(torch.bfloat16)
            return torch.from_numpy(np.ascontiguousarray(a))
    else:
        raise UserError(f"unknown backend {backend!r} (jax or torch)")
    return unflatten({k: conv(v) for k, v in flat.items()})


def load_hf(src, backend="jax", dtype="float32"):
    """(model module, cfg, params) from a local HF folder or hub id; safetensors only, no transformers."""
    model, cfg, flat = load_numpy(src, dtype)
    return model, cfg, to_backend(flat, backend, model.unflatten)


# ----------------------------------------------------------------------------------------------- command line
def main_guard(fn):
    """Runs a command; a UserError (or a missing file) becomes one line on stderr and exit code 2."""
    def wrapped(*a, **kw):
        try:
            return fn(*a, **kw)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except FileNotFoundError as e:
            print(f"error: {e.filename}: no such file or folder", file=sys.stderr)
            sys.exit(2)
    wrapped.__name__, wrapped.__doc__ = fn.__name__, fn.__doc__
    return wrapped


# ----------------------------------------------------------------------------------------------- parity
PARITY_LENGTHS = (7, 64, 300)
GOLDEN_TOPK = 64


def parity_prompts(vocab, seed=0):
    """A few deterministic token prompts (ids below the special tokens), short to long (RoPE errors show late)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, min(vocab, 151643), n).tolist() for n in PARITY_LENGTHS]


def _log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def hf_reference(folder, prompts, dtype):
    """Reference log-probs from transformers (a test/reference dependency, never used for loading)."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise UserError("transformers (and torch) are not installed: pass --golden FILE.jsonl instead") from None
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    with torch.no_grad():
        return [_log_softmax(m(torch.tensor([p])).logits[0].float().numpy()) for p in prompts]


def golden_record(tokens, logp):
    """Top-k log-probs per position (full rows when the vocab is small): enough for top-1 and a KL bound."""
    if logp.shape[-1] <= 4096:
        return {"tokens": tokens, "full": logp.tolist()}
    idx = np.argsort(-logp, -1)[:, :GOLDEN_TOPK]
    return {"tokens": tokens, "ids": idx.tolist(), "logp": np.take_along_axis(logp, idx, -1).tolist()}


def kl_vs_record(rec, ours):
    """Per-token KL(ref || ours). With a top-k record the rest of the vocab is one bucket, which gives a lower
    bound of the full KL (exact when the mass outside the top-k agrees)."""
    if "full" in rec:
        p = np.asarray(rec["full"])
        return (np.exp(p) * (p - ours)).sum(-1), p.argmax(-1)
    ids, lp = np.asarray(rec["ids"]), np.asarray(rec["logp"])
    lq = np.take_along_axis(ours, ids, -1)
    p, q = np.exp(lp), np.exp(lq)
    pr, qr = np.clip(1 - p.sum(-1), 1e-300, 1), np.clip(1 - q.sum(-1), 1e-300, 1)
    return (p * (lp - lq)).sum(-1) + pr * (np.log(pr) - np.log(qr)), ids[:, 0]


def run_parity(src, backends, dtype, golden=None, write_golden=None, max_kl=None, out=print):
    folder = resolve(src)
    if write_golden:
        d = read_config(folder)
        prompts = parity_prompts(d["vocab_size"])
        recs = [golden_record(p, lp) for p, lp in zip(prompts, hf_reference(folder, prompts, dtype))]
        tmp = write_golden + ".tmp"
        with open(tmp, "w") as f:
            for r in recs:
                f.write(json.dumps({**r, "dtype": dtype}) + "\n")
        os.replace(tmp, write_golden)
        out(f"wrote {len(recs)} golden records to {write_golden}")
        return True
    if golden:
        try:
            with open(golden) as f:
                recs = [json.loads(line) for line in f if line.strip()]
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{golden}: cannot read golden logits ({type(e).__name__})") from None
        if not recs or not all("tokens" in r for r in recs):
            raise UserError(f"{golden}: not a golden-logits file (no 'tokens' records)")
    else:
        d = read_config(folder)
        prompts = parity_prompts(d["vocab_size"])
        recs = [{"tokens": p, "full": lp} for p, lp in zip(prompts, hf_reference(folder, prompts, dtype))]
    max_kl = max_kl if max_kl is not None else (1e-6 if dtype == "float32" else 2e-2)
    ok = True
    for be in backends:
        model, cfg, params = load_hf(folder, backend=be, dtype=dtype)
        kls, agree, n = [], 0, 0
        for r in recs:
            toks = np.asarray([r["tokens"]])
            if be == "jax":
                import jax.numpy as jnp
                logits, _ = model.forward(params, jnp.asarray(toks), cfg)
                logits = np.asarray(logits[0].astype(jnp.float32))
            else:
                import torch
                with torch.no_grad():
                    logits, _ = model.forward(params, torch.as_tensor(toks), cfg)
                logits = logits[0].float().numpy()
            ours = _log_softmax(logits)
            r = {**r, "full": np.asarray(r["full"])} if "full" in r else r
            kl, top1 = kl_vs_record(r, ours)
            kls.append(kl)
            agree += int((ours.argmax(-1) == top1).sum())
            n += len(top1)
        kl = np.concatenate(kls)
        good = bool(kl.max() <= max_kl)
        ok &= good
        out(f"{be:5s} {dtype}: max KL {kl.max():.3e}  mean KL {kl.mean():.3e}  top-1 agreement {agree}/{n}"
            f"  ({'ok' if good else 'FAIL'}, threshold {max_kl:g})")
    return ok


def _parity_cmd():
    import click

    @click.command("parity")
    @click.option("--hf", "src", required=True, help="HF checkpoint folder or hub id")
    @click.option("--backend", type=click.Choice(["jax", "torch", "both"]), default="both")
    @click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32")
    @click.option("--golden", type=click.Path(), help="compare against this golden-logits JSONL instead of transformers")
    @click.option("--write-golden", type=click.Path(), help="write a golden-logits JSONL from transformers and exit")
    @click.option("--max-kl", type=float, help="per-token KL threshold (default 1e-6 float32, 2e-2 bfloat16)")
    @main_guard
    def parity(src, backend, dtype, golden, write_golden, max_kl):
        """Per-token KL(transformers || ours) and top-1 agreement; exits 1 over the threshold."""
        backends = ["jax", "torch"] if backend == "both" else [backend]
        if not run_parity(src, backends, dtype, golden, write_golden, max_kl):
            sys.exit(1)
    return parity


parity = _parity_cmd()
