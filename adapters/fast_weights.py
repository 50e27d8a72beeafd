"""A frozen base model whose target projections add Δx = B·(A0·x), exactly as vLLM's LoRA does."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tmem.adapters.a_init import load_or_compute_a0
from tmem.adapters.spec import FastWeightSpec
from tmem.adapters.targets import Target, adapted_layers, find_targets

SessionB = dict[str, Tensor]


class FastWeightModel:
    """The trainer's view of π(θ0 + Δ): a frozen HF causal LM plus forward hooks on the targets.

    With `lora_alpha = r` the LoRA scaling is 1, so the served output of a projection is
    W·x + B·(A0·x) — the hook computes the same thing, in the model's dtype.
    """

    def __init__(self, model: nn.Module, spec: FastWeightSpec, a0_cache_dir: Path | None = None) -> None:
        model.requires_grad_(False)
        model.eval()
        self.model: Any = model  # an HF PreTrainedModel; typed Any for its dynamic accessors
        self.spec = spec
        self.targets: list[Target] = find_targets(model, spec)
        self.a0: dict[str, Tensor] = load_or_compute_a0(model, targets=self.targets, spec=spec,
                                                        cache_dir=a0_cache_dir)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._a0_device = {n: a.to(self.device, self.dtype) for n, a in self.a0.items()}
        self._active: SessionB | None = None
        for target in self.targets:
            model.get_submodule(target.name).register_forward_hook(self._make_hook(target.name))

    @property
    def layers(self) -> list[int]:
        return adapted_layers(self.targets)

    def zero_b(self) -> SessionB:
        """B0 = 0 for every target (float32, CPU): a new session starts exactly at the base model."""
        return {t.name: torch.zeros(t.out_features, self.spec.rank) for t in self.targets}

    def check_b(self, b: SessionB) -> None:
        """Raise ValueError unless `b` has exactly this model's targets and shapes."""
        expected = {t.name: (t.out_features, self.spec.rank) for t in self.targets}
        got = {name: tuple(t.shape) for name, t in b.items()}
        if got != expected:
            raise ValueError(f"B does not match the fast-weight spec: expected {expected}, got {got}")

    @contextmanager
    def using(self, b: SessionB | None) -> Iterator[None]:
        """Run forwards with the session's B (None: the bare base model)."""
        previous = self._active
        self._active = None if b is None else {n: t.to(self.device, self.dtype) for n, t in b.items()}
        try:
            yield
        finally:
            self._active = previous

    def _make_hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
            if self._active is None:
                return None
            x = inputs[0]
            return output + F.linear(F.linear(x, self._a0_device[name]), self._active[name])

        return hook

    def logits(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Full next-token logits (batch, seq, vocab) under the active B."""
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=_maybe(attention_mask, self.device))
        return out.logits

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Final (normed) hidden states before the LM head, so the head can run where the loss is."""
        decoder = self.model.get_decoder()
        out = decoder(input_ids=input_ids.to(self.device), attention_mask=_maybe(attention_mask, self.device))
        return out.last_hidden_state

    def head(self, hidden: Tensor) -> Tensor:
        return self.model.get_output_embeddings()(hidden)

    @torch.no_grad()
    def greedy(self, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None) -> list[int]:
        """Greedy decoding without a KV cache: small and exact, for tests and parity checks."""
        ids = list(prompt_ids)
        for _ in range(max_new_tokens):
            nxt = int(self.logits(torch.tensor([ids]))[0, -1].argmax())
            ids.append(nxt)
            if nxt == eos_id:
                break
        return ids[len(prompt_ids):]


def _maybe(t: Tensor | None, device: torch.device) -> Tensor | None:
    return None if t is None else t.to(device)
