"""Resumable training checkpoints: everything needed to continue a run bit for bit.

``checkpoint.pt`` holds the model and optimizer state (full, unsharded tensors on the CPU, keyed
by parameter name so DDP, FSDP and single-process runs read each other's files), the LR
scheduler, the gradient scaler, the data sampler's generator (the data position), the RNG
states of torch (the CPU's, and each rank's CUDA device's when training on CUDA) and Python, and
the metrics so far. It is written with :func:`~yet_another_retnet.models.checkpoint.atomic_write`:
a crash or ``kill -9`` at any moment leaves either the previous checkpoint or the new one. A
SHA-256 over its whole content (every tensor's bytes and every other value) is saved in it and
checked on load, since ``torch.load`` reads most damaged bytes silently (a flipped bit in a
tensor is a different tensor).
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..models.checkpoint import atomic_write

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1
CHECKSUM_KEY = "sha256"


def _digest(value: Any, h: Any) -> None:
    """Feed ``value`` (nested dicts, lists, tuples, tensors, scalars) into ``h`` canonically: a
    list and a tuple alike (torch.load may turn one into the other), dict keys in sorted order."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype!s}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(value, dict):
        h.update(b"{")
        for key in sorted(value, key=repr):
            h.update(repr(key).encode() + b":")
            _digest(value[key], h)
        h.update(b"}")
    elif isinstance(value, list | tuple):
        h.update(b"[")
        for item in value:
            _digest(item, h)
        h.update(b"]")
    else:
        h.update(f"{type(value).__name__}:{value!r};".encode())


def payload_digest(payload: dict[str, Any]) -> str:
    h = hashlib.sha256()
    _digest({k: v for k, v in payload.items() if k != CHECKSUM_KEY}, h)
    return h.hexdigest()


def cuda_rng_states(device: torch.device, world_size: int) -> list[torch.Tensor] | None:
    """The CUDA generator state of the device each rank trains on, in rank order (on the CPU), or
    ``None`` when training is not on CUDA. Each rank's dropout masks come from its own device's
    generator, and only rank 0 writes the checkpoint, so under ``torchrun`` the states are
    gathered: a collective, every rank calls it."""
    if device.type != "cuda":
        return None
    own = torch.cuda.get_rng_state(device)
    if world_size == 1:
        return [own]
    import torch.distributed as dist

    local = own.to(device)  # NCCL (the CUDA backend: distributed.py) moves CUDA tensors only
    gathered = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(gathered, local)
    return [t.cpu() for t in gathered]


def rng_state(cuda: list[torch.Tensor] | None = None) -> dict[str, Any]:
    """The state of every random number generator training touches: torch's CPU generator,
    Python's, and ``cuda`` (from :func:`cuda_rng_states`: one state per rank) when given."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if cuda is not None:
        state["cuda_ranks"] = list(cuda)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None, rank: int = 0,
                  world_size: int = 1) -> str | None:
    """Restore :func:`rng_state`'s generators; this rank trains on ``device``, ``rank`` of
    ``world_size``. Returns a note for the user when the CUDA generator cannot be restored
    exactly (the run saved another number of processes' states, or none), else ``None``."""
    torch.set_rng_state(state["torch"])
    random.setstate(_as_python_random_state(state["python"]))
    if device is None or device.type != "cuda":
        return None  # a CPU run draws nothing from a CUDA generator
    per_rank = state.get("cuda_ranks")
    if per_rank is not None and len(per_rank) == world_size:
        torch.cuda.set_rng_state(per_rank[rank], device)
        return None
    legacy = state.get("cuda")  # older checkpoints: every device, as the one saving process saw it
    index = device.index if device.index is not None else torch.cuda.current_device()
    if per_rank is None and legacy is not None and world_size == 1 and index < len(legacy):
        torch.cuda.set_rng_state(legacy[index], device)
        return None
    if per_rank:
        # Another number of processes: any rank's advanced state beats replaying the first masks.
        torch.cuda.set_rng_state(per_rank[rank % len(per_rank)], device)
        saved = f"the CUDA random state of {len(per_rank)} process(es) and this call runs {world_size}"
    else:
        saved = "no CUDA random state (it did not train on CUDA)" if legacy is None else \
            "its CUDA random state in an older format that this number of processes cannot use"
    return (f"note: the run saved {saved}: it continues, but not bit for bit "
            f"(dropout draws other masks)")


def _as_python_random_state(value: Any) -> tuple[Any, ...]:
    # ``random.getstate()`` is (version, tuple of 625 ints, gauss_next); a round trip through
    # torch.load may turn inner tuples into lists, which setstate rejects.
    version, internal, gauss = value
    return (version, tuple(internal), gauss)


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """Unsharded model and optimizer states on the CPU, keyed by parameter name.

    A collective under FSDP: every rank must call it (rank 0 receives the tensors).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from .distributed import in_process_group

    # In one process the offload is ours: torch 2.2 asks the (absent) process group for this
    # rank when it offloads. Tensors already on the CPU are not copied, as with its offload.
    together = in_process_group()
    model_state, optimizer_state = get_state_dict(model, optimizer,
                                                  options=StateDictOptions(full_state_dict=True, cpu_offload=together))
    return (model_state, optimizer_state) if together else (_on_cpu(model_state), _on_cpu(optimizer_state))


def _on_cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.to("cpu")
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_on_cpu(v) for v in value)
    return value


def load_full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any],
                          optimizer_state: dict[str, Any]) -> None:
    """Load states written by :func:`full_state_dicts` (every rank passes the full tensors)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=StateDictOptions(full_state_dict=True))


def save_checkpoint(directory: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``directory/checkpoint.pt`` atomically."""
    payload = {"format_version": FORMAT_VERSION, **payload}
    payload[CHECKSUM_KEY] = payload_digest(payload)
    atomic_write(directory / CHECKPOINT_NAME, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(directory: Path, verify: bool = True) -> dict[str, Any]:
    """Read ``directory/checkpoint.pt`` (tensors on the CPU); ``OSError`` if unreadable or, with
    ``verify`` (and not ``YARETNET_VERIFY_WEIGHTS=0``), if it does not match its checksum."""
    path = directory / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"nothing to resume: no {CHECKPOINT_NAME} in {directory}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises several types on a damaged file
        raise OSError(f"{path} is unreadable or corrupt: {err}") from err
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise OSError(f"{path} is not a yet-another-retnet training checkpoint (format {FORMAT_VERSION})")
    saved = payload.get(CHECKSUM_KEY)
    if saved is not None and verify and os.environ.get("YARETNET_VERIFY_WEIGHTS", "1") != "0" \
            and payload_digest(payload) != saved:
        raise OSError(f"{path} is corrupt: its content does not match the checksum saved in it")
    return payload


# --------------------------------------------------------------------------------------------
# Sharded checkpoints (torch.distributed.checkpoint): each rank writes its own shards
# --------------------------------------------------------------------------------------------

#: Directory prefix of a sharded checkpoint; the step is appended (``checkpoint-dcp-000150``).
SHARDED_PREFIX = "checkpoint-dcp-"


def save_sharded(directory: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                 is_main: bool) -> str:
    """Write the model and optimizer state with ``torch.distributed.checkpoint`` into a new
    ``checkpoint-dcp-STEP`` directory (a collective: every rank writes its own shards, nothing is
    gathered). Returns the directory's name, which the caller records in ``checkpoint.pt`` *after*
    this returns: until then the previous checkpoint stays the valid one."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from .distributed import in_process_group

    name = f"{SHARDED_PREFIX}{step:06d}"
    target = directory / name
    if is_main and target.exists():  # a half-written one from a killed run
        import shutil

        shutil.rmtree(target)
    distributed = in_process_group()
    if distributed:
        dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    # A storage writer rather than checkpoint_id=, which torch 2.2's dcp.save does not take.
    dcp.save({"model": model_state, "optimizer": optimizer_state}, storage_writer=dcp.FileSystemWriter(str(target)),
             no_dist=not distributed)
    return name


def load_sharded(directory: Path, name: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a :func:`save_sharded` checkpoint into ``model`` and ``optimizer``, whatever number of
    processes wrote it (DCP reshards on load; one process reads it without a process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = directory / name
    if "/" in name or not name.startswith(SHARDED_PREFIX) or not path.is_dir():
        raise OSError(f"{directory / CHECKPOINT_NAME} points at a sharded checkpoint {name!r} that is missing")
    model_state, optimizer_state = get_state_dict(model, optimizer)  # the shapes to fill (this world size)
    state: dict[str, Any] = {"model": model_state, "optimizer": optimizer_state}
    from .distributed import in_process_group

    dcp.load(state, storage_reader=dcp.FileSystemReader(str(path)), no_dist=not in_process_group())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def remove_stale_sharded(directory: Path, keep: str | None) -> None:
    """Delete every sharded checkpoint directory but ``keep`` (older steps, killed runs' leftovers)."""
    import shutil

    for path in directory.glob(f"{SHARDED_PREFIX}*"):
        if path.is_dir() and path.name != keep:
            shutil.rmtree(path, ignore_errors=True)


def full_model_state(model: nn.Module) -> dict[str, Any]:
    """The unsharded model state on the CPU (a collective under FSDP; rank 0 receives it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
