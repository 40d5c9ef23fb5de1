"""Big checkpoints: sharded safetensors with ``model.safetensors.index.json``, loaded without a copy.

The layout is Hugging Face's: one ``model.safetensors`` when everything fits in one shard, else
``model-00001-of-0000N.safetensors`` ... and an index ``{"metadata": {"total_size": bytes},
"weight_map": {name: file}}``. Shards hold whole tensors, filled in order up to ``max_shard_size``
(default 5 GB, as ``transformers`` writes them).

Every save draws a random save id and writes it into each file's metadata and into the index
(written last, atomically). Re-saving over an earlier save with the same shard names replaces the
shards one by one: a save killed half-way leaves new shards beside old ones under an index that
names them all, each with a checksum of its own tensors only. On load every shard must carry
the index's save id (an index without one, from an older save or another tool, takes shards
without one), so such a mix is refused, never loaded.

Loading builds the model on the meta device (no memory, no initialisation) and fills it one
tensor at a time: each tensor is read from a shard opened for it alone, converted (renamed,
permuted, cast to the dtype asked for) and set in place, and the shard is closed again, which
unmaps the pages it read. A weight whose stored dtype is the one asked for and which needs no
conversion stays a view of the memory-mapped file. Peak memory is then the model in its target
dtype plus about one tensor, never the model twice.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .checkpoint import (
    CHECKSUM_KEY,
    VERIFY_ENV,
    WEIGHTS_NAME,
    atomic_write,
    digest_update,
    remove_stale,
    tensors_digest,
)

INDEX_NAME = "model.safetensors.index.json"
#: Metadata key (in each weights file and in the index's ``metadata``) of the save that wrote it.
SAVE_ID_KEY = "yaretnet_save_id"
#: Hugging Face's default largest shard, in bytes ("5GB").
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
_SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like ``"5GB"``, ``"500MB"``, ``"2GiB"``; ``ValueError`` otherwise."""
    if isinstance(size, bool):
        raise ValueError(f"max_shard_size must be a positive size, got {size!r}")
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
        if match is None or match.group(2).upper() not in _UNITS:
            raise ValueError(f"max_shard_size must be a size like '5GB' or a number of bytes, got {size!r}")
        value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value < 1:
        raise ValueError(f"max_shard_size must be a positive size, got {size!r}")
    return value


def plan_shards(tensors: Mapping[str, Tensor], max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> list[list[str]]:
    """Names grouped into shards of at most ``max_shard_size`` bytes (a bigger tensor alone)."""
    limit = parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def save_sharded(tensors: Mapping[str, Tensor], directory: str | Path,
                 max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                 metadata: dict[str, str] | None = None) -> list[str]:
    """Write ``tensors`` to ``directory`` as one file or shards plus index; returns the files.

    Every file is written atomically (see :func:`~.checkpoint.atomic_write`), the index last;
    shard files and an index left from an earlier save that the new one does not use are removed
    afterwards, so the directory never names a file that is not there. Every file and the index
    carry this save's random id, so shards of two saves are never loaded together.
    """
    directory = Path(directory)
    groups = plan_shards(tensors, max_shard_size)
    save_id = secrets.token_hex(16)
    meta = {"format": "pt", **(metadata or {}), SAVE_ID_KEY: save_id}
    if len(groups) == 1:
        names = [WEIGHTS_NAME]
    else:
        names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for file, group in zip(names, groups, strict=True):
        part = {name: tensors[name].detach().contiguous().cpu() for name in group}
        # Each file carries a checksum of its own tensors, verified when it is loaded.
        file_meta = {**meta, CHECKSUM_KEY: tensors_digest(part)}
        atomic_write(directory / file, lambda tmp, part=part, m=file_meta: save_file(part, str(tmp), metadata=m))
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values()),
                              SAVE_ID_KEY: save_id},
                 "weight_map": {name: file for file, group in zip(names, groups, strict=True) for name in group}}
        atomic_write(directory / INDEX_NAME, lambda tmp: tmp.write_text(json.dumps(index, indent=2) + "\n"))
    else:
        (directory / INDEX_NAME).unlink(missing_ok=True)
    for stale in directory.iterdir():
        if stale.name not in names and (_SHARD_PATTERN.fullmatch(stale.name) or stale.name == WEIGHTS_NAME):
            stale.unlink()
    return names


def remove_shards(directory: Path) -> None:
    """Remove the index and shard files an earlier sharded save left in ``directory``: the index
    first, so the directory never names a file that is not there."""
    remove_stale(directory / INDEX_NAME)
    for stale in sorted(directory.iterdir()):
        if _SHARD_PATTERN.fullmatch(stale.name):
            remove_stale(stale)


def load_json(path: Path) -> Any:
    """``path``'s JSON value; ``ValueError`` naming the file if it is not JSON."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    except RecursionError as err:  # thousands of nested "[": json's decoder recurses per level
        raise ValueError(f"{path} is not valid JSON: nested too deeply") from err


def read_weight_map(index_path: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file) of the index at ``index_path``, every shard a
    plain name present beside it. ``ValueError`` for an index that is not one or names a shard
    outside its directory, ``FileNotFoundError`` for a missing shard."""
    index = load_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index_path} has no weight_map of tensor names to files")
    for file in sorted(set(weight_map.values())):
        # Files from elsewhere are data: a shard must be a plain name inside the directory.
        if Path(file).name != file or file in ("", ".", ".."):
            raise ValueError(f"{index_path} names a shard outside the checkpoint: {file!r}")
        if not (index_path.parent / file).is_file():
            raise FileNotFoundError(f"{index_path} names {file}, which is not in {index_path.parent}")
    return weight_map


def weight_files(directory: str | Path) -> dict[str, Path]:
    """Each stored tensor's name and the file holding it, from the index or the single file.

    Raises ``FileNotFoundError`` when there are no weights or a file the index names is missing,
    ``ValueError`` for an index that is not one.
    """
    directory = Path(directory)
    index_path = directory / INDEX_NAME
    if index_path.is_file():
        files = {name: directory / file for name, file in read_weight_map(index_path).items()}
        check_save_ids(index_path, sorted(set(files.values())))
        return files
    single = directory / WEIGHTS_NAME
    if not single.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {directory}")
    try:
        with safe_open(str(single), framework="pt", device="cpu") as f:
            return {name: single for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise OSError(f"{single} is truncated or corrupt: {err}") from err


def check_save_ids(index_path: Path, shards: Iterable[Path]) -> None:
    """``ValueError`` unless every shard carries the save id of the index at ``index_path``.

    A save over an earlier one with the same shard names that was killed half-way leaves new
    shards beside old ones (each with a valid checksum of its own tensors); the index, written
    last, still has the old save's id, or none (a save from before ids existed). An index without
    an id therefore takes only shards without one.
    """
    index = load_json(index_path)
    meta = index.get("metadata") if isinstance(index, dict) else None
    expected = meta.get(SAVE_ID_KEY) if isinstance(meta, dict) else None
    mixed = sorted(path.name for path in shards if read_metadata(path).get(SAVE_ID_KEY) != expected)
    if mixed:
        raise ValueError(f"{index_path.parent}: {mixed[:5]} come from another save than {index_path.name} "
                         f"(a save was interrupted and left shards of two saves); save the model again")


def tensor_shapes(files: Mapping[str, Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """``(shape, dtype name)`` of each tensor in ``files`` (from the headers; nothing is read).

    Also checks that every file holds the tensors the index says it does.
    """
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                present = set(f.keys())
                absent = sorted(set(names) - present)
                if absent:
                    raise ValueError(f"{path} does not hold {absent[:5]}, which the index puts there")
                for name in names:
                    piece = f.get_slice(name)
                    out[name] = (tuple(piece.get_shape()), str(piece.get_dtype()))
        except (SafetensorError, OSError, RuntimeError) as err:
            raise OSError(f"{path} is truncated or corrupt: {err}") from err
    return out


def read_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise OSError(f"{path} is truncated or corrupt: {err}") from err


def verified_readers(files: Mapping[str, Path], checksums: Mapping[Path, str | None]
                     ) -> Iterator[tuple[str, Callable[[], Tensor]]]:
    """``(name, read)`` for every tensor of ``files``, file by file and in name order within a
    file, each ``read`` feeding what it read to its file's SHA-256; the read of a file's last
    tensor raises ``OSError`` if the file does not match its ``checksums`` entry (``None``: not
    checked, as for files of other tools). The caller's single pass over the weights is the
    check's: nothing is read twice, and a file fails before its model is handed out."""
    import hashlib

    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    for path in sorted(by_file):
        names = sorted(by_file[path])
        checksum = checksums.get(path)
        digest = hashlib.sha256() if checksum is not None else None
        for i, name in enumerate(names):
            yield name, _reader(path, name, digest, checksum if i == len(names) - 1 else None)


def _reader(path: Path, name: str, digest: Any, checksum: str | None) -> Callable[[], Tensor]:
    def read() -> Tensor:
        t = read_tensor(path, name)
        if digest is not None:
            digest_update(digest, name, t)
            if checksum is not None and digest.hexdigest() != checksum:
                raise OSError(f"{path} is corrupt: its tensors do not match the checksum saved with them "
                              f"(verify=False or {VERIFY_ENV}=0 loads it anyway)")
        return t

    return read


def read_tensor(path: Path, name: str) -> Tensor:
    """One tensor, from a mapping of ``path`` opened for it alone (closing it unmaps what was read)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.get_tensor(name)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise OSError(f"{path} is truncated or corrupt: {err}") from err


def stored_dtype(files: Mapping[str, Path]) -> torch.dtype:
    """The dtype of the first floating-point tensor stored (the default dtype to load in)."""
    for name, path in files.items():
        # The header names each tensor's dtype: read that, not the tensor (a whole embedding).
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                code = f.get_slice(name).get_dtype()
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise OSError(f"{path} is truncated or corrupt: {err}") from err
        dtype = _SAFETENSORS_DTYPES.get(code)
        if dtype is not None and dtype.is_floating_point:
            return dtype
    return torch.float32


#: safetensors' dtype codes of the floating-point types a checkpoint may store.
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                       "BF16": torch.bfloat16}


def fill_model(model: nn.Module, sources: Iterable[tuple[str, Callable[[], Tensor]]],
               dtype: torch.dtype) -> nn.Module:
    """Set each parameter ``name`` of a meta-device ``model`` to ``make()`` cast to ``dtype``.

    One tensor at a time (the caller's ``make`` reads it); every parameter must be filled. Each
    weight gets its own memory: a tensor already in ``dtype`` (a view of a memory-mapped file, or
    a caller's tensor) is copied, so the model never depends on a file staying in place or in the
    page cache (evicted file pages would be read from disk again on every decoding step).
    """
    for name, make in sources:
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        old = module._parameters.get(leaf)
        if old is None:
            raise RuntimeError(f"fill_model: the model has no parameter {name}")  # a converter bug
        t = make()
        if tuple(t.shape) != tuple(old.shape):
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match the config's {tuple(old.shape)}")
        if old.dtype.is_floating_point and not t.dtype.is_floating_point:
            # An integer (or bool, complex) tensor cast to float would load a silently wrong weight.
            raise ValueError(f"{name}: stored as {str(t.dtype).removeprefix('torch.')}, not a floating-point "
                             f"type; a float parameter cannot be loaded from it")
        cast = t.to(dtype)
        owned = cast.clone(memory_format=torch.contiguous_format) if cast is t else cast.contiguous()
        del t, cast  # the source view goes now: its file mapping is released before the next read
        module._parameters[leaf] = nn.Parameter(owned, requires_grad=old.requires_grad)
    return model


def tie_and_check(model: Any) -> None:
    """Re-tie a tied head to the embedding and check that no parameter is left on the meta device."""
    if model.config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise RuntimeError(f"weights left unset while loading: {left[:5]}")  # a converter bug
