"""Print the requirements of `tmem[server]` from pyproject.toml, one per line, for a cached image layer.

The Dockerfile installs these before it copies the code, so editing the code does not reinstall them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import tomllib


def server_requirements(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["server"]]


if __name__ == "__main__":
    print("\n".join(server_requirements(Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml"))))
