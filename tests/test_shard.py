"""Sharded == unsharded (DESIGN 6.6): JAX on 8 virtual CPU devices, torch on 4 gloo processes (torchrun), checkpoints
restored across meshes, per-device shard shapes, and the one-line error for an impossible mesh.

The heavy checks run once per model in a subprocess (tests/shard_jax_worker.py with cheap XLA compiles,
tests/shard_torch_worker.py under torchrun) and write JSON that the tests below read."""
import importlib
import json
import os
import subprocess
import sys

import pytest

import launch
import shard
from shard_cfg import MESHES_JAX, MESHES_TORCH, kind, tiny_cfg

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODELS = [m for m in ("qwen3", "qwen3_moe", "qwen3_next") if os.path.exists(os.path.join(ROOT, m + ".py"))]
TOL = 1e-5


def _model(name):
    return importlib.import_module(name)


def _rel(a, b):
    return abs(a - b) / abs(b)


# ----------------------------------------------------------------------------------------------- mesh description
def test_parse_mesh():
    assert shard.parse_mesh(None, 8) == {"data": 1, "fsdp": 8, "tp": 1, "ep": 1}
    assert shard.parse_mesh("tp=2", 8) == {"data": 1, "fsdp": 4, "tp": 2, "ep": 1}
    assert shard.parse_mesh("fsdp=2,tp=2,ep=2", 8) == {"data": 1, "fsdp": 2, "tp": 2, "ep": 2}
    assert shard.parse_mesh("data=-1,fsdp=2", 8) == {"data": 4, "fsdp": 2, "tp": 1, "ep": 1}
    assert shard.parse_mesh("fsdp=1", 1) == {"data": 1, "fsdp": 1, "tp": 1, "ep": 1}


@pytest.mark.parametrize("spec,n,words", [
    ("tp=3", 8, "do not divide 8 devices"),
    ("fsdp=2,tp=2", 8, "needs 4 devices but 8"),
    ("fsdp=-1,tp=-1", 8, "only one mesh axis"),
    ("pp=2", 8, "bad --mesh entry"),
    ("tp=x", 8, "bad size"),
    ("tp=0", 8, "sizes are positive"),
])
def test_impossible_mesh_is_one_line_error(spec, n, words):
    with pytest.raises(shard.MeshError) as e:
        shard.parse_mesh(spec, n)
    assert isinstance(e.value, ValueError) and words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", MODELS)
def test_mesh_that_does_not_divide_heads_or_experts(name):
    model = _model(name)
    cfg = tiny_cfg(model)  # 8 q heads, 4 kv heads, 8 experts
    with pytest.raises(shard.MeshError, match="does not divide .*=4 of parameter") as e:
        shard.check_params(model.param_table(cfg), shard.parse_mesh("tp=8", 8))
    assert "\n" not in str(e.value)
    if kind(model) != "dense":
        with pytest.raises(shard.MeshError, match="ep=16 does not divide experts=8"):
            shard.check_params(model.param_table(cfg), shard.parse_mesh("ep=16", 16))
    with pytest.raises(shard.MeshError, match="batch size 6"):
        shard.check_batch(6, shard.parse_mesh("fsdp=4", 4))


def test_two_axes_on_one_mesh_axis_is_refused():
    rules = dict(shard.RULES, mlp="fsdp")
    with pytest.raises(shard.MeshError, match="two axes of layers.w_up to mesh axis 'fsdp'"):
        shard.logical_to_mesh(("layers", "embed", "mlp"), rules, where="layers.w_up")
    # activations: the batch takes data/fsdp/ep, so a later embed axis is left whole instead of colliding
    assert shard.logical_to_mesh(("batch", "seq", "embed"), activation=True) == [("data", "fsdp", "ep"), (), ()]


@pytest.mark.parametrize("name", MODELS)
def test_rules_name_every_logical_axis(name):
    model = _model(name)
    axes = {a for p in model.param_table(tiny_cfg(model)).values() for a in p.axes}
    assert axes <= set(shard.RULES), f"add rules for {sorted(axes - set(shard.RULES))} to shard.RULES"
    for n, p in model.param_table(tiny_cfg(model)).items():
        shard.logical_to_mesh(p.axes, where=n)  # no collision in any parameter


def test_layout_of_one_layer(capsys):
    """What the rules say for one layer on fsdp=2,tp=4 (printed), and the NamedShardings give the same shapes."""
    import jax
    model = _model("qwen3")
    cfg = tiny_cfg(model)
    mesh = shard.make_mesh(shard.parse_mesh("fsdp=2,tp=4", len(jax.devices())))
    lay = shard.layout(model, cfg, mesh)
    sh = shard._flatten(shard.param_shardings(model, cfg, mesh))
    with capsys.disabled():
        print("\nlayout on fsdp=2,tp=4 (one layer of the stack shown):")
        for n, (shape, ms, local) in lay.items():
            if n.startswith("layers."):
                print(f"  {n:18s} {str(shape[1:]):18s} {str([('/'.join(m) or '-') for m in ms[1:]]):34s} {local[1:]}")
            assert sh[n].shard_shape(shape) == local
    E, Hq, Hkv, D, Inter = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size
    assert lay["layers.wq"][2][1:] == (E // 2, Hq // 4, D)
    assert lay["layers.wk"][2][1:] == (E // 2, Hkv // 4, D)
    assert lay["layers.wo"][2][1:] == (Hq // 4, D, E // 2)
    assert lay["layers.w_gate"][2][1:] == (E // 2, Inter // 4)
    assert lay["layers.w_down"][2][1:] == (Inter // 4, E // 2)
    assert lay["layers.attn_norm"][2][1:] == (E,)
    assert lay["embed"][2] == (cfg.vocab_size // 4, E // 2)


def test_constrain_is_noop_without_mesh():
    import jax.numpy as jnp
    x = jnp.ones((4, 3, 8))
    assert shard.constrain(x, ("batch", "seq", "embed")) is x
    assert shard.constrainer(None)(x, ("batch", "seq", "embed")) is x


# ----------------------------------------------------------------------------------------------- JAX, 8 CPU devices
@pytest.fixture(scope="module")
def jax_results(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            out = tmp_path_factory.mktemp("shard_jax") / f"{name}.json"
            meshes = MESHES_JAX[kind(_model(name))]
            r = subprocess.run([sys.executable, os.path.join(HERE, "shard_jax_worker.py"), name, str(out), *meshes],
                               capture_output=True, text=True, timeout=900, cwd=ROOT)
            assert r.returncode == 0, r.stderr[-4000:]
            cache[name] = json.loads(out.read_text())
        return cache[name]
    return get


def _check(res, local_key):
    for spec, m in res["meshes"].items():
        assert m["init_max_diff"] == 0.0, spec
        bad = {n: e for n, e in m["grad_rel"].items() if not e < TOL}
        assert not bad, f"{spec}: gradients differ from one device: {bad}"
        for i, (a, b) in enumerate(zip(m["losses"], res["ref_losses"])):
            assert _rel(a, b) < TOL, f"{spec}: AdamW step {i} loss {a} != {b}"
        for n, s in m["shards"].items():
            got = s[local_key] if local_key == "local" else s[local_key][0]
            assert got == s["rules"], f"{spec}: {n} shard {got} != rules {s['rules']}"
            if local_key == "device":
                assert len(s["device"]) == 1 and s["n_devices"] == 8, (spec, n, s)
        assert not m.get("full_copies"), f"{spec}: devices hold whole sharded weights {m['full_copies']}"
        assert not m.get("grad_placement_mismatch"), spec
    c = res["ckpt"]
    assert _rel(c["loss_restored"], c["loss_saved"]) < TOL, c


@pytest.mark.parametrize("name", MODELS)
def test_jax_sharded_equals_single_device(name, jax_results):
    """fsdp=8, fsdp=2,tp=4 (and fsdp=2,tp=2,ep=2 for MoE): init, loss, gradients and 5 AdamW steps as on one
    device; every device holds exactly the shard the rules say; an Orbax checkpoint saved on the first mesh
    restores onto the second with the same loss."""
    res = jax_results(name)
    _check(res, "device")
    for spec, m in res["meshes"].items():  # expert parallelism: tokens travel by all-to-all on ep meshes
        assert m["moe_dispatch"] == ("ep=2" in spec and kind(_model(name)) != "dense"), spec
        assert (m["collectives"]["user all-to-all"] > 0) == m["moe_dispatch"], (spec, m["collectives"])
    assert res["ckpt"]["restored_spec"] == res["ckpt"]["expected_spec"]


# ----------------------------------------------------------------------------------------------- torch, 4 gloo ranks
@pytest.fixture(scope="module")
def torch_results(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            pytest.importorskip("torch")
            out = tmp_path_factory.mktemp("shard_torch") / f"{name}.json"
            meshes = MESHES_TORCH[kind(_model(name))]
            r = launch.torchrun(4, [os.path.join(HERE, "shard_torch_worker.py"), name, str(out), *meshes],
                                timeout=900, retry_exit_abort=True)
            assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
            cache[name] = json.loads(out.read_text())
        return cache[name]
    return get


@pytest.mark.parametrize("name", MODELS)
def test_torch_sharded_equals_single_process(name, torch_results):
    """fsdp=4, fsdp=2,tp=2 (and fsdp=2,ep=2 for MoE) on 4 gloo processes: init, loss, gradients (DTensors placed like
    their params) and 5 AdamW steps as in one process; each rank's shard as the rules say; the layers' weights are
    gathered one layer at a time (the bytes of gathered layer weights alive at once, forward and backward, are at
    most one layer's); a DCP checkpoint saved on the first mesh loads onto the second with the same loss."""
    res = torch_results(name)
    _check(res, "local")
    for spec, m in res["meshes"].items():  # layers gathered one at a time: never the whole model on a rank
        g = m["gathered"]
        assert 0 < g["peak"] <= g["one_layer"] < g["total"], (spec, g)
    for spec, m in res["meshes"].items():  # MoE on ep meshes: tokens travel to their experts by all-to-all; on tp
        # meshes each rank runs its columns of the experts (the same hook)
        assert m["moe_dispatch"] == (("ep=2" in spec or "tp=2" in spec) and kind(_model(name)) != "dense"), spec
    assert res["ckpt"]["placements_ok"]
