"""Conversion throughput and peak memory on a generated checkpoint of real size.

    python bench_convert.py                      # Qwen3-1.7B shape (4.1 GB bf16), hf2orbax and orbax2hf
    python bench_convert.py --size 0.6b --formats orbax,dcp --layout unscanned --dir /big/disk

Writes a random Qwen3-shaped bfloat16 checkpoint straight to safetensors (hub-style shards), converts it to our
format and back, each conversion a subprocess (`python convert.py ...`) whose peak RSS is read from wait4, and checks
the round trip bit for bit. Peak RSS must stay below 3x the largest tensor plus the baseline, measured as a
python that imports the same modules (convert plus orbax/tensorstore, or torch.distributed.checkpoint).
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import click
import numpy as np

import convert
import qwen3

HERE = os.path.dirname(os.path.abspath(__file__))
BASELINE = {"orbax": "import numpy, convert, jax, orbax.checkpoint, tensorstore",
            "dcp": "import numpy, convert, torch, torch.distributed.checkpoint"}


def make_checkpoint(folder, cfg, seed=0):
    """A random bf16 Qwen3 checkpoint written tensor by tensor (values +-[1, 2) * 2^-7: finite, no NaNs)."""
    bf16 = convert.np_dtype("bfloat16")
    entries = qwen3.hf_entries(cfg)
    tensors = [(n, s, bf16) for e in entries for n, s in zip(e[2], e[3])]
    w = convert.SafetensorsWriter(folder, tensors, max_shard_size="2GB")
    rng = np.random.default_rng(seed)
    for n, s, _ in tensors:
        u = rng.integers(0, 1 << 16, size=s, dtype=np.uint16)
        w.write(n, ((u & 0x807F) | 0x3C00).view(bf16))
    w.close()
    d = cfg.to_hf()
    d["dtype"] = "bfloat16"
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(d, f, indent=2)
    return w.total, max(int(np.prod(s)) * 2 for _, s, _ in tensors)


# runs a script with sys.argv[1:] and records its peak RSS (VmHWM, per address space, so unlike ru_maxrss it does
# not include the forked parent's pages) in the file named by BENCH_HWM
WRAP = """import atexit, os, runpy, sys
def _hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            open(os.environ["BENCH_HWM"], "w").write(line.split()[1])
atexit.register(_hwm)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run(script, *args):
    """(seconds, CPU seconds, peak RSS in bytes) of `python script args...`."""
    with tempfile.NamedTemporaryFile("r", suffix=".hwm") as hwm:
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "BENCH_HWM": hwm.name}
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-c", WRAP, script, *args], cwd=HERE, env=env, stderr=subprocess.PIPE)
        err = p.stderr.read().decode()
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        dt = time.perf_counter() - t0
        if p.returncode:
            sys.exit(f"failed: {script} {' '.join(args)}\n{err}")
        return dt, ru.ru_utime + ru.ru_stime, int(hwm.read()) * 1024


def same(a, b):
    ca, cb = convert.Checkpoint(a), convert.Checkpoint(b)
    if ca.keys() != cb.keys():
        return False
    return all(ca.meta[k] == cb.meta[k] and ca.get(k).tobytes() == cb.get(k).tobytes() for k in ca.keys())


@click.command()
@click.option("--size", default="1.7b", type=click.Choice([s for s in qwen3.SIZES if s != "debug"]),
              help="Qwen3 size whose shapes the random checkpoint takes")
@click.option("--formats", default="orbax", help="comma list of orbax,dcp")
@click.option("--layout", default="scanned", type=click.Choice(["scanned", "unscanned"]))
@click.option("--dir", "root", default=None, help="scratch folder (default: a temp folder in /tmp)")
@click.option("--keep", is_flag=True, help="keep the scratch folder")
def main(size, formats, layout, root, keep):
    cfg = qwen3.SIZES[size]
    est = qwen3.count_params(cfg) * 2
    root = root or tempfile.mkdtemp(prefix="bench_convert_")
    os.makedirs(root, exist_ok=True)
    free = shutil.disk_usage(root).free
    need = 3 * est + (1 << 30)
    print(f"disk: {free / 1e9:.1f} GB free in {root}, need {need / 1e9:.1f} GB")
    if free < need:
        sys.exit(f"error: {root}: not enough disk space ({free / 1e9:.1f} GB free, need {need / 1e9:.1f} GB)")
    try:
        hf = os.path.join(root, "hf")
        os.makedirs(hf, exist_ok=True)
        t0 = time.perf_counter()
        total, largest = make_checkpoint(hf, cfg)
        print(f"checkpoint: Qwen3-{size} shapes, bf16, {total / 1e9:.2f} GB, largest tensor {largest / 1e6:.0f} MB"
              f" (written in {time.perf_counter() - t0:.1f}s)")
        rows = []
        for fmt in formats.split(","):
            script = os.path.join(root, f"baseline_{fmt}.py")
            with open(script, "w") as f:
                f.write(BASELINE[fmt] + "\n")
            t_imp, c_imp, base = run(script)
            bound = 3 * largest + base
            mid, back = os.path.join(root, fmt), os.path.join(root, f"{fmt}_hf")
            for cmd, args in ((f"hf2{fmt}", ["--hf", hf, "--out", mid, "--layout", layout]),
                              (f"{fmt}2hf", ["--ckpt", mid, "--out", back])):
                dt, cpu, rss = run("convert.py", cmd, *args)
                rows.append((cmd, dt, t_imp, total / max(dt - t_imp, 1e-9) / 1e9, cpu - c_imp, rss, base, bound))
            ok = same(hf, back)
            print(f"{fmt}: round trip bit-identical: {ok}")
            if not ok:
                sys.exit(1)
            shutil.rmtree(mid)
            shutil.rmtree(back)
        print(f"\n{'command':9s} {'seconds':>8s} {'imports':>8s} {'GB/s':>6s} {'CPU s':>6s} {'GB/CPU-s':>8s}"
              f" {'peak RSS MB':>12s} {'baseline MB':>12s} {'bound MB':>9s}")
        for cmd, dt, t_imp, gbs, cpu, rss, base, bound in rows:
            print(f"{cmd:9s} {dt:8.1f} {t_imp:8.1f} {gbs:6.2f} {cpu:6.1f} {total / cpu / 1e9:8.2f}"
                  f" {rss / 1e6:12.0f} {base / 1e6:12.0f} {bound / 1e6:9.0f}  {'ok' if rss < bound else 'OVER'}")
        print("GB/s = checkpoint size / (seconds - imports); imports = the baseline's wall time (python importing the"
              " same modules); CPU s = user + sys of the conversion less the baseline's (load-independent);"
              " bound = 3 x largest tensor + baseline")
        print(f"checkpoint {total / 1e9:.2f} GB, largest tensor {largest / 1e6:.0f} MB, layout {layout}, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        if any(r[5] >= r[7] for r in rows):
            sys.exit(1)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
