"""``save_pretrained`` / ``from_pretrained``: ``config.json`` + safetensors weights, atomic writes.

Each file is written to a temporary name in the target directory, flushed to disk and renamed
over the old one, so a crash leaves either the old file or the new one, never half of either.
Big models are sharded (``models/shards.py``). The weights files also carry the config in their metadata, so a pair that does not belong
together (a crash between the two renames, a hand-edited config) is caught on load.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import MODEL_TYPE, RetNetConfig

if TYPE_CHECKING:
    from .retnet import RetNet

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)``, fsync the result, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp (and some writers) leave the file owner-only (0600); give it the mode a plain
        # open() would have given it.
        os.chmod(tmp, 0o666 & ~_current_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _weights_of(model: RetNet) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as embed_tokens.weight
    return state


def save_pretrained(model: RetNet, directory: str | Path, max_shard_size: int | str | None = None) -> None:
    """``config.json`` and the weights, one file or shards with an index (see :mod:`.shards`)."""
    from .shards import DEFAULT_MAX_SHARD_SIZE, save_sharded

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"save_pretrained: {directory} exists and is not a directory")
    config_json = model.config.to_json()
    save_sharded(_weights_of(model), directory, max_shard_size or DEFAULT_MAX_SHARD_SIZE,
                 metadata={"config": config_json})
    # model_type lets transformers' AutoConfig find yet_another_retnet.hf's classes in the same file.
    file_json = json.dumps({"model_type": MODEL_TYPE, **model.config.to_dict()}, indent=2, sort_keys=True) + "\n"
    atomic_write(directory / CONFIG_NAME, lambda tmp: tmp.write_text(file_json))


def read_config(directory: Path) -> RetNetConfig:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    try:
        return RetNetConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path} is not a valid RetNetConfig: {err}") from err


def load_pretrained(cls: type[RetNet], directory: str | Path, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> RetNet:
    """The model in ``directory``, built on the meta device and filled one tensor at a time."""
    from .shards import (
        fill_model,
        read_metadata,
        read_tensor,
        stored_dtype,
        tensor_shapes,
        tie_and_check,
        weight_files,
    )

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"from_pretrained: {directory} is not a directory")
    config = read_config(directory)
    files = weight_files(directory)
    for path in sorted(set(files.values())):
        saved = read_metadata(path).get("config")
        if saved is not None and RetNetConfig.from_json(saved) != config:
            raise ValueError(f"{directory / CONFIG_NAME} does not match the config stored with {path}")
    shapes = tensor_shapes(files)
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
    def reader(name: str) -> Callable[[], torch.Tensor]:
        return lambda: read_tensor(files[name], name)

    fill_model(model, ((name, reader(name)) for name in expected), target_dtype)
    tie_and_check(model)
    model.eval()
    return model.to(device=device or "cpu")
