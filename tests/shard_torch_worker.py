"""torch half of tests/test_shard.py, one rank of `torchrun --nproc_per_node 4 tests/shard_torch_worker.py MODEL
OUT.json MESH [MESH ...]` (gloo on CPU). For each mesh: sharded init == model.init, loss and gradients of one step and
the losses of 5 AdamW steps == one process, each rank's shard shapes; then a DCP checkpoint saved on the first mesh
and loaded onto the second gives the same loss. Rank 0 writes the results."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import importlib  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import shard  # noqa: E402
from shard_cfg import tiny_cfg  # noqa: E402

STEPS = 5


def _gathered_sizes(params, mesh, experts_local, layers):
    """Bytes this rank computes with for the stacked leaves that need a gather (their computed block is larger
    than the stored one): all layers at once ("total") and one layer of each ("one_layer", a layer of every
    stacked group, e.g. Qwen3-Next's linear and full layers together: an upper bound for one layer)."""
    with torch.no_grad():
        cp = shard._flatten(shard.compute_params(params, mesh, experts_local))
    total = one = 0
    for n, p in shard._flatten(params).items():
        c = cp[n]
        c = c.to_local() if shard._any_dtensor(c) else c
        if n in layers and c.numel() > p.to_local().numel():
            total += c.numel() * c.element_size()
            one += c.numel() * c.element_size() // c.shape[0]
    return {"total": total, "one_layer": one}


def main(name, out_path, specs):
    rank, world, device = shard.init_torch_distributed()
    model = importlib.import_module(name)
    cfg = tiny_cfg(model)
    tokens = torch.as_tensor(np.random.RandomState(0).randint(0, cfg.vocab_size, (8, 17)))

    def loss_fn(params, tokens, kernels=None):
        logits, _ = model.forward(params, tokens[:, :-1], cfg, kernels=kernels)
        logits = logits.float()
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(0, 1))

    def train(params, mesh):
        """5 AdamW steps; returns losses, first gradients (whole, as numpy) and the final params."""
        flat = shard._flatten(params)
        for p in flat.values():
            p.requires_grad_(True)
        opt = torch.optim.AdamW(list(flat.values()), lr=1e-3, weight_decay=0.1, foreach=False)
        local = tokens if mesh is None else shard.local_batch(tokens, mesh)
        nb = 1 if mesh is None else shard.batch_shards(mesh)[1]
        kernels = shard.mesh_kernels(mesh, model, cfg)  # MoE on ep > 1: all-to-all expert parallelism
        local_experts = "moe_dispatch" in kernels
        losses, grads0, gathered = [], None, {}
        layers = shard.stacked_names(model, cfg)  # gathered one layer at a time (FSDP2-style)
        for i in range(STEPS):
            shard.gathered_peak(reset=True)
            with shard.compute_context(params):
                cp = params if mesh is None else shard.compute_params(params, mesh, local_experts, layers=layers)
                loss = loss_fn(cp, local, kernels)
                loss = loss.to_local() if shard._any_dtensor(loss) else loss
                grads = torch.autograd.grad(loss / nb, list(flat.values()), allow_unused=True)
                grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, flat.values())]  # MTP
            losses.append(loss.item() if mesh is None else shard.batch_mean(loss, mesh))
            if i == 0 and mesh is not None:
                gathered = {"peak": shard.gathered_peak(), **_gathered_sizes(params, mesh, local_experts, layers)}
            if i == 0:
                grads0 = {n: (g.full_tensor() if shard._any_dtensor(g) else g).numpy().astype(np.float64)
                          for n, g in zip(flat, grads)}
                placements_ok = [n for n, g, p in zip(flat, grads, flat.values())
                                 if shard._any_dtensor(g) and tuple(g.placements) != tuple(p.placements)]
            for p, g in zip(flat.values(), grads):
                p.grad = g
            opt.step()
            opt.zero_grad(set_to_none=True)
        return losses, grads0, params, (placements_ok if mesh is not None else []), local_experts, gathered

    def eval_loss(params, mesh):
        with torch.no_grad(), shard.compute_context(params):
            kernels = shard.mesh_kernels(mesh, model, cfg)
            loss = loss_fn(shard.compute_params(params, mesh, "moe_dispatch" in kernels), shard.local_batch(tokens, mesh),
                           kernels)
            return shard.batch_mean(loss.to_local() if shard._any_dtensor(loss) else loss, mesh)

    ref = model.init(cfg, backend="torch", seed=0)
    ref_init = {n: v.clone() for n, v in shard._flatten(ref).items()}
    r_losses, r_grads, _, _, _, _ = train(ref, None)
    res = {"ref_losses": r_losses, "meshes": {}}
    finals = {}
    for spec in specs:
        mesh = shard.torch_mesh(shard.parse_mesh(spec, world))
        params = shard.init_params_torch(model, cfg, mesh, seed=0)
        init_diff = max(float((v.full_tensor() - ref_init[n]).abs().max()) for n, v in shard._flatten(params).items())
        lay = shard.layout(model, cfg, mesh)
        shards = {n: {"global": list(v.shape), "local": list(v.to_local().shape), "rules": list(lay[n][2])}
                  for n, v in shard._flatten(params).items()}
        losses, grads, params, bad_pl, dispatch, gathered = train(params, mesh)
        finals[spec] = (mesh, params)
        res["meshes"][spec] = {
            "init_max_diff": init_diff, "losses": losses, "moe_dispatch": dispatch, "grad_placement_mismatch": bad_pl,
            "shards": shards, "gathered": gathered,
            "grad_rel": {n: float(np.abs(g - r_grads[n]).max() / max(np.abs(r_grads[n]).max(), 1e-30))
                         for n, g in grads.items()}}
    (m1, p1), (m2, _) = finals[specs[0]], finals[specs[1]]
    d = tempfile.mkdtemp() if rank == 0 else None
    obj = [d]
    dist.broadcast_object_list(obj, src=0)
    path = os.path.join(obj[0], "ckpt")
    shard.save_checkpoint(path, {n: v.detach() for n, v in shard._flatten(p1).items()})
    p2 = shard.load_checkpoint(path, shard.empty_params_torch(model, cfg, m2))
    res["ckpt"] = {"saved_on": specs[0], "restored_on": specs[1], "loss_saved": eval_loss(p1, m1),
                   "loss_restored": eval_loss(p2, m2),
                   "placements_ok": all(tuple(v.placements) == tuple(shard.placements(model.param_table(cfg)[n].axes, m2))
                                        for n, v in shard._flatten(p2).items())}
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(res, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
    shard.finish_torch_distributed()
