"""The tokenizer shipped with a pretrained checkpoint: SentencePiece-style BPE with byte fallback.

Built here with the ``tokenizers`` library the way Llama's ``tokenizer.json`` is (the one fla-hub's
RetNets ship): ``▁`` for spaces, ``<0xNN>`` byte tokens for characters outside the vocabulary,
``<s>``/``</s>`` as ids 1 and 2. It travels through ``retnet convert --from fla`` with its bos and
eos, and streamed output never shows half a character.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

tokenizers = pytest.importorskip("tokenizers")

from yet_another_retnet import RetNet, RetNetConfig  # noqa: E402
from yet_another_retnet.cli import main  # noqa: E402
from yet_another_retnet.training.data import HFTokenizer, StreamDecoder, load_tokenizer  # noqa: E402


def byte_fallback_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ("▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "▁w", "ll", "▁he", "▁hell", "▁hello", "or"):
        vocab[piece] = len(vocab)
    merges = [("▁", "h"), ("▁", "w"), ("l", "l"), ("▁h", "e"), ("▁he", "ll"), ("▁hell", "o"), ("o", "r")]
    tok = Tokenizer(BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(path))


def test_streaming_decodes_multi_byte_pieces(tmp_path: Path) -> None:
    byte_fallback_tokenizer(tmp_path / "tokenizer.json")
    tok = HFTokenizer(tmp_path / "tokenizer.json")
    text = "hello wörld 中文 🙂 hello"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert any(tok._tok.id_to_token(i) == "<0xE4>" for i in ids)  # 中 = E4 B8 AD, as three byte tokens
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces), pieces


def test_converted_checkpoint_brings_its_tokenizer_bos_and_eos(tmp_path: Path, capsys) -> None:
    config = RetNetConfig(vocab_size=300, d_model=32, num_heads=2, num_layers=1, ffn_dim=48, ffn="glu",
                          activation="swish", block_norm="rmsnorm", head_norm="rmsnorm", head_norm_weight=True,
                          rotation="rope", tie_embeddings=False, dropout=0.0)
    torch.manual_seed(0)
    src, out = tmp_path / "fla", tmp_path / "ours"
    RetNet(config).to_fla(src)
    byte_fallback_tokenizer(src / "tokenizer.json")
    (src / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "add_eos_token": False,
                                                           "bos_token": "<s>", "eos_token": "</s>"}))
    assert main(["convert", "--from", "fla", str(src), str(out)]) == 0
    tok = load_tokenizer(out)
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_token_id, tok.eos_token_id, tok.add_bos) == (1, 2, True)
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "hello 中", "--max-new-tokens", "8", "--temperature", "0",
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("hello 中")
    # the tokenizer (and its bos/eos) goes back to fla's format too
    back = tmp_path / "back"
    assert main(["convert", "--to", "fla", str(out), str(back)]) == 0
    assert (back / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert json.loads((back / "tokenizer_config.json").read_text())["add_bos_token"] is True


def trained_byte_level_bpe(path: Path) -> None:
    """A GPT-2-style byte-level BPE trained here: characters it has not merged (and every byte of
    a character outside its corpus) are byte tokens that decode to nothing whole on their own."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["hello world, the wörld is wide", "naïve café über straße", "中文 文字 hello 🙂"] * 20
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(path))


@pytest.mark.parametrize("build", [trained_byte_level_bpe, byte_fallback_tokenizer])
def test_streaming_decodes_a_short_window_to_the_same_text(build, tmp_path: Path) -> None:
    """A stream of thousands of tokens streams to exactly the text decoded at once, each token
    decoding a few tokens only (re-decoding the whole stream per token is quadratic)."""
    build(tmp_path / "tokenizer.json")
    tok = HFTokenizer(tmp_path / "tokenizer.json")
    # Multi-byte characters seen in training and not (漢, 😀, ж): merged pieces and bare bytes.
    text = "hello wörld 中文 🙂 naïve 漢字😀 жук, café " * 120
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) > 2500
    assert len({tok._tok.id_to_token(i) for i in ids}) > 20  # not one token a character
    decoded: list[int] = []
    real_decode = tok.decode

    def counting(ids: list[int]) -> str:
        decoded.append(len(ids))
        return real_decode(ids)

    tok.decode = counting  # type: ignore[method-assign]
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert max(decoded) <= 16, max(decoded)
