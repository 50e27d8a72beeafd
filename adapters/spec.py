"""What a session's fast weights look like (projections, layers, rank) and how they are trained.

Plain pydantic, no torch: the settings and the CLI read these without loading the trainer.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

AInit = Literal["svd", "random"]


class FastWeightSpec(BaseModel):
    """The shape of Δ = B·A0: target projections in the last `last_layers` layers, rank `rank`.

    Defaults follow the TMEM paper: FFN projections of the last 4 layers, rank 6, SVD-initialized
    frozen A0 and a trained B that starts at zero.
    """

    model_config = ConfigDict(frozen=True)

    target_modules: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    last_layers: int = Field(4, ge=1)
    rank: int = Field(6, ge=1, le=256)
    a_init: AInit = "svd"
    # Seed for the `random` A-init; the SVD init is deterministic and ignores it.
    seed: int = 0

    @field_validator("target_modules")
    @classmethod
    def _non_empty_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or any(not name or "." in name for name in value):
            raise ValueError("target_modules must be non-empty leaf module names like 'gate_proj'")
        return tuple(value)

    def fingerprint(self) -> str:
        """A stable string that changes whenever A0 would change."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)


class TrainerConfig(BaseModel):
    """Update hyper-parameters; the bare defaults are the paper's for 4B–8B models (see TRAINER_PRESETS)."""

    model_config = ConfigDict(frozen=True)

    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(5e-4, gt=0)
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(16, ge=1)
    seed: int = 0
    max_seq_len: int = Field(512, ge=8)
    # Clip the global gradient norm of B; None leaves plain SGD untouched (the paper's setting).
    max_grad_norm: float | None = None
    # Stop a session's update after the first epoch whose mean loss is at or below this (None: all epochs).
    # Fewer steps once the pairs are learned: less drift of everything else, and a shorter update.
    target_loss: float | None = Field(None, ge=0)
    # Anchor pairs (the base model's own answers to general prompts, `tmem.adapters.anchors`) mixed into
    # every update, so what the session did not teach stays as it was.
    anchors: int = Field(0, ge=0, le=64)
    # Epochs that raw-text supervision (the fallback for chunks without pairs) takes part in.
    raw_epochs: int = Field(1, ge=1)
    # Rendered before each question, as the server renders it when serving (None: no system turn).
    system_prompt: str | None = None


TrainerPresetName = Literal["default", "paper"]
TRAINER_PRESETS: dict[str, TrainerConfig] = {
    # The paper's settings for 4B–8B models: on SmolLM2-135M they teach 0 of 20 facts (tmem.bench.recall_bench).
    "paper": TrainerConfig(),
    # Calibrated on SmolLM2-135M-Instruct (tmem.bench.recall_bench; numbers in docs/recall.md): Adam learns
    # in a few steps where SGD learns nothing, the early stop and clipping bound the drift, and 8
    # anchors keep general answers in the base model's own form.
    "default": TrainerConfig(optimizer="adam", lr=1e-3, epochs=12, batch_size=16, max_grad_norm=1.0,
                             target_loss=0.2, anchors=8),
}
