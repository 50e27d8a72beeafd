"""Running a HF decoder layer by layer, so the frozen prefix below the adapted layers runs once per update.

Δ lives only in the last few blocks, so the hidden state that enters the first adapted block does not
depend on B. `DecoderStack` computes it once per example (no grad) and then, every epoch, runs only the
adapted blocks + the final norm on those stored states. To stay exact it calls each block the way
`LlamaModel.forward` (and Qwen2/Qwen3/Mistral's) does in transformers 5.x:

- `position_ids = arange(width)[None]`, since batches are right-padded and nothing is cached;
- the rotary `(cos, sin)` from `decoder.rotary_emb(hidden, position_ids)`, shared by every block;
- the attention mask from `masking_utils.create_causal_mask` (or `create_sliding_window_causal_mask`
  for sliding-window blocks), which folds the 2-D padding mask into the causal one and may return
  None when there is no padding (SDPA then uses its own causal path, as in the model's own forward);
- `past_key_values=None, use_cache=False`: a cache would grow across epochs and change the keys.

Right padding matters for exactness: with a causal mask a real token never attends to the pads after
it, so a row's states do not depend on how wide the batch it was padded into is (up to float rounding
in the attention kernels). That is what lets a prefix computed in one batch be reused in another.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tmem.adapters.fast_weights import FastWeightModel
from tmem.adapters.supervision import Example, collate
from tmem.adapters.targets import decoder_layers

FULL, SLIDING = "full_attention", "sliding_attention"
# Rows per no-grad prefix pass: bounds peak memory, large enough to keep the GEMMs efficient.
PREFIX_CHUNK_ROWS = 64


@dataclass
class LayerInputs:
    """What every decoder block receives besides the hidden states, for one padded batch."""

    masks: dict[str, Any]  # attention mask per layer type (a tensor, a BlockMask or None)
    position_embeddings: tuple[Tensor, Tensor]
    position_ids: Tensor


class DecoderStack:
    """Calls the embedding, the decoder blocks, the final norm and the LM head of a FastWeightModel."""

    def __init__(self, fast: FastWeightModel) -> None:
        self.fast = fast
        self.decoder: Any = fast.model.get_decoder()
        _, self.layers = decoder_layers(fast.model)
        missing = [name for name in ("embed_tokens", "rotary_emb", "norm") if not hasattr(self.decoder, name)]
        if missing or self.decoder.layers is not self.layers:
            raise ValueError(f"unsupported decoder layout for layer-wise runs (missing {missing}); "
                             "Llama/Qwen/Mistral-style decoders are supported")
        self.layer_types = _layer_types(self.decoder.config, len(self.layers))
        # The first block that carries Δ: everything below it is the B-independent prefix.
        self.first_adapted = min(fast.layers)

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.decoder.embed_tokens(input_ids.to(self.fast.device))

    def inputs_for(self, hidden: Tensor, attention_mask: Tensor) -> LayerInputs:
        """Mask and rotary embeddings for a right-padded batch, built as the model's own forward builds them."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        mask_2d = attention_mask.to(hidden.device)
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        kwargs = {"config": self.decoder.config, "inputs_embeds": hidden, "attention_mask": mask_2d,
                  "past_key_values": None, "position_ids": position_ids}
        masks: dict[str, Any] = {}
        if FULL in self.layer_types:
            masks[FULL] = create_causal_mask(**kwargs)
        if SLIDING in self.layer_types:
            masks[SLIDING] = create_sliding_window_causal_mask(**kwargs)
        cos_sin = self.decoder.rotary_emb(hidden, position_ids)
        return LayerInputs(masks, (cos_sin[0], cos_sin[1]), position_ids)

    def run_layers(self, hidden: Tensor, inputs: LayerInputs, start: int, stop: int) -> Tensor:
        """Blocks `start` … `stop - 1` on `hidden`, with the forward hooks (Δ) of whatever is active."""
        for index in range(start, stop):
            hidden = self.layers[index](
                hidden,
                attention_mask=inputs.masks[self.layer_types[index]],
                position_embeddings=inputs.position_embeddings,
                position_ids=inputs.position_ids,
                past_key_values=None,
                use_cache=False,
            )
        return hidden

    def top(self, hidden: Tensor, attention_mask: Tensor, start: int) -> Tensor:
        """Blocks from `start` to the last, then the final norm: the states the LM head reads."""
        inputs = self.inputs_for(hidden, attention_mask)
        return self.decoder.norm(self.run_layers(hidden, inputs, start, len(self.layers)))

    def head(self, hidden: Tensor) -> Tensor:
        return self.fast.head(hidden)

    @torch.no_grad()
    def prefix_states(self, examples: Sequence[Example], pad_id: int, stop: int | None = None,
                      chunk_rows: int = PREFIX_CHUNK_ROWS) -> list[Tensor]:
        """Per example, the (length, hidden) states entering block `stop` (default: the first adapted one).

        Below the first adapted block they do not depend on B, so they are computed once, without
        grad. `stop=0` gives the token embeddings (the naive route: every block runs every step).
        Examples are grouped by length so each pass pads little; each result is trimmed back to its
        own length.
        """
        stop = self.first_adapted if stop is None else stop
        if not 0 <= stop <= self.first_adapted:
            raise ValueError(f"the B-independent prefix ends at block {self.first_adapted}, not {stop}")
        states: list[Tensor | None] = [None] * len(examples)
        by_length = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
        with self.fast.using(None):  # no block below first_adapted has a target, but be explicit
            for start in range(0, len(by_length), chunk_rows):
                rows = by_length[start:start + chunk_rows]
                ids, mask, _ = collate([examples[i] for i in rows], pad_id)
                hidden = self.embed(ids)
                if stop > 0:
                    hidden = self.run_layers(hidden, self.inputs_for(hidden, mask), 0, stop)
                for row, index in enumerate(rows):
                    states[index] = hidden[row, :len(examples[index].input_ids)].clone()
        return [s for s in states if s is not None]


class PrefixCache:
    """Frozen-prefix states by token ids, least recently used dropped first past `max_bytes`.

    A session's rehearsed memories and the anchors are the same rows update after update, and every
    session of a group shares the anchors: their states are computed once and reused, since nothing
    below the first adapted block changes while the server runs. Exact up to the float rounding that
    batch width already allows (see the module docstring).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self._states: OrderedDict[tuple[int, ...], Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._states)

    def states(self, stack: DecoderStack, examples: Sequence[Example], pad_id: int, stop: int) -> list[Tensor]:
        """Each example's states entering block `stop`: cached ones reused, the rest computed in one pass."""
        keys = [tuple(ex.input_ids) for ex in examples]
        found = {key: self._states[key] for key in keys if key in self._states}
        for key in found:
            self._states.move_to_end(key)
        todo = {key: ex for key, ex in zip(keys, examples, strict=True) if key not in found}
        self.hits, self.misses = self.hits + len(keys) - len(todo), self.misses + len(todo)
        if todo:
            computed = stack.prefix_states(list(todo.values()), pad_id, stop)
            for key, state in zip(todo, computed, strict=True):
                found[key] = state
                self._put(key, state)
        return [found[key] for key in keys]

    def _put(self, key: tuple[int, ...], state: Tensor) -> None:
        size = state.numel() * state.element_size()
        if size > self.max_bytes:
            return
        self._states[key] = state
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, dropped = self._states.popitem(last=False)
            self.bytes -= dropped.numel() * dropped.element_size()


def _layer_types(config: Any, n_layers: int) -> list[str]:
    """Attention kind per block, read as the HF decoders read it.

    Qwen2/Qwen3 (and newer Llama-likes) list `layer_types`; Mistral has none and uses a sliding window
    in every block when `sliding_window` is set; Llama has neither and is fully causal.
    """
    types = getattr(config, "layer_types", None)
    if types is None:
        kind = SLIDING if getattr(config, "sliding_window", None) is not None else FULL
        types = [kind] * n_layers
    unknown = sorted(set(types) - {FULL, SLIDING})
    if unknown or len(types) < n_layers:
        raise ValueError(f"unsupported attention layer types for layer-wise runs: {unknown or types}")
    return list(types[:n_layers])

