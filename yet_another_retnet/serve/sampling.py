"""A served request's next token: from its own logits, with one draw from its own generator.

``generate`` samples with ``torch.multinomial``, which draws one random number per vocabulary
entry to pick one token. The engine picks a token for every request at every step, one request
at a time (each has its own seeded generator, so its tokens do not depend on the batch), and
there that draw was the largest cost after the model step itself (see docs/serving.md). Here a
token costs one uniform number and a walk of the cumulative distribution (inverse transform
sampling): the same distribution, from the same shift, temperature and ``top_k``/``top_p``
filter as :func:`~yet_another_retnet.generation.next_tokens`; for a given seed the tokens differ
from ``generate``'s.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..generation import filter_logits


def adjust_logits(logits: Tensor, counts: dict[int, int], presence_penalty: float = 0.0,
                  frequency_penalty: float = 0.0, logit_bias: dict[int, float] | None = None) -> Tensor:
    """OpenAI's sampling adjustments on one request's ``logits`` ``(vocab,)``, in float32:
    ``logit[j] + bias[j] - count[j] * frequency_penalty - (count[j] > 0) * presence_penalty``,
    ``count[j]`` the times token ``j`` was generated so far for the request. The logits
    themselves when nothing applies."""
    penalise = bool(counts) and (presence_penalty != 0 or frequency_penalty != 0)
    if not logit_bias and not penalise:
        return logits
    out = logits.float().clone()
    if logit_bias:
        out.index_add_(0, torch.tensor(list(logit_bias), device=out.device),
                       torch.tensor(list(logit_bias.values()), dtype=out.dtype, device=out.device))
    if penalise:
        times = torch.tensor(list(counts.values()), dtype=out.dtype, device=out.device)
        out.index_add_(0, torch.tensor(list(counts), device=out.device),
                       -(times * frequency_penalty + (times > 0).to(out.dtype) * presence_penalty))
    return out


def pick_token(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None,
               generator: torch.Generator | None) -> int:
    """The next token for one request's ``logits`` ``(vocab,)``: the argmax at ``temperature`` 0,
    else a sample from the softmax of the logits divided by ``temperature``, restricted to the
    ``top_k`` most likely tokens and the ``top_p`` nucleus, drawn with ``generator``."""
    if temperature == 0:
        return int(logits.argmax())
    # Shifted so the best logit is 0 before scaling (a tiny temperature cannot overflow).
    scores = logits.float()[None]
    scores = filter_logits((scores - scores.amax()) / temperature, top_k, top_p)
    cdf = scores.softmax(dim=-1)[0].cumsum(dim=0)
    total = float(cdf[-1])
    if not total > 0 or total == float("inf"):  # NaN logits: no distribution to draw from
        raise ValueError(f"logits: no finite distribution to sample from (its sum is {total})")
    # The first entry whose cumulative sum exceeds u in [0, total) has a nonzero probability.
    u = torch.rand((), generator=generator, device=cdf.device) * total
    index = int(torch.searchsorted(cdf, u[None], right=True))
    if index == cdf.shape[0]:  # u rounded up to the total: the last entry with a nonzero probability
        index = int(torch.searchsorted(cdf, cdf[-1:]))
    return index
