"""A conversation with a RetNet whose state is kept between turns.

The transcript is plain text, ``User: ...`` / ``Assistant: ...`` lines. A RetNet's whole context
is its recurrent state, so each turn prefills only what is new (the user's line and the token that
ended the last reply) on top of the state the previous turn left, whatever the conversation's
length. A reply ends at the first line break the model writes, at the tokenizer's end-of-sequence
token (never shown), or after ``max_new_tokens``. A pretrained model's conversation starts with
its beginning-of-sequence token, as ``retnet generate``'s prompts do.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ..generation import next_tokens
from ..training.data import ByteTokenizer, StreamDecoder

USER, ASSISTANT = "User: ", "Assistant:"


def end_token(tokenizer: Any) -> int | None:
    """The token that ends a generation: the tokenizer's ``eos_token_id`` (a pretrained model's
    ``</s>``), else the byte tokenizer's end-of-document id (what ``retnet prepare`` puts between
    documents), else ``None``."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None and isinstance(tokenizer, ByteTokenizer):
        eos = tokenizer.eod_id
    return None if eos is None else int(eos)


def with_bos(tokenizer: Any, ids: list[int]) -> list[int]:
    """``ids`` after the beginning-of-sequence token when the tokenizer's model expects one
    (``add_bos``, as ``retnet generate`` reads it)."""
    if getattr(tokenizer, "add_bos", False):
        return [int(tokenizer.bos_token_id), *ids]
    return ids


class Chat:
    """One conversation: :meth:`turn` takes the user's line and yields the reply as it is written.

    Attributes:
        state: the model's state after every token the model has read (``None`` before the first turn).
        pending: tokens written but not yet read by the model (the one that ended the last reply).
        prefilled: the number of tokens each turn's prefill read (what is new, not the transcript).
        transcript: every token of the conversation so far.
    """

    def __init__(self, model: Any, tokenizer: Any, max_new_tokens: int = 200, temperature: float = 0.8,
                 top_p: float | None = 0.95, seed: int = 0) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.generator = torch.Generator(device=model.device).manual_seed(seed)
        self.state: Any = None
        self.pending: list[int] = []
        self.prefilled: list[int] = []
        self.transcript: list[int] = []

    def turn(self, text: str) -> Iterator[str]:
        """The reply to ``text``, piece by piece (no line break: that ends it).

        A reply left unfinished (the caller stops iterating, or an error) is ended as a cut-off
        one is: the token the model has not read yet, then a line break, go first next turn."""
        line = self.tokenizer.encode(f"{USER}{text}\n{ASSISTANT}")
        if self.state is None:
            line = with_bos(self.tokenizer, line)
        new = self.pending + line
        device = self.model.device
        with torch.inference_mode():
            out = self.model.prefill(torch.tensor([new], device=device), state=self.state)
        self.pending = []
        self.transcript += line
        self.prefilled.append(len(new))
        self.state, logits = out.state, out.logits[:, -1]
        decoder = StreamDecoder(self.tokenizer)
        eos = end_token(self.tokenizer)
        greedy = self.temperature == 0
        unread: int | None = None  # the last token written, until the model reads it
        ended = False  # at a line break the model wrote: the reply needs no other end
        try:
            for step in range(self.max_new_tokens):
                with torch.inference_mode():
                    token = next_tokens(logits, not greedy, 1.0 if greedy else self.temperature, None,
                                        None if greedy else self.top_p, self.generator)
                tok = unread = int(token[0])
                self.transcript.append(tok)
                if tok == eos:  # the model ended its reply; the token is not text
                    break
                piece = decoder.push(tok)
                if "\n" in piece:  # the reply's end: the model reads this token at the next turn
                    self.pending, ended = [tok], True
                    if piece.split("\n", 1)[0]:
                        yield piece.split("\n", 1)[0]
                    return
                if piece:
                    yield piece
                if step + 1 == self.max_new_tokens:
                    break
                logits = self.model.step_(token, self.state)  # the chat's own state: stepped in place
                unread = None
            tail = decoder.flush()
            if tail:
                yield tail
        finally:
            if not ended:
                # Cut off (or ended by the model, or abandoned): the model never read the last
                # token; it goes first next turn, then a line break.
                line_break = self.tokenizer.encode("\n")
                self.pending = [*([] if unread is None else [unread]), *line_break]
                self.transcript += line_break
