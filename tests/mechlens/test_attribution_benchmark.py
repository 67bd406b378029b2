"""The attribution-vs-peers benchmark's quick mode runs end to end and prints its JSON line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("captum")
pytest.importorskip("pytorch_grad_cam")

ROOT = Path(__file__).resolve().parents[2]
COMPARISONS = {
    "saliency": ["captum"],
    "integrated_gradients": ["captum"],
    "smoothgrad": ["captum"],
    "occlusion": ["captum"],
    "gradcam": ["captum", "pytorch_grad_cam"],
    "scorecam": ["pytorch_grad_cam"],
}


def test_attribution_benchmark_quick_prints_its_json_line() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "attribution_vs_peers.py"), "--quick"],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["benchmark"] == "attribution_vs_peers"
    figures, ratios = line["figures"], line["ratios"]
    assert figures["images"] == 2 and figures["size"] == 64
    runs = figures["runs"]
    for method, peers in COMPARISONS.items():
        for impl in ["mechlens", *peers]:
            measured = [key for key in runs if key.startswith(f"{method}:{impl}:")]
            assert f"{method}:{impl}:default" in measured, (method, impl, sorted(runs))
            for key in measured:
                assert "error" not in runs[key], runs[key]
                assert runs[key]["seconds"] > 0 and runs[key]["peak_mib"] >= 0, runs[key]
        for peer in peers:
            name = f"{method}/{peer}"
            comparison = figures["comparisons"][name]
            assert comparison["mechlens_best"].startswith(f"{method}:mechlens:")
            assert comparison["peer_best"].startswith(f"{method}:{peer}:")
            # the maps were compared (same shapes, values close) for every pair of settings
            assert comparison["agreement"], comparison
            assert ratios[f"{name}_time"] > 0 and ratios[f"{name}_memory"] > 0
            assert isinstance(figures["targets"]["per_comparison"][name]["time"], bool)
    # the peers' batching knobs were exercised, not only their defaults
    for key in ("integrated_gradients:captum:batched", "smoothgrad:captum:batched", "occlusion:captum:batched",
                "scorecam:pytorch_grad_cam:batched"):
        assert key in runs
    assert isinstance(figures["targets"]["time"], bool) and isinstance(figures["targets"]["memory"], bool)
