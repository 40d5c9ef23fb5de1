"""Log-probabilities of the generated tokens, as OpenAI's API returns them (``logprobs``).

The engine computes, for a request that asks, each chosen token's log-probability and the
``top`` most likely alternatives (:func:`token_logprobs`) from the model's own next-token
distribution: the log-softmax of the raw logits in float32, before the request's temperature,
``top_k``/``top_p``, logit bias and penalties (what the model thinks, not what was sampled from).
The server lays them out in the two shapes of the API (:class:`LogprobsLayout`):

* completions (``logprobs: N``, 0 to 5): ``{"tokens", "token_logprobs", "top_logprobs",
  "text_offset"}``, ``top_logprobs`` one ``{token text: logprob}`` per token;
* chat (``logprobs: true``, ``top_logprobs: N``, 0 to 20): ``{"content": [{"token", "logprob",
  "bytes", "top_logprobs": [...]}]}``.

With completions' ``echo`` the prompt's tokens come first (:func:`score_tokens`: each scored by
the logits of the position before it; the first, which nothing predicts, has a null logprob).

A token's text is its decoding alone. A token that is part of a character (a byte of the byte
tokenizer, a byte-fallback ``<0xE2>`` token, a byte-level BPE piece) gets its own ``bytes`` and is
named ``bytes:\\xe2...`` as OpenAI names such tokens; other tokens' ``bytes`` are their text's
UTF-8 (U+FFFD's for a part of a character in a vocabulary of neither kind). The
end-of-sequence token, which ends the text and is none of it, gets no entry; the tokens of a stop
string that ends the text get theirs (their text is cut). A token's ``text_offset`` counts the
characters the tokens before it decoded to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

#: The most alternatives a request may ask per token: completions' ``logprobs``, chat's
#: ``top_logprobs`` (OpenAI's limits).
MAX_COMPLETION_LOGPROBS = 5
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class TokenLogprobs:
    """One token: its id and log-probability (``None`` for a prompt's first token, which nothing
    predicts), and the ``top`` most likely ids with theirs (most likely first)."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...]


def token_logprobs(logits: Tensor, token: int, top: int) -> TokenLogprobs:
    """``token``'s log-probability under ``logits`` ``(vocab,)`` and the ``top`` best ids'."""
    return score_tokens(logits[None], [int(token)], top)[0]


def score_tokens(logits: Tensor, following: list[int], top: int) -> list[TokenLogprobs]:
    """Each of ``following`` scored by the logits ``(positions, vocab)`` of the position before it,
    with the ``top`` best ids' (``echo`` with ``logprobs``: a prompt's tokens after its first)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp[torch.arange(len(following)), torch.tensor(following)].tolist()
    best = torch.topk(logp, min(top, logp.shape[-1]), dim=-1) if top > 0 else None
    entries = []
    for i, (token, value) in enumerate(zip(following, chosen, strict=True)):
        pairs = () if best is None else tuple(zip(best.indices[i].tolist(), best.values[i].tolist(), strict=True))
        entries.append(TokenLogprobs(token, value, pairs))
    return entries


def _byte_level_table() -> dict[str, int]:
    """The characters byte-level BPE vocabularies (GPT-2's, and the many after it) write for each
    byte: the printable ones stand for themselves, the other 68 for 256, 257, ... in byte order."""
    direct = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    others = [b for b in range(256) if b not in direct]
    return {chr(b): b for b in direct} | {chr(256 + i): b for i, b in enumerate(others)}


_BYTE_LEVEL = _byte_level_table()


def _own_bytes(piece: str | None) -> bytes | None:
    """A token's own bytes from its vocabulary string where the decoded text cannot give them (part
    of a character): a byte-fallback token (``<0xE2>``) or a byte-level BPE piece; else ``None``."""
    if piece is None:
        return None
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            return None
    if piece and all(c in _BYTE_LEVEL for c in piece):
        return bytes(_BYTE_LEVEL[c] for c in piece)
    return None


def _named(raw: bytes) -> str:
    """Text for a token's bytes: their UTF-8 text if they are whole characters, else named as
    OpenAI names such tokens (``bytes:\\xe2\\x82``), so that alternatives do not all read U+FFFD
    (and merge in completions' ``top_logprobs``)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def token_piece(tokenizer: Any, token: int) -> tuple[str, list[int]]:
    """``(text, bytes)`` of one token decoded alone."""
    from ..training.data import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        one = bytes([token]) if 0 <= token < 256 else b""
        return _named(one), list(one)
    text = tokenizer.decode([token])
    if "\ufffd" in text and hasattr(tokenizer, "id_to_token"):  # part of a character: its own bytes
        own = _own_bytes(tokenizer.id_to_token(token))
        if own is not None:
            return _named(own), list(own)
    return text, list(text.encode("utf-8"))


class LogprobsLayout:
    """The ``logprobs`` object of a choice, in the completions or the chat shape, for the tokens
    added since the last :meth:`take` (a streamed chunk's) or all of them (a whole reply)."""

    def __init__(self, tokenizer: Any, chat: bool) -> None:
        self.tokenizer, self.chat = tokenizer, chat
        self._entries: list[tuple[TokenLogprobs, int]] = []  # (token, its text's offset)

    def add(self, entry: TokenLogprobs, offset: int) -> None:
        """A generated token whose text starts ``offset`` characters into the completion."""
        self._entries.append((entry, offset))

    def take(self) -> dict[str, Any]:
        """The object for the tokens added since the last call."""
        entries, self._entries = self._entries, []
        if self.chat:
            return {"content": [self._chat_entry(e) for e, _ in entries]}
        texts = [token_piece(self.tokenizer, e.token)[0] for e, _ in entries]
        return {"tokens": texts, "token_logprobs": [e.logprob for e, _ in entries],
                "top_logprobs": [None if e.logprob is None else {token_piece(self.tokenizer, t)[0]: lp for t, lp in e.top}
                                 for e, _ in entries],
                "text_offset": [offset for _, offset in entries]}

    def _chat_entry(self, entry: TokenLogprobs) -> dict[str, Any]:
        text, raw = token_piece(self.tokenizer, entry.token)
        top = []
        for token, logprob in entry.top:
            t, b = token_piece(self.tokenizer, token)
            top.append({"token": t, "logprob": logprob, "bytes": b})
        return {"token": text, "logprob": entry.logprob, "bytes": raw, "top_logprobs": top}
