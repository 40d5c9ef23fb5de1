"""Files are data: damaged bytes are caught (or provably harmless), metadata is never a path,
and every refusal is one clear line."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from yet_another_retnet import RetNet
from yet_another_retnet.cli import main
from yet_another_retnet.models import RetNetConfig
from yet_another_retnet.training.checkpoint import load_checkpoint

from .conftest import TINY


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from yet_another_retnet.training.data import default_corpus_text

    root = tmp_path_factory.mktemp("damaged")
    corpus = root / "corpus.txt"
    corpus.write_text(default_corpus_text()[:8_000])
    out = root / "run"
    assert main(["train", "--data", str(corpus), "--out", str(out), *TINY, "--max-steps", "2",
                 "--eval-interval", "2"]) == 0
    return out


def _flips(data: bytes, rng: random.Random, n: int) -> list[tuple[int, int]]:
    """``n`` (position, bit) pairs: a few in the first 8 + header bytes, the rest anywhere."""
    header = 8 + int.from_bytes(data[:8], "little") if len(data) > 8 else len(data)
    spots = [rng.randrange(min(header, len(data))) for _ in range(n // 4)]
    spots += [rng.randrange(len(data)) for _ in range(n - len(spots))]
    return [(p, rng.randrange(8)) for p in spots]


def test_flipped_bits_in_the_weights_never_load_silently(trained: Path, tmp_path: Path,
                                                        rng: random.Random) -> None:
    reference = {k: v.clone() for k, v in RetNet.from_pretrained(trained).state_dict().items()}
    data = (trained / "model.safetensors").read_bytes()
    copy = tmp_path / "model"
    copy.mkdir()
    (copy / "config.json").write_bytes((trained / "config.json").read_bytes())
    caught = harmless = 0
    for position, bit in _flips(data, rng, 60):
        damaged = bytearray(data)
        damaged[position] ^= 1 << bit
        (copy / "model.safetensors").write_bytes(bytes(damaged))
        try:
            model = RetNet.from_pretrained(copy)
        except (OSError, ValueError) as err:
            assert "model.safetensors" in str(err) or "config" in str(err), err
            caught += 1
            continue
        # Loaded: then the flip changed nothing the model reads (JSON whitespace, ...).
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in reference.items()), (position, bit)
        harmless += 1
    assert caught >= 40, (caught, harmless)


def test_the_checksum_can_be_skipped_and_files_without_one_load(trained: Path, tmp_path: Path) -> None:
    tensors = load_file(trained / "model.safetensors")
    config_text = (trained / "config.json").read_text()
    name = next(iter(sorted(tensors)))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1.0
    for directory, metadata in (("other-tool", {"format": "pt"}), ("damaged", None)):
        target = tmp_path / directory
        target.mkdir()
        (target / "config.json").write_text(config_text)
        if metadata is None:  # the original checksum over changed tensors: a damaged file
            with open(trained / "model.safetensors", "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            metadata = header["__metadata__"]
        save_file(tensors, str(target / "model.safetensors"), metadata=metadata)
    loaded = RetNet.from_pretrained(tmp_path / "other-tool")  # no checksum: loads unverified
    assert torch.equal(loaded.state_dict()[name], tensors[name])
    with pytest.raises(OSError, match=r"damaged/model\.safetensors is corrupt"):
        RetNet.from_pretrained(tmp_path / "damaged")
    assert torch.equal(RetNet.from_pretrained(tmp_path / "damaged", verify=False).state_dict()[name], tensors[name])
    os.environ["YARETNET_VERIFY_WEIGHTS"] = "0"
    try:
        RetNet.from_pretrained(tmp_path / "damaged")
    finally:
        del os.environ["YARETNET_VERIFY_WEIGHTS"]


def test_metadata_is_parsed_as_data_never_opened_as_a_path(trained: Path, tmp_path: Path) -> None:
    tensors = load_file(trained / "model.safetensors")
    (tmp_path / "config.json").write_bytes((trained / "config.json").read_bytes())
    secret = tmp_path / "secret.json"
    secret.write_text((trained / "config.json").read_text())  # a valid config, reachable as a path
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it for reading would block forever
    for value in (str(secret), str(fifo), " " + str(secret)):
        save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt", "config": value})
        with pytest.raises(ValueError, match="metadata is invalid"):
            RetNet.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Infinity is not a valid JSON number"):
        RetNetConfig.from_json_text('{"embed_scale": Infinity}')


def test_mixed_dtypes_and_bad_configs_are_refused_in_one_line(
        trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tensors = load_file(trained / "model.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].double()
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "config.json").write_bytes((trained / "config.json").read_bytes())
    save_file(tensors, str(mixed / "model.safetensors"), metadata={"format": "pt"})
    infinite = tmp_path / "infinite"
    infinite.mkdir()
    (infinite / "config.json").write_text((trained / "config.json").read_text()
                                          .replace('"embed_scale": 1.0', '"embed_scale": Infinity'))
    wrong_type = tmp_path / "wrong-type"
    wrong_type.mkdir()
    (wrong_type / "config.json").write_text((trained / "config.json").read_text()
                                            .replace('"num_layers": 2', '"num_layers": "2"'))
    for directory, message in ((mixed, "mixes dtypes"), (infinite, "Infinity is not a valid JSON number"),
                               (wrong_type, "num_layers must be a positive int, got str")):
        capsys.readouterr()
        assert main(["generate", str(directory), "--max-new-tokens", "2"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    with pytest.raises(TypeError, match="num_layers"):
        RetNetConfig(num_layers="2")  # type: ignore[arg-type]


def test_flipped_bits_in_a_training_checkpoint_are_caught(trained: Path, tmp_path: Path,
                                                         rng: random.Random) -> None:
    data = (trained / "checkpoint.pt").read_bytes()
    reference = load_checkpoint(trained)
    caught = 0
    for _ in range(25):
        damaged = bytearray(data)
        damaged[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        (tmp_path / "checkpoint.pt").write_bytes(bytes(damaged))
        try:
            state = load_checkpoint(tmp_path)
        except OSError as err:
            assert "checkpoint.pt" in str(err)
            caught += 1
            continue
        assert state["step"] == reference["step"]  # harmless: loads the same content
        for key in reference["model"]:
            assert torch.equal(state["model"][key], reference["model"][key])
    assert caught >= 20
