"""Generation speed: ours (JAX and torch) next to transformers' `generate` (eager, its DynamicCache), same model, same
machine, same run, and next to the machine's own limits measured in this run.

    python bench_generate.py              # ~100M-parameter Qwen3 (vocab 151,936, random weights), a few minutes
    python bench_generate.py --quick      # fewer repeats

Every figure is wall time of the public call, the same way for everyone: prefill = generate(max_new_tokens=1);
decode = (generate(1 + N) - generate(1)) / N per step, best of the repeats (taken round the runners), after a warm-up
(compiles excluded).
Rooflines: decode tokens/s <= read bandwidth / bytes read per step (every weight, tied unembedding included, plus
the KV cache) x batch; prefill tokens/s <= matmul FLOP/s (of the dtype) / (2 x non-embedding params + attention)
FLOPs per token, the unembedding counted for the last token only (both sides skip the others).
"""
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import click  # noqa: E402
import numpy as np  # noqa: E402

BENCH_CFG = dict(vocab_size=151936, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=64, tie_word_embeddings=True)


def best(fn, repeats):
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def machine_limits(repeats=5):
    """Read bandwidth (bytes/s, a reduction over 1 GiB) and matmul FLOP/s (2048^3 in fp32 and bf16), with torch."""
    import torch
    x = torch.ones(256 * 2**20, dtype=torch.float32)
    x.sum()
    bw = x.numel() * 4 / best(lambda: x.sum(), repeats)
    del x
    flops = {}
    for dt, n in ((torch.float32, 2048), (torch.bfloat16, 512)):  # bf16 GEMM can be a slow fallback on CPUs
        a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
        a @ b
        flops[str(dt).replace("torch.", "")] = 2 * n**3 / best(lambda: a @ b, 3)
    return bw, flops


def build_model(folder):
    import torch
    import transformers as tf
    torch.manual_seed(0)
    model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**BENCH_CFG)).eval()
    model.save_pretrained(folder)
    return model


def hf_runner(model, dtype):
    import torch
    m = model.to(getattr(torch, dtype))

    def run(prompts, n):
        ids = torch.as_tensor(np.array(prompts), dtype=torch.long)
        with torch.no_grad():
            m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0)
    return run


def our_runner(folder, backend, dtype):
    """backend: jax, torch, or torch+compile (generate(compile=True): the torch.compile'd decode step; its compile
    happens in measure()'s warm-up, as JAX's jit does)."""
    import convert
    import generate
    model, cfg, params = convert.load_hf(folder, backend=backend.split("+")[0], dtype=dtype)
    compile = backend.endswith("+compile")
    if generate.relays(backend.split("+")[0], dtype, compile):  # as generate.py does: only the relaid copy is kept
        params = generate.decode_layout(model, cfg, params)

    def run(prompts, n):
        generate.generate(model, cfg, params, prompts, max_new_tokens=n, eos_ids=[], compile=compile)
    return run


def measure(runs, batch, prompt_len, new, repeats):
    """{who: (prefill tokens/s, decode tokens/s)} for `batch` prompts of `prompt_len` tokens. The repeats go round
    the runners (one timing of each, then the next round), so a machine whose speed drifts during the run (these
    VMs do, by 1.5x within minutes) slows every runner alike instead of whichever ran then."""
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, 151643, (batch, prompt_len)).tolist()
    for run in runs.values():
        run(prompts, 1)
        run(prompts, 1 + new)  # warm-up: compiles, allocator
    t1 = {who: [] for who in runs}
    tn = {who: [] for who in runs}
    for _ in range(repeats):
        for who, run in runs.items():
            t1[who].append(best(lambda: run(prompts, 1), 1))
            if new:
                tn[who].append(best(lambda: run(prompts, 1 + new), 1))
    out = {}
    for who in runs:
        a, b = min(t1[who]), (min(tn[who]) if new else None)
        out[who] = (batch * prompt_len / a, batch * new / (b - a) if new else None)
    return out


@click.command()
@click.option("--quick", is_flag=True, help="Fewer repeats and shorter prefill.")
@click.option("--backends", default="jax,torch,torch+compile", show_default=True)
@click.option("--bf16-prefill", is_flag=True, help="Also time a (short) bf16 prefill.")
def main(quick, backends, bf16_prefill):
    import torch
    import qwen3
    cfg = qwen3.Config(**BENCH_CFG)
    n_params = qwen3.count_params(cfg)
    E, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    repeats = 2 if quick else 5
    load = os.getloadavg()[0]
    bw, peak = machine_limits()
    print(f"machine: {os.cpu_count()} CPUs, load average {load:.2f} at start; torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads; read bandwidth {bw / 1e9:.1f} GB/s; matmul "
          f"{peak['float32'] / 1e9:.0f} GFLOP/s fp32, {peak['bfloat16'] / 1e9:.1f} GFLOP/s bf16", flush=True)
    print(f"model: Qwen3 {n_params / 1e6:.1f}M parameters (hidden {E}, {L} layers, vocab {V}, tied), random weights",
          flush=True)
    # bf16 rows are kept short: CPUs without native bf16 run bf16 GEMMs far below their fp32 speed (see the
    # matmul line); prefill in bf16 is measured only with --bf16-prefill for that reason.
    T = 128 if quick else 256
    cases = [("decode", "bfloat16", 1, 16, 32), ("decode", "float32", 1, 16, 32), ("decode", "float32", 8, 16, 32),
             ("prefill", "float32", 1, T, 0)] + ([("prefill", "bfloat16", 1, 64, 0)] if bf16_prefill else [])
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        hf_model = build_model(folder)
        runners = {}
        for kind, dtype, B, T, new in cases:
            if ("hf", dtype) not in runners:
                runners = {k: v for k, v in runners.items() if k[-1] != dtype}  # free the other dtype's copies
                runners[("hf", dtype)] = hf_runner(hf_model, dtype)
                for be in backends.split(","):
                    runners[(be, dtype)] = our_runner(folder, be, dtype)
            kv_bytes = 2 * L * B * (T + new) * cfg.num_key_value_heads * cfg.head_dim * (2 if dtype == "bfloat16" else 4)
            nbytes = n_params * (2 if dtype == "bfloat16" else 4) + kv_bytes
            attn = 2 * 2 * L * cfg.num_attention_heads * cfg.head_dim * T / 2  # causal: average context T/2
            flops_tok = 2 * (n_params - V * E) + attn + 2 * E * V / T
            got = measure({who: runners[(who, dtype)] for who in ["hf"] + backends.split(",")}, B, T, new, repeats)
            res = {who: (dec if kind == "decode" else pre) for who, (pre, dec) in got.items()}
            roof = bw / nbytes * B if kind == "decode" else peak[dtype] / flops_tok
            for who in ["hf"] + backends.split(","):
                rows.append((f"{kind} B={B} T={T}{f' +{new}' if new else ''}", dtype, who, res[who],
                             res[who] / res["hf"], res[who] / roof))
            for r in rows[-len(res):]:
                print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.2f}x | {r[5]:.1%} |", flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}\n")
    print("| case | dtype | who | tokens/s | vs transformers | of roofline |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {'transformers' if r[2] == 'hf' else 'ours, ' + r[2]} | {r[3]:.1f} | "
              f"{r[4]:.2f}x | {r[5]:.1%} |")


if __name__ == "__main__":
    main()
