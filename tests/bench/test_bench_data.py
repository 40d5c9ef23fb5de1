"""``retnet bench data`` at a tiny size: the report's prepare rows (1 and 2 workers, byte and BPE)
describe the runs that produced them; the two worker counts prepare identical shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from yet_another_retnet.bench import data as bench_data

pytest.importorskip("tokenizers")


def test_bench_data_reports_prepare_rows_for_both_tokenizers_and_worker_counts(tmp_path: Path) -> None:
    out = tmp_path / "report"
    code = bench_data.main(["--size-mb", "2", "--bpe-vocab", "400", "--train-steps", "0", "--workers", "1,2",
                            "--work", str(tmp_path / "work"), "--out", str(out)])
    assert code == 0
    report = json.loads((out / "data.json").read_text())
    rows = {(r["tokenizer"], r["workers"]): r for r in report["prepare"]}
    assert set(rows) == {("byte", 1), ("byte", 2), ("bpe", 1), ("bpe", 2)}
    corpus_mb = (tmp_path / "work" / "corpus.jsonl").stat().st_size / 1e6
    for r in rows.values():
        assert r["text_mb"] == pytest.approx(corpus_mb)  # the whole generated corpus was read
        assert r["cpu_seconds"] > 0 and r["mb_per_s"] > 0 and r["documents"] > 100
    # A byte per token of text (plus one end id per document); BPE packs several bytes per token.
    index = json.loads((tmp_path / "work" / "prepared-byte" / "index.json").read_text())
    text_bytes = sum(split["text_bytes"] for split in index["splits"].values())
    assert rows[("byte", 2)]["tokens"] == text_bytes + rows[("byte", 2)]["documents"]
    assert rows[("bpe", 1)]["tokens"] < 0.8 * rows[("byte", 1)]["tokens"]
    assert rows[("bpe", 2)]["tokens"] == rows[("bpe", 1)]["tokens"]
    assert report["train"] == {} and "| bpe | 2 |" in (out / "data.md").read_text()
