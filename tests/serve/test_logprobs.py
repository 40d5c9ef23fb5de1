"""Log-probabilities as the server returns them (``serve/logprobs.py``): how a token is named."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_token_pieces_name_the_bytes_of_part_of_a_character(tmp_path: Path) -> None:
    """A token that is part of a character gets its own bytes and OpenAI's ``bytes:\\x..`` name,
    whether it is a byte of the byte tokenizer, a byte-fallback token (Llama's ``<0xE2>``) or a
    piece of byte-level BPE (GPT-2's); whole characters keep their text."""
    tokenizers = pytest.importorskip("tokenizers")
    from yet_another_retnet.serve.logprobs import token_piece
    from yet_another_retnet.training.data import ByteTokenizer, HFTokenizer

    assert token_piece(ByteTokenizer(), 0xE2) == ("bytes:\\xe2", [0xE2])
    assert token_piece(ByteTokenizer(), ord("a")) == ("a", [ord("a")])
    # Byte fallback: "<0xE2>", "<0x82>", "<0xAC>" spell the euro sign.
    fallback = tokenizers.Tokenizer(tokenizers.models.BPE({"<0xE2>": 0, "<0x82>": 1, "<0xAC>": 2, "a": 3, "</s>": 4},
                                                          [], byte_fallback=True))
    fallback.decoder = tokenizers.decoders.ByteFallback()
    fallback.save(str(tmp_path / "fallback.json"))
    tok = HFTokenizer(tmp_path / "fallback.json")
    assert tok.decode([0, 1, 2]) == "€"
    assert [token_piece(tok, i) for i in range(4)] == [("bytes:\\xe2", [0xE2]), ("bytes:\\x82", [0x82]),
                                                      ("bytes:\\xac", [0xAC]), ("a", [ord("a")])]
    # Byte-level BPE trained here on text with multi-byte characters.
    level = tokenizers.Tokenizer(tokenizers.models.BPE())
    level.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    level.decoder = tokenizers.decoders.ByteLevel()
    level.train_from_iterator(["€ costs é and ü"] * 4, tokenizers.trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), special_tokens=["</s>"]))
    level.save(str(tmp_path / "level.json"))
    tok = HFTokenizer(tmp_path / "level.json")
    for text in ("€", "é", " costs"):
        for token in tok.encode(text):
            piece, raw = token_piece(tok, token)
            assert bytes(raw) == tok.decode([token]).encode() or piece.startswith("bytes:")
        assert b"".join(bytes(token_piece(tok, t)[1]) for t in tok.encode(text)) == text.encode()
    unseen = tok.encode("漢")  # not in the training text: three byte tokens, each named by its byte
    assert [token_piece(tok, t) for t in unseen] == [(f"bytes:\\x{b:02x}", [b]) for b in "漢".encode()]
