"""--kernels auto == --kernels ref for training and generation, with the kernels in interpret mode on CPU
(NANOQWEN_INTERPRET=1 makes `auto` pick the Pallas / Triton kernels off their accelerators)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT


# cheap XLA compiles for the subprocesses (compilation, not execution, is most of their time on CPU)
FAST_XLA = {"XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"}


def _train(tmp_path, backend, kernels, model, extra_env):
    metrics = tmp_path / f"{backend}-{kernels}.jsonl"
    env = dict(os.environ, **FAST_XLA, **extra_env)
    r = subprocess.run([sys.executable, "train.py", "--model", model, "--size", "debug", "--backend", backend,
                        "--steps", "2", "--batch-size", "2", "--seq-len", "48", "--dtype", "float32", "--seed", "0",
                        "--kernels", kernels, "--metrics", str(metrics), "--quiet"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(x)["loss"] for x in open(metrics) if x.strip()]


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_train_auto_kernels_equal_reference(tmp_path, backend):
    """Qwen3-Next uses every kernel kind (Gated DeltaNet, attention, grouped matmul, cross-entropy)."""
    if backend == "torch":
        pytest.importorskip("triton")
    ref = _train(tmp_path, backend, "ref", "qwen3_next", {})
    auto = _train(tmp_path, backend, "auto", "qwen3_next", {"NANOQWEN_INTERPRET": "1"})
    assert len(ref) == len(auto) == 2
    np.testing.assert_allclose(auto, ref, rtol=1e-5)


def test_generate_auto_kernels_equal_reference():
    """JAX generation with the interpret-mode kernels gives the reference's tokens (run in a subprocess so the
    interpret switch does not leak into other tests)."""
    code = """
import os, sys
sys.path.insert(0, os.getcwd())
import generate, kernels_tpu, qwen3_next
cfg = qwen3_next.SIZES["debug"]
params = qwen3_next.init(cfg, backend="jax", seed=0)
prompts = [[5, 9, 13, 2, 7, 11], [3, 1, 4]]
ref = generate.generate(qwen3_next, cfg, params, prompts, max_new_tokens=6, temperature=0.0, eos_ids=[])
ks = kernels_tpu.select("auto")
assert "gated_delta_rule" in ks, sorted(ks)
auto = generate.generate(qwen3_next, cfg, params, prompts, max_new_tokens=6, temperature=0.0, eos_ids=[], kernels=ks)
print(ref, auto)
assert ref == auto
"""
    env = dict(os.environ, NANOQWEN_INTERPRET="1", **FAST_XLA)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]


def test_fused_rms_norm_is_used_by_every_model():
    """The Triton RMSNorm selected by --kernels replaces the layer norms of all four models (interpret mode) and
    gives the reference's logits; a kernel key the models ignored would be a dead switch."""
    pytest.importorskip("triton")
    code = """
import os, sys
sys.path.insert(0, os.getcwd())
import torch, kernels_gpu, qwen2, qwen3, qwen3_moe, qwen3_next
calls = []
fused = kernels_gpu.select("rms_norm")["rms_norm"]
def counting(*a, **kw):
    calls.append(1)
    return fused(*a, **kw)
for mod in (qwen2, qwen3, qwen3_moe, qwen3_next):
    cfg = mod.SIZES["debug"]
    p = mod.init(cfg, backend="torch", seed=0)
    toks = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    ref, _ = mod.forward(p, toks, cfg)
    n = len(calls)
    out, _ = mod.forward(p, toks, cfg, kernels={"rms_norm": counting})
    assert len(calls) - n == 2 * cfg.num_hidden_layers, (mod.__name__, len(calls) - n)
    d = (ref - out).abs().max().item()
    assert d < 1e-4, (mod.__name__, d)
"""
    env = dict(os.environ, NANOQWEN_INTERPRET="1", **FAST_XLA)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
