"""`sightline inference serve`'s PyTriton workspaces (a killed server's is removed by the next)
and the Triton stub's environment (built into an image, used read-only by its pods)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from backend.inference.serve import stub_environment, workspace


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


def test_a_complete_stub_environment_is_used_as_it_is(tmp_path: Path) -> None:
    """The Dockerfile builds the stub's environment as root; the pods run as another user on a
    read-only root filesystem: a complete environment is used as it is, nothing written."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = tmp_path / "stub" / "lib" / version / "site-packages"
    (site / "numpy").mkdir(parents=True)  # what pip --target leaves (numpy 1.26)
    paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    pth = site / "sightline-serve.pth"
    pth.write_text("\n".join(paths) + "\n", encoding="utf-8")
    os.utime(pth, ns=(0, 0))
    assert stub_environment(tmp_path / "stub") == tmp_path / "stub"
    assert pth.stat().st_mtime_ns == 0  # not rewritten
    pth.write_text("/elsewhere\n", encoding="utf-8")  # another interpreter's: mended
    stub_environment(tmp_path / "stub")
    assert pth.read_text(encoding="utf-8").splitlines() == list(paths)
