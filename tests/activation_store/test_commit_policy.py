"""When a writer commits: by time, rows or bytes, whichever comes first (what a kill can lose)."""
from __future__ import annotations

import numpy as np
import pytest

from activation_store import ActivationStore, CommitPolicy, LayerSpec, StoreWriter


@pytest.mark.parametrize("spec,expected", [
    ("5s", CommitPolicy(seconds=5.0, rows=None, bytes=None)),
    ("2000rows", CommitPolicy(seconds=None, rows=2000, bytes=None)),
    ("256MB", CommitPolicy(seconds=None, rows=None, bytes=256_000_000)),
    ("10s,512MiB", CommitPolicy(seconds=10.0, rows=None, bytes=512 << 20)),
    ("1min, 100rows", CommitPolicy(seconds=60.0, rows=100, bytes=None)),
    (2.5, CommitPolicy(seconds=2.5, rows=None, bytes=None)),
])
def test_commit_specs_parse(spec, expected):
    assert CommitPolicy.parse(spec) == expected
    assert CommitPolicy.parse(str(expected)) == expected  # printed specs read back the same


@pytest.mark.parametrize("spec,message", [
    ("5 parsecs", "cannot read commit spec"), ("", "cannot read commit spec"), ("0s", "must be > 0"),
    ("5s,6s", "gives seconds twice"), ("-3rows", "cannot read commit spec"),
])
def test_bad_commit_specs_are_one_line_errors(spec, message):
    with pytest.raises(ValueError, match=message) as error:
        CommitPolicy.parse(spec)
    assert "\n" not in str(error.value)


def test_default_depends_on_the_rows_only():
    # a wall-clock trigger by default would make segment boundaries (and so statistics' last digits
    # and shuffled batch order) depend on the machine's speed
    default = CommitPolicy()
    assert default.seconds is None and default.bytes == 64 << 20


@pytest.mark.parametrize("policy,commits", [("10rows", 4), ("1000B", 1), ("1h", 0)])
def test_writer_commits_by_rows_and_bytes_without_flush(tmp_path, policy, commits):
    """42 rows in batches of 10 float32 rows of width 4 (160 data bytes + 10 index rows of 3 int64 =
    240 bytes: 400 bytes a batch): a commit every 10 rows, one after 1000 bytes (3 batches), none in 1 h."""
    path = tmp_path / "s"
    writer = StoreWriter(path, model="m", layers={"l": LayerSpec(4, "float32", chunk_rows=16)},
                         commit_every=policy)
    enqueue = writer._enqueue_commit
    writer._enqueue_commit = lambda wait: enqueue(wait=True)  # each commit done before the next write
    visible = []
    try:
        for begin in range(0, 42, 10):
            ids = np.arange(begin, min(begin + 10, 42))
            writer.write({"l": np.repeat(ids[:, None], 4, axis=1).astype(np.float32)}, sample_ids=ids,
                         cursor={"next": int(ids[-1]) + 1})
            visible.append(ActivationStore(path)["l"].shape[0] if (path / "shards").is_dir() else 0)
        segments = len(writer._shard_manifest.segments)
    finally:
        writer.close()
    assert segments == commits
    expected = {"10rows": [10, 20, 30, 40, 40], "1000B": [0, 0, 30, 30, 30], "1h": [0] * 5}[policy]
    assert visible == expected  # what a kill at each point would keep
    assert ActivationStore(path)["l"].shape == (42, 4)
