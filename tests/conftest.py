"""Shared test helpers: tiny random transformers checkpoints, KL, backend conversion."""
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def to_np(x):
    """jax or torch array -> float64 numpy."""
    if type(x).__module__.startswith("torch"):
        return x.detach().float().cpu().numpy().astype(np.float64)
    return np.asarray(x, dtype=np.float64)


def as_backend(a, backend):
    """A numpy array (e.g. token ids) as a jax or torch array."""
    if backend == "torch":
        import torch
        return torch.as_tensor(np.asarray(a))
    import jax.numpy as jnp
    return jnp.asarray(a)


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def max_kl(ref_logits, logits):
    """max over tokens of KL(ref || ours), in float64."""
    lp, lq = log_softmax(to_np(ref_logits)), log_softmax(to_np(logits))
    return float((np.exp(lp) * (lp - lq)).sum(-1).max())


def save_hf(model, folder, **kw):
    """save_pretrained without the progress bar noise."""
    model.save_pretrained(folder, **kw)
    return str(folder)


def hf_logits(model, tokens, **kw):
    import torch
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens)), **kw).logits


@pytest.fixture(params=["jax", "torch"])
def backend(request):
    return request.param
