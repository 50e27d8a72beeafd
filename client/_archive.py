"""Saving a downloaded adapter archive: as the ``.tar.gz`` itself, or unpacked as a PEFT directory."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

from .errors import APIResponseValidationError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")


def save_adapter(content: bytes, path: str | os.PathLike[str]) -> Path:
    """Write the adapter archive ``content`` to ``path`` and return it.

    A ``path`` ending in ``.tar.gz`` or ``.tgz`` receives the archive unchanged. Any other ``path``
    is a directory (created if missing) that becomes the PEFT directory: the archive is unpacked
    into it, with a single top-level folder in the archive stripped, so ``path/adapter_config.json``
    exists afterwards.
    """
    target = Path(path)
    if target.name.endswith(ARCHIVE_SUFFIXES):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        return target
    target.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(fileobj=io.BytesIO(content), mode="r:*") as tar:
            _extract(tar, target)
    except tarfile.TarError as exc:
        raise APIResponseValidationError(f"The adapter archive could not be read: {exc}") from exc
    return target


def _extract(tar: tarfile.TarFile, target: Path) -> None:
    members = [m for m in tar.getmembers() if Path(m.name).parts]
    for member in members:
        name = Path(member.name)
        if not (member.isfile() or member.isdir()) or name.is_absolute() or ".." in name.parts:
            raise APIResponseValidationError(f"Refusing unsafe archive member {member.name!r}")
    parts = [Path(m.name).parts for m in members]
    # "adapter/adapter_config.json", ... : the folder itself is not wanted, only its contents.
    if len({p[0] for p in parts}) == 1 and all(len(p) > 1 or m.isdir() for p, m in zip(parts, members, strict=True)):
        members = [_strip_root(m) for m in members if len(Path(m.name).parts) > 1]
    for member in members:
        if hasattr(tarfile, "data_filter"):  # Python's own safety filter, where this Python has it
            tar.extract(member, target, filter="data")
        else:
            tar.extract(member, target)


def _strip_root(member: tarfile.TarInfo) -> tarfile.TarInfo:
    member.name = str(Path(*Path(member.name).parts[1:]))
    return member
