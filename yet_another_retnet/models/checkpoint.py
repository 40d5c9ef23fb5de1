"""``save_pretrained`` / ``from_pretrained``: ``config.json`` + safetensors weights, atomic writes.

Each file is written to a temporary name in the target directory, flushed to disk and renamed
over the old one, so a crash leaves either the old file or the new one, never half of either.
Big models are sharded (``models/shards.py``). Each weights file also carries the config in its
metadata, so a pair that does not belong together (a crash between the two renames, a
hand-edited config) is caught on load, and a SHA-256 of its tensors (names, dtypes, shapes and
bytes), so a damaged byte in the weights is a clear error instead of a silently wrong model.
Files without that checksum (older saves, other tools) load unverified; ``verify=False`` or
``YARETNET_VERIFY_WEIGHTS=0`` skips the check (the hashing of the bytes as they are read in, about
1 s per GB). Everything in the metadata is parsed as data: the config as JSON text,
never as a path.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import MODEL_TYPE, RetNetConfig, loads_strict

if TYPE_CHECKING:
    from .retnet import RetNet

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
#: Metadata key of the weights' checksum.
CHECKSUM_KEY = "yaretnet_sha256"
VERIFY_ENV = "YARETNET_VERIFY_WEIGHTS"


def digest_update(digest: Any, name: str, t: torch.Tensor) -> None:
    """Feed one tensor (name, dtype, shape, raw bytes) to a ``hashlib`` digest."""
    digest.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}|".encode())
    if t.numel():
        digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over ``tensors`` in name order: each name, dtype, shape and raw bytes."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest_update(digest, name, tensors[name])
    return digest.hexdigest()


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)``, fsync the result, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp (and some writers) leave the file owner-only (0600); give it the mode a plain
        # open() would have given it.
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        # A full disk, a quota, an I/O error: torch.save reports them as RuntimeError. The old
        # file is untouched; say which file could not be written, in one line.
        Path(tmp).unlink(missing_ok=True)
        reason = os.strerror(err.errno) if isinstance(err, OSError) and err.errno else str(err).splitlines()[0]
        failure = OSError(f"could not write {path} ({reason}); the previous version, if any, is kept")
        failure.errno = getattr(err, "errno", None)
        raise failure from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def fsync_path(path: Path) -> None:
    """Flush ``path`` (a file, or a directory's entries after a rename) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _weights_of(model: RetNet) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as embed_tokens.weight
    return state


def save_pretrained(model: RetNet, directory: str | Path, max_shard_size: int | str | None = None) -> None:
    """``config.json`` and the weights, one file or shards with an index (see :mod:`.shards`).

    A quantized model (``models/quantized.py``) is saved in its own format by
    :func:`~.quantized.save_quantized` (one file: ``max_shard_size`` does not apply); its float
    form would mix int8 codes and float scales in a file no loader reads.
    """
    from .quantized import QUANTIZATION_NAME, is_quantized, save_quantized
    from .shards import DEFAULT_MAX_SHARD_SIZE, save_sharded

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"save_pretrained: {directory} exists and is not a directory")
    if is_quantized(model):
        save_quantized(model, directory)
        return
    config_json = model.config.to_json()
    save_sharded(_weights_of(model), directory, max_shard_size or DEFAULT_MAX_SHARD_SIZE,
                 metadata={"config": config_json})
    # model_type lets transformers' AutoConfig find yet_another_retnet.hf's classes in the same file.
    file_json = json.dumps({"model_type": MODEL_TYPE, **model.config.to_dict()}, indent=2, sort_keys=True) + "\n"
    atomic_write(directory / CONFIG_NAME, lambda tmp: tmp.write_text(file_json))
    # A quantization.json left by an earlier quantized save goes last: which format a directory
    # holds is read from its weights file (models/quantized.py: saved_quantization), so until it
    # goes the new float files load as float, and a kill before this line loses nothing.
    remove_stale(directory / QUANTIZATION_NAME)


def remove_stale(path: Path) -> None:
    """Remove ``path`` (a file an earlier save left that the new one does not use), if there, and
    make the removal durable."""
    if not path.exists():
        return
    path.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_config(directory: Path) -> RetNetConfig:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
    data = loads_strict(path.read_bytes(), str(path))
    try:
        return RetNetConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path} is not a valid RetNetConfig: {err}") from err


def load_pretrained(cls: type[RetNet], directory: str | Path, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None, verify: bool | None = None) -> RetNet:
    """The model in ``directory``, built on the meta device and filled one tensor at a time.

    ``verify`` (default: on unless ``YARETNET_VERIFY_WEIGHTS=0``) checks each file's checksum.
    """
    from .shards import (
        fill_model,
        read_metadata,
        stored_dtype,
        tensor_shapes,
        tie_and_check,
        verified_readers,
        weight_files,
    )

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"from_pretrained: {directory} is not a directory")
    config = read_config(directory)
    files = weight_files(directory)
    if verify is None:
        verify = os.environ.get(VERIFY_ENV, "1") != "0"
    checksums: dict[Path, str | None] = {}
    for path in sorted(set(files.values())):
        metadata = read_metadata(path)
        check_stored_config(metadata, path, config, directory / CONFIG_NAME)
        checksums[path] = metadata.get(CHECKSUM_KEY) if verify else None
    shapes = tensor_shapes(files)
    dtypes = sorted({dtype_name for _, dtype_name in shapes.values()})
    if len(dtypes) > 1:
        raise ValueError(f"{directory} mixes dtypes {dtypes} in its weights; a model's weights share one dtype")
    target_dtype = dtype or stored_dtype(files)
    model = cls(config, device="meta", dtype=target_dtype)
    expected = {name: t.shape for name, t in _weights_of(model).items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(n for n in set(expected) & set(shapes) if tuple(shapes[n][0]) != tuple(expected[n]))
    if missing or unexpected or wrong:
        raise ValueError(
            f"the weights in {directory} do not match its config: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, wrong shape {wrong[:5]}"
        )
    # Each file's checksum is checked as its tensors are read in: one pass over the weights.
    fill_model(model, verified_readers(files, checksums), target_dtype)
    tie_and_check(model)
    model.eval()
    return model.to(device=device or "cpu")


def check_stored_config(metadata: dict[str, str], weights_path: Path, config: RetNetConfig, config_path: Path) -> None:
    """``ValueError`` unless the config a weights file carries in its metadata (if any) is
    ``config``, the one read from ``config_path``. Metadata is data from the file: parsed as JSON
    text, never opened as a path."""
    saved = metadata.get("config")
    if saved is None:
        return
    try:
        stored = RetNetConfig.from_json_text(saved)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{weights_path}: the config in its metadata is invalid: {err}") from err
    if stored != config:
        raise ValueError(f"{config_path} does not match the config stored with {weights_path}")
