"""convert.py's error paths, run as a user would (`python convert.py ...`): exit code 2, one line on stderr that
names the problem and the file, no traceback, and the output location untouched (no half-written or temp folders)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import convert

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A tiny Qwen3 HF folder and its Orbax and DCP checkpoints."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    root = tmp_path_factory.mktemp("good")
    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=8)).save_pretrained(root / "hf")
    convert.hf_to_ckpt(str(root / "hf"), str(root / "orbax"), "orbax")
    convert.hf_to_ckpt(str(root / "hf"), str(root / "dcp"), "dcp", layout="unscanned")
    return root


def run_convert(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "convert.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=env)


def assert_user_error(r, *words):
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def assert_nothing_written(parent, out_name="out"):
    left = [f for f in os.listdir(parent) if f == out_name or f.startswith(f".{out_name}.tmp")]
    assert left == [], left


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_folder(tmp_path):
    r = run_convert("hf2orbax", "--hf", tmp_path / "nope", "--out", tmp_path / "out")
    assert_user_error(r, str(tmp_path / "nope"), "no such folder")
    assert_nothing_written(tmp_path)
    r = run_convert("orbax2hf", "--ckpt", tmp_path / "nope", "--out", tmp_path / "out")
    assert_user_error(r, str(tmp_path / "nope"), "no such folder")


def test_unknown_model_type(good, tmp_path):
    src = copy(good / "hf", tmp_path / "src")
    d = json.load(open(src / "config.json"))
    json.dump({**d, "model_type": "llama"}, open(src / "config.json", "w"))
    r = run_convert("hf2dcp", "--hf", src, "--out", tmp_path / "out")
    assert_user_error(r, "config.json", "unknown model_type 'llama'")
    assert_nothing_written(tmp_path)


def test_truncated_safetensors(good, tmp_path):
    src = copy(good / "hf", tmp_path / "src")
    path = src / "model.safetensors"
    os.truncate(path, os.path.getsize(path) - 100)
    r = run_convert("hf2orbax", "--hf", src, "--out", tmp_path / "out")
    assert_user_error(r, str(path), "truncated")
    assert_nothing_written(tmp_path)
    os.truncate(path, 5)
    r = run_convert("hf2orbax", "--hf", src, "--out", tmp_path / "out")
    assert_user_error(r, str(path))
    assert_nothing_written(tmp_path)


def test_wrong_tensor_shape(good, tmp_path):
    from safetensors.torch import load_file, save_file
    src = copy(good / "hf", tmp_path / "src")
    t = load_file(src / "model.safetensors")
    t["model.layers.1.mlp.up_proj.weight"] = torch.zeros(31, 16)
    save_file(t, src / "model.safetensors", metadata={"format": "pt"})
    r = run_convert("hf2dcp", "--hf", src, "--out", tmp_path / "out")
    assert_user_error(r, "model.layers.1.mlp.up_proj.weight", "[31, 16]", "[32, 16]")
    assert_nothing_written(tmp_path)


def test_existing_out_refused_and_untouched(good, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for args in (("hf2orbax", "--hf", good / "hf"), ("dcp2hf", "--ckpt", good / "dcp")):
        r = run_convert(*args, "--out", out)
        assert_user_error(r, str(out), "not empty", "--overwrite")
        assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["out"]
    r = run_convert("hf2orbax", "--hf", good / "hf", "--out", out, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert not (out / "keep.txt").exists() and (out / "nanoqwen.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_corrupt_orbax(good, tmp_path):
    ck = copy(good / "orbax", tmp_path / "ck")
    os.remove(ck / "nanoqwen.json")
    r = run_convert("orbax2hf", "--ckpt", ck, "--out", tmp_path / "out")
    assert_user_error(r, str(ck), "not a nanoqwen checkpoint")
    assert_nothing_written(tmp_path)
    # data files damaged: found while reading, after writing started; the output still never appears
    shutil.rmtree(ck)
    ck = copy(good / "orbax", tmp_path / "ck")
    for d, _, files in os.walk(ck / "params"):
        for f in files:
            if os.sep + "d" in d or f.startswith("manifest"):
                with open(os.path.join(d, f), "r+b") as fh:
                    fh.truncate(max(os.path.getsize(os.path.join(d, f)) // 2, 1))
    r = run_convert("orbax2hf", "--ckpt", ck, "--out", tmp_path / "out")
    assert_user_error(r, str(ck / "params"))
    assert_nothing_written(tmp_path)


def test_corrupt_dcp(good, tmp_path):
    ck = copy(good / "dcp", tmp_path / "ck")
    (ck / "params" / ".metadata").write_bytes(b"garbage")
    r = run_convert("dcp2hf", "--ckpt", ck, "--out", tmp_path / "out")
    assert_user_error(r, str(ck / "params"), "corrupt torch DCP checkpoint")
    assert_nothing_written(tmp_path)
    shutil.rmtree(ck)
    ck = copy(good / "dcp", tmp_path / "ck")
    data = max((ck / "params").glob("*.distcp"), key=os.path.getsize)
    os.truncate(data, os.path.getsize(data) // 2)
    r = run_convert("dcp2hf", "--ckpt", ck, "--out", tmp_path / "out")
    assert_user_error(r, str(ck / "params"))
    assert_nothing_written(tmp_path)


def test_wrong_format_and_bad_options(good, tmp_path):
    r = run_convert("orbax2hf", "--ckpt", good / "dcp", "--out", tmp_path / "out")
    assert_user_error(r, str(good / "dcp"), "dcp checkpoint", "dcp2hf")
    r = run_convert("orbax2hf", "--ckpt", good / "orbax", "--out", tmp_path / "out", "--max-shard-size", "lots")
    assert_user_error(r, "lots")
    r = run_convert("hf2orbax", "--hf", good / "orbax", "--out", tmp_path / "out")
    assert_user_error(r, "config.json")
    assert_nothing_written(tmp_path)
