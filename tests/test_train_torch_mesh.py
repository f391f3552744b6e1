"""train.py --backend torch on a shard.py mesh under torchrun (4 gloo processes on CPU) == one process: the losses
of the --metrics file on fsdp=4 and fsdp=2,tp=2 (with gradient accumulation and eval), Qwen3-MoE on fsdp=2,ep=2 and
Qwen3-Next on tp=2,ep=2,
checkpoints moved between meshes (fsdp=4 -> one process, one process -> fsdp=2,tp=2), and the one-line error
without torchrun. Every run is a few steps of a debug-size model (3 torchrun jobs, about a minute on 2 cores)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

import launch
import train

torch = pytest.importorskip("torch")
TOL = 1e-5
STEPS = 3
# accum 2 (global batch 8 of micro-batches of 4), eval at steps 2 and 3
COMMON = dict(backend="torch", size="debug", steps=STEPS, batch_size=4, global_batch_size=8, seq_len=32,
              eval_every=2, quiet=True)


def _cli(kw):
    out = []
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        out += [flag] if v is True else [flag, str(v)]
    return out


def _records(path):
    return [json.loads(line) for line in open(path)]


def torchrun(n, kw, metrics):
    """train.py under torchrun on n local processes; the --metrics records of rank 0."""
    r = launch.torchrun(n, ["train.py", *_cli(kw), "--metrics", str(metrics)], timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return _records(metrics)


def one_process(kw, metrics):
    train.run(train.Args(**kw, metrics=str(metrics)))
    return _records(metrics)


def _close(got, ref, key, tol=TOL):
    for g, r in zip(got, ref):
        assert g["step"] == r["step"]
        assert abs(g[key] - r[key]) <= tol * abs(r[key]), f"step {r['step']} {key}: {g[key]} != {r[key]}"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("torch_mesh")


@pytest.fixture(scope="module")
def dense_ref(work):
    """One process, a checkpoint after every step."""
    ck = work / "ck_one"
    return one_process(dict(COMMON, model="qwen3", ckpt_dir=str(ck), save_every=1), work / "ref.jsonl"), ck


def _resume_dir(ck, dst, step):
    """A copy of a checkpoint folder holding only the checkpoints up to `step`."""
    shutil.copytree(ck, dst)
    for s, path in train.checkpoints(str(dst)):
        if s > step:
            shutil.rmtree(path)
    return dst


def test_fsdp4_equals_one_process_and_resumes_in_one(dense_ref, work):
    """fsdp=4 (4 processes): losses, gradient norms and eval losses as one process; its sharded checkpoint of
    step 2 resumed in one process gives step 3 as the uninterrupted run."""
    ref, _ = dense_ref
    ck = work / "ck_fsdp"
    recs = torchrun(4, dict(COMMON, model="qwen3", mesh="fsdp=4", ckpt_dir=ck, save_every=2), work / "fsdp.jsonl")
    assert len(recs) == STEPS == len(ref)
    _close(recs, ref, "loss")
    _close(recs, ref, "grad_norm")
    _close([r for r in recs if "eval_loss" in r], [r for r in ref if "eval_loss" in r], "eval_loss")
    # the same checkpoint folder as one process writes, renamed into place (no temporary folder left)
    assert sorted(os.listdir(ck)) == ["step_00000002", "step_00000003"]
    assert {"nanoqwen.json", "params", "optimizer", "train_state.json"} <= set(os.listdir(ck / "step_00000002"))
    resumed = one_process(dict(COMMON, model="qwen3", ckpt_dir=str(_resume_dir(ck, work / "ck_fsdp_1", 2)),
                               resume=True), work / "resumed1.jsonl")
    assert [r["step"] for r in resumed] == [3]
    _close(resumed, ref[2:], "loss")


def test_fsdp2_tp2_resumed_from_one_process(dense_ref, work):
    """fsdp=2,tp=2 (4 processes) resuming the one-process checkpoint of step 1 (params and AdamW state laid out
    on the mesh by DCP): steps 2 and 3, with eval, as the uninterrupted run."""
    ref, ck = dense_ref
    recs = torchrun(4, dict(COMMON, model="qwen3", mesh="fsdp=2,tp=2", resume=True,
                            ckpt_dir=_resume_dir(ck, work / "ck_tp", 1)), work / "tp.jsonl")
    assert [r["step"] for r in recs] == [2, 3]
    _close(recs, ref[1:], "loss")
    _close(recs, ref[1:], "eval_loss")


@pytest.mark.parametrize("name,mesh", [("qwen3_moe", "fsdp=2,ep=2"), ("qwen3_next", "tp=2,ep=2")])
def test_moe_on_mesh(work, name, mesh):
    """MoE models with experts over ep (tokens sent to them by all-to-all), with tp (each rank runs its columns of
    the experts, vocabulary-parallel CE): CE, router aux loss (its statistics summed over the batch shards first),
    Qwen3-Next's MTP loss and the total loss as in one process."""
    kw = dict(COMMON, model=name, steps=2, eval_every=0)
    ref = one_process(kw, work / f"{name}_ref.jsonl")
    recs = torchrun(4, dict(kw, mesh=mesh), work / f"{name}.jsonl")
    for key in ("ce", "router_aux_loss", "loss", "grad_norm") + (("mtp_loss",) if "mtp_loss" in ref[0] else ()):
        _close(recs, ref, key)


def test_mesh_without_torchrun_is_one_line_error():
    r = subprocess.run([sys.executable, "train.py", "--backend", "torch", "--model", "qwen3", "--size", "debug",
                        "--steps", "1", "--mesh", "fsdp=2,tp=2"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "torchrun --nproc_per_node 4 train.py" in lines[0]
