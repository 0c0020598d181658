"""Training checkpoints: safetensors + JSON, written to a temp folder and renamed into place.

    RUN/checkpoints/step-00000100/
        model.safetensors        student weights (shared/tied tensors stored once)
        optimizer.safetensors    per-parameter optimizer state, keys "state.<index>.<name>"
                                 ("param.<fqn>.<name>" for FSDP runs; train/fsdp.py)
        cursor.safetensors       bit-packed consumed-sequence masks of the loader cursor
        rng-rank<r>.safetensors  torch (and CUDA) generator states of rank r
        state.json               step, tokens, optimizer hyper-parameters, cursor, Python and
                                 NumPy generator states per rank, the run's config, and the
                                 sha256 of every other file (checked on --resume)

A folder without the `.tmp` suffix is complete: the rename is the commit. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from atkd_cache.errors import UserError
from atkd_cache.train.loader import Cursor

CHECKPOINTS = "checkpoints"
PREFIX = "step-"


def checkpoint_path(run_dir: str, step: int) -> str:
    """Folder of the checkpoint taken after `step` optimizer steps."""
    return os.path.join(run_dir, CHECKPOINTS, f"{PREFIX}{step:08d}")


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest committed checkpoint of a run, or None."""
    root = os.path.join(run_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return None
    done = sorted(
        d for d in os.listdir(root) if d.startswith(PREFIX) and d[len(PREFIX) :].isdigit()
    )
    return os.path.join(root, done[-1]) if done else None


def resumable(run_dir: str) -> bool:
    """Can a run in `run_dir` be resumed (`TrainConfig.resume`)? A folder killed before its
    first checkpoint holds nothing to resume from: it is removed, and the run starts over."""
    if os.path.isdir(run_dir) and latest_checkpoint(run_dir) is None:
        shutil.rmtree(run_dir)
    return os.path.isdir(run_dir)


def drop_checkpoints(run_dir: str) -> None:
    """Remove a finished run's checkpoints (they serve resuming; `model/` stays)."""
    shutil.rmtree(os.path.join(run_dir, CHECKPOINTS), ignore_errors=True)


def temp_path(run_dir: str, step: int) -> str:
    """Folder a checkpoint is assembled in before `commit` renames it."""
    return checkpoint_path(run_dir, step) + ".tmp"


def start(run_dir: str, step: int) -> str:
    """Create (fresh) the temp folder a checkpoint is assembled in; returns its path."""
    tmp = temp_path(run_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def _fsync_dir(path: str) -> None:
    for name in os.listdir(path):
        with open(os.path.join(path, name), "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: str, keep: int) -> str:
    """Flush and rename the temp folder into place, then drop all but the newest `keep`."""
    _fsync_dir(tmp)
    final = tmp[: -len(".tmp")]
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    root = os.path.dirname(final)
    done = sorted(d for d in os.listdir(root) if d.startswith(PREFIX) and "." not in d)
    for old in done[: max(0, len(done) - keep)]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON) capturing this process's torch, CUDA, Python and NumPy generators."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def write_rank_rng(tmp: str, rank: int) -> dict:
    """Write this rank's torch generator states; returns the JSON part for state.json."""
    tensors, meta = rng_state()
    save_file(tensors, os.path.join(tmp, f"rng-rank{rank}.safetensors"))
    return meta


def _optimizer_split(optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = optimizer.state_dict()
    tensors = {
        f"state.{index}.{name}": value.detach().contiguous()
        for index, per_param in sd["state"].items()
        for name, value in per_param.items()
    }
    return tensors, sd["param_groups"]


def _optimizer_join(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


def _pack(mask: np.ndarray | None) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask if mask is not None else np.zeros(0, bool)))


def write_main(
    tmp: str, model, optimizer, state: dict, cursor: Cursor, rng_by_rank: list[dict],
    gathered: tuple[dict, dict, list] | None = None,
) -> None:
    """Write the weights, the optimizer, the cursor and state.json (rank 0's part).
    `gathered` = (weights, optimizer tensors by name, named groups) of a sharded model,
    collected beforehand by every rank (train/fsdp.py)."""
    if gathered is None:
        save_model(model, os.path.join(tmp, "model.safetensors"))
        tensors, groups = _optimizer_split(optimizer)
        keys = "index"
    else:
        weights, tensors, groups = gathered
        save_file(weights, os.path.join(tmp, "model.safetensors"))
        keys = "fqn"
    save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
    n = 0 if cursor.consumed is None else len(cursor.consumed)
    save_file(
        {"consumed": _pack(cursor.consumed), "base_consumed": _pack(cursor.base_consumed)},
        os.path.join(tmp, "cursor.safetensors"),
    )
    doc = {
        **state,
        "optimizer_groups": groups,
        "optimizer_keys": keys,
        "cursor": {
            "epoch": cursor.epoch,
            "world_size": cursor.world_size,
            "num_workers": cursor.num_workers,
            "slot_batches": cursor.slot_batches,
            "settings": cursor.settings,
            "num_sequences": n,
            "has_base": cursor.base_consumed is not None,
        },
        "rng": rng_by_rank,
        "sha256": file_digests(tmp),
    }
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(doc, f, indent=1)


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def file_digests(folder: str) -> dict[str, str]:
    """sha256 of every file of a checkpoint folder but state.json (which records them)."""
    return {name: _sha256_file(os.path.join(folder, name))
            for name in sorted(os.listdir(folder)) if name != "state.json"}


def check_files(path: str, state: dict) -> None:
    """Raise UserError when a checkpoint's files differ from the digests it recorded (a
    damaged disk or copy; checkpoints written before digests existed are not checked)."""
    recorded = state.get("sha256")
    if recorded is None:
        return
    for name, expected in recorded.items():
        where = os.path.join(path, name)
        if not os.path.exists(where):
            raise UserError(f"--resume: checkpoint {path} lacks {name}: delete the checkpoint "
                            f"to resume from the one before, or start a new run")
        if _sha256_file(where) != expected:
            raise UserError(f"--resume: checkpoint {path}: {name} differs from its sha256 "
                            f"(damaged): delete the checkpoint to resume from the one before, "
                            f"or start a new run")


def read_state(path: str) -> dict:
    """state.json of a committed checkpoint."""
    with open(os.path.join(path, "state.json")) as f:
        return json.load(f)


def read_cursor(path: str, state: dict) -> Cursor:
    """The loader cursor saved in a checkpoint."""
    c = state["cursor"]
    packed = load_file(os.path.join(path, "cursor.safetensors"))
    n = c["num_sequences"]

    def unpack(t: torch.Tensor) -> np.ndarray:
        return np.unpackbits(t.numpy(), count=n).astype(bool)

    return Cursor(
        epoch=c["epoch"],
        world_size=c["world_size"],
        num_workers=c["num_workers"],
        slot_batches=list(c["slot_batches"]),
        settings=c["settings"],
        consumed=unpack(packed["consumed"]),
        base_consumed=unpack(packed["base_consumed"]) if c["has_base"] else None,
    )


def load_into(
    path: str, state: dict, model, optimizer, rank: int, sharded: bool = False
) -> None:
    """Restore weights, optimizer and (when this rank was saved) its generator states. A
    checkpoint of a run with or without FSDP loads into a model sharded or not."""
    keys = state.get("optimizer_keys", "index")
    tensors = load_file(os.path.join(path, "optimizer.safetensors"))
    if keys == "index" and not sharded:
        load_model(model, os.path.join(path, "model.safetensors"))
        optimizer.load_state_dict(_optimizer_join(tensors, state["optimizer_groups"]))
    else:
        from atkd_cache.train import fsdp

        if sharded:
            fsdp.load_model(model, load_file(os.path.join(path, "model.safetensors")))
        else:
            load_model(model, os.path.join(path, "model.safetensors"), strict=False)
        fsdp.load_optimizer(model, optimizer, tensors, state["optimizer_groups"], keys)
    rng_file = os.path.join(path, f"rng-rank{rank}.safetensors")
    if rank < len(state["rng"]) and os.path.exists(rng_file):
        set_rng_state(load_file(rng_file), state["rng"][rank])
