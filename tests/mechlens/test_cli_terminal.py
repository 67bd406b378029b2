"""Every long-running command draws a progress bar on a terminal and prints pure JSON with
``--json`` (issue 20, point 1). Each command runs as a user runs it, in a child process: once
with a pseudo-terminal as its stdout and stderr (a bar must appear), once with pipes and
``--json`` (stdout must parse as one JSON document; the bar stays off when stderr is no terminal).
``demo`` is ``run clever_hans`` (one handler); ``run`` is tested with the quick SAE sweep."""
from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

MODEL = ["--model", "mechlens:small_cnn_tiny"]
BAR = re.compile(r"\d+%\|")  # tqdm's "42%|████" (or "0%|" as it starts)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "100"}


def _run_in_terminal(argv: list[str], cwd: Path) -> tuple[int, str]:
    leader, follower = pty.openpty()
    # a real terminal has a size; a fresh pty has 0 columns, where tqdm draws an empty bar
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    process = subprocess.Popen([sys.executable, "-m", "mechlens", *argv], stdin=subprocess.DEVNULL, stdout=follower,
                               stderr=follower, cwd=cwd, env=ENV, close_fds=True)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the child closed the terminal (EIO on Linux)
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    return process.wait(timeout=600), b"".join(chunks).decode(errors="replace")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, trained_shapes_model) -> Path:
    """A store, an SAE per layer, images and concept folders for the commands below, and the
    trained shapes model's cache (for ``mechlens run``)."""
    root = tmp_path_factory.mktemp("terminal")
    (root / "model_cache.txt").write_text(str(trained_shapes_model.checkpoint.parent))
    rng = np.random.default_rng(0)
    for folder, count in (("img", 2), ("concept", 6), ("random", 30), ("examples", 6)):
        (root / folder).mkdir()
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / folder / f"{i}.png")
    run = lambda *argv: subprocess.run([sys.executable, "-m", "mechlens", *argv], cwd=root, env=ENV, check=True,  # noqa: E731
                                       capture_output=True)
    run("capture", *MODEL, "--layer", "stage1", "stage2", "--data", "synthetic:shapes?n=48&size=64", "--out", "store",
        "--no-progress")
    for layer in ("stage1", "stage2"):
        run("sae", "train", "--store", "store", "--layer", layer, "--width", "16", "--k", "4", "--steps", "30", "--batch-size", "256",
            "--out", f"sae-{layer}", "--no-progress")
    return root


COMMANDS = {
    "capture": ["capture", *MODEL, "--layer", "stage1", "--data", "synthetic:shapes?n=48&size=64", "--out", "{out}"],
    "store verify": ["store", "verify", "store"],
    "sae train": ["sae", "train", "--store", "store", "--layer", "stage1", "--width", "16", "--k", "4", "--steps", "30", "--batch-size", "256",
                  "--out", "{out}"],
    "sae stats": ["sae", "stats", "sae-stage2", "--store", "store", "--out", "{out}"],
    "sae eval": ["sae", "eval", "sae-stage2", "--store", "store"],
    "attribute": ["attribute", *MODEL, "--image", "img/0.png", "img/1.png", "--method", "saliency", "gradcam",
                  "--out", "{out}"],
    "visualize": ["visualize", *MODEL, "--feature", "class:0", "--size", "32", "--steps", "6", "--out", "{out}"],
    "dream": ["dream", *MODEL, "--image", "img/0.png", "--layer", "stage2", "--steps", "3", "--octaves", "1",
              "--out", "{out}.png"],
    "tcav": ["tcav", *MODEL, "--layer", "stage2", "--concept", "c=concept", "--random", "random", "--examples", "examples",
             "--num-random", "3", "--set-size", "6", "--out", "{out}"],
    "atlas": ["atlas", *MODEL, "--sae", "sae-stage2", "--store", "store", "--causal-images", "8", "--out", "{out}"],
    "intervene": ["intervene", *MODEL, "--store", "store", "--ablate", "channel:stage1:0", "--bootstrap", "200",
                  "--out", "{out}"],
    "circuit": ["circuit", *MODEL, "--data", "synthetic:shapes?n=16&size=64", "--sae", "sae-stage1", "sae-stage2",
                "--target", "class:0", "--nodes-per-layer", "2", "--out", "{out}"],
    "audit": ["audit", *MODEL, "--sae", "sae-stage2", "--store", "store", "--images-per-class", "3", "--verify", "2",
              "--out", "{out}"],
    "evaluate": ["evaluate", *MODEL, "--data", "synthetic:shapes?n=8&size=64", "--methods", "saliency,gradcam",
                 "--images", "4", "--out", "{out}"],
    "run": ["run", "sae_sweep", "--quick", "--set", "model_cache=\"{model_cache}\"", "--out", "{out}"],
}


def _argv(command: str, out: str, root: Path) -> list[str]:
    cache = (root / "model_cache.txt").read_text()
    return [part.replace("{out}", out).replace("{model_cache}", cache) for part in COMMANDS[command]]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_long_command_draws_a_bar_on_a_terminal_and_prints_pure_json(workspace, command) -> None:
    name = command.replace(" ", "-")
    code, shown = _run_in_terminal(_argv(command, f"tty-{name}", workspace), workspace)
    assert code == 0, shown[-2000:]
    assert BAR.search(shown), f"no progress bar on the terminal:\n{shown[-1500:]}"
    done = subprocess.run([sys.executable, "-m", "mechlens", *_argv(command, f"json-{name}", workspace), "--json"], cwd=workspace,
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    json.loads(done.stdout)  # one JSON document, nothing else
    assert not BAR.search(done.stderr), "a bar was drawn into a pipe"
