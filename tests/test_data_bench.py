"""benchmarks/bench_shards.py runs end to end (--quick) and prints both tables with ratios."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_shards_quick(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_shards.py"),
            "--quick",
            "--workers",
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    number = r"\s+[0-9.]+"
    for row in ("tar \\(copy the source files\\)", "bigmodel-shard build"):
        assert re.search(row + number * 3, out), out
    for row in (
        "one file per member",
        "shard pipeline \\(sha256 checked\\)",
        "shard pipeline, no sha256 check",
        "decode from memory \\(bound\\)",
    ):
        assert re.search(row + number * 2, out), out
    assert re.search(r"sha256 check on read: [0-9.]+x", out), out
    assert re.search(r"first new batch after [0-9.]+ s \(replay\) vs [0-9.]+ s \(seeded\)", out), (
        out
    )
    assert "read (one epoch, 12 samples)" in out
    for row in ("shard pipeline, local disk", "same, s3:// \\(loopback server\\)"):
        assert re.search(row + number * 2, out), out  # the object-storage rows, side by side
    # the work folder holds the real artefacts: shards with a manifest, and the per-file copy
    assert (tmp_path / "shards" / "dataset.json").is_file()
    assert len(list((tmp_path / "files").glob("*.image.npy"))) == 12
