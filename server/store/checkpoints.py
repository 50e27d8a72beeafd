"""Checkpoint records: one adapter version's bytes as the store keeps them, and what those bytes say about
themselves (the header every worker writes and every replica reads to rebuild the adapter)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import ValidationError

from tmem.adapters.spec import FastWeightSpec
from tmem.server.store.replies import as_bytes, as_str


@dataclass(frozen=True)
class StoredCheckpoint:
    """One adapter version's bytes as stored: the `:ckpt:{n}` hash that scripts.COMMIT_UPDATE writes."""

    version: int
    data: bytes
    sha256: str
    created_at: float

    @classmethod
    def from_hash(cls, version: int, fields: Mapping[bytes | str, bytes | str]) -> StoredCheckpoint | None:
        """The record of an HGETALL reply; None when the version is not stored."""
        if b"data" not in fields:
            return None
        return cls(version=version, data=as_bytes(fields[b"data"]), sha256=as_str(fields.get(b"sha256")),
                   created_at=float(as_str(fields.get(b"created_at"), "0")))


@dataclass(frozen=True)
class CheckpointHeader:
    """The safetensors metadata of a checkpoint: the A0, spec and layers its B was trained against."""

    a0: str  # the identity of the shared A0 (`KeyLayout.a0`) this B multiplies
    spec: FastWeightSpec
    layers: list[int]
    base_model: str = ""

    def to_metadata(self) -> dict[str, str]:
        """The header as safetensors metadata (string values only)."""
        return {"a0": self.a0, "spec": self.spec.model_dump_json(), "layers": json.dumps(self.layers),
                "base_model": self.base_model}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> CheckpointHeader:
        """The header of a checkpoint's metadata; ValueError when a field is missing or unreadable."""
        try:
            layers = json.loads(metadata["layers"])
            if not isinstance(layers, list) or not all(isinstance(n, int) for n in layers):
                raise ValueError(f"layers must be a list of layer indices, got {metadata['layers']!r}")
            return cls(a0=metadata["a0"], spec=FastWeightSpec.model_validate_json(metadata["spec"]),
                       layers=layers, base_model=metadata.get("base_model", ""))
        except KeyError as exc:
            raise ValueError(f"checkpoint header lacks {exc}") from exc
        except (ValidationError, json.JSONDecodeError) as exc:
            raise ValueError(f"checkpoint header is unreadable: {exc}") from exc
