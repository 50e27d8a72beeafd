"""Finding the modules Δ adapts inside a Hugging Face causal LM."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tmem.adapters.spec import FastWeightSpec


@dataclass(frozen=True)
class Target:
    """One adapted projection: its module path, layer index and weight shape (out, in)."""

    name: str
    layer: int
    out_features: int
    in_features: int


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return the dotted path and the ModuleList of transformer blocks.

    Llama, Qwen2/3, Mistral and most HF decoders keep them at `model.layers`; we search instead of
    hard-coding so other families work when their blocks are one ModuleList.
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        is_blocks = isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks")
        if is_blocks and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise ValueError("could not find the decoder layers (a ModuleList named 'layers')")
    return best


def find_targets(model: nn.Module, spec: FastWeightSpec) -> list[Target]:
    """The Linear modules of the last `spec.last_layers` blocks whose leaf name is a target."""
    prefix, layers = decoder_layers(model)
    if spec.last_layers > len(layers):
        raise ValueError(f"spec adapts {spec.last_layers} layers but the model has {len(layers)}")
    first = len(layers) - spec.last_layers
    targets: list[Target] = []
    for index in range(first, len(layers)):
        for sub_name, module in layers[index].named_modules():
            if isinstance(module, nn.Linear) and sub_name.split(".")[-1] in spec.target_modules:
                out_f, in_f = module.weight.shape
                targets.append(Target(f"{prefix}.{index}.{sub_name}", index, int(out_f), int(in_f)))
    found = {t.name.split(".")[-1] for t in targets}
    missing = set(spec.target_modules) - found
    if missing:
        raise ValueError(f"target modules not found in the model: {sorted(missing)}")
    return targets


def adapted_layers(targets: list[Target]) -> list[int]:
    """Sorted indices of the blocks that carry Δ."""
    return sorted({t.layer for t in targets})
