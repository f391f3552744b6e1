"""The shape of the house (DESIGN.md section 1) and the error standard of load_hf / parity (section 5)."""
import ast
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

import convert

MODEL_FILES = ["qwen2.py", "qwen3.py", "qwen3_moe.py", "qwen3_next.py"]


def _defs(path):
    """name -> source text of each top-level def/class/assignment, and the names marked '# same as mod.name'."""
    src = pathlib.Path(path).read_text()
    tree = ast.parse(src)
    lines = src.splitlines()
    defs, marks = {}, {}
    for node in tree.body:
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
            [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        for name in names:
            defs[name] = ast.get_source_segment(src, node)
            if hasattr(node, "decorator_list") and node.decorator_list:
                defs[name] = "\n".join(lines[start - 1:node.end_lineno])
            above = lines[start - 2].strip() if start >= 2 else ""
            same_line = lines[node.lineno - 1].split("#")[-1].strip() if "# same as" in lines[node.lineno - 1] else ""
            for text in (above, same_line):
                if text.startswith("# same as ") or text.startswith("same as "):
                    marks[name] = text.split("same as ")[1].strip()
    return defs, marks


def present_models():
    return [f for f in MODEL_FILES if os.path.exists(os.path.join(ROOT, f))]


@pytest.mark.parametrize("path", present_models())
def test_marked_copies_are_identical(path):
    """Blocks marked '# same as qwen3.name' are textually identical to the original, so a fix lands everywhere."""
    defs, marks = _defs(os.path.join(ROOT, path))
    for name, ref in marks.items():
        mod, ref_name = ref.split(".")
        other, _ = _defs(os.path.join(ROOT, mod + ".py"))
        strip = lambda s: re.sub(r"  # same as [\w.]+", "", s)  # noqa: E731
        assert strip(defs[name]) == strip(other[ref_name]), f"{path}:{name} differs from {ref}"
    if path != "qwen3.py":  # an identical block that is not marked would drift unnoticed: it must carry the mark
        ref, _ = _defs(os.path.join(ROOT, "qwen3.py"))
        unmarked = [n for n, src in defs.items() if n in ref and src == ref[n] and n not in marks and "(" in src]
        assert not unmarked, f"{path}: blocks identical to qwen3.py but not marked as copies: {unmarked}"
        assert len(marks) >= 3, f"{path} marks only {len(marks)} copies"


@pytest.mark.parametrize("path", present_models())
def test_model_files_import_no_project_file(path):
    local = {p.stem for p in pathlib.Path(ROOT).glob("*.py")}
    tree = ast.parse(pathlib.Path(ROOT, path).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [(node.module or "").split(".")[0]] if node.level == 0 else ["<relative>"]
        else:
            continue
        bad = [n for n in names if n in local or n == "<relative>"]
        assert not bad, f"{path} imports {bad}"


# ------------------------------------------------------------------------------------------ error standard
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "qwen3"
    Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=8)).save_pretrained(path)
    return path


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def _broken(kind, tiny, tmp_path):
    d = _copy(tiny, tmp_path / kind)
    st = d / "model.safetensors"
    if kind == "missing":
        return tmp_path / "does-not-exist", "no such folder"
    if kind == "model_type":
        cfg = json.load(open(d / "config.json"))
        cfg["model_type"] = "llama9"
        json.dump(cfg, open(d / "config.json", "w"))
        return d, "unknown model_type 'llama9'"
    if kind == "truncated":
        data = st.read_bytes()
        st.write_bytes(data[: len(data) - 100])
        return d, "truncated"
    if kind == "shape":
        from safetensors.numpy import load_file, save_file
        t = load_file(str(st))
        t["model.layers.0.mlp.up_proj.weight"] = np.zeros((33, 16), np.float32)
        save_file(t, str(st), metadata={"format": "pt"})
        return d, "model.layers.0.mlp.up_proj.weight has shape [33, 16], expected [32, 16]"
    if kind == "missing_tensor":
        from safetensors.numpy import load_file, save_file
        t = load_file(str(st))
        del t["model.norm.weight"]
        save_file(t, str(st), metadata={"format": "pt"})
        return d, "missing, e.g. model.norm.weight"
    if kind == "extra_tensor":
        from safetensors.numpy import load_file, save_file
        t = load_file(str(st))
        t["model.layers.0.mystery.weight"] = np.zeros(3, np.float32)
        save_file(t, str(st), metadata={"format": "pt"})
        return d, "not used by qwen3, e.g. model.layers.0.mystery.weight"
    if kind == "no_config":
        os.remove(d / "config.json")
        return d, "config.json: missing"


KINDS = ["missing", "model_type", "truncated", "shape", "missing_tensor", "extra_tensor", "no_config"]


@pytest.mark.parametrize("kind", KINDS)
def test_load_hf_errors(kind, tiny, tmp_path):
    path, msg = _broken(kind, tiny, tmp_path)
    with pytest.raises(convert.UserError, match=None) as e:
        convert.load_hf(str(path), backend="torch")
    assert msg in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["missing", "model_type", "truncated", "shape"])
def test_parity_cli_errors_are_one_line(kind, tiny, tmp_path):
    path, msg = _broken(kind, tiny, tmp_path)
    r = subprocess.run([sys.executable, "-c", "import cli; cli.main()", "parity", "--hf", str(path),
                        "--backend", "torch"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0], r.stderr
    assert str(path).split("/")[-1] in err[0]
    assert "Traceback" not in r.stderr


def test_parity_cli_passes_and_fails_on_golden(tiny, tmp_path):
    """The parity command passes on a faithful load and fails (exit 1) against a tampered golden file."""
    golden = tmp_path / "g.jsonl"
    run = lambda *a: subprocess.run([sys.executable, "-c", "import cli; cli.main()", "parity", "--hf", str(tiny),  # noqa: E731
                                     *a], capture_output=True, text=True, cwd=ROOT)
    r = run("--backend", "torch", "--write-golden", str(golden))
    assert r.returncode == 0, r.stderr
    r = run("--backend", "both", "--golden", str(golden))
    assert r.returncode == 0 and r.stdout.count("ok") == 2, r.stdout + r.stderr
    recs = [json.loads(x) for x in open(golden)]
    for rec in recs:  # shift the reference distribution: our logits no longer match
        rec["full"] = [[v + (0.5 if i == 3 else 0.0) for i, v in enumerate(row)] for row in rec["full"]]
        lse = [np.log(np.exp(np.asarray(row)).sum()) for row in rec["full"]]
        rec["full"] = [(np.asarray(row) - s).tolist() for row, s in zip(rec["full"], lse)]
    golden.write_text("".join(json.dumps(r) + "\n" for r in recs))
    r = run("--backend", "torch", "--golden", str(golden))
    assert r.returncode == 1 and "FAIL" in r.stdout
