"""Sharding for both backends: one mesh description, one table of logical-axis rules.

The mesh has four named axes, always in this order (a size of 1 switches an axis off):
  data  pure data parallelism (replicated weights, sharded batch)
  fsdp  data parallelism with weights sharded on their `embed` axis (ZeRO-3 / FSDP)
  tp    tensor parallelism: heads, MLP columns/rows and the vocabulary
  ep    expert parallelism: MoE experts (the batch is split over ep too, as in torchtitan and MaxText)

Every parameter in a model file's `param_table(cfg)` names its logical axes (`("layers", "embed", "q_heads",
"head_dim")`); `RULES` maps each logical axis to mesh axes, and that one table gives JAX `NamedSharding`s and
torch DTensor placements. Parameters are checked strictly: two logical axes of one array on the same mesh axis,
or a mesh size that does not divide the dimension, raise `MeshError` (a ValueError whose message is one line;
the commands print it as `error: ...`). Activations use the same table, except that a mesh axis already taken by an
earlier dimension (the batch takes data and fsdp) leaves later dimensions replicated.

JAX: `make_mesh`, `param_shardings`, `init_params` (sharded init inside jit: a model larger than one device is never
whole anywhere), `tree_shardings` (optimizer states), `batch_sharding`, `constrain` / `constrainer` for activations,
`abstract_params` (Orbax restore target on any mesh), `init_distributed` (multi-host).
torch: `torch_mesh`, `placements`, `init_params_torch` (each rank keeps only its shards), `distribute_params`,
`shard_batch`, `compute_params` (what the step computes with; `layers=stacked_names(model, cfg)` gathers one layer
at a time), `compute_context` (DTensor ops mixing plain tensors; the per-layer regather hooks), `gathered_peak`,
`empty_params_torch` (DCP load target).
Imports only numpy here; jax and torch are imported lazily.
"""
import contextlib
import math
import os
import sys

MESH_AXES = ("data", "fsdp", "tp", "ep")

# logical axis -> mesh axis, tuple of mesh axes, or None (replicated). Axes not listed are replicated.
RULES = {
    "batch": ("data", "fsdp", "ep"),
    "seq": None,
    "vocab": "tp",
    "embed": "fsdp",
    "q_heads": "tp",
    "kv_heads": "tp",
    "heads": "tp",
    "mlp": "tp",
    "moe_mlp": "tp",
    "experts": "ep",
    "layers": None,
    "norm": None,
    "head_dim": None,
    # Qwen3-Next: Gated DeltaNet heads over tp; packed per-head projections, the conv channels (q, k, v of all heads
    # side by side), the router's expert outputs and the MTP input stay whole
    "lin_k_heads": "tp",
    "lin_v_heads": "tp",
    "lin_qkvz": None,
    "lin_ba": None,
    "lin_conv": None,
    "conv_k": None,
    "experts_r": None,
    "mtp_fc": None,
}


class MeshError(ValueError):
    """An impossible mesh or rule; the message is one line."""


# ----------------------------------------------------------------------------------------------- mesh description
def parse_mesh(spec, n_devices):
    """'data=..,fsdp=..,tp=..,ep=..' -> {axis: size} over MESH_AXES. Missing axes are 1, except fsdp, which takes
    the devices left over unless another axis is -1 ("the rest"). None or '' means fsdp over every device."""
    given = {}
    for part in (spec or "").replace(" ", "").split(","):
        if not part:
            continue
        key, sep, val = part.partition("=")
        if key not in MESH_AXES or not sep:
            raise MeshError(f"bad --mesh entry {part!r} in {spec!r}: expected axis=size with axis one of "
                            f"{', '.join(MESH_AXES)}")
        if key in given:
            raise MeshError(f"mesh axis {key!r} given twice in {spec!r}")
        try:
            given[key] = int(val)
        except ValueError:
            raise MeshError(f"bad size {val!r} for mesh axis {key!r} in {spec!r}") from None
        if given[key] == 0 or given[key] < -1:
            raise MeshError(f"mesh axis {key}={given[key]} in {spec!r}: sizes are positive or -1 (the rest)")
    rest = [k for k, v in given.items() if v == -1]
    if len(rest) > 1:
        raise MeshError(f"only one mesh axis may be -1 in {spec!r}")
    if not rest and "fsdp" not in given:
        given["fsdp"], rest = -1, ["fsdp"]
    sizes = {a: given.get(a, 1) for a in MESH_AXES}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if rest:
        if n_devices % fixed:
            raise MeshError(f"mesh {spec!r}: the fixed sizes (product {fixed}) do not divide {n_devices} devices")
        sizes[rest[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise MeshError(f"mesh {mesh_str(sizes)} needs {fixed} devices but {n_devices} are present")
    return sizes


def mesh_str(sizes):
    return ",".join(f"{a}={sizes[a]}" for a in MESH_AXES)


def mesh_sizes(mesh):
    """{axis: size} of a JAX Mesh, a torch DeviceMesh or a sizes dict."""
    if isinstance(mesh, dict):
        return {a: mesh.get(a, 1) for a in MESH_AXES}
    if hasattr(mesh, "mesh_dim_names"):  # torch DeviceMesh (only the axes of size > 1)
        got = dict(zip(mesh.mesh_dim_names, mesh.mesh.shape))
        return {a: int(got.get(a, 1)) for a in MESH_AXES}
    return {a: mesh.shape[a] for a in MESH_AXES}


# ----------------------------------------------------------------------------------------------- rules
def logical_to_mesh(axes, rules=None, activation=False, where=""):
    """Logical axes -> one tuple of mesh axes per dimension. Raises MeshError when two dimensions of one parameter
    share a mesh axis; for an activation the later dimension is left replicated instead."""
    rules = RULES if rules is None else rules
    used, out = set(), []
    for ax in axes:
        m = rules.get(ax)
        m = () if m is None else (m,) if isinstance(m, str) else tuple(m)
        if activation:
            m = tuple(a for a in m if a not in used)
        elif used & set(m):
            raise MeshError(f"sharding rules map two axes of {where or axes} to mesh axis "
                            f"{sorted(used & set(m))[0]!r} (axes {tuple(axes)})")
        used |= set(m)
        out.append(m)
    return out


def check_params(table, sizes, rules=None):
    """Every parameter of a param_table can be laid out on a mesh of these sizes, or MeshError (one line)."""
    for name, p in table.items():
        for dim, (n, ms) in enumerate(zip(p.shape, logical_to_mesh(p.axes, rules, where=name))):
            k = math.prod(sizes[a] for a in ms)
            if n % k:
                ax = "*".join(f"{a}={sizes[a]}" for a in ms)
                raise MeshError(f"mesh {ax} does not divide {p.axes[dim]}={n} of parameter {name} {tuple(p.shape)}")


def check_batch(batch_size, sizes):
    k = math.prod(sizes[a] for a in logical_to_mesh(("batch",))[0])
    if batch_size % k:
        raise MeshError(f"batch size {batch_size} is not divisible by the {k} batch shards of mesh {mesh_str(sizes)}")


def _fit(axes, shape, sizes, activation=True):
    """Mesh axes per dimension for an activation, dropping (from the right) mesh axes that do not divide it."""
    out = []
    for n, ms in zip(shape, logical_to_mesh(axes, activation=activation)):
        ms = list(ms)
        while ms and n % math.prod(sizes[a] for a in ms):
            ms.pop()
        out.append(tuple(ms))
    return out


def _unflatten(flat):
    out = {}
    for k, v in flat.items():
        *path, leaf = k.split(".")
        d = out
        for part in path:
            d = d.setdefault(part, {})
        d[leaf] = v
    return out


def _flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def layout(model, cfg, sizes):
    """name -> (global shape, mesh axes per dim, per-device shard shape): what the rules say, for printing/tests."""
    sizes = mesh_sizes(sizes)
    table = model.param_table(cfg)
    check_params(table, sizes)
    out = {}
    for name, p in table.items():
        ms = logical_to_mesh(p.axes)
        out[name] = (tuple(p.shape), ms, tuple(n // math.prod(sizes[a] for a in m) for n, m in zip(p.shape, ms)))
    return out


# ----------------------------------------------------------------------------------------------- JAX
def make_mesh(sizes, devices=None):
    """A jax Mesh with axes MESH_AXES (Auto axis types: XLA propagates shardings through the model)."""
    import jax
    from jax.sharding import AxisType
    sizes = mesh_sizes(sizes)
    devices = list(devices) if devices is not None else jax.devices()
    n = math.prod(sizes.values())
    if n != len(devices):
        raise MeshError(f"mesh {mesh_str(sizes)} needs {n} devices but {len(devices)} are present")
    return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * 4,
                         devices=devices)


def _pspec(ms):
    from jax.sharding import PartitionSpec
    return PartitionSpec(*[None if not m else m[0] if len(m) == 1 else m for m in ms])


def param_shardings(model, cfg, mesh):
    """The params' tree of NamedShardings, from param_table(cfg) and RULES (checked against the mesh)."""
    from jax.sharding import NamedSharding
    table = model.param_table(cfg)
    check_params(table, mesh_sizes(mesh))
    return _unflatten({n: NamedSharding(mesh, _pspec(logical_to_mesh(p.axes, where=n))) for n, p in table.items()})


def init_params(model, cfg, mesh, seed=0, dtype="float32"):
    """model.init run inside jit with sharded outputs: each device computes only its shards, and the values equal
    the unsharded init (jax_threefry_partitionable, the default, makes random bits independent of the layout)."""
    import jax
    sh = param_shardings(model, cfg, mesh)
    return jax.jit(lambda: model.init(cfg, backend="jax", seed=seed, dtype=dtype), out_shardings=sh)()


def shard_params(params, model, cfg, mesh):
    """Lays out params that exist whole (numpy arrays or jax arrays, e.g. from convert.load_hf) on the mesh.
    Numpy leaves are copied shard by shard (make_array_from_callback), so this also works on several hosts."""
    import jax
    import numpy as np
    sh = _flatten(param_shardings(model, cfg, mesh))
    out = {}
    for name, x in _flatten(params).items():
        if isinstance(x, np.ndarray):
            out[name] = jax.make_array_from_callback(x.shape, sh[name], lambda idx, x=x: x[idx])
        else:
            out[name] = jax.device_put(x, sh[name])
    return _unflatten(out)


def abstract_params(model, cfg, mesh, dtype="float32"):
    """ShapeDtypeStructs carrying the target shardings: the restore target of an Orbax checkpoint on any mesh."""
    import jax
    import jax.numpy as jnp
    sh = _flatten(param_shardings(model, cfg, mesh))
    return _unflatten({n: jax.ShapeDtypeStruct(p.shape, jnp.dtype(dtype), sharding=sh[n])
                       for n, p in model.param_table(cfg).items()})


def tree_shardings(tree, model, cfg, mesh):
    """Shardings for a tree keyed like the params (an optax state: mu and nu mirror the params): a leaf whose dict
    path ends with a parameter's name and has its shape gets that parameter's sharding; anything else (step counts)
    is replicated. Leaves may be arrays or ShapeDtypeStructs (jax.eval_shape)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec
    table = model.param_table(cfg)
    sh = _flatten(param_shardings(model, cfg, mesh))
    by_path = {tuple(n.split(".")): n for n in table}
    rep = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        keys = tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
        for i in range(len(keys)):
            name = by_path.get(keys[i:])
            if name is not None and tuple(leaf.shape) == tuple(table[name].shape):
                return sh[name]
        return rep

    return jax.tree_util.tree_map_with_path(pick, tree)


def jit_init(fn, *args, model, cfg, mesh):
    """fn(*args) run under jit with outputs laid out by tree_shardings, e.g. `jit_init(opt.init, params, ...)`:
    optimizer state is created sharded like the params."""
    import jax
    out = tree_shardings(jax.eval_shape(fn, *args), model, cfg, mesh)
    return jax.jit(fn, out_shardings=out)(*args)


def batch_sharding(mesh, ndim=2):
    """NamedSharding for a [batch, seq, ...] input: batch over data, fsdp and ep."""
    from jax.sharding import NamedSharding
    return NamedSharding(mesh, _pspec(logical_to_mesh(("batch",) + ("seq",) * (ndim - 1), activation=True)))


def replicated(mesh):
    from jax.sharding import NamedSharding, PartitionSpec
    return NamedSharding(mesh, PartitionSpec())


def constrain(x, axes, mesh=None):
    """with_sharding_constraint from logical axes (e.g. ("batch", "seq", "embed")); a no-op without a mesh, on a
    one-device mesh, and on torch tensors (DTensor carries its own placements). A mesh axis that does not divide
    a dimension (a decode batch of 1) is dropped for that dimension."""
    if mesh is None or type(x).__module__.startswith("torch"):
        return x
    import jax
    from jax.sharding import NamedSharding
    sizes = mesh_sizes(mesh)
    if math.prod(sizes.values()) == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, _pspec(_fit(axes, x.shape, sizes))))


def constrainer(mesh):
    """The callable model code receives through its kernels dict: kernels["constrain"](x, logical_axes) -> x."""
    return lambda x, axes: constrain(x, axes, mesh)


EXPERT_AXES = {"w_gate": ("experts", "embed", "moe_mlp"), "w_up": ("experts", "embed", "moe_mlp"),
               "w_down": ("experts", "moe_mlp", "embed")}


def moe_dispatch(mesh, capacity_factor=None):
    """Expert parallelism for the MoE layers on a JAX mesh with ep > 1 (a torch mesh with ep > 1 or tp > 1), or None
    otherwise. The callable goes in
    the model's kernels dict as kernels["moe_dispatch"] and is called by the model's MoE block as
        dispatch(x [N, E], idx [N, K] expert of each token-slot, weights {w_gate, w_up, w_down}, experts)
    where experts(xs, weights, group_sizes) is the model's grouped SwiGLU over rows sorted by expert. It returns the
    expert output of every token-slot, [N, K, E], which the model weights and sums as before.

    Inside a shard_map, each device holds its batch rows (split over data, fsdp, ep) and its X/ep experts (their
    embed dimension gathered over fsdp, their moe_mlp columns left split over tp). Each device sorts its token-slots
    by expert, so the slots for the experts of ep-peer d are one contiguous run, and one all_to_all over ep sends
    every run to its peer; the peer sorts what it received by its local expert, runs the grouped matmul (a psum over
    tp adds the column halves), and a second all_to_all sends the results back to the same places. XLA:CPU has no
    ragged all-to-all, so each run travels in a fixed buffer: S rows per peer (S = the device's token-slots) is
    dropless; capacity_factor c shrinks it to ceil(c * S / ep) rows and drops the overflow (zero output)."""
    sizes = mesh_sizes(mesh)
    ep = sizes["ep"]
    if hasattr(mesh, "mesh_dim_names"):
        return _moe_dispatch_torch(mesh) if ep > 1 or sizes["tp"] > 1 else None
    if ep == 1:
        return None
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec
    batch = _pspec(logical_to_mesh(("batch",), activation=True))[0]
    spec = {n: _pspec(logical_to_mesh(a)) for n, a in EXPERT_AXES.items()}
    gather = {n: [(i, m[0]) for i, m in enumerate(logical_to_mesh(a)) if m and m[0] in ("data", "fsdp")]
              for n, a in EXPERT_AXES.items()}

    def local(x, idx, weights, experts):
        w = dict(weights)
        for n, axes in gather.items():  # FSDP: the whole embed dimension of this device's experts
            for i, ax in axes:
                w[n] = jax.lax.all_gather(w[n], ax, axis=i, tiled=True)
        n_tok, K = idx.shape
        S, Xl = n_tok * K, w["w_gate"].shape[0]
        cap = S if capacity_factor is None else max(1, min(S, math.ceil(capacity_factor * S / ep)))
        flat = idx.reshape(-1)
        order = jnp.argsort(flat, stable=True)                   # slots by (peer, local expert), token order within
        e_sorted = flat[order]
        peer = e_sorted // Xl
        counts = jnp.bincount(flat, length=Xl * ep).reshape(ep, Xl)  # slots for each expert of each peer
        start = jnp.cumsum(counts.sum(1)) - counts.sum(1)
        pos = jnp.arange(S) - start[peer]                        # place in the peer's run
        keep = pos < cap
        dest = jnp.where(keep, peer * cap + pos, ep * cap)         # row ep*cap: the dump for dropped slots
        send = jnp.zeros((ep * cap + 1, x.shape[1]), x.dtype).at[dest].set(x[order // K])[:-1]
        recv = jax.lax.all_to_all(send.reshape(ep, cap, -1), "ep", 0, 0)          # [source, cap, E]
        got = jnp.minimum(jax.lax.all_to_all(counts, "ep", 0, 0), cap)            # what each source sent me
        got = jnp.minimum(jnp.cumsum(got, 1), cap)                 # cut at the buffer: later experts lose rows first
        row = jnp.arange(cap)
        expert = (row[None, :, None] >= got[:, None, :]).sum(-1)  # local expert of each received row; Xl = padding
        perm = jnp.argsort(expert.reshape(-1), stable=True)
        group = jnp.bincount(expert.reshape(-1), length=Xl + 1)[:Xl]
        ys = experts(recv.reshape(ep * cap, -1)[perm], w, group)
        ys = jax.lax.psum(ys, "tp")                                # moe_mlp columns split over tp (size 1: a no-op)
        ys = jnp.zeros_like(ys).at[perm].set(ys)                   # back to [source, row] order
        back = jax.lax.all_to_all(ys.reshape(ep, cap, -1), "ep", 0, 0).reshape(ep * cap, -1)
        back = jnp.concatenate([back, jnp.zeros_like(back[:1])], 0)[dest]   # dropped slots read the zero row
        out = jnp.zeros_like(back).at[order].set(back)              # token-major slots
        return out.reshape(n_tok, K, -1)

    def dispatch(x, idx, weights, experts):
        names = sorted(weights)
        f = jax.shard_map(lambda x, idx, *ws: local(x, idx, dict(zip(names, ws)), experts), mesh=mesh,
                          in_specs=(PartitionSpec(batch, None), PartitionSpec(batch, None),
                                    *[spec[n] for n in names]),
                          out_specs=PartitionSpec(batch, None, None))
        return f(x, idx, *[weights[n] for n in names])
    return dispatch


def mesh_kernels(mesh, model, cfg):
    """What a mesh adds to a model's kernels dict: "constrain" (JAX activation shardings) and, for MoE models on a
    mesh with ep > 1 (or a torch mesh with tp > 1), "moe_dispatch" (all-to-all expert parallelism, tp-split expert
    columns on torch; on torch it needs compute_params(..., experts_local=True)). Empty without a mesh."""
    if mesh is None or math.prod(mesh_sizes(mesh).values()) == 1:
        return {}
    out = {} if hasattr(mesh, "mesh_dim_names") else {"constrain": constrainer(mesh)}
    torch_tp = "constrain" not in out and mesh_sizes(mesh)["tp"] > 1
    if any("experts" in p.axes for p in model.param_table(cfg).values()) and (mesh_sizes(mesh)["ep"] > 1 or torch_tp):
        out["moe_dispatch"] = moe_dispatch(mesh)
    return out


def init_distributed():
    """jax.distributed.initialize when launched on several hosts; a no-op on one. Driven by the environment:
    JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID) explicitly, or the clusters JAX detects by
    itself (TPU pod slices, SLURM with several tasks, Open MPI). Returns (process_index, process_count)."""
    import jax
    env = os.environ
    multi = (env.get("JAX_COORDINATOR_ADDRESS") or int(env.get("JAX_NUM_PROCESSES", "1")) > 1
             or int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
             or len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1)
    if multi and not jax.distributed.is_initialized():
        kw = {}
        if env.get("JAX_COORDINATOR_ADDRESS"):
            kw = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                      num_processes=int(env.get("JAX_NUM_PROCESSES", "1")),
                      process_id=int(env.get("JAX_PROCESS_ID", "0")))
        jax.distributed.initialize(**kw)
    return jax.process_index(), jax.process_count()


# ----------------------------------------------------------------------------------------------- torch
def init_torch_distributed():
    """torch.distributed from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR): NCCL on GPUs,
    gloo on CPU; a no-op without torchrun. Returns (rank, world_size, device)."""
    import torch
    import torch.distributed as dist
    cuda = torch.cuda.is_available()
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def finish_torch_distributed():
    """End a torchrun rank that is done: a barrier (every rank finished its collectives), the process groups
    destroyed, stdout/stderr flushed, then os._exit(0) without the interpreter's finalization. There, gloo's C++
    threads could still drop the last work objects, whose tensors hold Python references, while the interpreter is
    shutting down, and a rank aborted with "terminate called without an active exception" after its work was done
    (seen in CI's 4-rank gloo jobs on 2 cores, rarely). A no-op without torch.distributed."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def torch_mesh(sizes, device_type=None):
    """A torch DeviceMesh over the process group's ranks whose dims are the axes of MESH_AXES with size > 1, in that
    order (DTensor's sharding propagation grows with the number of mesh dims, so size-1 axes are left out; a
    one-process run gets a 1-dim mesh named 'data')."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    sizes = mesh_sizes(sizes)
    names = tuple(a for a in MESH_AXES if sizes[a] > 1) or ("data",)
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    return init_device_mesh(device_type, tuple(sizes[a] for a in names), mesh_dim_names=names)


def placements(axes, mesh, activation=False, where=""):
    """DTensor placements (one per dim of the torch mesh) for an array with these logical axes."""
    from torch.distributed.tensor import Replicate, Shard
    names = list(mesh.mesh_dim_names)
    pl = [Replicate()] * len(names)
    for d, ms in enumerate(logical_to_mesh(axes, activation=activation, where=where)):
        for a in ms:
            if a in names:
                pl[names.index(a)] = Shard(d)
    return pl


def _local_slice(full, mesh, pls):
    """This rank's block of a whole tensor under even Shard placements (dims checked to divide)."""
    coord = mesh.get_coordinate()
    for i, pl in enumerate(pls):
        if pl.is_shard():
            n = mesh.mesh.shape[i]
            full = full.chunk(n, dim=pl.dim)[coord[i]]
    return full


def _dtensor(local, mesh, pls, shape):
    import torch
    from torch.distributed.tensor import DTensor
    local = local.contiguous()
    stride = tuple(int(s) for s in torch.empty(shape, device="meta").stride())
    return DTensor.from_local(local, mesh, pls, run_check=False, shape=torch.Size(shape), stride=stride)


def init_params_torch(model, cfg, mesh, seed=0, dtype="float32", device=None):
    """Params as DTensors with placements from RULES, equal to model.init(cfg, "torch", seed, dtype). No rank holds
    a whole weight: a normal leaf's random stream is drawn in pieces and only this rank's elements are kept
    (_normal_block); ones/zeros are made at shard size; other inits (Qwen3-Next's A_log, a small vector) come from
    model.init restricted to that leaf. Blocks are made on the CPU and moved to `device`."""
    import torch
    table = model.param_table(cfg)
    check_params(table, mesh_sizes(mesh))
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if mesh.device_type == "cuda" else torch.device("cpu")
    xp = model.shim("torch")
    streamed = _stream_matches(model)
    out = {}
    for name, p in table.items():
        pls = placements(p.axes, mesh, where=name)
        lo, size = _local_box(p.shape, mesh, pls)
        if p.init == "normal" and streamed:
            local = _normal_block(model, seed, name, p.shape, lo, size)
            local = (cfg.initializer_range * local).to(xp.dtype(dtype))  # as the shim's normal: scale, then cast
        elif p.init == "normal":
            local = _local_slice(xp.normal(seed, name, p.shape, cfg.initializer_range, dtype), mesh, pls)
        elif p.init in ("ones", "zeros"):
            local = torch.full(size, 1.0 if p.init == "ones" else 0.0, dtype=xp.dtype(dtype))
        else:
            local = _local_slice(_init_leaf(model, cfg, name, seed, dtype), mesh, pls)
        out[name] = _dtensor(local.to(device), mesh, pls, p.shape)
    return _unflatten(out)


def _local_box(shape, mesh, pls):
    """(start, size) per dim of this rank's block under even Shard placements (as _local_slice cuts it)."""
    lo, size = [0] * len(shape), list(shape)
    coord = mesh.get_coordinate()
    for i, pl in enumerate(pls):
        if pl.is_shard():
            c = size[pl.dim] // mesh.mesh.shape[i]
            lo[pl.dim] += coord[i] * c
            size[pl.dim] = c
    return lo, size


PIECE = 1 << 20  # random numbers drawn at a time by _normal_block (a multiple of 16)


def _normal_block(model, seed, name, shape, lo, size, piece=PIECE):
    """The block [lo, lo + size) of torch.randn(shape) from the model shim's per-leaf generator (unscaled float32),
    drawing the leaf's stream `piece` numbers at a time and keeping only the block's elements. Equal to slicing
    the whole draw because torch's CPU normal turns a sequential stream of uniforms into normals 16 at a time
    (the last 16 redrawn when the size is not a multiple of 16, kept here by never ending on a piece shorter than
    16); _stream_matches checks this against the shim once per model file. Stops once the block is complete."""
    import torch
    g = torch.Generator().manual_seed((seed * 1000003 + model._name_hash(name)) % 2**63)  # as the shim's normal
    idx = torch.zeros((), dtype=torch.int64)
    for d in range(len(shape)):
        stride = math.prod(shape[d + 1:])
        idx = idx[..., None] + ((lo[d] + torch.arange(size[d])) * stride)  # flat index of each block element
    idx = idx.reshape(-1)
    out = torch.empty(idx.numel(), dtype=torch.float32)
    total, start, done = math.prod(shape), 0, 0
    while done < idx.numel():
        end = min(start + piece, total)
        if total - end < 16:
            end = total
        vals = torch.randn(end - start, generator=g, dtype=torch.float32)
        stop = int(torch.searchsorted(idx, end))
        out[done:stop] = vals[idx[done:stop] - start]
        done, start = stop, end
    return out.reshape(size)


_STREAM_OK = {}


def _stream_matches(model):
    """Whether _normal_block reproduces this model's torch shim bit for bit (a small leaf, drawn in 64-number pieces,
    whole and one block); if not, init_params_torch falls back to making each normal leaf whole."""
    if model.__name__ not in _STREAM_OK:
        import torch
        ok = hasattr(model, "_name_hash")
        if ok:
            shape = (3, 7, 157)  # 3297 numbers: not a multiple of 16
            ref = model.shim("torch").normal(5, "check.w", shape, 1.0, "float32")
            ok = (torch.equal(_normal_block(model, 5, "check.w", shape, [0, 0, 0], list(shape), piece=64), ref)
                  and torch.equal(_normal_block(model, 5, "check.w", shape, [1, 2, 40], [2, 3, 100], piece=64),
                                  ref[1:3, 2:5, 40:140]))
        _STREAM_OK[model.__name__] = ok
    return _STREAM_OK[model.__name__]


def _init_leaf(model, cfg, name, seed, dtype):
    """One leaf of model.init(cfg, "torch", seed, dtype), for init kinds shard.py does not know: model.init run over
    a param_table restricted to that leaf (patched on the module for the call), so no other leaf is made."""
    whole_table = model.param_table
    model.param_table = lambda c: {n: p for n, p in whole_table(c).items() if n == name}
    try:
        return _flatten(model.init(cfg, backend="torch", seed=seed, dtype=dtype))[name]
    finally:
        model.param_table = whole_table


def distribute_params(params, model, cfg, mesh):
    """Whole torch params (each rank holding the same values, e.g. from convert.load_hf) -> DTensors, keeping only
    this rank's blocks (no communication)."""
    table = model.param_table(cfg)
    check_params(table, mesh_sizes(mesh))
    out = {}
    for name, x in _flatten(params).items():
        pls = placements(table[name].axes, mesh, where=name)
        dev = x.device if mesh.device_type == x.device.type else mesh.device_type
        out[name] = _dtensor(_local_slice(x, mesh, pls).to(dev), mesh, pls, tuple(x.shape))
    return _unflatten(out)


def empty_params_torch(model, cfg, mesh, dtype="float32"):
    """Zero DTensors laid out for this mesh: the state dict a DCP checkpoint is loaded into (any saving mesh)."""
    import torch
    from torch.distributed.tensor import zeros
    return _unflatten({n: zeros(p.shape, dtype=getattr(torch, dtype), device_mesh=mesh,
                                placements=placements(p.axes, mesh, where=n)) for n, p in model.param_table(cfg).items()})


def shard_batch(x, mesh, axes=("batch", "seq")):
    """A whole batch (the same on every rank) -> a DTensor sharded over data/fsdp/ep; this rank keeps its rows."""
    pls = placements(axes, mesh, activation=True)
    return _dtensor(_local_slice(x, mesh, pls), mesh, pls, tuple(x.shape))


def batch_from_local(x, mesh, axes=("batch", "seq")):
    """This rank's rows of the batch (a per-rank data loader) -> the global batch as a DTensor."""
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(x, mesh, placements(axes, mesh, activation=True), run_check=False)


def compute_context(x=None):
    """The context the torch forward and backward run in on a mesh: plain tensors made inside the model (positions,
    masks, RoPE tables) are treated as replicated over tp, and the autograd graph keeps a recipe in place of each
    per-layer gathered weight (compute_params(layers=...)). A null context for plain (unsharded) params."""
    import torch
    from torch.distributed.tensor import DTensor
    if x is not None and not isinstance(x, DTensor) and not _any_dtensor(x):
        return contextlib.nullcontext()
    from torch.distributed.tensor.experimental import implicit_replication
    stack = contextlib.ExitStack()
    stack.enter_context(implicit_replication())
    stack.enter_context(torch.autograd.graph.saved_tensors_hooks(_REGATHER.pack, _REGATHER.unpack))
    return stack


def _any_dtensor(tree):
    from torch.distributed.tensor import DTensor
    if isinstance(tree, dict):
        return any(_any_dtensor(v) for v in tree.values())
    return isinstance(tree, DTensor)


BATCH_AXES = ("data", "fsdp", "ep")


def compute_params(params, mesh, experts_local=False, layers=()):
    """Stored DTensor params -> what the torch forward computes with, FSDP2-style: every mesh axis the batch is
    split over (data, fsdp, ep) is all-gathered, and its gradient comes back as a partial sum that the backward
    reduce-scatters onto the stored shards (all-reduce for data). Weights sharded over tp stay sharded: they become
    DTensors on the tp sub-mesh, so DTensor runs the heads / MLP columns / vocab in parallel and inserts the
    all-reduces; without tp they are plain tensors and the forward runs at single-device speed.
    experts_local: expert weights split over ep (w_gate/w_up/w_down) keep only this rank's experts, for moe_dispatch's
    all-to-all expert parallelism (their gradients then arrive whole for those experts from the ep group).
    layers: flat names of the leaves with a leading layer axis (stacked_names(model, cfg)). Those are gathered one
    layer at a time, when the model's layer loop takes layer i's slice, and are not kept: under compute_context the
    autograd graph saves a recipe for them instead of the gathered tensor, and the backward gathers the layer
    again (with remat the checkpoint recomputes the slice). So a rank holds the whole of one layer at a time, plus
    the embedding, final norm and head, as FSDP2 with reshard_after_forward does. Other leaves are gathered here.
    Call inside the training step (differentiable); run forward and backward under compute_context(params)."""
    from torch.distributed.tensor import DTensor
    names = list(mesh.mesh_dim_names)
    tp = names.index("tp") if "tp" in names else None
    out = {}
    for n, p in _flatten(params).items():
        if not isinstance(p, DTensor):
            out[n] = p
            continue
        expert = experts_local and n.rsplit(".", 1)[-1] in EXPERT_AXES  # the routed experts' SwiGLU weights
        if n in layers:
            out[n] = _LayerStack(p, mesh, tp, expert)
        else:
            out[n] = _gather(p, None, p.placements, p.shape, mesh, tp, expert)[0]
    return _unflatten(out)


def stacked_names(model, cfg):
    """Flat names of a model's leaves with a leading layer axis (compute_params(layers=...))."""
    return frozenset(n for n, p in model.param_table(cfg).items() if p.axes and p.axes[0] == "layers")


def _gather(p, local, pls, shape, mesh, tp, expert):
    """A stored DTensor p, or one layer's block `local` of it (placements pls, global shape), -> the tensor to compute
    with (see compute_params), and whether that took communication."""
    import torch
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    names = list(mesh.mesh_dim_names)
    keep = lambda i, pl: i == tp or (expert and names[i] == "ep" and isinstance(pl, Shard))  # noqa: E731
    gather = [pl if keep(i, pl) else Replicate() for i, pl in enumerate(pls)]
    grad = [pl if keep(i, pl) else Partial() if names[i] in BATCH_AXES else Replicate()
            for i, pl in enumerate(gather)]
    x = p if local is None else DTensor.from_local(local, mesh, pls, shape=torch.Size(shape),
                                                    stride=_contiguous_stride(shape), run_check=False)
    full = x.redistribute(mesh, gather).to_local(grad_placements=grad)
    out = full if tp is None else DTensor.from_local(full, mesh["tp"], [gather[tp]], run_check=False)
    return out, list(gather) != list(pls)


def _contiguous_stride(shape):
    st, acc = [], 1
    for d in reversed(tuple(shape)):
        st.append(acc)
        acc *= d
    return tuple(reversed(st))


class _LayerStack:
    """A stored stacked DTensor leaf [L, ...] seen by the model's layer loop: `.shape`, `reshape` of the leading layer
    axis (Qwen3-Next's blocks) and integer indexing, which gathers that one layer (compute_params). The stored local
    shard is unbound once, so the layers' gradients are stacked back in one node."""

    def __init__(self, p, mesh, tp, expert, lead=None, offset=0, cell=None, cast=None):
        self.p, self.mesh, self.tp, self.expert, self.cast = p, mesh, tp, expert, cast
        self.lead = tuple(lead or p.shape[:1])
        self.offset, self.cell = offset, cell if cell is not None else [None]  # the unbound shards, shared
        self.shape = self.lead + tuple(p.shape[1:])
        self.dtype, self.ndim = cast or p.dtype, len(self.shape)

    def _like(self, lead, offset, cast):
        return _LayerStack(self.p, self.mesh, self.tp, self.expert, lead, offset, self.cell, cast)

    def to(self, dtype):
        """Mixed precision: each layer is cast once gathered (so its gradient is reduced in float32)."""
        return self if dtype == self.dtype else self._like(self.lead, self.offset, dtype)

    def reshape(self, *shape):
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else tuple(shape)
        k = len(shape) - (self.ndim - len(self.lead))
        if k < 1 or tuple(shape[k:]) != self.shape[len(self.lead):] or math.prod(shape[:k]) != math.prod(self.lead):
            raise NotImplementedError(f"a stacked layer leaf {self.shape} reshaped to {shape}: only the layer axis "
                                      "may be split")
        return self._like(shape[:k], self.offset, self.cast)

    def __len__(self):
        return self.lead[0]

    def __getitem__(self, i):
        if not isinstance(i, int):
            raise NotImplementedError("a stacked layer leaf takes integer indices only")
        i = range(self.lead[0])[i]
        step = math.prod(self.lead[1:])
        if len(self.lead) > 1:
            return self._like(self.lead[1:], self.offset + i * step, self.cast)
        from torch.distributed.tensor import Shard
        layer = self.offset + i
        pls = [Shard(pl.dim - 1) if isinstance(pl, Shard) else pl for pl in self.p.placements]
        shard, cast = self._units()[layer], self.cast or self.p.dtype
        out, moved = _gather(None, shard, pls, self.p.shape[1:], self.mesh, self.tp, self.expert)
        out = out.to(cast)  # after the gather: the gradients are reduced in float32
        if moved:
            sd = shard.detach()
            _REGATHER.register(out, lambda: _gather(None, sd, pls, self.p.shape[1:], self.mesh, self.tp,
                                                   self.expert)[0].to(cast))
        return out

    def _units(self):
        if self.cell[0] is None:  # differentiable: the layers' gradients come back here as one stack
            self.cell[0] = self.p.to_local().unbind(0)
        return self.cell[0]


class _Regather:
    """The gathered layer weights alive now, by storage, with the recipe that gathers each again; the saved-tensor
    hooks of compute_context save the recipe in the autograd graph instead of the tensor. Also counts the bytes of
    gathered layer weights alive at once (peak), which the tests read."""

    def __init__(self):
        import weakref
        self.weakref, self.live, self.bytes, self.peak = weakref, {}, 0, 0

    def reset_peak(self):
        self.peak = self.bytes

    def _base(self, t):
        return getattr(t, "_local_tensor", t)

    def register(self, t, fn):
        base = self._base(t)
        key, nbytes = base.untyped_storage().data_ptr(), base.untyped_storage().nbytes()
        self.live[key] = (self.weakref.ref(base), fn)
        self.bytes += nbytes
        self.peak = max(self.peak, self.bytes)
        self.weakref.finalize(base, self._gone, key, nbytes)

    def _gone(self, key, nbytes):
        self.bytes -= nbytes
        ent = self.live.get(key)
        if ent is not None and ent[0]() is None:
            del self.live[key]

    def pack(self, t):
        import torch
        base = self._base(t)
        if not isinstance(base, torch.Tensor) or base.layout != torch.strided:
            return t
        ent = self.live.get(base.untyped_storage().data_ptr()) if base.untyped_storage().nbytes() else None
        if ent is None or ent[0]() is None:
            return t
        meta = (tuple(base.shape), base.stride(), base.storage_offset())
        spec = (t.device_mesh, t.placements, tuple(t.shape), t.stride()) if base is not t else None
        return ("regather", ent[1], meta, spec)

    def unpack(self, saved):
        if not (isinstance(saved, tuple) and len(saved) == 4 and saved[0] == "regather"):
            return saved
        import torch
        from torch.distributed.tensor import DTensor
        _, fn, (shape, stride, offset), spec = saved
        with torch.no_grad():
            whole = self._base(fn())
            self.bytes += whole.untyped_storage().nbytes()  # counted while alive, as in the forward
            self.peak = max(self.peak, self.bytes)
            self.weakref.finalize(whole, self._gone, None, whole.untyped_storage().nbytes())
            view = whole.as_strided(shape, stride, offset)
            if spec is None:
                return view
            mesh, pls, gshape, gstride = spec
            return DTensor.from_local(view, mesh, pls, shape=torch.Size(gshape), stride=gstride, run_check=False)


_REGATHER = _Regather()


def gathered_peak(reset=False):
    """Bytes of per-layer gathered weights alive at once since the last reset (compute_params(layers=...))."""
    peak = _REGATHER.peak
    if reset:
        _REGATHER.reset_peak()
    return peak


def _moe_dispatch_torch(mesh):
    """moe_dispatch on a torch DeviceMesh (see the JAX version for the contract).
    ep > 1: this rank's token-slots, sorted by expert, go to the ep-peer holding their expert with one
    all_to_all_single of uneven splits (dropless; the split sizes are exchanged first, a host sync), the peer runs
    the grouped matmul over its experts (the weights from compute_params(..., experts_local=True)) and a second
    all_to_all_single sends the outputs back. Differentiable (torch.distributed.nn's all_to_all_single).
    tp > 1: the routing stays in DTensor (replicated over tp); the experts run on local tensors, each tp rank with
    its moe_mlp columns of w_gate/w_up and rows of w_down, so its outputs are a partial sum (a Partial DTensor) that
    one all-reduce over tp completes. The input's gradient is partial in the same way (grad_placements)."""
    import torch
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_fn
    sizes = mesh_sizes(mesh)
    ep = sizes["ep"]
    group = mesh["ep"].get_group() if ep > 1 else None
    tp_mesh = mesh["tp"] if sizes["tp"] > 1 else None

    def local(x, idx, weights, experts):
        n_tok, K = idx.shape
        Xl = weights["w_gate"].shape[0]
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)               # slots by (peer, local expert), token order within
        counts = torch.bincount(flat, minlength=Xl * ep)
        xs = x[order // K]
        if group is None:                                      # all experts here (tp only)
            ys = experts(xs, weights, counts)
            return ys[torch.argsort(order)].reshape(n_tok, K, -1)
        counts = counts.reshape(ep, Xl)
        got = torch.empty_like(counts)
        dist.all_to_all_single(got, counts, group=group)         # [source, local expert] rows coming to me
        send, recv = counts.sum(1).tolist(), got.sum(1).tolist()
        rx = dist_fn.all_to_all_single(xs.new_empty((sum(recv), x.shape[1])), xs, recv, send, group=group)
        expert = torch.repeat_interleave(torch.arange(Xl, device=x.device).repeat(ep), got.reshape(-1))
        perm = torch.argsort(expert, stable=True)                # received rows grouped by local expert
        ys = experts(rx[perm], weights, got.sum(0))
        ys = ys[torch.argsort(perm)]
        back = dist_fn.all_to_all_single(ys.new_empty((sum(send), ys.shape[1])), ys, send, recv, group=group)
        return back[torch.argsort(order)].reshape(n_tok, K, -1)

    def dispatch(x, idx, weights, experts):
        from torch.distributed.tensor import DTensor, Partial, Replicate
        if tp_mesh is None or not isinstance(x, DTensor):
            return local(x, idx, weights, experts)
        x = x.redistribute(tp_mesh, [Replicate()])              # x may arrive as a partial sum (after a norm)
        xl = x.to_local(grad_placements=[Partial()])             # each rank's columns add to x's gradient
        il = idx.redistribute(tp_mesh, [Replicate()]).to_local() if isinstance(idx, DTensor) else idx
        wl = {n: w.to_local() if isinstance(w, DTensor) else w for n, w in weights.items()}
        y = local(xl, il, wl, experts)
        return DTensor.from_local(y, tp_mesh, [Partial()], run_check=False).redistribute(tp_mesh, [Replicate()])
    return dispatch


def batch_shards(mesh):
    """(index of this rank's batch shard, number of batch shards) over the data, fsdp and ep axes."""
    names = list(mesh.mesh_dim_names)
    coord = mesh.get_coordinate()
    idx, n = 0, 1
    for a in BATCH_AXES:
        if a in names:
            k = mesh.mesh.shape[names.index(a)]
            idx, n = idx * k + coord[names.index(a)], n * k
    return idx, n


def local_batch(x, mesh):
    """This rank's rows of a whole batch (the same on every rank): split over data, fsdp and ep, equal over tp."""
    idx, n = batch_shards(mesh)
    if x.shape[0] % n:
        raise MeshError(f"batch size {x.shape[0]} is not divisible by the {n} batch shards of the mesh")
    return x.chunk(n, dim=0)[idx]


def batch_mean(x, mesh):
    """The mean over batch shards of a per-rank scalar (a local loss), as a float, for logging."""
    import torch
    import torch.distributed as dist
    t = (x.full_tensor() if _any_dtensor(x) else x).detach().float().reshape(1).clone()
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return float(t.item())


def grads_like(grads, params):
    """Gradients (DTensors from torch.autograd.grad) redistributed to their parameters' placements, so an optimizer
    updates each shard locally."""
    from torch.distributed.tensor import DTensor
    flat_p = _flatten(params) if isinstance(params, dict) else None

    def fix(g, p):
        if isinstance(g, DTensor) and tuple(g.placements) != tuple(p.placements):
            return g.redistribute(p.device_mesh, p.placements)
        return g

    if flat_p is None:
        return [fix(g, p) for g, p in zip(grads, params)]
    return _unflatten({n: fix(g, flat_p[n]) for n, g in _flatten(grads).items()})


# ----------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path, tree):
    """Saves a tree of sharded arrays, every process writing only its shards: Orbax for jax arrays, torch DCP for
    (D)Tensors. `path` is a folder that must not exist yet."""
    leaf = next(iter(_flatten(tree).values()))
    if type(leaf).__module__.startswith("torch"):
        import torch.distributed.checkpoint as dcp
        dcp.save(_flatten(tree), checkpoint_id=path)
        return
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.abspath(path), tree)


def load_checkpoint(path, target):
    """Restores a checkpoint onto the layout of `target`, whatever mesh it was saved from: for JAX a tree of
    ShapeDtypeStructs with shardings (abstract_params), for torch a tree of DTensors (empty_params_torch, filled in
    place and returned)."""
    leaf = next(iter(_flatten(target).values()))
    if type(leaf).__module__.startswith("torch"):
        import torch.distributed.checkpoint as dcp
        flat = _flatten(target)
        dcp.load(flat, checkpoint_id=path)
        return _unflatten(flat)
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.path.abspath(path), target)
