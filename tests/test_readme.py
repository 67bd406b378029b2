"""The README's Python examples run as written."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README should show at least one Python example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "readme_example"})


def test_readme_setup_commands_are_what_ci_runs():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    for command in ('python3 -m venv .venv && .venv/bin/pip install -e ".[dev]"', ".venv/bin/python -m pytest"):
        assert command in text and command in ci


def test_readme_shell_commands_parse_with_the_real_cli():
    """Every `mechlens ...` line of the README's shell blocks is accepted by the real parser, so a
    flag the README shows cannot silently disappear from (or never exist in) the CLI."""
    import shlex

    import pytest

    from mechlens.cli import build_parser

    parser = build_parser()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("mechlens ") and "..." not in line:
                commands.append(line)
    assert len(commands) >= 10, commands
    for command in commands:
        argv = shlex.split(command)[1:]
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"the README's command does not parse: {command}")
