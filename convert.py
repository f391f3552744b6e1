"""Checkpoints in and out, without transformers: Hugging Face safetensors <-> our param trees, Orbax and torch DCP.

    model, cfg, params = convert.load_hf("path/or/hub-id", backend="jax", dtype="float32")
    model, cfg, params = convert.load_checkpoint("hf-folder-or-our-folder", backend="torch")
    python convert.py hf2orbax --hf SRC --out DIR      # also orbax2hf --ckpt DIR --out DIR, hf2dcp, dcp2hf

Every model file describes its weights in `hf_entries(cfg, keys)`; loading reads each HF tensor straight from the
safetensors file, checks its shape and turns it into our einsum-ready layout. Every expected tensor must be there and
every tensor in the checkpoint must be used (an lm_head equal to a tied embedding is fine).

Our checkpoint folder (written by the hf2* commands, `write_params` and train.py):
    nanoqwen.json   {"format": "orbax" | "dcp", "model_type", "config": cfg.to_hf() (config.json's fields),
                     "dtype": the params' dtype ("mixed" if several), "layout": "scanned" | "unscanned", "version": 1}
                    written last: a folder without it is not a checkpoint.
    params/         orbax: an Orbax PyTree checkpoint (OCDBT) of the nested param dict as numpy arrays, restorable
                      with `orbax.checkpoint.PyTreeCheckpointer().restore(DIR/params)`; stacked arrays are chunked
                      one layer per chunk, so a layer can be read alone.
                    dcp: `torch.distributed.checkpoint` of the flat {name: tensor} dict ("layers.wq", ...).
                    layout "scanned" keeps the stacked leading layer axis ("layers.wq" [L, E, H, D]); "unscanned"
                    stores each layer's slice as its own leaf ("layers.0.wq" [E, H, D], "layers.1.wq", ...).
                    Either way `read_params` returns the stacked tree, on either backend.
    tokenizer.json, tokenizer_config.json, generation_config.json, ...: copied from the HF source, copied back on
                    export (so generate.py --ckpt finds a tokenizer).
    anything else   (train.py's optimizer state, step, RNG, data position) is ignored by read_params and export.

Conversion streams: a tensor is read, transformed and written before the next is read (a stacked param one layer at
a time), so memory stays near the largest tensor, not the model. Inputs are validated (config, every header, names,
shapes) before anything is written, and outputs go to a temporary folder renamed into place when complete.
"""
import contextlib
import importlib
import json
import math
import os
import shutil
import struct
import sys
import tempfile
import time

import numpy as np

from shard import _unflatten as _nest  # one dotted-name nesting for the project's trees

MODELS = {"qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3_moe", "qwen3_next": "qwen3_next"}


class UserError(Exception):
    """A user's mistake: reported as one line on stderr with a non-zero exit, never a traceback."""


def model_module(model_type, where=""):
    if model_type not in MODELS:
        raise UserError(f"{where}unknown model_type {model_type!r} (known: {', '.join(MODELS)})")
    return importlib.import_module(MODELS[model_type])


# ----------------------------------------------------------------------------------------------- reading HF folders
def resolve(src):
    """A local folder, or a hub id resolved with huggingface_hub (which honours HF_HUB_OFFLINE and its cache)."""
    if os.path.isdir(src):
        return src
    if os.path.exists(src):
        raise UserError(f"{src}: not a folder (expected a Hugging Face checkpoint folder)")
    if src.count("/") != 1 or src.startswith((".", "/")):
        raise UserError(f"{src}: no such folder")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(src, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"])
    except Exception as e:  # offline, unknown repo, no network
        raise UserError(f"{src}: not a local folder and not fetchable from the hub ({type(e).__name__})") from None


def read_config(folder):
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise UserError(f"{path}: missing (not a Hugging Face checkpoint folder)")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None


def safetensors_files(folder):
    """The checkpoint's safetensors files: those named by model.safetensors.index.json, else every *.safetensors."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise UserError(f"{folder}: no *.safetensors files")
    paths = [os.path.join(folder, f) for f in files]
    for p in paths:
        if not os.path.exists(p):
            raise UserError(f"{p}: missing (named in model.safetensors.index.json)")
    return paths


ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
             "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _raw_header(path):
    """(header dict, start of the data) of a safetensors file, validated against the file size."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise UserError(f"{path}: truncated or not a safetensors file")
        n = struct.unpack("<Q", raw)[0]
        if n > size - 8 or n > 1 << 30:
            raise UserError(f"{path}: corrupt safetensors header")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{path}: corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: corrupt safetensors header")
    end = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        try:
            a, b = v["data_offsets"]
            nbytes = math.prod(v["shape"]) * np_dtype(ST_DTYPES[v["dtype"]]).itemsize
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: corrupt safetensors header entry {k!r}") from None
        if b - a != nbytes or a < 0:
            raise UserError(f"{path}: {k} has {b - a} bytes, shape {v['shape']} {v['dtype']} needs {nbytes}")
        end = max(end, b)
    if 8 + n + end > size:
        raise UserError(f"{path}: truncated ({size} bytes, header promises {8 + n + end})")
    return header, 8 + n


def read_header(path):
    """The safetensors header {name: (dtype, shape)}, validated against the file size (catches truncation)."""
    header, _ = _raw_header(path)
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"}


class Checkpoint:
    """The tensors of an HF folder by name, read one at a time straight from the file (numpy; bfloat16 via
    ml_dtypes; no torch or safetensors-framework needed). Every header is validated when this is built."""

    def __init__(self, folder):
        self.folder = folder
        self.where, self.meta, self._loc = {}, {}, {}
        for p in safetensors_files(folder):
            header, start = _raw_header(p)
            for k, v in header.items():
                if k == "__metadata__":
                    continue
                self.where[k] = p
                self.meta[k] = (v["dtype"], tuple(v["shape"]))
                self._loc[k] = start + v["data_offsets"][0]

    def keys(self):
        return set(self.where)

    def nbytes(self, name):
        dt, shape = self.meta[name]
        return math.prod(shape) * np_dtype(ST_DTYPES[dt]).itemsize

    def get(self, name):
        dt, shape = self.meta[name]
        dtype = np_dtype(ST_DTYPES[dt])
        try:
            with open(self.where[name], "rb") as f:
                f.seek(self._loc[name])
                a = np.fromfile(f, dtype=dtype, count=math.prod(shape))
        except OSError as e:
            raise UserError(f"{self.where[name]}: cannot read {name} ({e})") from None
        if a.size != math.prod(shape):
            raise UserError(f"{self.where[name]}: truncated while reading {name}")
        return a.reshape(shape)


# ----------------------------------------------------------------------------------------------- load_hf
def np_dtype(name):
    if name in ("bfloat16", "bf16"):
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class HFPlan:
    """A validated HF checkpoint: model module, cfg, tensors and the entries mapping them to our params."""

    def __init__(self, folder, model, cfg, ckpt, entries):
        self.folder, self.model, self.cfg, self.ckpt, self.entries = folder, model, cfg, ckpt, entries


def plan_hf(src):
    """Reads config.json and every safetensors header and checks that the checkpoint matches the model (every
    tensor there, every tensor used, every shape right) without reading any tensor data."""
    folder = resolve(src)
    d = read_config(folder)
    model = model_module(d.get("model_type"), f"{os.path.join(folder, 'config.json')}: ")
    ckpt = Checkpoint(folder)
    keys = ckpt.keys()
    try:
        cfg = model.Config.from_hf(d, keys=keys)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{os.path.join(folder, 'config.json')}: {type(e).__name__}: {e}") from None
    # tie_word_embeddings with both tensors present and different: transformers does not tie them
    if getattr(cfg, "tie_word_embeddings", False) and "lm_head.weight" in keys:
        if not np.array_equal(ckpt.get("lm_head.weight"), ckpt.get("model.embed_tokens.weight")):
            import dataclasses
            cfg = dataclasses.replace(cfg, tie_word_embeddings=False)
    entries = model.hf_entries(cfg, keys)
    want = {n for e in entries for n in e[2]}
    missing = sorted(want - keys)
    if missing:
        raise UserError(f"{folder}: {len(missing)} tensors missing, e.g. {missing[0]}")
    unused = sorted(keys - want - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()))
    unused = [k for k in unused if not _ignored(model, k)]
    if unused:
        raise UserError(f"{ckpt.where[unused[0]]}: {len(unused)} tensors not used by {model.MODEL_TYPE}, e.g. {unused[0]}")
    for _, _, names, shapes, _, _ in entries:
        for n, s in zip(names, shapes):
            if tuple(ckpt.meta[n][1]) != tuple(s):
                raise UserError(f"{ckpt.where[n]}: {n} has shape {list(ckpt.meta[n][1])}, expected {list(s)}")
    return HFPlan(folder, model, cfg, ckpt, entries)


def load_numpy(src, dtype=None):
    """(model module, cfg, flat numpy params {name: array}) from an HF folder or hub id."""
    plan = src if isinstance(src, HFPlan) else plan_hf(src)
    table = plan.model.param_table(plan.cfg)
    out_dtype = np_dtype(dtype) if dtype else None
    flat = {}
    for name, i, names, _, to_ours, _ in plan.entries:
        arr = to_ours([plan.ckpt.get(n) for n in names])
        p = table[name]
        if name not in flat:
            flat[name] = np.empty(p.shape, out_dtype or arr.dtype)
        if i is None:
            flat[name][...] = arr
        else:
            flat[name][i] = arr
    return plan.model, plan.cfg, flat


def _ignored(model, key):
    return any(key.startswith(p) for p in getattr(model, "HF_IGNORED_PREFIXES", ()))


def to_backend(flat, backend, unflatten):
    """numpy leaves -> jax or torch arrays (bfloat16 kept), nested by the model's unflatten."""
    if backend == "jax":
        import jax.numpy as jnp
        conv = jnp.asarray
    elif backend == "torch":
        import torch

        def conv(a):
            return _to_torch(a)
    else:
        raise UserError(f"unknown backend {backend!r} (jax or torch)")
    return unflatten({k: conv(v) for k, v in flat.items()})


def load_hf(src, backend="jax", dtype="float32"):
    """(model module, cfg, params) from a local HF folder or hub id; safetensors only, no transformers."""
    model, cfg, flat = load_numpy(src, dtype)
    return model, cfg, to_backend(flat, backend, model.unflatten)


# ----------------------------------------------------------------------------------------------- our checkpoints
META = "nanoqwen.json"
FORMATS = ("orbax", "dcp")
LAYOUTS = ("scanned", "unscanned")
# copied from an HF source into our folder and back out on export (tokenizer for generate.py --ckpt)
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
              "qwen.tiktoken")


def _check_out(out, overwrite):
    if os.path.lexists(out) and not overwrite:
        if not os.path.isdir(out) or os.path.islink(out):
            raise UserError(f"{out}: exists and is not a folder (pass --overwrite to replace it)")
        if os.listdir(out):
            raise UserError(f"{out}: exists and is not empty (pass --overwrite to replace it)")


@contextlib.contextmanager
def atomic_dir(out, overwrite=False):
    """Yields a temporary folder beside `out` (same filesystem) that is renamed to `out` when the block completes.
    On an exception the temporary folder is removed and `out` is untouched. An existing non-empty `out` is refused
    unless overwrite, and then replaced only at the end."""
    out = os.path.normpath(out)
    _check_out(out, overwrite)
    parent = os.path.dirname(os.path.abspath(out))
    made = []
    p = parent
    while not os.path.exists(p):
        made.append(p)
        p = os.path.dirname(p)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in made:  # parents we created, innermost first
            try:
                os.rmdir(p)
            except OSError:
                break
        raise
    if os.path.lexists(out):
        old = tmp + ".old"
        os.rename(out, old)
        os.rename(tmp, out)
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.remove(old)
    else:
        os.rename(tmp, out)


class _Progress:
    """tensors and bytes done, on stderr, only when stderr is a terminal."""

    def __init__(self, what, tensors, nbytes):
        self.what, self.tensors, self.nbytes, self.t, self.b = what, tensors, nbytes, 0, 0
        self.on = sys.stderr.isatty()
        self.t0 = time.time()

    def update(self, nbytes, tensors=1):
        self.t += tensors
        self.b += nbytes
        if self.on:
            rate = self.b / max(time.time() - self.t0, 1e-9) / 1e9
            print(f"\r{self.what}: {self.t}/{self.tensors} tensors, {self.b / 1e9:.2f}/{self.nbytes / 1e9:.2f} GB"
                  f" ({rate:.2f} GB/s)", end="", file=sys.stderr, flush=True)

    def close(self):
        if self.on:
            print(file=sys.stderr, flush=True)


def _dtype_name(x):
    return str(x.dtype).rsplit(".", 1)[-1]


def _np(x):
    """jax / torch / numpy array -> numpy (bfloat16 kept, via ml_dtypes)."""
    if type(x).__module__.startswith("torch"):
        import torch
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            return x.view(torch.int16).numpy().view(np_dtype("bfloat16"))
        return x.numpy()
    return np.asarray(x)


def _to_torch(a):
    import torch
    a = np.ascontiguousarray(a)
    if not a.flags.writeable:  # e.g. a view of a jax array; torch wants writable memory
        a = a.copy()
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _torch_dtype(dt):
    import torch
    return getattr(torch, np.dtype(dt).name)


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _stacked_names(model, cfg):
    """Params with a leading stacked (layer) axis: those whose HF entries carry an index."""
    return {e[0] for e in model.hf_entries(cfg, None) if e[1] is not None}


def _split_name(name, i):
    """'layers.wq', 3 -> 'layers.3.wq': the name of one layer's slice in the unscanned layout."""
    head, _, rest = name.partition(".")
    return f"{head}.{i}.{rest}" if rest else f"{head}.{i}"


def _expected(model, cfg, layout):
    """Stored name -> shape for a layout."""
    stacked = _stacked_names(model, cfg)
    out = {}
    for name, p in model.param_table(cfg).items():
        if layout == "unscanned" and name in stacked:
            for i in range(p.shape[0]):
                out[_split_name(name, i)] = tuple(p.shape[1:])
        else:
            out[name] = tuple(p.shape)
    return out


class Leaf:
    """One stored array: its name, shape, dtype and blocks(), which yields (index along the first axis or None for
    the whole array, numpy array), so a stacked array is produced and written one layer at a time."""

    def __init__(self, name, shape, dtype, blocks, stacked):
        self.name, self.shape, self.dtype = name, tuple(shape), np.dtype(dtype)
        self.blocks, self.stacked = blocks, stacked
        self.ndim, self.size = len(self.shape), math.prod(self.shape)
        self.nbytes = self.size * self.dtype.itemsize

    def full(self):
        out = None
        for i, a in self.blocks():
            if i is None:
                return a
            if out is None:
                out = np.empty(self.shape, self.dtype)
            out[i] = a
        return out


def _param_leaves(model, cfg, params, layout, dtype=None):
    """Leaves of an in-memory param tree (jax, torch or numpy), converted to numpy one slice at a time."""
    stacked = _stacked_names(model, cfg)
    for name, x in _flatten(params).items():
        dt = np_dtype(dtype or _dtype_name(x))
        if name in stacked and layout == "unscanned":
            for i in range(x.shape[0]):
                yield Leaf(_split_name(name, i), x.shape[1:], dt,
                           lambda x=x, i=i, dt=dt: [(None, _np(x[i]).astype(dt, copy=False))], False)
        elif name in stacked:
            yield Leaf(name, x.shape, dt,
                       lambda x=x, dt=dt: ((i, _np(x[i]).astype(dt, copy=False)) for i in range(x.shape[0])), True)
        else:
            yield Leaf(name, x.shape, dt, lambda x=x, dt=dt: [(None, _np(x).astype(dt, copy=False))], False)


def _hf_leaves(plan, layout, dtype=None):
    """Leaves read from a validated HF checkpoint: each HF tensor is read, transformed and handed on as it comes;
    a stacked param is produced one layer (e.g. one layer's experts) at a time."""
    table = plan.model.param_table(plan.cfg)
    by_name = {}
    for e in plan.entries:
        by_name.setdefault(e[0], []).append(e)

    def load(e):
        return e[4]([plan.ckpt.get(n) for n in e[2]])

    def block(entries, shape, dt):
        if len(entries) == 1 and not isinstance(entries[0][1], tuple):
            return np.asarray(load(entries[0])).astype(dt, copy=False)
        out = np.empty(shape, dt)
        for e in entries:
            out[e[1][1:]] = load(e)
        return out

    for name, es in by_name.items():
        shape = tuple(table[name].shape)
        dt = np_dtype(dtype or ST_DTYPES[plan.ckpt.meta[es[0][2][0]][0]])
        if es[0][1] is None:
            yield Leaf(name, shape, dt, lambda es=es, s=shape, dt=dt: [(None, block(es, s, dt))], False)
            continue
        groups = {}
        for e in es:
            groups.setdefault(e[1][0] if isinstance(e[1], tuple) else e[1], []).append(e)
        groups = sorted(groups.items())
        if layout == "unscanned":
            for k, g in groups:
                yield Leaf(_split_name(name, k), shape[1:], dt,
                           lambda g=g, s=shape[1:], dt=dt: [(None, block(g, s, dt))], False)
        else:
            yield Leaf(name, shape, dt,
                       lambda groups=groups, s=shape[1:], dt=dt: ((k, block(g, s, dt)) for k, g in groups), True)


_ORBAX = {}


def _orbax_checkpointer(progress):
    """An Orbax PyTree checkpointer whose handler for Leaf writes one leaf, and one layer of it, at a time (the
    standard NumpyHandler would hold every array at once). What it writes is an ordinary Orbax PyTree checkpoint of
    numpy arrays, restorable with ocp.PyTreeCheckpointer().restore; stacked arrays get one chunk per layer."""
    import orbax.checkpoint as ocp
    if "handler" not in _ORBAX:
        import tensorstore as ts
        from orbax.checkpoint import future
        from orbax.checkpoint._src.serialization import ocdbt_utils, type_handlers, types
        from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

        class LeafHandler(type_handlers.NumpyHandler):
            progress, error = None, None

            async def _write(self, values, infos, args):
                try:
                    await self._write_all(values, infos, args)
                except Exception as e:  # raised after save returns, so orbax does not log a traceback
                    self.error = self.error or e

            async def _write_all(self, values, infos, args):
                for value, info, arg in zip(values, infos, args):
                    if self.error:
                        return
                    await info.await_path_creation()
                    local = (1,) + value.shape[1:] if value.stacked else value.shape
                    spec = ts_utils.build_array_write_spec(
                        info=info, arg=arg, global_shape=value.shape, local_shape=local, dtype=value.dtype,
                        use_ocdbt=info.is_ocdbt_checkpoint,
                        process_index=ocdbt_utils.get_process_index_for_subdir(use_ocdbt=info.is_ocdbt_checkpoint))
                    t = await ts.open(ts.Spec(spec.json), create=True, open=True, context=info.ts_context)
                    for i, a in value.blocks():
                        # the block is not touched again: tensorstore may use it without a copy
                        await (t if i is None else t[i]).write(a, can_reference_source_data_indefinitely=True)
                        if self.progress:
                            self.progress.update(a.nbytes, 1 if i is None else 0)
                    if self.progress and value.stacked:
                        self.progress.update(0)

            async def serialize(self, values, infos, args=None):
                args = args or [types.SaveArgs()] * len(values)
                return [future.CommitFutureAwaitingContractedSignals(self._write(values, infos, args), name="leaf")]

        _ORBAX["handler"] = LeafHandler(deepcopy_host_arrays=False)
        _ORBAX["registry"] = ocp.type_handlers.create_type_handler_registry((Leaf, _ORBAX["handler"]))
    _ORBAX["handler"].progress = progress
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=_ORBAX["registry"]))


def _save_orbax(path, leaves, progress=None):
    import logging

    import orbax.checkpoint as ocp
    tree = _nest({leaf.name: leaf for leaf in leaves})
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # "No jax.Array in TypeHandlerRegistry": expected, we write numpy
    try:
        ckptr = _orbax_checkpointer(progress)
        handler = _ORBAX["handler"]
        handler.error = None
        ckptr.save(os.path.abspath(path), args=ocp.args.PyTreeSave(tree))
    finally:
        absl.setLevel(level)
    if handler.error:
        raise handler.error


def _save_dcp(path, leaves, progress=None):
    """torch.distributed.checkpoint of the flat {name: tensor} dict. The plan is made from meta tensors and each
    tensor is produced only when the writer asks for it (resolve_data), one file per tensor, so one tensor (a whole
    stacked param in the scanned layout) is in memory at a time."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    leaves = {leaf.name: leaf for leaf in leaves}

    class LazyPlanner(DefaultSavePlanner):
        def resolve_data(self, item):
            leaf = leaves.get(item.index.fqn)
            if leaf is None:
                return super().resolve_data(item)
            t = _to_torch(leaf.full())
            if progress:
                progress.update(leaf.nbytes)
            return t

    sd = {n: torch.empty(leaf.shape, dtype=_torch_dtype(leaf.dtype), device="meta") for n, leaf in leaves.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # one file per tensor: DCP's writer keeps every tensor of a file alive until that file is closed
        dcp.save(sd, storage_writer=dcp.FileSystemWriter(path, thread_count=1, single_file_per_rank=False),
                 planner=LazyPlanner())


def _write_leaves(folder, fmt, leaves, what):
    leaves = list(leaves)
    progress = _Progress(what, len(leaves), sum(leaf.nbytes for leaf in leaves))
    path = os.path.join(folder, "params")
    (_save_orbax if fmt == "orbax" else _save_dcp)(path, leaves, progress)
    progress.close()
    return leaves


def _write_meta(folder, model, cfg, fmt, dtype, layout):
    d = cfg.to_hf()
    if hasattr(cfg, "num_mtp_layers"):  # qwen3_next: from_hf without tensor names reads the MTP count from here
        d["num_nextn_predict_layers"] = cfg.num_mtp_layers
    meta = {"format": fmt, "model_type": model.MODEL_TYPE, "config": d, "dtype": dtype, "layout": layout,
            "version": 1}
    with open(os.path.join(folder, META), "w") as f:
        json.dump(meta, f, indent=1)


def write_params(folder, model, cfg, params, fmt, layout="scanned"):
    """Writes `nanoqwen.json` and `params/` (an Orbax PyTree checkpoint of the nested param dict, or a torch DCP of
    the flat {name: tensor} dict) into `folder`; params are jax, torch or numpy arrays. layout "unscanned" stores
    each layer's slice of a stacked param as its own leaf ("layers.0.wq", ...). nanoqwen.json is written last."""
    if fmt not in FORMATS:
        raise UserError(f"unknown checkpoint format {fmt!r} ({' or '.join(FORMATS)})")
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r} ({' or '.join(LAYOUTS)})")
    os.makedirs(folder, exist_ok=True)
    leaves = _write_leaves(folder, fmt, _param_leaves(model, cfg, params, layout), f"writing {fmt}")
    dtypes = {leaf.dtype.name for leaf in leaves}
    _write_meta(folder, model, cfg, fmt, dtypes.pop() if len(dtypes) == 1 else "mixed", layout)


def _read_meta(folder):
    """(meta dict, model module, cfg) of one of our checkpoint folders."""
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: no such folder")
    path = os.path.join(folder, META)
    if not os.path.exists(path):
        raise UserError(f"{folder}: not a nanoqwen checkpoint (no {META}; an HF folder has config.json)")
    try:
        with open(path) as f:
            meta = json.load(f)
        fmt, layout, d = meta["format"], meta.get("layout", "scanned"), meta["config"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path}: corrupt ({type(e).__name__}: {e})") from None
    if fmt not in FORMATS or layout not in LAYOUTS:
        raise UserError(f"{path}: unknown format {fmt!r} or layout {layout!r}")
    model = model_module(meta.get("model_type", d.get("model_type")), f"{path}: ")
    try:
        cfg = model.Config.from_hf(d)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: config: {type(e).__name__}: {e}") from None
    if not os.path.isdir(os.path.join(folder, "params")):
        raise UserError(f"{os.path.join(folder, 'params')}: missing (incomplete checkpoint)")
    return meta, model, cfg


def _err(e):
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"


class _OrbaxStore:
    """Reads an Orbax PyTree checkpoint's arrays with tensorstore, whole or one layer at a time."""

    def __init__(self, path):
        import tensorstore as ts
        self.path = path
        ocdbt = os.path.exists(os.path.join(path, "manifest.ocdbt"))
        base = {"driver": "ocdbt", "base": "file://" + os.path.abspath(path) + "/"} if ocdbt else \
            {"driver": "file", "path": os.path.abspath(path) + "/"}
        try:
            keys = [k.decode() for k in ts.KvStore.open(base).result().list().result()]
            names = sorted({k.rsplit("/", 1)[0] for k in keys if k.endswith(("/.zarray", "/zarr.json"))})
            self.arrays = {}
            for n in names:
                driver = "zarr3" if n + "/zarr.json" in keys else "zarr"
                self.arrays[n] = ts.open({"driver": driver, "kvstore": {**base, "path": n}}, open=True).result()
        except Exception as e:  # tensorstore raises ValueError/RuntimeError on corrupt data
            raise UserError(f"{path}: corrupt Orbax checkpoint ({_err(e)})") from None
        self.meta = {n: (tuple(t.shape), np.dtype(t.dtype.numpy_dtype)) for n, t in self.arrays.items()}

    def read(self, name, i=None):
        t = self.arrays[name]
        try:
            return np.asarray((t if i is None else t[i]).read().result())
        except Exception as e:
            raise UserError(f"{self.path}: cannot read {name} ({_err(e)})") from None


class _DcpStore:
    """Reads a torch DCP checkpoint's tensors (a whole tensor at a time: DCP reads whole stored items)."""

    def __init__(self, path):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata
        self.path, self._last = path, (None, None)
        from torch.distributed.checkpoint.api import CheckpointException
        try:
            md = dcp.FileSystemReader(path).read_metadata()
        except (Exception, CheckpointException) as e:
            raise UserError(f"{path}: corrupt torch DCP checkpoint ({_err(e)})") from None
        self.meta = {n: (tuple(m.size), np_dtype(str(m.properties.dtype).rsplit(".", 1)[-1]))
                     for n, m in md.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}

    def read_many(self, names):
        import warnings

        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
        sd = {n: torch.empty(self.meta[n][0], dtype=_torch_dtype(self.meta[n][1])) for n in names}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dcp.load(sd, storage_reader=dcp.FileSystemReader(self.path),
                         planner=DefaultLoadPlanner(allow_partial_load=True))
        except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
            raise UserError(f"{self.path}: cannot read {', '.join(names)[:80]} ({_err(e)})") from None
        return {n: _np(t) for n, t in sd.items()}

    def read(self, name, i=None):
        if self._last[0] != name:
            self._last = (name, None)  # drop the previous tensor before reading the next
            self._last = (name, self.read_many([name])[name])
        return self._last[1] if i is None else self._last[1][i]


def _open_store(folder, meta, model, cfg):
    """The stored arrays, checked against the model's table for the checkpoint's layout before any data is read."""
    path = os.path.join(folder, "params")
    store = (_OrbaxStore if meta["format"] == "orbax" else _DcpStore)(path)
    want = _expected(model, cfg, meta.get("layout", "scanned"))
    missing = sorted(set(want) - set(store.meta))
    if missing:
        raise UserError(f"{path}: {len(missing)} arrays missing, e.g. {missing[0]} (corrupt, or not a "
                        f"{meta.get('layout', 'scanned')} {meta['format']} checkpoint of this model)")
    extra = sorted(set(store.meta) - set(want))
    if extra:
        raise UserError(f"{path}: {len(extra)} arrays not in {model.MODEL_TYPE}, e.g. {extra[0]}")
    for n, s in want.items():
        if store.meta[n][0] != s:
            raise UserError(f"{path}: {n} has shape {list(store.meta[n][0])}, expected {list(s)}")
    return store


def read_params(folder, backend, dtype=None):
    """(model module, cfg, params) from one of our checkpoint folders (Orbax or DCP, either layout) on either
    backend; stacked params come back stacked whatever the layout. Other entries in the folder are ignored."""
    meta, model, cfg = _read_meta(folder)
    store = _open_store(folder, meta, model, cfg)
    layout = meta.get("layout", "scanned")
    stacked = _stacked_names(model, cfg)
    table = model.param_table(cfg)
    names = list(_expected(model, cfg, layout))
    got = store.read_many(names) if isinstance(store, _DcpStore) else {n: store.read(n) for n in names}
    flat = {}
    for name, p in table.items():
        if layout == "unscanned" and name in stacked:
            parts = [got.pop(_split_name(name, i)) for i in range(p.shape[0])]
            a = np.empty(p.shape, np_dtype(dtype) if dtype else parts[0].dtype)
            for i, x in enumerate(parts):
                a[i] = x
        else:
            a = got.pop(name)
        flat[name] = a.astype(np_dtype(dtype), copy=False) if dtype else a
    return model, cfg, to_backend(flat, backend, model.unflatten)


def load_checkpoint(src, backend, dtype=None):
    """(model, cfg, params) from an HF folder or hub id (config.json) or one of our folders (nanoqwen.json)."""
    if os.path.isdir(src) and os.path.exists(os.path.join(src, META)):
        return read_params(src, backend, dtype)
    if os.path.isdir(src) and not os.path.exists(os.path.join(src, "config.json")):
        raise UserError(f"{src}: neither a Hugging Face checkpoint (config.json) nor ours ({META})")
    return load_hf(src, backend, dtype)


def _copy_side_files(src, dst):
    for name in SIDE_FILES:
        p = os.path.join(src, name)
        if os.path.isfile(p):
            shutil.copyfile(p, os.path.join(dst, name))


def hf_to_ckpt(src, out, fmt, dtype=None, layout="scanned", overwrite=False):
    """HF folder or hub id -> our checkpoint folder, streaming one tensor at a time. Everything (config, headers,
    names, shapes) is checked before anything is written; the folder appears only when complete."""
    _check_out(out, overwrite)
    plan = plan_hf(src)
    leaves = _hf_leaves(plan, layout, dtype)
    with atomic_dir(out, overwrite) as tmp:
        leaves = _write_leaves(tmp, fmt, leaves, f"hf2{fmt}")
        dtypes = {leaf.dtype.name for leaf in leaves}
        _write_meta(tmp, plan.model, plan.cfg, fmt, dtypes.pop() if len(dtypes) == 1 else "mixed", layout)
        _copy_side_files(plan.folder, tmp)
    return out


# ----------------------------------------------------------------------------------------------- command line
def main_guard(fn):
    """Runs a command; a UserError (or a missing file) becomes one line on stderr and exit code 2."""
    def wrapped(*a, **kw):
        try:
            return fn(*a, **kw)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except FileNotFoundError as e:
            print(f"error: {e.filename}: no such file or folder", file=sys.stderr)
            sys.exit(2)
    wrapped.__name__, wrapped.__doc__ = fn.__name__, fn.__doc__
    return wrapped


# ----------------------------------------------------------------------------------------------- parity
PARITY_LENGTHS = (7, 64, 300)
GOLDEN_TOPK = 64


def parity_prompts(vocab, seed=0):
    """A few deterministic token prompts (ids below the special tokens), short to long (RoPE errors show late)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, min(vocab, 151643), n).tolist() for n in PARITY_LENGTHS]


def _log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def hf_reference(folder, prompts, dtype):
    """Reference log-probs from transformers (a test/reference dependency, never used for loading)."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise UserError("transformers (and torch) are not installed: pass --golden FILE.jsonl instead") from None
    try:
        m = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    except Exception as e:
        raise UserError(f"{folder}: transformers cannot load it ({type(e).__name__})") from None
    with torch.no_grad():
        return [_log_softmax(m(torch.tensor([p])).logits[0].float().numpy()) for p in prompts]


def golden_record(tokens, logp):
    """Top-k log-probs per position (full rows when the vocab is small): enough for top-1 and a KL bound."""
    if logp.shape[-1] <= 4096:
        return {"tokens": tokens, "full": logp.tolist()}
    idx = np.argsort(-logp, -1)[:, :GOLDEN_TOPK]
    return {"tokens": tokens, "ids": idx.tolist(), "logp": np.take_along_axis(logp, idx, -1).tolist()}


def kl_vs_record(rec, ours):
    """Per-token KL(ref || ours). With a top-k record the rest of the vocab is one bucket, which gives a lower
    bound of the full KL (exact when the mass outside the top-k agrees)."""
    if "full" in rec:
        p = np.asarray(rec["full"])
        return (np.exp(p) * (p - ours)).sum(-1), p.argmax(-1)
    ids, lp = np.asarray(rec["ids"]), np.asarray(rec["logp"])
    lq = np.take_along_axis(ours, ids, -1)
    p, q = np.exp(lp), np.exp(lq)
    pr, qr = np.clip(1 - p.sum(-1), 1e-300, 1), np.clip(1 - q.sum(-1), 1e-300, 1)
    return (p * (lp - lq)).sum(-1) + pr * (np.log(pr) - np.log(qr)), ids[:, 0]


def run_parity(src, backends, dtype, golden=None, write_golden=None, max_kl=None, out=print):
    folder = resolve(src)
    if write_golden:
        d = read_config(folder)
        prompts = parity_prompts(d["vocab_size"])
        recs = [golden_record(p, lp) for p, lp in zip(prompts, hf_reference(folder, prompts, dtype))]
        tmp = write_golden + ".tmp"
        with open(tmp, "w") as f:
            for r in recs:
                f.write(json.dumps({**r, "dtype": dtype}) + "\n")
        os.replace(tmp, write_golden)
        out(f"wrote {len(recs)} golden records to {write_golden}")
        return True
    loaded = {be: load_hf(folder, backend=be, dtype=dtype) for be in backends}  # validates before transformers
    if golden:
        try:
            with open(golden) as f:
                recs = [json.loads(line) for line in f if line.strip()]
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{golden}: cannot read golden logits ({type(e).__name__})") from None
        if not recs or not all("tokens" in r for r in recs):
            raise UserError(f"{golden}: not a golden-logits file (no 'tokens' records)")
    else:
        d = read_config(folder)
        prompts = parity_prompts(d["vocab_size"])
        recs = [{"tokens": p, "full": lp} for p, lp in zip(prompts, hf_reference(folder, prompts, dtype))]
    max_kl = max_kl if max_kl is not None else (1e-6 if dtype == "float32" else 2e-2)
    ok = True
    for be in backends:
        model, cfg, params = loaded[be]
        kls, agree, n = [], 0, 0
        for r in recs:
            toks = np.asarray([r["tokens"]])
            if be == "jax":
                import jax.numpy as jnp
                logits, _ = model.forward(params, jnp.asarray(toks), cfg)
                logits = np.asarray(logits[0].astype(jnp.float32))
            else:
                import torch
                with torch.no_grad():
                    logits, _ = model.forward(params, torch.as_tensor(toks), cfg)
                logits = logits[0].float().numpy()
            ours = _log_softmax(logits)
            r = {**r, "full": np.asarray(r["full"])} if "full" in r else r
            kl, top1 = kl_vs_record(r, ours)
            kls.append(kl)
            agree += int((ours.argmax(-1) == top1).sum())
            n += len(top1)
        kl = np.concatenate(kls)
        good = bool(kl.max() <= max_kl)
        ok &= good
        out(f"{be:5s} {dtype}: max KL {kl.max():.3e}  mean KL {kl.mean():.3e}  top-1 agreement {agree}/{n}"
            f"  ({'ok' if good else 'FAIL'}, threshold {max_kl:g})")
    return ok


def _parity_cmd():
    import click

    @click.command("parity")
    @click.option("--hf", "src", required=True, help="HF checkpoint folder or hub id")
    @click.option("--backend", type=click.Choice(["jax", "torch", "both"]), default="both")
    @click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32")
    @click.option("--golden", type=click.Path(), help="compare against this golden-logits JSONL instead of transformers")
    @click.option("--write-golden", type=click.Path(), help="write a golden-logits JSONL from transformers and exit")
    @click.option("--max-kl", type=float, help="per-token KL threshold (default 1e-6 float32, 2e-2 bfloat16)")
    @main_guard
    def parity(src, backend, dtype, golden, write_golden, max_kl):
        """Per-token KL(transformers || ours) and top-1 agreement; exits 1 over the threshold."""
        backends = ["jax", "torch"] if backend == "both" else [backend]
        if not run_parity(src, backends, dtype, golden, write_golden, max_kl):
            sys.exit(1)
    return parity


parity = _parity_cmd()


# ----------------------------------------------------------------------------------------------- HF export
ST_CODES = {v: k for k, v in ST_DTYPES.items()}


def parse_size(s):
    """'5GB' -> 5e9, '500MiB' -> 500 * 2**20, '1000' -> 1000 (as transformers' max_shard_size)."""
    if isinstance(s, int):
        return s
    t = str(s).strip().upper()
    units = [("KIB", 2**10), ("MIB", 2**20), ("GIB", 2**30), ("TIB", 2**40), ("KB", 10**3), ("MB", 10**6),
             ("GB", 10**9), ("TB", 10**12), ("B", 1)]
    for u, m in units:
        if t.endswith(u):
            t, mult = t[:-len(u)], m
            break
    else:
        mult = 1
    try:
        n = int(float(t) * mult)
    except ValueError:
        raise UserError(f"bad size {s!r} (e.g. 5GB, 500MB)") from None
    if n <= 0:
        raise UserError(f"bad size {s!r}: must be positive")
    return n


class SafetensorsWriter:
    """Writes tensors whose names, shapes and dtypes are known up front into one or more safetensors files, one
    tensor at a time in the announced order: each file's header is written first (8-byte little-endian length,
    JSON padded with spaces to a multiple of 8), then the tensors' raw bytes are appended. Files above
    max_shard_size are split as transformers does, with model.safetensors.index.json."""

    def __init__(self, folder, tensors, max_shard_size=None):
        self.folder, self.tensors = folder, list(tensors)  # [(name, shape, numpy dtype)]
        limit = parse_size(max_shard_size) if max_shard_size else None
        shards, cur, size = [], [], 0
        for name, shape, dt in self.tensors:
            n = math.prod(shape) * np.dtype(dt).itemsize
            if cur and limit and size + n > limit:
                shards.append(cur)
                cur, size = [], 0
            cur.append((name, tuple(shape), np.dtype(dt), n))
            size += n
        shards.append(cur)
        k = len(shards)
        self.files = (["model.safetensors"] if k == 1 else
                      [f"model-{j + 1:05d}-of-{k:05d}.safetensors" for j in range(k)])
        self.shards = shards
        self.order = [(j, t) for j, s in enumerate(shards) for t in s]
        self.pos, self.f, self.fj = 0, None, None
        self.total = sum(t[1][3] for t in self.order)

    def _open(self, j):
        if self.f:
            self.f.close()
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dt, n in self.shards[j]:
            header[name] = {"dtype": ST_CODES[dt.name], "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.f = open(os.path.join(self.folder, self.files[j]), "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)
        self.fj = j

    def write(self, name, a):
        j, (want, shape, dt, n) = self.order[self.pos]
        if name != want or tuple(a.shape) != shape or a.dtype != dt:
            raise RuntimeError(f"export order: got {name} {a.shape} {a.dtype}, expected {want} {shape} {dt}")
        if self.fj != j:
            self._open(j)
        self.f.write(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
        self.pos += 1

    def close(self):
        if self.pos != len(self.order):
            raise RuntimeError(f"export: {len(self.order) - self.pos} tensors not written")
        if self.f:
            self.f.close()
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {t[0]: self.files[j] for j, t in self.order}}
            with open(os.path.join(self.folder, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)


def ckpt_to_hf(folder, out, fmt=None, dtype=None, max_shard_size="5GB", overwrite=False):
    """Our checkpoint folder -> an HF folder (config.json, safetensors in the hub layout, per-expert keys), one
    tensor at a time. With fmt set, the checkpoint must be of that format."""
    _check_out(out, overwrite)
    meta, model, cfg = _read_meta(folder)
    if fmt and meta["format"] != fmt:
        raise UserError(f"{folder}: a {meta['format']} checkpoint, not {fmt} (use {meta['format']}2hf)")
    store = _open_store(folder, meta, model, cfg)
    layout = meta.get("layout", "scanned")
    stacked = _stacked_names(model, cfg)
    order = {n: k for k, n in enumerate(model.param_table(cfg))}
    entries = sorted(model.hf_entries(cfg, None), key=lambda e: order[e[0]])  # stable: each leaf read once
    out_dt = np_dtype(dtype) if dtype else None

    def where(name, i):
        """(stored name, index into it, index into that)."""
        i0, rest = (i[0], i[1:]) if isinstance(i, tuple) else (i, ())
        if i0 is not None and layout == "unscanned" and name in stacked:
            return _split_name(name, i0), None, rest
        return name, i0, rest

    tensors = []
    for name, i, names, shapes, _, _ in entries:
        sname = where(name, i)[0]
        dt = out_dt or store.meta[sname][1]
        tensors += [(n, s, dt) for n, s in zip(names, shapes)]
    _check_out(out, overwrite)
    with atomic_dir(out, overwrite) as tmp:
        w = SafetensorsWriter(tmp, tensors, max_shard_size)
        progress = _Progress(f"{meta['format']}2hf", len(tensors), w.total)
        last = block = x = a = None
        for name, i, names, shapes, _, to_hf in entries:
            sname, j, rest = where(name, i)
            if (sname, j) != last:
                block = x = a = None  # drop the previous block before reading the next
                block, last = store.read(sname, j), (sname, j)
            x = block[rest] if rest else block
            if out_dt is not None:
                x = x.astype(out_dt, copy=False)
            for n, a in zip(names, to_hf(x)):
                w.write(n, np.asarray(a))
                progress.update(a.nbytes)
        w.close()
        progress.close()
        d = cfg.to_hf()
        if dtype:
            d["dtype"] = dtype
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(d, f, indent=2, sort_keys=True)
        _copy_side_files(folder, tmp)
    return out


# ----------------------------------------------------------------------------------------------- commands
def _convert_cli():
    import click

    dtype_opt = click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
                             help="cast floating-point weights (default: keep the source dtype)")
    over_opt = click.option("--overwrite", is_flag=True, help="replace an existing non-empty --out")

    @click.group("convert")
    def group():
        """Checkpoint conversion: Hugging Face safetensors <-> Orbax / torch DCP, streaming one tensor at a time."""

    def hf2(fmt):
        @group.command(f"hf2{fmt}")
        @click.option("--hf", "src", required=True, help="HF checkpoint folder or hub id")
        @click.option("--out", required=True, type=click.Path(), help="output folder (written atomically)")
        @dtype_opt
        @click.option("--layout", type=click.Choice(LAYOUTS), default="scanned",
                      help="scanned: layers stacked on a leading axis; unscanned: one array per layer")
        @over_opt
        @main_guard
        def cmd(src, out, dtype, layout, overwrite):
            hf_to_ckpt(src, out, fmt, dtype, layout, overwrite)
        cmd.__doc__ = f"HF safetensors -> {'Orbax PyTree' if fmt == 'orbax' else 'torch DCP'} checkpoint folder."
        cmd.help = cmd.__doc__

    def to_hf(fmt):
        @group.command(f"{fmt}2hf")
        @click.option("--ckpt", required=True, type=click.Path(), help=f"our {fmt} checkpoint folder")
        @click.option("--out", required=True, type=click.Path(), help="output HF folder (written atomically)")
        @dtype_opt
        @click.option("--max-shard-size", default="5GB", show_default=True,
                      help="split safetensors above this size (index in model.safetensors.index.json)")
        @over_opt
        @main_guard
        def cmd(ckpt, out, dtype, max_shard_size, overwrite):
            ckpt_to_hf(ckpt, out, fmt, dtype, max_shard_size, overwrite)
        cmd.help = f"{'Orbax' if fmt == 'orbax' else 'torch DCP'} checkpoint folder -> HF safetensors folder."

    for fmt in FORMATS:
        hf2(fmt)
        to_hf(fmt)
    return group


convert_cli = _convert_cli()


if __name__ == "__main__":
    convert_cli()
