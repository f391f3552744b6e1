"""Training throughput, MFU and peak memory: ours (JAX and torch) next to transformers, same model, same run.

    python bench_train.py                 # Qwen3-shaped ~100M params, vocab 151,936, batch 4 x 256, CPU
    python bench_train.py --steps 8 --only hf-fp32,jax-fp32

Every configuration runs in its own subprocess, so its peak RSS (ru_maxrss) is its own. A step is a full update:
forward, backward and AdamW (transformers: `model(ids, labels=ids).loss`, `.backward()`, `torch.optim.AdamW`;
ours: train.py's step). The first `--warmup` steps (compilation) are not timed. MFU uses train.flops_per_token
(MaxText's count: causal attention halved, unembedding counted, lookup free) against the peak train.py reports
(spec sheet on known accelerators; on a CPU a measured float32 matmul rate)."""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)

SHAPE = dict(vocab_size=151936, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, head_dim=64, tie_word_embeddings=True)
CONFIGS = {  # name -> (who, backend, dtype, --remat)
    "hf-fp32": ("hf", "torch", "float32", "none"),
    "jax-fp32": ("ours", "jax", "float32", "none"),
    "torch-fp32": ("ours", "torch", "float32", "none"),
    "jax-fp32-remat": ("ours", "jax", "float32", "block"),
    "torch-fp32-remat": ("ours", "torch", "float32", "block"),
    "jax-bf16": ("ours", "jax", "bfloat16", "none"),
    "torch-bf16": ("ours", "torch", "bfloat16", "none"),
    "jax-bf16-remat": ("ours", "jax", "bfloat16", "block"),
    "torch-bf16-remat": ("ours", "torch", "bfloat16", "block"),
}


def cfg():
    import qwen3
    return qwen3.Config(**SHAPE)


def torch_bf16_rate():
    """GFLOP/s of a 512^3 bfloat16 matmul in torch; CPUs without AVX512-BF16/AMX fall to a scalar loop."""
    import torch
    a = torch.randn(512, 512).bfloat16()
    a @ a
    t = time.perf_counter()
    a @ a
    return 2 * 512 ** 3 / (time.perf_counter() - t) / 1e9


def one(name, batch, seq, steps, warmup):
    """Runs one configuration in this process; prints one JSON line."""
    who, backend, dtype, remat = CONFIGS[name]
    import numpy as np
    import qwen3
    import train
    c = cfg()
    tokens = batch * seq
    rng = np.random.default_rng(0)
    times = []
    if who == "hf":
        import torch
        from transformers import Qwen3Config, Qwen3ForCausalLM
        torch.manual_seed(0)
        m = Qwen3ForCausalLM(Qwen3Config(**SHAPE, rope_theta=1e6)).float().train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.1)
        for i in range(warmup + steps):
            ids = torch.as_tensor(rng.integers(0, c.vocab_size, (batch, seq)))
            t = time.perf_counter()
            loss = m(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            float(loss)
            times.append(time.perf_counter() - t)
    else:
        a = train.Args(model="qwen3", backend=backend, dtype=dtype, steps=warmup + steps, batch_size=batch,
                       seq_len=seq, lr=1e-4, quiet=True, kernels="auto", remat=remat)
        r = train.run(a, cfg=c, on_step=lambda *x: None, step_times=times)
        assert len(r["losses"]) == warmup + steps
    timed = times[warmup:]
    tps = tokens * len(timed) / sum(timed)
    peak, _ = train.peak_flops(backend, "float32")
    print(json.dumps({"name": name, "tokens_per_s": tps, "mfu": train.flops_per_token(qwen3, c, seq) * tps / peak,
                      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "params_m": qwen3.count_params(c) / 1e6}))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--only", default=",".join(CONFIGS), help="comma list of: " + ", ".join(CONFIGS))
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        return one(a.one, a.batch, a.seq, a.steps, a.warmup)
    rows = []
    notes = []
    for name in a.only.split(","):
        t = time.time()
        if name == "torch-bf16":
            import torch
            rate = torch_bf16_rate()
            if not torch.cuda.is_available() and rate < 5:
                notes.append(f"torch-bf16 skipped: torch's bfloat16 matmul runs at {rate:.2f} GFLOP/s on this CPU "
                             "(no native bf16), a step would take tens of minutes")
                continue
        r = subprocess.run([sys.executable, __file__, "--one", name, "--batch", str(a.batch), "--seq", str(a.seq),
                            "--steps", str(a.steps), "--warmup", str(a.warmup)], capture_output=True, text=True)
        lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
        if r.returncode or not lines:
            print(f"{name}: failed\n{r.stderr[-1500:]}", file=sys.stderr)
            continue
        rows.append(json.loads(lines[-1]))
        print(f"{name}: {rows[-1]['tokens_per_s']:.0f} tok/s, {rows[-1]['peak_rss_gb']:.2f} GB ({time.time() - t:.0f} s)",
              file=sys.stderr, flush=True)
    base = next((r for r in rows if r["name"] == "hf-fp32"), None)
    print(f"\nQwen3-shaped {rows[0]['params_m']:.0f}M params (vocab 151,936, tied), batch {a.batch} x {a.seq}, "
          f"{a.steps} timed steps after {a.warmup}; MFU: MaxText count vs a measured fp32 matmul peak on CPU\n")
    print("| config | tokens/s | vs transformers fp32 | MFU | peak RSS GB | vs transformers |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        rel = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        mem = f"{r['peak_rss_gb'] / base['peak_rss_gb']:.2f}x" if base else "-"
        print(f"| {r['name']} | {r['tokens_per_s']:.0f} | {rel} | {100 * r['mfu']:.1f}% | {r['peak_rss_gb']:.2f} | {mem} |")
    for n in notes:
        print("\n" + n)


if __name__ == "__main__":
    main()
