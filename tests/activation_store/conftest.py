from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

WRITER_SCRIPT = Path(__file__).with_name("writer_process.py")


def start_writer(store: Path, *extra: str) -> subprocess.Popen:
    """Start the deterministic writer subprocess (see writer_process.py)."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, str(WRITER_SCRIPT), str(store), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture
def writer_process():
    return start_writer
