"""A conversation with a RetNet whose state is kept between turns.

The transcript is plain text, ``User: ...`` / ``Assistant: ...`` lines. A RetNet's whole context
is its recurrent state, so each turn prefills only what is new (the user's line and the token that
ended the last reply) on top of the state the previous turn left, whatever the conversation's
length. A reply ends at the first line break the model writes, or after ``max_new_tokens``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ..generation import next_tokens
from ..training.data import StreamDecoder

USER, ASSISTANT = "User: ", "Assistant:"


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
        """The reply to ``text``, piece by piece (no line break: that ends it)."""
        line = self.tokenizer.encode(f"{USER}{text}\n{ASSISTANT}")
        new, self.pending = self.pending + line, []
        self.transcript += line
        device = self.model.device
        with torch.inference_mode():
            out = self.model.prefill(torch.tensor([new], device=device), state=self.state)
        self.prefilled.append(len(new))
        self.state, logits = out.state, out.logits[:, -1]
        decoder = StreamDecoder(self.tokenizer)
        greedy = self.temperature == 0
        for step in range(self.max_new_tokens):
            with torch.inference_mode():
                token = next_tokens(logits, not greedy, 1.0 if greedy else self.temperature, None,
                                    None if greedy else self.top_p, self.generator)
            tok = int(token[0])
            self.transcript.append(tok)
            piece = decoder.push(tok)
            if "\n" in piece:  # the reply's end: the model reads this token at the next turn
                self.pending = [tok]
                if piece.split("\n", 1)[0]:
                    yield piece.split("\n", 1)[0]
                return
            if piece:
                yield piece
            if step + 1 == self.max_new_tokens:
                break
            logits = self.model.step_(token, self.state)  # the chat's own state: stepped in place
        # Cut off: the model never read the last token; it goes first next turn, then a line break.
        line_break = self.tokenizer.encode("\n")
        self.pending = [self.transcript[-1], *line_break]
        self.transcript += line_break
        tail = decoder.flush()
        if tail:
            yield tail
