"""A version of Δ as a PEFT LoRA directory that vLLM and PEFT both load as is."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from tmem.adapters.spec import FastWeightSpec

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT wraps the causal LM as `base_model.model.<module path>`; vLLM strips the same prefix.
PEFT_PREFIX = "base_model.model."


def adapter_config(spec: FastWeightSpec, layers: list[int], base_model: str) -> dict[str, Any]:
    """PEFT LoraConfig fields: lora_alpha = r (scaling 1), no dropout, only the adapted layers."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        "lora_alpha": spec.rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": list(spec.target_modules),
        "layers_to_transform": list(layers),
        "layers_pattern": "layers",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }


def peft_state_dict(a0: dict[str, Tensor], b: dict[str, Tensor]) -> dict[str, Tensor]:
    """lora_A = A0 (r × in) and lora_B = B (out × r) under PEFT's key names."""
    if set(a0) != set(b):
        raise ValueError("A0 and B name different modules")
    state: dict[str, Tensor] = {}
    for name in sorted(a0):
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a0[name].detach().to("cpu", torch.float32).contiguous()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b[name].detach().to("cpu", torch.float32).contiguous()
    return state


def write_peft_dir(path: Path, spec: FastWeightSpec, layers: list[int], a0: dict[str, Tensor],
                   b: dict[str, Tensor], base_model: str) -> Path:
    """Write the directory atomically: a reader sees either nothing or a complete adapter."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        save_file(peft_state_dict(a0, b), str(staging / WEIGHTS_FILE))
        (staging / CONFIG_FILE).write_text(json.dumps(adapter_config(spec, layers, base_model), indent=2))
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def read_peft_dir(path: Path) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Tensor]]:
    """(config, A0, B) from a PEFT directory written by `write_peft_dir`."""
    config = json.loads((Path(path) / CONFIG_FILE).read_text())
    state = load_file(str(Path(path) / WEIGHTS_FILE))
    a0: dict[str, Tensor] = {}
    b: dict[str, Tensor] = {}
    for key, tensor in state.items():
        name = key.removeprefix(PEFT_PREFIX)
        if name.endswith(".lora_A.weight"):
            a0[name.removesuffix(".lora_A.weight")] = tensor
        elif name.endswith(".lora_B.weight"):
            b[name.removesuffix(".lora_B.weight")] = tensor
    return config, a0, b
