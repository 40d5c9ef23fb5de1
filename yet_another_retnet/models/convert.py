"""Checkpoint directories from one format to another: ``retnet convert``.

``ours``: :meth:`RetNet.save_pretrained`'s directory (``config.json``, safetensors, and a tokenizer
described by ``tokenizer_config.json``). ``fla``: flash-linear-attention's ``RetNetForCausalLM``
as on the Hugging Face Hub (``config.json`` with ``model_type: retnet``, safetensors, Hugging
Face tokenizer files). ``syncdoth`` (read only): syncdoth/RetNet's ``RetNetForCausalLM``
(``model_type: retnet`` with torchscale's field names; see :mod:`.syncdoth`). The output directory is written under a temporary name beside it and
renamed into place at the end: a conversion that fails writes nothing.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CONFIG_NAME
from .config import MODEL_TYPE
from .shards import load_json

FORMATS = ("ours", "fla", "syncdoth")
#: Formats that are only read (``--from``), never written.
READ_ONLY = ("syncdoth",)
#: Tokenizer files copied along as they are.
COPIED_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "special_tokens_map.json", "generation_config.json")
HF_TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


def detect_format(directory: Path) -> str:
    """``"fla"`` or ``"ours"`` from ``config.json``; ``ValueError`` for anything else."""
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory")
    if not path.is_file():
        raise ValueError(f"{directory} is not a checkpoint: no {CONFIG_NAME}")
    data = load_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a config object")
    if data.get("model_type") == "retnet" and "decoder_embed_dim" in data:
        return "syncdoth"  # syncdoth/RetNet shares fla's model_type, with torchscale's field names
    if data.get("model_type") == "retnet":
        return "fla"
    if "d_model" in data and data.get("model_type", MODEL_TYPE) == MODEL_TYPE:
        return "ours"
    raise ValueError(f"{path}: unknown checkpoint format (model_type {data.get('model_type')!r}); "
                     f"known: {', '.join(FORMATS)}")


def special_token_ids(src: Path, fla_config: dict[str, Any] | None) -> dict[str, Any]:
    """``bos_token_id``/``eos_token_id``/``add_bos`` for our tokenizer config, from the fla config
    and the Hugging Face ``tokenizer_config.json`` beside it."""
    out: dict[str, Any] = {}
    for name in ("bos_token_id", "eos_token_id"):
        value = (fla_config or {}).get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            out[name] = value
    hf_path = src / TOKENIZER_CONFIG
    if hf_path.is_file():
        try:
            hf = json.loads(hf_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):  # nested "[" too: data, not a crash
            hf = {}
        if isinstance(hf, dict) and isinstance(hf.get("add_bos_token"), bool):
            out["add_bos"] = hf["add_bos_token"]
    if "bos_token_id" in out:
        out.setdefault("add_bos", True)
    return out


def convert(src: str | Path, out: str | Path, source: str | None = None, target: str | None = None,
            dtype: torch.dtype | None = None, max_shard_size: int | str | None = None) -> Path:
    """Convert the checkpoint in ``src`` to ``target`` format in ``out`` (which must not exist or
    be empty). ``source`` defaults to the detected format, ``target`` to the other one."""
    from .fla import read_fla_config
    from .retnet import RetNet

    src, out = Path(src), Path(out)
    detected = detect_format(src)
    source = source or detected
    if source not in FORMATS:
        raise ValueError(f"unknown source format {source!r}; known: {', '.join(FORMATS)}")
    if source != detected:
        raise ValueError(f"{src} holds a {detected!r} checkpoint, not {source!r}")
    target = target or ("fla" if source == "ours" else "ours")
    if target not in FORMATS:
        raise ValueError(f"unknown target format {target!r}; known: {', '.join(FORMATS)}")
    if target in READ_ONLY:
        raise ValueError(f"--to {target}: that format is read, not written; known targets: ours, fla")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory")
    if out.resolve() == src.resolve():
        raise ValueError("the output directory must differ from the source")

    if source == "syncdoth":
        from .syncdoth import from_syncdoth, read_syncdoth_config

        fla_config: dict[str, Any] | None = read_syncdoth_config(src)  # its token ids, as fla's
        model = from_syncdoth(RetNet, src, dtype=dtype)
    else:
        fla_config = read_fla_config(src) if source == "fla" else None
        model = RetNet.from_fla(src, dtype=dtype) if source == "fla" else RetNet.from_pretrained(src, dtype=dtype)
    # The parents this call creates, deepest first: removed again if the conversion fails, so a
    # failed convert leaves no empty directories behind.
    created = [p for p in out.absolute().parents if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        if target == "fla":
            model.to_fla(tmp, max_shard_size)
        else:
            model.save_pretrained(tmp, max_shard_size)
        for name in COPIED_TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        if target == "ours" and (src / HF_TOKENIZER).is_file():
            described = {"type": "hf", "file": HF_TOKENIZER, **special_token_ids(src, fla_config)}
            (tmp / TOKENIZER_CONFIG).write_text(json.dumps(described, indent=2) + "\n")
        elif target == "fla" and (src / TOKENIZER_CONFIG).is_file():
            _fla_tokenizer_config(src, tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in created:
            try:
                parent.rmdir()
            except OSError:
                break
        raise
    return out


def _fla_tokenizer_config(src: Path, tmp: Path) -> None:
    """Our tokenizer description as Hugging Face's ``tokenizer_config.json`` and the ids in fla's config."""
    ours = load_json(src / TOKENIZER_CONFIG)
    if not isinstance(ours, dict) or ours.get("type") != "hf":
        return  # the byte tokenizer has no Hugging Face form
    config_path = tmp / CONFIG_NAME
    config = json.loads(config_path.read_text())
    for name in ("bos_token_id", "eos_token_id"):
        if isinstance(ours.get(name), int):
            config[name] = ours[name]
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    hf = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": bool(ours.get("add_bos", False))}
    (tmp / TOKENIZER_CONFIG).write_text(json.dumps(hf, indent=2) + "\n")
