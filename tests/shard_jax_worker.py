"""JAX half of tests/test_shard.py, run in a subprocess (8 virtual CPU devices, cheap XLA compiles):
python tests/shard_jax_worker.py MODEL OUT.json MESH [MESH ...]. For each mesh: sharded init == single-device init,
loss and gradients of one step and the losses of 5 AdamW steps == single device; per-device shard shapes of every
parameter; then an Orbax checkpoint saved on the first mesh restored on the second gives the same loss."""
import os
import sys

os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                           "--xla_llvm_disable_expensive_passes=true")
os.environ["JAX_PLATFORMS"] = "cpu"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import importlib  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import shard  # noqa: E402
from shard_cfg import tiny_cfg  # noqa: E402

STEPS = 5


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def main(name, out_path, specs):
    model = importlib.import_module(name)
    cfg = tiny_cfg(model)
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (8, 17)).astype(np.int32)
    opt = optax.adamw(1e-3, weight_decay=0.1)

    def loss_fn(params, tokens, kernels=None):
        logits, _ = model.forward(params, tokens[:, :-1], cfg, kernels=kernels)
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        return -jnp.take_along_axis(lp, tokens[:, 1:, None], -1).mean()

    def step(params, opt_state, tokens, kernels):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, kernels)
        upd, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, upd), opt_state, loss, grads

    def run(mesh):
        params = shard.init_params(model, cfg, mesh, seed=0)
        psh = shard.param_shardings(model, cfg, mesh)
        opt_state = shard.jit_init(opt.init, params, model=model, cfg=cfg, mesh=mesh)
        osh = shard.tree_shardings(opt_state, model, cfg, mesh)
        bsh = shard.batch_sharding(mesh)
        kernels = shard.mesh_kernels(mesh, model, cfg)  # activation constraints; all-to-all experts when ep > 1
        f = jax.jit(lambda p, o, t: step(p, o, t, kernels), in_shardings=(psh, osh, bsh),
                    out_shardings=(psh, osh, shard.replicated(mesh), psh), donate_argnums=(0, 1))
        init = jax.tree.map(np.asarray, params)
        batch = jax.device_put(tokens, bsh)
        lowered = f.lower(params, opt_state, batch)
        hlo = lowered.compile().as_text()  # after SPMD partitioning (its own resharding all-to-alls included)
        collectives = {op: hlo.count(op + "(") for op in ("all-to-all", "all-gather", "reduce-scatter", "all-reduce")}
        collectives["user all-to-all"] = lowered.as_text().count("all_to_all")  # written in the program (shard_map)
        losses, grads0 = [], None
        for i in range(STEPS):
            params, opt_state, loss, grads = f(params, opt_state, batch)
            losses.append(float(loss))
            if i == 0:
                grads0 = jax.tree.map(np.asarray, grads)
        return init, grads0, losses, params, collectives

    one = shard.make_mesh(shard.parse_mesh("fsdp=1", 1), devices=jax.devices()[:1])
    r_init, r_grads, r_losses, _, _ = run(one)
    res = {"ref_losses": r_losses, "meshes": {}}
    finals = {}
    for spec in specs:
        mesh = shard.make_mesh(shard.parse_mesh(spec, 8))
        init, grads, losses, params, collectives = run(mesh)
        finals[spec] = (mesh, params)
        lay = shard.layout(model, cfg, mesh)
        shards, full_copies = {}, []
        for n, x in shard._flatten(params).items():
            shapes = sorted({tuple(s.data.shape) for s in x.addressable_shards})
            shards[n] = {"global": list(x.shape), "device": [list(s) for s in shapes],
                         "rules": list(lay[n][2]), "axes": [list(m) for m in lay[n][1]], "n_devices": len(x.addressable_shards)}
            if tuple(lay[n][2]) != tuple(x.shape) and any(s == tuple(x.shape) for s in shapes):
                full_copies.append(n)
        res["meshes"][spec] = {
            "init_max_diff": max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(r_init))),
            "grad_rel": {n: rel(g, shard._flatten(r_grads)[n]) for n, g in shard._flatten(grads).items()},
            "losses": losses, "shards": shards, "full_copies": full_copies, "collectives": collectives,
            "moe_dispatch": "moe_dispatch" in shard.mesh_kernels(mesh, model, cfg)}
    # checkpoint: saved on the first mesh, restored onto the second
    import orbax.checkpoint as ocp
    (m1, p1), (m2, _) = finals[specs[0]], finals[specs[1]]
    loss_on = jax.jit(loss_fn)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ckpt")
        shard.save_checkpoint(path, p1)
        p2 = shard.load_checkpoint(path, shard.abstract_params(model, cfg, m2))
        res["ckpt"] = {"saved_on": specs[0], "restored_on": specs[1],
                       "loss_saved": float(loss_on(p1, jax.device_put(tokens, shard.batch_sharding(m1)))),
                       "loss_restored": float(loss_on(p2, jax.device_put(tokens, shard.batch_sharding(m2)))),
                       "restored_spec": {n: str(x.sharding.spec) for n, x in shard._flatten(p2).items()},
                       "expected_spec": {n: str(x.spec) for n, x in
                                         shard._flatten(shard.param_shardings(model, cfg, m2)).items()}}
    del ocp
    with open(out_path, "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
