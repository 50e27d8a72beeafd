"""A0 initialisation strategies and the on-disk A0 cache.

A0 depends only on the frozen base weights and the spec, so it is computed once per model and
shared by every session; only B is stored per session.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from tmem.adapters.spec import FastWeightSpec
from tmem.adapters.targets import Target

AInitFn = Callable[[Tensor, int, torch.Generator], Tensor]


def svd_a0(weight: Tensor, rank: int, generator: torch.Generator) -> Tensor:
    """A0 = Σ_r V_rᵀ: the top-r right singular vectors of W scaled by their singular values."""
    del generator  # deterministic
    _, singular, vh = torch.linalg.svd(weight.detach().to(torch.float32), full_matrices=False)
    return (singular[:rank, None] * vh[:rank]).contiguous()


def random_a0(weight: Tensor, rank: int, generator: torch.Generator) -> Tensor:
    """PEFT's default LoRA-A init (Kaiming-uniform, a=√5), seeded: the paper's baseline."""
    in_features = weight.shape[1]
    bound = 1.0 / math.sqrt(in_features)
    noise = torch.rand((rank, in_features), generator=generator, dtype=torch.float32)
    return (noise * 2.0 - 1.0) * bound


A_INIT_STRATEGIES: dict[str, AInitFn] = {"svd": svd_a0, "random": random_a0}


def weight_of(model: nn.Module, name: str) -> Tensor:
    """The weight tensor of the Linear module at dotted path `name`."""
    module = model.get_submodule(name)
    if not isinstance(module, nn.Linear):
        raise TypeError(f"{name} is not a Linear module")
    return module.weight


def model_identity(model: nn.Module, targets: list[Target], spec: FastWeightSpec) -> str:
    """A key that changes iff A0 would: the spec plus the exact bytes of every target weight."""
    digest = hashlib.sha256(spec.fingerprint().encode())
    for target in targets:
        weight = weight_of(model, target.name).detach().to("cpu").contiguous()
        digest.update(f"{target.name}:{tuple(weight.shape)}:{weight.dtype}".encode())
        digest.update(weight.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def compute_a0(model: nn.Module, targets: list[Target], spec: FastWeightSpec) -> dict[str, Tensor]:
    """Compute A0 (float32, CPU) for every target with the spec's strategy."""
    strategy = A_INIT_STRATEGIES[spec.a_init]
    generator = torch.Generator().manual_seed(spec.seed)
    return {t.name: strategy(weight_of(model, t.name), spec.rank, generator).cpu() for t in targets}


def load_or_compute_a0(
    model: nn.Module, targets: list[Target], spec: FastWeightSpec, cache_dir: Path | None
) -> dict[str, Tensor]:
    """A0 from `cache_dir` when present for this model identity, else computed and cached."""
    if cache_dir is None:
        return compute_a0(model, targets, spec)
    path = Path(cache_dir) / f"a0-{model_identity(model, targets, spec)}.safetensors"
    if path.exists():
        cached = load_file(str(path))
        if set(cached) == {t.name for t in targets}:
            return cached
    a0 = compute_a0(model, targets, spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(a0, str(tmp))
    tmp.replace(path)  # atomic: concurrent processes never read a half-written cache file
    return a0
