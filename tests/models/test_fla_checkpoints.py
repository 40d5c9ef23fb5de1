"""fla RetNet checkpoints against fla's own model code (flash-linear-attention 0.6.0, on a CPU).

fla's ``RetNetForCausalLM`` runs with its pure-PyTorch references in place of its GPU kernels
(``tests/fla_oracle.py``); its checkpoints are written by its own ``save_pretrained``
(transformers), one file or shards with an index, float32 and bfloat16. Skipped without fla.
float32 logits are compared by relative (Frobenius) error: both sides round in float32 and each
is ~1e-4 off float64 logits of magnitude ~3, while they agree to ~3e-6 of the logits' norm.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from reference import rel_err

try:  # fla imports triton and transformers >= 5.6.2 at import: any failure means "not installed"
    import fla.models  # noqa: F401
except Exception as err:
    pytest.skip(f"needs flash-linear-attention 0.6.0 (the [fla] test extra): {err}", allow_module_level=True)

from fla_oracle import (
    fla_checkpoint_config,
    fla_checkpoint_state,
    fla_logits,
    fla_model,
    fla_on_cpu,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from yet_another_retnet import RetNet
from yet_another_retnet.cli import main
from yet_another_retnet.models.fla import config_from_fla, config_to_fla

FORMS = ("parallel", "chunkwise", "recurrent")


@pytest.fixture(scope="module")
def oracle32():
    with fla_on_cpu():
        model = fla_model(seed=0)
        ids = torch.randint(0, 97, (2, 70), generator=torch.Generator().manual_seed(1))
        return model, ids, fla_logits(model, ids)


def test_float32_logits_match_fla_in_every_form(oracle32):
    model, ids, expected = oracle32
    ours = RetNet.from_fla(fla_checkpoint_state(model), fla_checkpoint_config(model))
    with torch.no_grad():
        for form in FORMS:
            got = ours(ids, mode=form, chunk_size=16).logits
            assert rel_err(got, expected) <= 2e-5, form


def test_float64_logits_match_fla_line_for_line_references():
    with fla_on_cpu(float64=True):
        model = fla_model(seed=3, dtype=torch.float64, num_heads=2, hidden_size=32, expand_v=1.0, hidden_ratio=3)
        ids = torch.randint(0, 97, (2, 45), generator=torch.Generator().manual_seed(4))
        expected = fla_logits(model, ids)
    ours = RetNet.from_fla(fla_checkpoint_state(model), fla_checkpoint_config(model))
    assert ours.embed_tokens.weight.dtype == torch.float64
    with torch.no_grad():
        for form in FORMS:
            assert rel_err(ours(ids, mode=form, chunk_size=8).logits, expected) <= 1e-10, form


def test_chunked_prefill_then_decoding_gives_fla_full_sequence_logits(oracle32):
    model, ids, expected = oracle32
    ours = RetNet.from_fla(fla_checkpoint_state(model), fla_checkpoint_config(model))
    with torch.no_grad():
        out = ours(ids[:, :40], mode="chunkwise", chunk_size=16)  # 16 + 16 + 8
        assert rel_err(out.logits, expected[:, :40]) <= 2e-5
        state = out.state
        for t in range(40, 70):
            out = ours(ids[:, t : t + 1], state=state)  # the fast decoding step
            assert rel_err(out.logits[:, 0], expected[:, t]) <= 2e-5, t
            state = out.state


@pytest.mark.parametrize(("dtype", "shard"), [(torch.float32, None), (torch.bfloat16, "30KB")])
def test_fla_saved_checkpoints_convert_and_round_trip_bitwise(tmp_path: Path, oracle32, dtype, shard):
    model, ids, expected = oracle32
    src = tmp_path / "fla"
    with fla_on_cpu():
        copy.deepcopy(model).to(dtype).save_pretrained(src, **({"max_shard_size": shard} if shard else {}))
    assert (src / "model.safetensors.index.json").is_file() == (shard is not None)
    ours_dir, back = tmp_path / "ours", tmp_path / "back"
    assert main(["convert", "--from", "fla", str(src), str(ours_dir)]) == 0
    loaded = RetNet.from_pretrained(ours_dir)
    assert loaded.embed_tokens.weight.dtype == dtype
    if dtype == torch.float32:
        with torch.no_grad():
            assert rel_err(loaded(ids).logits, expected) <= 2e-5
    assert main(["convert", "--to", "fla", str(ours_dir), str(back), "--max-shard-size", "20KB"]) == 0
    assert (back / "model.safetensors.index.json").is_file()
    index = json.loads((back / "model.safetensors.index.json").read_text())
    stored = {}
    for file in set(index["weight_map"].values()):
        stored.update(load_file(str(back / file)))
    original = {k.replace("attn.g_norm.weight", "attn.g_norm_swish_gate.weight"): v.to(dtype)
                for k, v in model.state_dict().items()}
    assert stored.keys() == original.keys()
    assert all(torch.equal(stored[k], original[k]) for k in stored)
    # fla reads the exported config.json into the same architecture (fused kernels off for the CPU)
    with fla_on_cpu():
        from fla.models import RetNetConfig as FlaConfig
        from fla.models import RetNetForCausalLM

        fla_config = FlaConfig.from_pretrained(back)
        fla_config.update({"fuse_norm": False, "fuse_swiglu": False, "fuse_cross_entropy": False})
        rebuilt = RetNetForCausalLM(fla_config).to(dtype).eval()
        rebuilt.load_state_dict({k.replace("g_norm_swish_gate", "g_norm"): v for k, v in stored.items()})
        if dtype == torch.float32:
            assert rel_err(fla_logits(rebuilt, ids), expected) <= 1e-6
    # ... and back again: our checkpoint, bit for bit
    again = RetNet.from_fla(back)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), loaded.state_dict().values(),
                                                  strict=True))
    assert config_from_fla(json.loads((back / "config.json").read_text())) == loaded.config


def test_legacy_fused_gate_proj_is_split(oracle32):
    model, ids, expected = oracle32
    state = fla_checkpoint_state(model)
    for i in range(2):
        prefix = f"model.layers.{i}.mlp."
        state[f"{prefix}gate_proj.weight"] = torch.cat([state[f"{prefix}gate_proj.weight"],
                                                        state.pop(f"{prefix}up_proj.weight")])
    ours = RetNet.from_fla(state, fla_checkpoint_config(model))
    with torch.no_grad():
        assert rel_err(ours(ids).logits, expected) <= 2e-5


@pytest.mark.parametrize(("field", "value"), [("num_kv_heads", 2), ("use_short_conv", True),
                                              ("feature_map", "relu"), ("attnres_block_size", 2),
                                              ("expand_k", 0.5), ("hidden_act", "powlu")])
def test_unsupported_fla_fields_are_named(field, value):
    config = {"model_type": "retnet", "hidden_size": 64, "num_heads": 4, field: value}
    with pytest.raises(ValueError, match=field):
        config_from_fla(config)


@pytest.mark.parametrize(("field", "value"), [("expand_v", None), ("norm_eps", None), ("hidden_ratio", "2"),
                                              ("expand_v", "2"), ("hidden_ratio", 1e308),
                                              ("intermediate_size", "256"), ("hidden_size", "64")])
def test_fla_fields_of_the_wrong_type_are_named(field, value):
    config = {"model_type": "retnet", "hidden_size": 64, "num_heads": 4, "intermediate_size": None, field: value}
    with pytest.raises(ValueError, match=f"{field}"):
        config_from_fla(config)


def test_a_tied_fla_config_with_its_own_head_is_refused(tmp_path: Path):
    """tie_word_embeddings with an lm_head.weight that is not the embedding: dropping the head
    would load a model with other logits than the checkpoint's."""
    from yet_another_retnet import RetNetConfig
    from yet_another_retnet.models.config import FLA_ARCHITECTURE
    from yet_another_retnet.models.fla import fla_state_dict

    torch.manual_seed(0)
    model = RetNet(RetNetConfig(**{**FLA_ARCHITECTURE, "vocab_size": 40, "d_model": 16, "num_heads": 2,
                                   "num_layers": 1, "ffn_dim": 32})).eval()
    state, config = fla_state_dict(model), {**config_to_fla(model.config), "tie_word_embeddings": True}
    with pytest.raises(ValueError, match=r"lm_head\.weight differs from model\.embeddings\.weight"):
        RetNet.from_fla(state, config)
    model.to_fla(tmp_path / "fla")
    (tmp_path / "fla" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"lm_head\.weight differs from model\.embeddings\.weight"):
        RetNet.from_fla(tmp_path / "fla")
    # A stored head equal to the embedding is what tying means: it loads.
    tied = RetNet.from_fla({**state, "lm_head.weight": state["model.embeddings.weight"].clone()}, config)
    assert tied.config.tie_embeddings and tied.lm_head.weight is tied.embed_tokens.weight


def test_export_refuses_what_fla_cannot_express():
    from yet_another_retnet import RetNetConfig

    with pytest.raises(ValueError, match="rotation"):
        config_to_fla(RetNetConfig(ffn="glu", activation="swish", block_norm="rmsnorm", head_norm="rmsnorm"))


def _tiny_fla_dir(tmp_path: Path, oracle32, shard: str | None = "30KB") -> Path:
    model = oracle32[0]
    src = tmp_path / "fla"
    with fla_on_cpu():
        model.save_pretrained(src, **({"max_shard_size": shard} if shard else {}))
    return src


def _fails_cleanly(capsys, argv: list[str], out: Path, needle: str) -> None:
    capsys.readouterr()  # whatever came before (transformers' progress bars)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("retnet: error:") and needle in err[0], err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temporary left


def test_bad_inputs_fail_with_one_line_and_write_nothing(tmp_path: Path, oracle32, capsys):
    src = _tiny_fla_dir(tmp_path, oracle32)
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails_cleanly(capsys, ["convert", "--from", "fla", str(empty), str(out)], out, "not a checkpoint")

    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    moved = tmp_path / "moved.safetensors"
    shutil.move(src / shard, moved)  # a missing shard
    _fails_cleanly(capsys, ["convert", "--from", "fla", str(src), str(out)], out, shard)
    shutil.move(moved, src / shard)

    renamed = dict(index)
    renamed["weight_map"] = {**index["weight_map"], "model.norm.weight": "model-99999-of-99999.safetensors"}
    (src / "model.safetensors.index.json").write_text(json.dumps(renamed))  # names a file not there
    _fails_cleanly(capsys, ["convert", "--from", "fla", str(src), str(out)], out, "model-99999-of-99999")
    (src / "model.safetensors.index.json").write_text(json.dumps(index))

    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "hidden_size": 32, "num_heads": 2}))
    _fails_cleanly(capsys, ["convert", "--from", "fla", str(src), str(out)], out, "do not match the config")
    (src / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    _fails_cleanly(capsys, ["convert", str(src), str(out)], out, "unknown checkpoint format")
    (src / "config.json").write_text(json.dumps({"model_type": "retnet", "decoder_embed_dim": 64}))
    _fails_cleanly(capsys, ["convert", str(src), str(out)], out, "syncdoth")
    (src / "config.json").write_text(json.dumps(config))
    _fails_cleanly(capsys, ["convert", "--from", "ours", str(src), str(out)], out, "not 'ours'")
    assert main(["convert", "--from", "fla", str(src), str(out)]) == 0  # the repaired directory converts


def test_from_pretrained_reads_and_writes_shards(tmp_path: Path, oracle32):
    ours = RetNet.from_fla(fla_checkpoint_state(oracle32[0]), fla_checkpoint_config(oracle32[0]))
    ours.save_pretrained(tmp_path / "one")
    assert not (tmp_path / "one" / "model.safetensors.index.json").exists()
    ours.save_pretrained(tmp_path / "many", max_shard_size="25KB")
    files = sorted(p.name for p in (tmp_path / "many").glob("model-*.safetensors"))
    assert len(files) > 3
    for name in files:  # whole tensors, each shard within the limit unless one tensor is bigger
        tensors = load_file(str(tmp_path / "many" / name))
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= 25_000
    a, b = RetNet.from_pretrained(tmp_path / "one"), RetNet.from_pretrained(tmp_path / "many", dtype=torch.bfloat16)
    assert all(torch.equal(x.to(torch.bfloat16), y) for x, y in zip(a.state_dict().values(), b.state_dict().values(),
                                                                    strict=True))
    # a shard whose tensor has the wrong shape for the config (its metadata, save id and all, kept)
    victim = tmp_path / "many" / files[0]
    tensors = load_file(str(victim))
    with safe_open(str(victim), framework="pt") as f:
        metadata = f.metadata()
    name = next(iter(tensors))
    save_file({name: torch.zeros(3, 3), **{k: v for k, v in tensors.items() if k != name}}, str(victim),
              metadata=metadata)
    with pytest.raises(ValueError, match="wrong shape"):
        RetNet.from_pretrained(tmp_path / "many")


def test_a_model_converted_from_fla_loads_through_the_auto_classes(oracle32, tmp_path):
    """fla checkpoint -> `retnet convert --from fla` -> transformers' AutoModelForCausalLM."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    import yet_another_retnet.hf  # noqa: F401  (registers the Auto classes)

    model, ids, expected = oracle32
    src, ours_dir = tmp_path / "fla", tmp_path / "ours"
    with fla_on_cpu():
        model.save_pretrained(src)
    assert main(["convert", "--from", "fla", str(src), str(ours_dir)]) == 0
    auto = AutoModelForCausalLM.from_pretrained(ours_dir).eval()
    with torch.no_grad():
        got = auto(input_ids=ids).logits
    assert rel_err(got, expected) <= 2e-5
