"""What a session's fast weights look like: which projections, how many layers, which rank."""

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
