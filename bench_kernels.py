"""Kernel benchmark: each of our GPU kernels next to its peer, measured in the same run on the same GPU.

  python bench_kernels.py [--dtype bfloat16] [--quick]     # on a CUDA machine
  python bench_kernels.py --interpret                      # no GPU: tiny shapes through the Triton interpreter

Rows (TFLOP/s for matmul-bound kernels, GB/s for memory-bound ones, against the H100 SXM peak: 989 TFLOP/s dense
bf16, 3.35 TB/s HBM3; the ratio column is ours / peer):
  gated_delta_rule  ours (Triton) vs fla's chunk_gated_delta_rule when installed, forward and forward+backward.
                    FLOPs are the chunked algorithm's useful matmuls, the same count for both:
                    per token and value head 2*C*(3K + 2V) + 6*K*V forward, x3 for forward+backward.
  attention         SDPA with our dense packed-document mask (the `attention` entry), flex attention with a block
                    mask (attention_segments), next to plain causal SDPA (flash). FLOPs 4*T^2*Hq*D/2 forward
                    (causal halved, MaxText's convention), x3.5 for forward+backward.
  cross_entropy     fused linear + CE vs the unfused path (logits = h @ w, fp32 cross-entropy): time and peak
                    memory, forward+backward, 6*N*E*V FLOPs.
  rms_norm          Triton (fused residual add) vs torch eager and torch.compile, forward+backward, GB/s of the
                    bytes a fused kernel must move.
  moe_gmm           torch._grouped_mm vs the per-expert loop, forward, 2*M*K*N FLOPs.
Without a GPU the script says so and exits 0; --interpret runs the same code paths at tiny sizes on CPU, and those
timings are of numpy emulation, not performance.
"""
import argparse
import os
import sys
import time

PEAK_TFLOPS = 989.0  # H100 SXM dense bf16
PEAK_GBS = 3350.0    # H100 SXM HBM3


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--quick", action="store_true", help="smaller shapes")
    p.add_argument("--interpret", action="store_true", help="no GPU: tiny shapes in the Triton interpreter on CPU")
    p.add_argument("--only", default="", help="comma list of rows: gated_delta_rule,attention,cross_entropy,"
                                              "rms_norm,moe_gmm")
    return p.parse_args()


def main():
    a = parse()
    if a.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (kernels_gpu imports it)
    import torch
    if not torch.cuda.is_available() and not a.interpret:
        print("bench_kernels: no CUDA GPU here, nothing to benchmark (run with --interpret for a CPU check of the "
              "script with tiny shapes; those timings are not performance).")
        return 0
    import kernels_gpu as kg
    if kg.triton is None:
        print("bench_kernels: triton is not installed (pip install triton)", file=sys.stderr)
        return 1
    dev = "cpu" if a.interpret else "cuda"
    dtype = torch.float32 if a.interpret else getattr(torch, a.dtype)
    tiny = a.interpret
    if a.interpret:
        print("INTERPRETER TIMINGS ON CPU: numpy emulation of the kernels at tiny sizes; not performance.\n")
    else:
        print(f"device: {torch.cuda.get_device_name()}, dtype {a.dtype}, torch {torch.__version__}, "
              f"triton {kg.triton.__version__}; peaks: {PEAK_TFLOPS:.0f} TFLOP/s bf16, {PEAK_GBS / 1000:.2f} TB/s\n")
    rows = []
    only = {s.strip() for s in a.only.split(",") if s.strip()}
    benches = [("gated_delta_rule", bench_gdn), ("attention", bench_attention), ("cross_entropy", bench_ce),
               ("rms_norm", bench_rms), ("moe_gmm", bench_gmm)]
    for name, fn in benches:
        if only and name not in only:
            continue
        try:
            fn(rows, kg, torch, dev, dtype, tiny, a.quick)
        except Exception as e:  # one failing row must not hide the others
            rows.append((name, "error", f"{type(e).__name__}: {str(e).splitlines()[0][:90]}", "", "", ""))
    print("| kernel | impl | ms | TFLOP/s or GB/s | % of H100 peak | speed vs peer (>1: ours faster) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
    return 0


# ---------------------------------------------------------------------------------------------- timing
def timeit(fn, torch, dev, reps=None):
    """Median milliseconds of fn() (CUDA events on GPU, wall clock under the interpreter)."""
    if dev == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=10, rep=100, return_mode="median")
    fn()
    t = []
    for _ in range(reps or 2):
        s = time.perf_counter()
        fn()
        t.append((time.perf_counter() - s) * 1e3)
    return sorted(t)[len(t) // 2]


def peak_mem(fn, torch, dev):
    """Peak extra GPU memory of one call, GiB (n/a on CPU)."""
    if dev != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def tf(flops, ms):
    return flops / (ms * 1e-3) / 1e12


def row(rows, kernel, impl, ms, rate, unit, peer_ms=None):
    peak = PEAK_TFLOPS if unit == "TFLOP/s" else PEAK_GBS
    ratio = f"{peer_ms / ms:.2f}x" if peer_ms else ""  # peer time / our time: > 1 means ours is faster
    rows.append((kernel, impl, f"{ms:.3f}", f"{rate:.1f} {unit}", f"{100 * rate / peak:.1f}%", ratio))


# ---------------------------------------------------------------------------------------------- rows
def bench_gdn(rows, kg, torch, dev, dtype, tiny, quick):
    # Qwen3-Next linear attention: 16 q/k heads, 32 value heads, 128 x 128 state
    B, T, H, HV, K, V = (1, 64, 1, 2, 16, 16) if tiny else ((1, 2048, 16, 32, 128, 128) if quick else
                                                            (2, 4096, 16, 32, 128, 128))
    C = 16 if tiny else 64
    mk = lambda *s: torch.randn(*s, device=dev, dtype=dtype)  # noqa: E731
    q, k, v = mk(B, T, H, K), mk(B, T, H, K), mk(B, T, HV, V)
    g = -torch.rand(B, T, HV, device=dev).mul(0.3).to(dtype)
    beta = torch.rand(B, T, HV, device=dev).to(dtype)
    ins = [x.requires_grad_() for x in (q, k, v, g, beta)]
    flops = B * T * HV * (2 * C * (3 * K + 2 * V) + 6 * K * V)
    impls = [("ours (Triton)", lambda *x, **kw: kg.chunk_gated_delta_rule(*x, chunk_size=C, **kw))]
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_gdn
        impls.append(("fla", fla_gdn))
    except Exception as e:  # noqa: BLE001
        rows.append(("gated_delta_rule", "fla", f"not available ({type(e).__name__})", "", "", ""))
    res = {}
    for name, fn in impls:
        fwd = lambda: fn(*ins, use_qk_l2norm_in_kernel=True, output_final_state=True)  # noqa: E731

        def fwd_bwd():
            o, s = fwd()
            torch.autograd.grad(o.float().sum() + s.sum(), ins)

        with torch.no_grad():
            ms_f = timeit(fwd, torch, dev)
        ms_fb = timeit(fwd_bwd, torch, dev)
        res[name] = (ms_f, ms_fb)
    peer = res.get("fla")
    for name, (ms_f, ms_fb) in res.items():
        theirs = peer if (peer and name != "fla") else (None, None)
        row(rows, "gated_delta_rule fwd", name, ms_f, tf(flops, ms_f), "TFLOP/s", theirs[0])
        row(rows, "gated_delta_rule fwd+bwd", name, ms_fb, tf(3 * flops, ms_fb), "TFLOP/s", theirs[1])


def bench_attention(rows, kg, torch, dev, dtype, tiny, quick):
    import torch.nn.functional as F
    B, T, Hq, Hkv, D = (1, 32, 2, 1, 16) if tiny else ((1, 2048, 16, 8, 128) if quick else (1, 8192, 16, 8, 128))
    mk = lambda *s: torch.randn(*s, device=dev, dtype=dtype, requires_grad=True)  # noqa: E731
    q, k, v = mk(B, T, Hq, D), mk(B, T, Hkv, D), mk(B, T, Hkv, D)
    seg = torch.zeros(B, T, dtype=torch.int32, device=dev)  # 4 packed documents
    for i in range(1, 4):
        seg[:, i * T // 4:] = i
    causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
    mask = (seg[:, :, None] == seg[:, None, :]) & causal
    flops = 4 * B * T * T * Hq * D / 2

    def sdpa_causal():
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True, enable_gqa=True).transpose(1, 2)

    impls = [("SDPA causal (peer: no document mask)", sdpa_causal),
             ("ours: SDPA + dense doc mask", lambda: kg.attention(q, k, v, mask))]
    if dev == "cuda":
        impls.append(("ours: flex doc block mask", lambda: kg.attention_segments(q, k, v, seg)))
    res = {}
    for name, fn in impls:
        with torch.no_grad():
            ms_f = timeit(fn, torch, dev)
        ms_fb = timeit(lambda: torch.autograd.grad(fn().float().sum(), (q, k, v)), torch, dev)
        res[name] = (ms_f, ms_fb)
    peer = res[impls[0][0]]
    for name, (ms_f, ms_fb) in res.items():
        p = (None, None) if name == impls[0][0] else peer
        row(rows, "attention fwd", name, ms_f, tf(flops, ms_f), "TFLOP/s", p[0])
        row(rows, "attention fwd+bwd", name, ms_fb, tf(3.5 * flops, ms_fb), "TFLOP/s", p[1])


def bench_ce(rows, kg, torch, dev, dtype, tiny, quick):
    N, E, V = (64, 32, 1000) if tiny else ((4096, 1024, 151936) if quick else (16384, 1024, 151936))
    h = torch.randn(N, E, device=dev, dtype=dtype, requires_grad=True)
    w = (torch.randn(E, V, device=dev, dtype=dtype) * 0.02).requires_grad_()
    labels = torch.randint(0, V, (N,), device=dev)
    flops = 6 * N * E * V

    def fused():
        loss, n = kg.fused_linear_cross_entropy(h, w, labels)
        torch.autograd.grad(loss / n, (h, w))

    def unfused():
        logits = (h @ w).float()
        loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100)
        torch.autograd.grad(loss, (h, w))

    ms_u = timeit(unfused, torch, dev)
    ms_f = timeit(fused, torch, dev)
    mem_u, mem_f = peak_mem(unfused, torch, dev), peak_mem(fused, torch, dev)
    row(rows, "cross_entropy fwd+bwd", f"unfused h@w + CE (peak {mem_u:.2f} GiB)", ms_u, tf(flops, ms_u), "TFLOP/s")
    row(rows, "cross_entropy fwd+bwd", f"ours fused (peak {mem_f:.2f} GiB)", ms_f, tf(flops, ms_f), "TFLOP/s", ms_u)


def bench_rms(rows, kg, torch, dev, dtype, tiny, quick):
    R, E = (64, 128) if tiny else ((8192, 4096) if quick else (32768, 4096))
    x = torch.randn(R, E, device=dev, dtype=dtype, requires_grad=True)
    r = torch.randn(R, E, device=dev, dtype=dtype, requires_grad=True)
    w = torch.ones(E, device=dev, dtype=dtype, requires_grad=True)
    es = x.element_size()
    # bytes a fused kernel must move: fwd reads x, r, writes y, z; bwd reads z, dy, dz, writes dx (and dr = dx)
    nbytes = R * E * es * 8

    def make(f):
        def run():
            y, z = f(x, w, 1e-6, residual=r)
            torch.autograd.grad((y.float().sum() + z.float().sum()), (x, r, w))
        return run

    impls = [("torch eager", make(kg.rms_norm_ref))]
    if dev == "cuda":
        impls.append(("torch.compile", make(torch.compile(kg.rms_norm_ref))))
    impls.append(("ours (Triton)", make(kg.rms_norm)))
    res = {n: timeit(f, torch, dev) for n, f in impls}
    for n, ms in res.items():
        row(rows, "rms_norm+residual fwd+bwd", n, ms, nbytes / (ms * 1e-3) / 1e9, "GB/s",
            res["torch eager"] if n != "torch eager" else None)


def bench_gmm(rows, kg, torch, dev, dtype, tiny, quick):
    # Qwen3-30B-A3B experts: 128 experts, hidden 2048, expert width 768, 8 of 128 experts per token
    G, M, K, N = (4, 64, 32, 32) if tiny else ((128, 4096 * 8, 2048, 768) if quick else (128, 16384 * 8, 2048, 768))
    lhs = torch.randn(M, K, device=dev, dtype=dtype)
    rhs = torch.randn(G, K, N, device=dev, dtype=dtype) * 0.02
    sizes = torch.full((G,), M // G, device=dev, dtype=torch.int32)
    flops = 2 * M * K * N
    ms_ref = timeit(lambda: kg.moe_gmm_ref(lhs, rhs, sizes), torch, dev)
    ms = timeit(lambda: kg.moe_gmm(lhs, rhs, sizes), torch, dev)
    row(rows, "moe_gmm fwd", "per-expert loop", ms_ref, tf(flops, ms_ref), "TFLOP/s")
    row(rows, "moe_gmm fwd", "torch._grouped_mm", ms, tf(flops, ms), "TFLOP/s", ms_ref)


if __name__ == "__main__":
    sys.exit(main())
