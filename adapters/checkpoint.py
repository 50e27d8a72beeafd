"""Compact per-session checkpoints: B alone as safetensors bytes plus their sha256."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import Tensor


class CheckpointError(ValueError):
    """A checkpoint that must not be loaded: wrong checksum, unreadable bytes, or a bad tensor."""


@dataclass(frozen=True)
class Checkpoint:
    """Serialized B tensors and the sha256 of exactly these bytes."""

    data: bytes
    sha256: str


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_b(b: dict[str, Tensor], metadata: dict[str, str] | None = None) -> Checkpoint:
    """Serialize B (as contiguous float32 on CPU) to safetensors bytes with their sha256."""
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in b.items()}
    data = save(tensors, metadata=metadata)
    return Checkpoint(data=data, sha256=sha256_hex(data))


def decode_b(data: bytes, expected_sha256: str) -> dict[str, Tensor]:
    """Load B from bytes, refusing anything whose sha256 differs or whose values are not finite."""
    actual = sha256_hex(data)
    if actual != expected_sha256:
        raise CheckpointError(f"checkpoint sha256 mismatch: expected {expected_sha256[:12]}…, got {actual[:12]}…")
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint bytes are not valid safetensors: {exc}") from exc
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"checkpoint tensor {name} holds NaN or inf")
    return tensors


def read_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of safetensors bytes, read from the header without loading tensors."""
    try:
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_len])
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint header is unreadable: {exc}") from exc
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}
