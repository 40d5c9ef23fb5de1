"""A run's settings before anything is written: defaults, the saved run's (on ``--resume``) and
the user's, checked against the output directory (:func:`resolve_config`) and, on resume, against
the checkpoint (:func:`check_run`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..models import RetNetConfig
from ..models.config import loads_strict
from ..ops import matmul
from . import rundir
from .checkpoint import CHECKPOINT_NAME, load_checkpoint
from .config import (
    PRECISIONS,
    PREPARED_DIR,
    RUN_FILES,
    TRAIN_CONFIG_NAME,
    TrainConfig,
    TrainingError,
    _flag,
)
from .corpus import Corpus
from .data import ByteTokenizer, HFTokenizer


def resolve_config(explicit: dict[str, Any], resume: bool = False, overwrite: bool = False) -> TrainConfig:
    """The run's settings: defaults, then the saved run's (on resume), then what the user gave.

    Checks the output directory before anything is written: a directory that already holds a
    run needs ``resume`` or ``overwrite``; ``resume`` needs a checkpoint and must not change a
    setting in :attr:`TrainConfig.IDENTITY`.
    """
    defaults = TrainConfig()
    out = Path(explicit.get("out", defaults.out))
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out} exists and is not a directory")
    if resume and overwrite:
        raise TrainingError("--resume and --overwrite exclude each other")
    if explicit.get("extend_schedule") and not resume:
        raise TrainingError("--extend-schedule applies only with --resume (a new run's schedule follows --max-steps)")
    with rundir.hold(out):  # no other process may change the directory while it is checked
        note = rundir.recover(out, RUN_FILES) if rundir.is_main() else None
        if note:
            rundir.note(note)
        return _resolve_config(out, explicit, defaults, resume, overwrite)


def _resolve_config(out: Path, explicit: dict[str, Any], defaults: TrainConfig, resume: bool,
                    overwrite: bool) -> TrainConfig:
    saved_path = out / TRAIN_CONFIG_NAME
    found = rundir.state(out, RUN_FILES, TRAIN_CONFIG_NAME, CHECKPOINT_NAME, ignore=(PREPARED_DIR,))
    if resume:
        if found == "unfinished":
            raise TrainingError(f"--resume: the run in {out} stopped before its first checkpoint, so there is "
                                f"nothing to resume; run the same command without --resume to start it over")
        if not (out / CHECKPOINT_NAME).is_file() or not saved_path.is_file():
            raise TrainingError(f"--resume: nothing to resume in {out} (no {CHECKPOINT_NAME})")
        try:
            saved = loads_strict(saved_path.read_bytes(), str(saved_path))["train"]
            if not isinstance(saved, dict):
                raise TypeError(f"'train' is a {type(saved).__name__}, not an object")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise TrainingError(f"--resume: {saved_path} is unreadable: {err}") from err
        for name in TrainConfig.IDENTITY:
            if name in explicit and explicit[name] != saved.get(name):
                raise TrainingError(
                    f"--{_flag(name)} {explicit[name]} differs from the run in {out} ({saved.get(name)}); "
                    f"a resumed run keeps its settings: drop the flag or choose another --out"
                )
        inherited = {k: v for k, v in saved.items() if k not in TrainConfig.PER_CALL}
        try:
            config = TrainConfig.from_dict({**defaults.to_dict(), **inherited, **explicit})
        except TypeError as err:
            raise TrainingError(f"--resume: {saved_path} is unreadable: {err}") from err
    else:
        if found == "foreign" and not overwrite:
            raise TrainingError(f"--out {out} is not empty and holds no training run; choose an empty or new directory")
        if found == "run" and not overwrite:
            raise TrainingError(
                f"--out {out} already holds a training run: pass --resume to continue it, "
                f"--overwrite to replace it, or choose another --out"
            )
        config = TrainConfig.from_dict({**defaults.to_dict(), **explicit})
    config.out = str(out)
    config.validate()
    return config


def build_model_config(config: TrainConfig, vocab_size: int) -> RetNetConfig:
    overrides: dict[str, Any] = {"vocab_size": vocab_size}
    for name in ("d_model", "num_layers", "num_heads", "ffn_dim", "dropout"):
        if getattr(config, name) is not None:
            overrides[name] = getattr(config, name)
    try:
        return RetNetConfig.from_preset(config.preset, **overrides)
    except ValueError as err:
        raise TrainingError(f"invalid model size: {err}") from err



def check_run(config: TrainConfig, corpus: Corpus, tokenizer: ByteTokenizer | HFTokenizer,
               resume: bool, say: Callable[[str], None]) -> tuple[RetNetConfig, dict[str, Any] | None]:
    """The model configuration and, on ``resume``, the checkpoint, once it agrees with this call."""
    model_config = build_model_config(config, tokenizer.vocab_size)
    out = Path(config.out)
    checkpoint: dict[str, Any] | None = None
    if resume:
        checkpoint = load_checkpoint(out)
        saved = checkpoint.get("run", {})
        if saved.get("data_sha256") != corpus.sha256:
            raise TrainingError(f"--resume: the training data differs from the data of the run in {out}")
        if saved.get("model_config") != model_config.to_dict():
            raise TrainingError(f"--resume: the model configuration differs from the run in {out}")
        if not _same_tokenizer(saved.get("tokenizer", {}), tokenizer.describe()):
            raise TrainingError(f"--resume: the tokenizer differs from the one of the run in {out} "
                                f"(its type, vocabulary size or file content)")
        if checkpoint["step"] >= config.max_steps:
            raise TrainingError(
                f"--resume: the run in {out} already reached step {checkpoint['step']} of --max-steps "
                f"{config.max_steps}; to train further, pass a larger --max-steps with --extend-schedule"
            )
        _check_schedule(config, int(checkpoint["step"]), saved.get("train", {}).get("max_steps"), say)
        _check_rounding(config, saved.get("train", {}), say)
        saved_backend = checkpoint.get("cpu_matmul")  # the products' rounding, as before the stop
        if saved_backend in matmul.BACKENDS and matmul.pin_cpu_backend(saved_backend) != saved_backend:
            say(f"note: the run used the {saved_backend} matmul backend, this call {matmul.cpu_backend()} "
                f"({matmul.ENV}): it continues, but not bit for bit")
    return model_config, checkpoint



def _same_tokenizer(saved: dict[str, Any], now: dict[str, Any]) -> bool:
    """Type and vocabulary size, and for a tokenizer file its content (runs recorded before the
    digest existed compare without it)."""
    if (saved.get("type"), saved.get("vocab_size")) != (now.get("type"), now.get("vocab_size")):
        return False
    return "sha256" not in saved or "sha256" not in now or saved["sha256"] == now["sha256"]


def _check_rounding(config: TrainConfig, saved: dict[str, Any], say: Callable[[str], None]) -> None:
    """Settings a resume may change that compute the same steps with other rounding
    (:attr:`TrainConfig.ROUNDING`: a note says the run is not bit for bit), but not a change to
    fp16: the checkpoint holds no gradient scaler state, and a fresh scaler skips updates while it
    calibrates its scale (from fp16, the scaler is simply no longer needed)."""
    before = saved.get("precision")
    if config.precision == "fp16" and before in PRECISIONS and before != "fp16":
        raise TrainingError(
            f"--precision fp16 differs from the run in {config.out} ({before}): its checkpoint holds no fp16 "
            f"gradient scaler state to continue from; drop the flag or start a new run in another --out")
    for name in TrainConfig.ROUNDING:
        if name in saved and saved[name] != getattr(config, name):
            say(f"note: --{_flag(name)} {_shown(getattr(config, name))}: the run used {_shown(saved[name])}; "
                f"it continues, but not bit for bit")


def _shown(value: object) -> str:
    return "the default" if value is None else str(value)


def _check_schedule(config: TrainConfig, step: int, saved_max: object, say: Callable[[str], None]) -> None:
    """A resumed run's LR schedule follows this call's ``--max-steps``. A run that finished its
    schedule and is resumed to a larger horizon would see its LR rise again, which is rarely
    wanted: refused unless ``--extend-schedule`` asks for it (then said in the log)."""
    if not isinstance(saved_max, int) or isinstance(saved_max, bool) or saved_max == config.max_steps:
        return
    if step >= saved_max and not config.extend_schedule:
        raise TrainingError(
            f"--max-steps {config.max_steps}: the run in {config.out} finished its {saved_max}-step LR schedule; "
            f"training on would stretch the schedule to {config.max_steps} steps (the LR rises again): pass "
            f"--extend-schedule to do that, or start a new run in another --out"
        )
    what = "extended" if config.max_steps > saved_max else "shortened"
    say(f"note: --max-steps {config.max_steps}: the LR schedule of the run ({saved_max} steps) is {what} to "
        f"{config.max_steps} steps from step {step} on")
