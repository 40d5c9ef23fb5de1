"""save_pretrained / from_pretrained: round trips, atomic writes under a crash, clear load errors."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from yet_another_retnet import RetNet, RetNetConfig
from yet_another_retnet.models import checkpoint, shards

VOCAB = 41


def make_model(seed: int = 0, **overrides: Any) -> RetNet:
    fields: dict[str, Any] = {"vocab_size": VOCAB, "d_model": 16, "num_heads": 2, "num_layers": 2,
                              "ffn_dim": 24, "dropout": 0.0}
    fields.update(overrides)
    torch.manual_seed(seed)
    model = RetNet(RetNetConfig(**fields)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # every weight non-default, so a missed one shows
                p.add_(0.3 * torch.randn_like(p))
    return model


IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("overrides", [
    {},
    {"tie_embeddings": False, "ffn": "glu", "block_norm": "rmsnorm", "head_norm": "rmsnorm"},
    {"bias": True, "embedding_norm": True, "value_factor": 1.0, "pre_norm": False, "residual_scale": 2.0},
])
def test_round_trip_restores_identical_logits(tmp_path: Path, overrides: dict[str, Any]) -> None:
    model = make_model(**overrides)
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = RetNet.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config and not loaded.training
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == model.config.tie_embeddings
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)
        for mode in ("chunkwise", "recurrent"):
            assert torch.equal(loaded(IDS, mode=mode).logits, model(IDS, mode=mode).logits)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_load_with_dtype_and_device(tmp_path: Path) -> None:
    model = make_model(tie_embeddings=False)
    model.save_pretrained(str(tmp_path))  # a str path works too
    low = RetNet.from_pretrained(str(tmp_path), device="cpu", dtype=torch.bfloat16)
    assert low.dtype == torch.bfloat16 and low.device.type == "cpu"
    assert all(p.dtype == torch.bfloat16 for p in low.parameters())
    with torch.no_grad():
        got, want = low(IDS).logits.float(), model(IDS).logits
    assert torch.isfinite(got).all()
    assert float((got - want).abs().max() / want.abs().max()) < 0.05
    wide = RetNet.from_pretrained(tmp_path, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(wide(IDS).logits.float(), want, rtol=1e-4, atol=1e-5)
    # A float64 model saves and loads as float64.
    wide.save_pretrained(tmp_path / "f64")
    assert RetNet.from_pretrained(tmp_path / "f64").dtype == torch.float64


def test_overwriting_replaces_both_files(tmp_path: Path) -> None:
    make_model(seed=1).save_pretrained(tmp_path)
    new = make_model(seed=2, num_layers=3)
    new.save_pretrained(tmp_path)
    loaded = RetNet.from_pretrained(tmp_path)
    assert loaded.config.num_layers == 3
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, new(IDS).logits)


def _no_temp_files(directory: Path) -> bool:
    return sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]


def test_crash_while_writing_weights_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = make_model(seed=1)
    old.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def crashing_save_file(tensors: dict[str, torch.Tensor], filename: str, metadata: Any = None) -> None:
        save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # half written, then the "power cut"
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError("simulated crash while writing")

    monkeypatch.setattr(shards, "save_file", crashing_save_file)
    with pytest.raises(OSError, match="simulated crash"):
        make_model(seed=2, num_layers=3).save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert _no_temp_files(tmp_path)
    with torch.no_grad():
        assert torch.equal(RetNet.from_pretrained(tmp_path)(IDS).logits, old(IDS).logits)


def test_crash_at_the_rename_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = make_model(seed=1)
    old.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def failing_replace(src: Any, dst: Any) -> None:
        raise OSError("simulated crash at rename")

    monkeypatch.setattr(checkpoint.os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated crash"):
        make_model(seed=2).save_pretrained(tmp_path)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert _no_temp_files(tmp_path)
    with torch.no_grad():
        assert torch.equal(RetNet.from_pretrained(tmp_path)(IDS).logits, old(IDS).logits)


def test_crash_between_the_two_renames_is_detected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """New weights next to an old config.json: a clear error when they disagree, never a mix."""
    make_model(seed=1).save_pretrained(tmp_path)
    real_replace = os.replace

    def replace_weights_only(src: Any, dst: Any) -> None:
        if str(dst).endswith("config.json"):
            raise OSError("simulated crash before the config rename")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace_weights_only)
    with pytest.raises(OSError, match="simulated crash"):
        make_model(seed=2, num_layers=3).save_pretrained(tmp_path)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="does not match"):
        RetNet.from_pretrained(tmp_path)


def test_missing_files_and_directories(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        RetNet.from_pretrained(tmp_path / "nowhere")
    make_model().save_pretrained(tmp_path / "a")
    (tmp_path / "a" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        RetNet.from_pretrained(tmp_path / "a")
    make_model().save_pretrained(tmp_path / "b")
    (tmp_path / "b" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        RetNet.from_pretrained(tmp_path / "b")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):
        RetNet.from_pretrained(tmp_path / "file")
    with pytest.raises(OSError):
        make_model().save_pretrained(tmp_path / "file")


@pytest.mark.parametrize("damage", ["truncate-half", "truncate-header", "random-bytes", "empty"])
def test_corrupt_weights_raise_oserror(tmp_path: Path, damage: str) -> None:
    make_model().save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    if damage == "truncate-half":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "truncate-header":
        path.write_bytes(data[:20])
    elif damage == "random-bytes":
        path.write_bytes(torch.randint(0, 256, (len(data),), generator=torch.Generator().manual_seed(0),
                                       dtype=torch.uint8).numpy().tobytes())
    else:
        path.write_bytes(b"")
    with pytest.raises(OSError, match=r"model\.safetensors"):
        RetNet.from_pretrained(tmp_path)


def test_checksums_are_checked_in_the_one_read_of_each_tensor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model(tie_embeddings=False)
    model.save_pretrained(tmp_path, max_shard_size=3000)  # several shards, each with its checksum
    files = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(files) >= 3
    reads: list[str] = []
    read_tensor = shards.read_tensor

    def counted(path: Path, name: str) -> torch.Tensor:
        reads.append(name)
        return read_tensor(path, name)

    monkeypatch.setattr(shards, "read_tensor", counted)
    loaded = RetNet.from_pretrained(tmp_path)
    assert sorted(reads) == sorted(model.state_dict())  # every tensor read once, checksums included
    assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    # One value changed in the second shard, its checksum kept: caught, naming that shard.
    from safetensors import safe_open

    with safe_open(str(files[1]), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        metadata = f.metadata()
    name = sorted(tensors)[-1]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[-1] += 1.0
    save_file(tensors, str(files[1]), metadata=metadata)
    with pytest.raises(OSError, match=files[1].name):
        RetNet.from_pretrained(tmp_path)
    assert RetNet.from_pretrained(tmp_path, verify=False) is not None


@pytest.mark.parametrize("damage", ["not-json", "not-an-object", "unknown-field", "invalid-value", "binary"])
def test_corrupt_config_raises_valueerror(tmp_path: Path, damage: str) -> None:
    make_model().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    if damage == "not-json":
        path.write_text(path.read_text()[:-10])
    elif damage == "not-an-object":
        path.write_text("[1, 2]")
    elif damage == "unknown-field":
        path.write_text(json.dumps({**data, "n_layer": 3}))
    elif damage == "invalid-value":
        path.write_text(json.dumps({**data, "num_heads": 5}))
    else:
        path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=r"config\.json"):
        RetNet.from_pretrained(tmp_path)


def test_config_not_matching_the_weights(tmp_path: Path) -> None:
    make_model().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    # A valid config that is not the one the weights were saved with.
    path.write_text(json.dumps({**data, "num_layers": 3}))
    with pytest.raises(ValueError, match="does not match"):
        RetNet.from_pretrained(tmp_path)
    # Even a change that keeps every shape (the norm eps) is caught through the stored config.
    path.write_text(json.dumps({**data, "norm_eps": 1e-3}))
    with pytest.raises(ValueError, match="does not match"):
        RetNet.from_pretrained(tmp_path)
    # A weights file without a stored config (written by other tools) is checked by key and shape.
    path.write_text(json.dumps({**data, "num_layers": 3}))
    tensors = {k: v.contiguous() for k, v in make_model().state_dict().items() if k != "lm_head.weight"}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing .*decoder\.layers\.2"):
        RetNet.from_pretrained(tmp_path)
    path.write_text(json.dumps({**data, "ffn_dim": 32}))
    with pytest.raises(ValueError, match=r"wrong shape .*ffn"):
        RetNet.from_pretrained(tmp_path)
    path.write_text(json.dumps(data))
    assert RetNet.from_pretrained(tmp_path).config.num_layers == 2


def test_saved_files_follow_the_umask(tmp_path: Path) -> None:
    """Atomic writes go through a temporary file; the result must not stay owner-only (0600)."""
    old = os.umask(0o022)
    try:
        model = RetNet(RetNetConfig(vocab_size=32, d_model=16, num_heads=2, num_layers=1, ffn_dim=32))
        model.save_pretrained(tmp_path / "m")
    finally:
        os.umask(old)
    for name in ("config.json", "model.safetensors"):
        assert stat.S_IMODE((tmp_path / "m" / name).stat().st_mode) == 0o644


class Killed(BaseException):
    """A kill at one point of a save: not an ``Exception``, so no ``except`` in the code under test
    turns it into something else."""


def _kill_at(step: int, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make the ``step``-th visible change of a directory (a rename into place, the removal of a
    file that is not a hidden temporary one) raise :class:`Killed` before it happens; returns the
    list the changes are recorded in (``step=-1``: never killed, only recorded)."""
    done: list[str] = []
    real_replace, real_unlink = os.replace, Path.unlink

    def point(what: str) -> None:
        if len(done) == step:
            raise Killed(what)
        done.append(what)

    def replace(src: Any, dst: Any) -> None:
        point(f"rename {Path(dst).name}")
        real_replace(src, dst)

    def unlink(self: Path, missing_ok: bool = False) -> None:
        if not self.name.startswith("."):  # a temporary file's clean-up is no visible change
            point(f"remove {self.name}")
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(Path, "unlink", unlink)
    return done


def _logits(source: Path | RetNet) -> torch.Tensor:
    """The logits on ``IDS`` of a model, or of the one loaded from a directory."""
    model = RetNet.from_pretrained(source) if isinstance(source, Path) else source
    with torch.no_grad():
        return model(IDS).logits


def test_an_interrupted_save_over_shards_is_refused_never_loaded_as_a_mix(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards of two saves (a re-save killed after its first shard) each pass their own checksum:
    the save id in every shard and the index tells them apart."""
    old, new = make_model(seed=1, tie_embeddings=False), make_model(seed=2, tie_embeddings=False)
    old.save_pretrained(tmp_path, max_shard_size=3000)
    shard_files = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shard_files) >= 3
    _kill_at(1, monkeypatch)  # the first shard renamed into place, then the kill
    with pytest.raises(Killed):
        new.save_pretrained(tmp_path, max_shard_size=3000)
    monkeypatch.undo()
    assert sorted(tmp_path.glob("model-*.safetensors")) == shard_files  # the same names, one of them new
    with pytest.raises(ValueError, match=r"interrupted.*save the model again") as caught:
        RetNet.from_pretrained(tmp_path)
    assert shard_files[0].name in str(caught.value)
    new.save_pretrained(tmp_path, max_shard_size=3000)  # saving again repairs it
    assert torch.equal(_logits(tmp_path), _logits(new))

    # Files from before save ids (no id in the index or the shards) still load ...
    index_path = tmp_path / shards.INDEX_NAME
    index = json.loads(index_path.read_text())
    assert shards.SAVE_ID_KEY in index["metadata"]
    del index["metadata"][shards.SAVE_ID_KEY]
    index_path.write_text(json.dumps(index))
    from safetensors import safe_open

    for path in shard_files:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            metadata = dict(f.metadata())
        if path != shard_files[0]:  # ... but not beside a shard a newer save wrote
            del metadata[shards.SAVE_ID_KEY]
        save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ValueError, match="interrupted"):
        RetNet.from_pretrained(tmp_path)
    with safe_open(str(shard_files[0]), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        metadata = {k: v for k, v in f.metadata().items() if k != shards.SAVE_ID_KEY}
    save_file(tensors, str(shard_files[0]), metadata=metadata)
    assert torch.equal(_logits(tmp_path), _logits(new))


@pytest.mark.parametrize(("first", "second"), [("int8", "float"), ("int8", "float-sharded"),
                                               ("float-sharded", "int8"), ("int8", "int4")])
def test_a_save_killed_at_any_point_over_another_format_leaves_the_old_or_the_new_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: str, second: str) -> None:
    """Float over quantized and back: a stale quantization.json (or index) never makes the
    directory unloadable or read as the other format, at any kill point nor at the end."""
    from yet_another_retnet.models.quantized import quantize_model

    def save(kind: str, seed: int, directory: Path) -> None:
        model = make_model(seed=seed, tie_embeddings=False)
        if kind in ("int8", "int4"):
            quantize_model(model, kind).save_pretrained(directory)  # a quantized model keeps its format
        else:
            model.save_pretrained(directory, max_shard_size=3000 if kind == "float-sharded" else None)

    save(first, 1, tmp_path / "old")
    save(second, 2, tmp_path / "new")
    want_old, want_new = _logits(tmp_path / "old"), _logits(tmp_path / "new")
    assert not torch.equal(want_old, want_new)
    steps = _kill_at(-1, monkeypatch)
    save(first, 1, tmp_path / "count")
    steps.clear()
    save(second, 2, tmp_path / "count")
    monkeypatch.undo()
    assert len(steps) >= 3, steps
    for step in range(len(steps) + 1):
        directory = tmp_path / f"kill-{step}"
        save(first, 1, directory)
        _kill_at(step, monkeypatch)
        if step < len(steps):
            with pytest.raises(Killed):
                save(second, 2, directory)
        else:
            save(second, 2, directory)
        monkeypatch.undo()
        got = _logits(directory)
        assert torch.equal(got, want_old) or torch.equal(got, want_new), (step, steps)
    # The finished save leaves nothing of the old format behind.
    names = {p.name for p in (tmp_path / f"kill-{len(steps)}").iterdir()}
    assert ("quantization.json" in names) == (second in ("int8", "int4"))
    assert (shards.INDEX_NAME in names) == (second == "float-sharded")


def test_integer_weights_are_refused_for_float_parameters(tmp_path: Path) -> None:
    model = make_model()
    model.save_pretrained(tmp_path)
    tensors = {k: (v * 100).to(torch.int32).contiguous() for k, v in model.state_dict().items()
               if k != "lm_head.weight"}  # one integer dtype throughout: not a mix
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"decoder\..*stored as int32, not a floating-point type"):
        RetNet.from_pretrained(tmp_path)
