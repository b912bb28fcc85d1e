"""The README's two commands: CI runs exactly the test command; the run command is the one
`tests/test_cli.py::test_serve_on_embedded_defaults` exercises."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _sh_blocks(text: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)\n```", text, flags=re.DOTALL)


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assignment = next(line for line in ci.splitlines() if line.startswith("TEST_COMMAND="))
    command = subprocess.run(  # let bash undo the quoting, as .ci/run does
        ["bash", "-c", f'{assignment}\nprintf %s "$TEST_COMMAND"'],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert command in _sh_blocks(readme)
    assert 'bash -c "$TEST_COMMAND"' in ci


def test_readme_run_command_serves_on_embedded_defaults() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    run = _sh_blocks(readme)[0]
    assert run.endswith("sightline serve")
    assert "SIGHTLINE_" not in run  # nothing to configure
