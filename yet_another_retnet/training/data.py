"""Corpora and tokenizers for training and evaluation.

The default corpus needs no download: it is the English help text that every CPython ships in
``pydoc_data.topics`` (~465 KB), tokenized byte by byte (vocabulary 256).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from .shards import TensorStream, TokenStream

#: What a sampler reads windows from: an in-memory tensor or memory-mapped shards.
TokenSource = TensorStream | TokenStream

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text", ".py", ".json", ".jsonl", ".csv")


def default_corpus_text() -> str:
    """The embedded default corpus: CPython's ``pydoc_data.topics``, topics in sorted order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics)) + "\n"


TOKENIZER_CONFIG = "tokenizer_config.json"
HF_TOKENIZER_FILE = "tokenizer.json"


class Tokenizer(Protocol):
    """What training, evaluation and generation need of a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int] | Tensor) -> str: ...

    def save(self, directory: Path) -> None: ...

    def describe(self) -> dict[str, Any]: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255, nothing to download or train.

    ``end_of_document=True`` adds id 256, the end-of-document marker that ``retnet prepare``
    puts between documents (vocabulary 257); decoding drops it. The default (256 ids, no
    marker) is the plain byte stream of the embedded corpus.
    """

    def __init__(self, end_of_document: bool = False) -> None:
        self.eod_id: int | None = 256 if end_of_document else None

    @property
    def vocab_size(self) -> int:
        return 256 if self.eod_id is None else 257

    def save(self, directory: Path) -> None:
        """Record the choice in ``directory/tokenizer_config.json`` (atomically)."""
        _write_tokenizer_config(directory, {"type": "byte"} if self.eod_id is None
                                else {"type": "byte", "eod_id": self.eod_id})

    def describe(self) -> dict[str, Any]:
        if self.eod_id is None:
            return {"type": "byte", "vocab_size": 256}
        return {"type": "byte", "vocab_size": 257, "eod_id": self.eod_id}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int] | Tensor) -> str:
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


#: Names under which tokenizers commonly keep their end-of-document token, in the order tried.
EOD_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "[EOS]", "<|eot_id|>")


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer read from its JSON file (``tokenizer.json``)."""

    def __init__(self, path: str | Path, bos_token_id: int | None = None, eos_token_id: int | None = None,
                 add_bos: bool = False) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        try:
            from tokenizers import Tokenizer as _HFTokenizer
        except ImportError as err:  # an optional dependency: the [train] extra
            raise ImportError("--tokenizer needs the `tokenizers` package: pip install tokenizers") from err
        raw = path.read_bytes()  # read once: the tokenizer and its digest come from the same bytes
        try:
            self._tok = _HFTokenizer.from_str(raw.decode("utf-8"))
        except Exception as err:  # tokenizers raises its own Exception subclass on a bad file
            raise ValueError(f"{path} is not a Hugging Face tokenizers JSON file: {err}") from err
        self.path = path
        #: SHA-256 of the file: what a run records, so a resume with another mapping of the same
        #: vocabulary size is refused rather than trained on.
        self.sha256 = hashlib.sha256(raw).hexdigest()
        #: Special tokens a pretrained model expects (``tokenizer_config.json``): ``add_bos`` puts
        #: ``bos_token_id`` before a prompt; generation stops at ``eos_token_id``.
        self.bos_token_id, self.eos_token_id, self.add_bos = bos_token_id, eos_token_id, add_bos

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    @property
    def eod_id(self) -> int | None:
        """The id of the tokenizer's end-of-document token (the first of :data:`EOD_TOKENS` it
        knows), or ``None``."""
        for name in EOD_TOKENS:
            found = self._tok.token_to_id(name)
            if found is not None:
                return int(found)
        return None

    def decode(self, ids: list[int] | Tensor) -> str:
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        return str(self._tok.decode([int(i) for i in ids], skip_special_tokens=False))

    def id_to_token(self, token: int) -> str | None:
        """The vocabulary's string for ``token`` (before decoding), or ``None`` if it has none."""
        found = self._tok.id_to_token(int(token))
        return None if found is None else str(found)

    def save(self, directory: Path) -> None:
        """Copy the JSON file next to the model and record it in ``tokenizer_config.json``."""
        from ..models.checkpoint import atomic_write

        if self.path.resolve() != (directory / HF_TOKENIZER_FILE).resolve():
            atomic_write(directory / HF_TOKENIZER_FILE, lambda tmp: shutil.copyfile(self.path, tmp))
        _write_tokenizer_config(directory, {"type": "hf", "file": HF_TOKENIZER_FILE, **self._special()})

    def _special(self) -> dict[str, Any]:
        out: dict[str, Any] = {"add_bos": self.add_bos} if self.add_bos else {}
        for name in ("bos_token_id", "eos_token_id"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    def describe(self) -> dict[str, Any]:
        return {"type": "hf", "file": str(self.path), "vocab_size": self.vocab_size, "sha256": self.sha256}


def _write_tokenizer_config(directory: Path, data: dict[str, Any]) -> None:
    from ..models.checkpoint import atomic_write

    text = json.dumps(data, indent=2) + "\n"
    atomic_write(directory / TOKENIZER_CONFIG, lambda tmp: tmp.write_text(text))


def load_tokenizer(directory: str | Path) -> ByteTokenizer | HFTokenizer:
    """The tokenizer saved with a model directory (the byte tokenizer when none is recorded)."""
    directory = Path(directory)
    path = directory / TOKENIZER_CONFIG
    if not path.is_file():
        return ByteTokenizer()
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    kind = data.get("type") if isinstance(data, dict) else None
    if kind is None and isinstance(data, dict) and (directory / HF_TOKENIZER_FILE).is_file():
        kind = "hf"  # a tokenizer_config.json of transformers' own, next to its tokenizer.json
    if kind == "byte":
        return ByteTokenizer(end_of_document=data.get("eod_id") == 256)
    if kind == "hf":
        special: dict[str, Any] = {}
        for name in ("bos_token_id", "eos_token_id"):
            value = data.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{path}: {name} must be a token id, got {value!r}")
            special[name] = value
        if not isinstance(data.get("add_bos", False), bool):
            raise ValueError(f"{path}: add_bos must be a bool, got {data.get('add_bos')!r}")
        # A plain file name beside the config: files from elsewhere are data, not paths.
        file = str(data.get("file", HF_TOKENIZER_FILE))
        if Path(file).name != file:
            raise ValueError(f"{path}: file must be a file name in {directory}, got {file!r}")
        return HFTokenizer(directory / file, add_bos=bool(data.get("add_bos", False)) and special["bos_token_id"]
                           is not None, **special)
    raise ValueError(f"{path}: unknown tokenizer type {kind!r} (expected 'byte' or 'hf')")


class StreamDecoder:
    """Turn tokens into text as they arrive, never printing half a character.

    Byte tokens go through an incremental UTF-8 decoder (a multi-byte character is held back
    until complete). Other tokenizers decode a short window of recent tokens (the prefix and read
    offsets of Hugging Face's text-generation-inference): the tokens of the last piece emitted
    (the *prefix*, context for decoders that join or strip across tokens) and those read since.
    The window's text past the prefix's is new once it no longer ends in a replacement character
    that a later token may complete; then the new tokens become the next prefix. Each token costs
    a decode of a few tokens, not of the whole stream (which made a long stream quadratic), and
    the pieces join to what decoding all the tokens at once gives.
    """

    def __init__(self, tokenizer: ByteTokenizer | HFTokenizer) -> None:
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._window: list[int] = []  # the last piece's tokens, then the tokens read since
        self._read = 0  # how many of the window's tokens are already out as text (the last piece's)

    def push(self, token: int) -> str:
        """The text that ``token`` completes (possibly empty)."""
        if isinstance(self.tokenizer, ByteTokenizer):
            return self._utf8.decode(bytes([int(token)]) if 0 <= int(token) < 256 else b"")
        self._window.append(int(token))
        seen = self.tokenizer.decode(self._window[:self._read])
        text = self.tokenizer.decode(self._window)
        # Hold back a trailing replacement character: with byte-fallback tokenizers (Llama's
        # SentencePiece BPE) and byte-level BPE, each byte of an unfinished character decodes
        # to one, and the next tokens may complete it.
        if len(text) <= len(seen) or text.endswith("\ufffd"):
            return ""
        # The tokens just emitted are the next window's prefix; those before them are done.
        self._window = self._window[self._read:]
        self._read = len(self._window)
        return text[len(seen):]

    def flush(self) -> str:
        """Whatever is still held back, with replacement characters for incomplete input."""
        if isinstance(self.tokenizer, ByteTokenizer):
            return self._utf8.decode(b"", final=True)
        seen = self.tokenizer.decode(self._window[:self._read])
        text = self.tokenizer.decode(self._window)
        self._window, self._read = [], 0
        return text[len(seen):]


class WindowSampler:
    """Random training windows of ``seq_len + 1`` tokens, drawn from a seeded generator.

    ``tokens`` is a 1-D tensor or a token stream (:class:`~.shards.TokenStream`, memory-mapped
    shards). Every rank of a distributed run draws the same global batch's start offsets and
    reads only its own rows, so the data a step sees does not depend on the number of processes.
    The generator's state is the data position: saving and restoring it resumes the exact
    sequence of batches.
    """

    def __init__(self, tokens: Tensor | TokenSource, seq_len: int, seed: int) -> None:
        if isinstance(tokens, Tensor):
            if tokens.dim() != 1:
                raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
            tokens = TensorStream(tokens)
        if len(tokens) < seq_len + 1:
            raise ValueError(
                f"the training data has {len(tokens)} tokens, fewer than one sequence of seq_len + 1 = {seq_len + 1}"
            )
        self.stream = tokens
        self.seq_len = seq_len
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0

    def next_starts(self, batch_size: int) -> Tensor:
        """The start offsets ``(batch_size,)`` of the next global batch's windows."""
        starts = torch.randint(0, len(self.stream) - self.seq_len, (batch_size,), generator=self.generator)
        self.batches_drawn += 1
        return starts

    def windows(self, starts: Tensor) -> Tensor:
        """``(len(starts), seq_len + 1)`` long: inputs are ``[:, :-1]``, targets ``[:, 1:]``."""
        return self.stream.windows(starts, self.seq_len + 1)

    def next_batch(self, batch_size: int) -> Tensor:
        """``(batch_size, seq_len + 1)`` long: inputs are ``[:, :-1]``, targets ``[:, 1:]``."""
        return self.windows(self.next_starts(batch_size))

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.batches_drawn = int(state["batches_drawn"])


def eval_windows(tokens: Tensor, seq_len: int) -> Tensor:
    """Non-overlapping windows ``(n, seq_len + 1)`` covering ``tokens`` (consecutive windows share
    one token, so every token but the first is predicted exactly once; a short tail is dropped)."""
    if len(tokens) < seq_len + 1:
        raise ValueError(f"the evaluation data has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    n = (len(tokens) - 1) // seq_len
    starts = torch.arange(n) * seq_len
    return tokens[starts[:, None] + torch.arange(seq_len + 1)]


def split_tokens(tokens: Tensor, val_fraction: float = 0.05) -> tuple[Tensor, Tensor]:
    """Split a 1-D token tensor into (train, validation): the last ``val_fraction`` validates."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = max(1, int(len(tokens) * val_fraction))
    return tokens[:-n_val], tokens[-n_val:]


def encode_corpus(text: str, tokenizer: ByteTokenizer | HFTokenizer | None = None) -> Tensor:
    """A 1-D long tensor of the tokens of ``text``."""
    tokenizer = tokenizer or ByteTokenizer()
    return torch.tensor(tokenizer.encode(text), dtype=torch.long)


def _read_strict(file: Path, encoding: str) -> str:
    raw = file.read_bytes()
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as err:  # never replaced silently: name the file and the offset
        raise ValueError(f"{file}: bytes at offset {err.start} are not valid {encoding} ({err.reason})") from None


def read_text_files(path: str | Path, encoding: str = "utf-8") -> str:
    """The text of a file, or of every text file under a directory (sorted), joined by blank lines.

    Bytes that do not decode in ``encoding`` raise ``ValueError`` naming the file and byte offset."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data path {path} does not exist")
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
    )
    if not files:
        raise ValueError(f"data path {path} holds no text files ({', '.join(TEXT_SUFFIXES)})")
    text = "\n\n".join(_read_strict(f, encoding) for f in files)
    if not text.strip():
        raise ValueError(f"data path {path} is empty")
    return text
