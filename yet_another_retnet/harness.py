"""lm-evaluation-harness on a RetNet (extra ``[eval]``): ``retnet eval DIR --tasks ...``.

:class:`RetNetLM` is lm-eval's ``TemplateLM`` over our model and tokenizer:

- ``loglikelihood``: a batch of distinct contexts is read in the chunkwise form (left-padded:
  :meth:`RetNet.prefill`, the logits at each context's end and the state), then every
  continuation of those contexts runs from its context's state (right-padded: a position never
  sees a later one, so the padding changes no score). The choices of a question share one read.
- ``loglikelihood_rolling`` (perplexity): each document is scored whole, in windows of
  ``window`` tokens that carry the recurrent state, so no token loses its context (a RetNet has no
  maximum length); documents are batched, right-padded.
- ``generate_until``: our generation (chunkwise prefill, one recurrent step per token), batched
  by generation arguments, each row stopping at one of its stop strings or at the end-of-text
  token (as lm-eval's Hugging Face model does); generation arguments are read as lm-eval reads
  them (``max_gen_toks`` or its aliases), and any we cannot honour is refused.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

try:
    from lm_eval.api.model import TemplateLM
except ImportError as err:  # an optional dependency
    raise ImportError("--tasks needs lm-evaluation-harness: pip install 'yet-another-retnet[eval]'") from err

from .models.retnet import RetNet, RetNetState
from .training.data import ByteTokenizer, HFTokenizer

#: Generation arguments we do not implement, with the value at which they change nothing: a
#: task giving another value is refused (its scores would not be what it asks for).
_NEUTRAL_GEN_KWARGS: dict[str, Any] = {"num_beams": 1, "num_return_sequences": 1, "repetition_penalty": 1.0,
                                       "length_penalty": 1.0, "no_repeat_ngram_size": 0, "typical_p": 1.0,
                                       "min_p": 0.0, "early_stopping": False}

_TemplateLM: Any = TemplateLM  # typed as Any: lm-eval ships no type information


class RetNetLM(_TemplateLM):
    """lm-eval's language-model interface on a :class:`RetNet` and one of our tokenizers.

    Args:
        model: the RetNet (put in eval mode).
        tokenizer: :class:`ByteTokenizer` or :class:`HFTokenizer` (``load_tokenizer(dir)``).
        batch_size: requests per forward pass.
        eot_token_id: the end-of-text token: it stands before a document or an empty context, and
            generation stops at it. Default: the tokenizer's own (``eos_token_id``, else
            ``eod_id``: the byte tokenizer's end-of-document 256, or the first of
            ``training.data.EOD_TOKENS`` a ``tokenizer.json`` has); failing those, the newline's token,
            which then only stands before documents (generation does not stop at it).
        window: tokens per forward pass when scoring a long document (the state carries over).
        max_gen_toks: default cap on generated tokens when a task gives none.
        add_bos_token: start every encoded text with the tokenizer's beginning-of-sequence token
            (as lm-eval's Hugging Face model does for tokenizers that add one); ``None``
            (default): when the tokenizer asks for it (``add_bos`` in its ``tokenizer_config.json``,
            as a model converted from fla-hub's does: its models were trained on ``<s>``-led text).

    With the beginning-of-sequence token, what lm-eval's Hugging Face model does is done here:
    ``tok_encode`` puts it first unless told ``add_special_tokens=False`` or the text already starts
    with it; it is :attr:`prefix_token_id`, the token an empty context and a document's first
    window are conditioned on; so a context, a generation prompt and a rolling document all start
    with it (a rolling document's own first token, the ``<s>``, is scored after the prefix, as
    lm-eval's model scores it).
    """

    def __init__(self, model: RetNet, tokenizer: ByteTokenizer | HFTokenizer, batch_size: int = 8,
                 eot_token_id: int | None = None, window: int = 2048, max_gen_toks: int = 256,
                 add_bos_token: bool | None = None) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("window", window), ("max_gen_toks", max_gen_toks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.model = model.eval()
        self.tok = tokenizer
        self.batch_size = batch_size
        self.window = window
        self.max_gen_toks = max_gen_toks
        self._eot = _default_eot(tokenizer) if eot_token_id is None else int(eot_token_id)
        # The newline stand-in is no end of text: stopping there would cut multi-line answers.
        self._stops_at_eot = eot_token_id is not None or _tokenizer_eot(tokenizer) is not None
        if not 0 <= self._eot < model.config.vocab_size:
            raise ValueError(f"eot_token_id must be a token id in [0, {model.config.vocab_size}), got {self._eot}")
        if add_bos_token is not None and not isinstance(add_bos_token, bool):
            raise ValueError(f"add_bos_token must be True, False or None, got {add_bos_token!r}")
        bos = getattr(tokenizer, "bos_token_id", None)
        wants = bool(getattr(tokenizer, "add_bos", False)) if add_bos_token is None else add_bos_token
        self._bos: int | None = None
        if wants:
            if bos is None:
                raise ValueError("add_bos_token: the tokenizer has no beginning-of-sequence token (bos_token_id)")
            if not 0 <= int(bos) < model.config.vocab_size:
                raise ValueError(f"the tokenizer's bos_token_id {bos} is not a token id of the model")
            self._bos = int(bos)
        self._bos_text = tokenizer.decode([self._bos]) if self._bos is not None else ""

    # -- tokens --------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context and a document's first window are conditioned on: the
        beginning-of-sequence token where it is used, else the end-of-text token."""
        return self._bos if self._bos is not None else self._eot

    @property
    def device(self) -> torch.device:
        return self.model.device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        ids = list(self.tok.encode(string))
        if self._bos is None or add_special_tokens is False:
            return ids
        if add_special_tokens is None and self._bos_text and string.startswith(self._bos_text):
            return ids  # the text brings its own <s> (lm-eval's HF model checks the same)
        return [self._bos, *ids]

    def tok_decode(self, tokens: Iterable[int]) -> str:
        return self.tok.decode(list(tokens))

    # -- scoring -------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests: Sequence[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """``(sum of log-probabilities of the continuation, whether it is the greedy one)`` for
        each ``(key, context tokens, continuation tokens)``. Requests with the same context (the
        choices of a multiple-choice question) read it once and share its state."""
        by_context: dict[tuple[int, ...], list[int]] = {}
        for i, (_, context, continuation) in enumerate(requests):
            if not context or not continuation:
                raise ValueError("every loglikelihood request needs a context and a continuation token")
            by_context.setdefault(tuple(context), []).append(i)
        contexts = sorted(by_context, key=len, reverse=True)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for start in range(0, len(contexts), self.batch_size):
            group = contexts[start:start + self.batch_size]
            members = [(row, i) for row, context in enumerate(group) for i in by_context[context]]
            scored = self._score_batch([list(c) for c in group], [row for row, _ in members],
                                       [requests[i][2] for _, i in members])
            for (_, i), result in zip(members, scored, strict=True):
                results[i] = result
                self.cache_hook.add_partial("loglikelihood", requests[i][0], result)
        return [r for r in results if r is not None]

    @torch.no_grad()
    def _score_batch(self, contexts: list[list[int]], rows: list[int],
                     continuations: list[list[int]]) -> list[tuple[float, bool]]:
        """Score ``continuations[j]`` after ``contexts[rows[j]]``."""
        device = self.model.device
        ids, mask = _left_padded(contexts)
        out = self.model.prefill(ids.to(device), attention_mask=mask.to(device) if not bool(mask.all()) else None)
        index = torch.tensor(rows, device=device)
        state = RetNetState([m.index_select(0, index) for m in out.state.memories],
                            out.state.position.index_select(0, index))
        logits = [out.logits[:, -1].index_select(0, index)[:, None]]  # each continuation's first token
        rest = max(len(c) for c in continuations) - 1
        if rest:
            tail = torch.zeros(len(continuations), rest, dtype=torch.long)
            for row, continuation in enumerate(continuations):
                tail[row, :len(continuation) - 1] = torch.tensor(continuation[:-1])
            logits.append(self.model(tail.to(device), state=state).logits)
        logp = F.log_softmax(torch.cat(logits, dim=1).float(), dim=-1)
        results = []
        for row, continuation in enumerate(continuations):
            target = torch.tensor(continuation, device=device)
            row_logp = logp[row, :len(continuation)]
            total = float(row_logp.gather(-1, target[:, None]).sum())
            greedy = bool((row_logp.argmax(-1) == target).all())
            results.append((total, greedy))
        return results

    @torch.no_grad()
    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole document (after :attr:`prefix_token_id`)."""
        docs = [self.tok_encode(req.args[0]) for req in requests]
        results: list[float] = [0.0] * len(docs)
        order = sorted(range(len(docs)), key=lambda i: -len(docs[i]))
        device = self.model.device
        for start in range(0, len(order), self.batch_size):
            batch = [i for i in order[start:start + self.batch_size] if docs[i]]
            if not batch:
                continue
            length = len(docs[batch[0]])
            inputs = torch.zeros(len(batch), length, dtype=torch.long)
            targets = torch.full((len(batch), length), -100, dtype=torch.long)
            for row, i in enumerate(batch):
                doc = docs[i]
                inputs[row, :len(doc)] = torch.tensor([self.prefix_token_id, *doc[:-1]])
                targets[row, :len(doc)] = torch.tensor(doc)
            totals = torch.zeros(len(batch), dtype=torch.float64)
            state: RetNetState | None = None
            for lo in range(0, length, self.window):
                piece = inputs[:, lo:lo + self.window].to(device)
                out = self.model(piece, state=state)
                state = out.state
                want = targets[:, lo:lo + self.window].to(device)
                logp = F.log_softmax(out.logits.float(), dim=-1)
                picked = logp.gather(-1, want.clamp(min=0)[..., None]).squeeze(-1)
                totals += picked.masked_fill(want < 0, 0.0).sum(-1).double().cpu()
            for row, i in enumerate(batch):
                results[i] = float(totals[row])
                self.cache_hook.add_partial("loglikelihood_rolling", (requests[i].args[0],), results[i])
        return results

    # -- generation ----------------------------------------------------------------------------

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        results: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        for members in groups.values():
            gen_kwargs = dict(requests[members[0]].args[1])
            for start in range(0, len(members), self.batch_size):
                batch = members[start:start + self.batch_size]
                texts = self._generate([requests[i].args[0] for i in batch], gen_kwargs)
                for i, text in zip(batch, texts, strict=True):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results

    def _generate(self, contexts: list[str], gen_kwargs: dict[str, Any]) -> list[str]:
        # lm-eval's own reading of the arguments (a copy: the group's batches share them):
        # max_gen_toks or its aliases (max_new_tokens, max_tokens, ...), do_sample from temperature.
        kwargs = dict(_normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks))
        eot = self._eot if self._stops_at_eot else None
        # As lm-eval's HF model: the end-of-text token's text is a stop string too (our decode may
        # drop it, as the byte tokenizer does; the token itself stops the row below).
        eot_text = self.tok_decode([eot]) if eot is not None else ""
        until = _handle_stop_sequences(kwargs.pop("until", None), eot_text or None)
        max_new = int(kwargs.pop("max_gen_toks"))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        do_sample = bool(kwargs.pop("do_sample", False)) and temperature > 0
        top_k, top_p = kwargs.pop("top_k", None), kwargs.pop("top_p", None)
        options: dict[str, Any] = {}
        if do_sample:
            # transformers' "no top-k" is 0, ours None
            options = {"temperature": temperature, "top_k": top_k or None, "top_p": top_p}
        unsupported = sorted(k for k, v in kwargs.items() if k not in _NEUTRAL_GEN_KWARGS or v != _NEUTRAL_GEN_KWARGS[k])
        if unsupported:
            raise ValueError(f"generate_until: unsupported generation arguments {unsupported} "
                             f"({', '.join(f'{k}={kwargs[k]!r}' for k in unsupported)}); RetNetLM supports until, "
                             "max_gen_toks (or max_new_tokens, max_tokens, max_completion_tokens), do_sample, "
                             "temperature, top_k, top_p")
        encoded = [self.tok_encode(c) or [self._eot] for c in contexts]
        ids, mask = _left_padded(encoded)
        device = self.model.device
        new: list[list[int]] = [[] for _ in encoded]
        done = [False] * len(encoded)
        stream = self.model.stream_generate(ids.to(device), max_new, do_sample=do_sample, eos_token_id=eot,
                                            attention_mask=mask.to(device) if not bool(mask.all()) else None,
                                            **options)
        for token in stream:
            for row, t in enumerate(token.tolist()):
                if not done[row]:
                    if eot is not None and int(t) == eot:
                        done[row] = True  # the end of text: not part of the answer
                        continue
                    new[row].append(int(t))
                    done[row] = any(s in self.tok_decode(new[row]) for s in until)
            if all(done):
                break
        texts = []
        for tokens in new:
            text = self.tok_decode(tokens)
            for s in until:
                text = text.split(s)[0] if s else text
            texts.append(text)
        return texts


def _tokenizer_eot(tokenizer: ByteTokenizer | HFTokenizer) -> int | None:
    """The tokenizer's own end-of-text token, or ``None``: its declared ``eos_token_id`` (what
    lm-eval's HF model uses), else its end-of-document id (the byte tokenizer's 256 when it has
    one; a ``tokenizer.json``'s first ``training.data.EOD_TOKENS`` name)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        return int(eos)
    eod = tokenizer.eod_id  # HFTokenizer.eod_id looks up the shared EOD_TOKENS names
    return int(eod) if eod is not None else None


def _default_eot(tokenizer: ByteTokenizer | HFTokenizer) -> int:
    """The tokenizer's end-of-text token, else the newline's (a document separator at least)."""
    eot = _tokenizer_eot(tokenizer)
    if eot is not None:
        return eot
    newline = tokenizer.encode("\n")
    return newline[0] if newline else 0


def _normalize_gen_kwargs(gen_kwargs: dict[str, Any], default_max_gen_toks: int) -> dict[str, Any]:
    """lm-eval's ``normalize_gen_kwargs`` (lm-eval >= 0.4.10); for older versions the same rules:
    ``until`` a list, ``max_gen_toks`` from the first of its aliases given, ``do_sample`` from
    the temperature when not given, greedy (temperature 0) when ``do_sample`` is False."""
    try:
        from lm_eval.models.utils import normalize_gen_kwargs
    except ImportError:
        pass
    else:
        return dict(normalize_gen_kwargs(gen_kwargs, default_max_gen_toks))
    kwargs = dict(gen_kwargs)
    until = kwargs.get("until", [])
    kwargs["until"] = until if isinstance(until, list) else [until]
    given = [kwargs.pop(name) for name in ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
             if name in kwargs]
    given = [v for v in given if v is not None]
    kwargs["max_gen_toks"] = int(given[0]) if given else default_max_gen_toks
    temperature = float(kwargs.get("temperature", 0.0))
    if kwargs.get("do_sample") is None:
        kwargs["do_sample"] = temperature > 0.0
    elif kwargs["do_sample"] is False:
        kwargs["temperature"] = 0.0
    return kwargs


def _handle_stop_sequences(until: str | list[str] | None, eos: str | None) -> list[str]:
    """lm-eval's ``handle_stop_sequences``: ``until`` as a list, with ``eos`` added (once)."""
    try:
        from lm_eval.models.utils import handle_stop_sequences
    except ImportError:
        pass
    else:
        return list(handle_stop_sequences(until, eos=eos))
    stops = [until] if isinstance(until, str) else list(until or [])
    if eos is not None and eos not in stops:
        stops.append(eos)
    return stops


# --------------------------------------------------------------------------------------------
# retnet eval DIR --tasks ...
# --------------------------------------------------------------------------------------------


def run_tasks(model: RetNet, tokenizer: ByteTokenizer | HFTokenizer, tasks: list[str], *, batch_size: int = 8,
              include_path: str | Path | None = None, include_defaults: bool = True,
              num_fewshot: int | None = None, limit: float | None = None, log_samples: bool = False,
              ) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` of ``tasks`` on our model; its results dictionary."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise ValueError(f"--include-path {include_path} is not a directory")
    path = str(include_path) if include_path is not None else None
    # lm-eval's own index of ~15k task files takes half a minute to build: when every task is in
    # include_path, skip it.
    manager = TaskManager(include_path=path, include_defaults=path is None and include_defaults)
    unknown = [t for t in tasks if t not in set(manager.all_tasks)]
    if unknown and path is not None and include_defaults:
        manager = TaskManager(include_path=path, include_defaults=True)
        unknown = [t for t in tasks if t not in set(manager.all_tasks)]
    if unknown:
        raise ValueError(f"unknown lm-eval tasks: {unknown}")
    lm = RetNetLM(model, tokenizer, batch_size=batch_size)
    results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, num_fewshot=num_fewshot,
                              limit=limit, log_samples=log_samples, bootstrap_iters=0)
    if results is None:
        raise RuntimeError("lm-eval returned no results")
    return dict(results)


def cmd_tasks(args: argparse.Namespace, model: RetNet, tokenizer: ByteTokenizer | HFTokenizer) -> int:
    """``retnet eval DIR --tasks ...``: print one line per task and metric (or JSON)."""
    tasks = [t.strip() for t in str(args.tasks).split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks: give at least one task name")
    mixed = [name for name, given in (("--data", args.data is not None), ("--seq-len", args.seq_len is not None),
                                      ("--max-windows", args.max_windows is not None),
                                      ("--precision", args.precision != "fp32")) if given]
    if mixed:
        raise ValueError(f"--tasks runs lm-eval's tasks: {', '.join(mixed)} would be ignored; leave it out")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ValueError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    if args.limit is not None and args.limit <= 0:
        raise ValueError(f"--limit must be > 0, got {args.limit}")
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    results = run_tasks(model, tokenizer, tasks, batch_size=args.batch_size, include_path=args.include_path,
                        num_fewshot=args.num_fewshot, limit=limit)
    table = {name: {k: v for k, v in metrics.items() if k != "alias"}
             for name, metrics in results.get("results", {}).items()}
    if args.output is not None:
        from .models.checkpoint import atomic_write

        text = json.dumps({"results": table, "configs": results.get("configs", {})}, indent=2, default=str)
        atomic_write(Path(args.output), lambda tmp: tmp.write_text(text + "\n"))
    if args.json:
        print(json.dumps(table, default=str))
        return 0
    for name, metrics in table.items():
        shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        print(f"{name}: {shown}")
    return 0


def _left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as ``(ids, attention_mask)``, each ``(len(rows), longest)``, padded on the left
    (the model's batched prompts are left-padded; 0 in the mask marks padding)."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask
