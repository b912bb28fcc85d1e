"""`sightline inference serve`'s PyTriton workspaces: a killed server's is removed by the next."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from backend.inference.serve import workspace


def test_a_workspace_left_by_a_killed_server_is_removed(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    (tmp_path / gone / "tritonserver").mkdir(parents=True)
    alive = tmp_path / str(os.getppid())  # another server, still running
    alive.mkdir()
    other = tmp_path / "notes"  # not a workspace
    other.mkdir()
    ours = workspace(tmp_path)
    assert ours == tmp_path / str(os.getpid())
    assert not ours.exists()  # PyTriton makes it
    assert not (tmp_path / gone).exists()
    assert alive.is_dir()
    assert other.is_dir()
