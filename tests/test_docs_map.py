"""The project's docs stand alone: the README links no file outside the repository, and every
file that docs/ARCHITECTURE.md names exists (the map is kept true as files move)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_readme_points_inside_the_repository():
    readme = (REPO / "README.md").read_text()
    assert "../" not in readme
    assert "docs/ARCHITECTURE.md" in readme


def test_every_file_the_architecture_map_names_exists():
    named = re.findall(r"`((?:loraplex|tests|benchmarks|docs)/[^`\s]+)`", (REPO / "docs" / "ARCHITECTURE.md").read_text())
    assert len(named) >= 30
    assert [path for path in named if not (REPO / path).is_file()] == []
