"""The layers of the house: the import-linter contracts hold, packages have no internal import
cycles, and docs/architecture.md states the same layers as the contract (issue 18)."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _contract_layers() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c["layers"] for c in config["contracts"] if c["type"] == "layers"]
    return layers


def test_import_linter_contracts_hold() -> None:
    executable = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if executable is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    done = subprocess.run([executable], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_no_package_imports_itself_in_a_circle() -> None:
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("mechlens", exclude_type_checking_imports=True)  # annotations only
    modules = sorted(m for m in graph.modules if m.startswith("mechlens."))
    cycles = []
    for package in sorted({".".join(m.split(".")[:2]) for m in modules}):
        members = [m for m in modules if m.startswith(package + ".")]
        for a in members:
            for b in members:
                if a < b and graph.chain_exists(a, b) and graph.chain_exists(b, a):
                    cycles.append((a, b))
    assert cycles == []


def test_the_architecture_page_states_the_contracts_layers() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    (block,) = re.findall(r"```layers\n(.*?)```", text, flags=re.S)
    assert [line.strip() for line in block.strip().splitlines()] == _contract_layers()
    picture = re.findall(r"```mermaid\n(.*?)```", text, flags=re.S)[0]
    for layer in _contract_layers():
        for package in layer.split("|"):
            assert f'"{package.strip()}"' in picture, package
