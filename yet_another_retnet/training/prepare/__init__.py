"""``retnet prepare``: tokenize a corpus once into memory-mapped token shards.

Sources: text files (one document per file), directories of them, ``.jsonl`` (one document per
line, its ``text`` field or ``--field``), ``.parquet`` (one per row), a Hugging Face ``datasets``
directory saved with ``save_to_disk`` (one per row), or ``hf:NAME`` for a hub dataset streamed
over the network. The output layout is described in
:mod:`yet_another_retnet.training.shards`.

How it stays correct at scale:

- The sources are cut into units of a few MiB (at line boundaries) that worker processes
  tokenize independently; the main process writes their results *in unit order*, so the output
  is the same with any number of workers.
- Documents are separated by the tokenizer's end-of-document id, and the held-out split takes
  whole documents (every ``1 / val_fraction``-th one), so validation text never appears in training.
- Bytes are decoded strictly (``--data-encoding``, UTF-8 by default): an undecodable byte stops
  the run with the file and byte offset instead of being replaced silently.
- Atomic: shards are written into ``DIR/.partial/`` and moved into place at the end, ``index.json``
  last. A directory without an index is incomplete; a rerun clears what it left and starts
  again. A lock keeps two runs out of one directory.

The parts, in the order a run goes through them: :mod:`.sources` (sources and units of work),
:mod:`.encode` (tokenizing a unit, the worker pool), :mod:`.write` (shards, the tail split,
publishing), :mod:`.pipeline` (a whole run: checks, reuse, lock), :mod:`.cli` (``retnet prepare``).
"""

from .cli import add_arguments, run
from .common import LOCK_NAME, PrepareError
from .pipeline import PrepareResult, prepare, would_reuse
from .sources import UNIT_BYTES
from .write import SHARD_TOKENS

__all__ = ["LOCK_NAME", "SHARD_TOKENS", "UNIT_BYTES", "PrepareError", "PrepareResult", "add_arguments", "prepare",
           "run", "would_reuse"]
