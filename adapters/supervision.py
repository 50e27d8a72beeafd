"""QA pairs → token ids with labels on the answer tokens only, through the model's chat template."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

IGNORE_INDEX = -100


class Pair(Protocol):
    """Anything with a question and an answer (read-only, so frozen models and dataclasses fit)."""

    @property
    def instruction(self) -> str: ...

    @property
    def output(self) -> str: ...


@dataclass(frozen=True)
class Example:
    """One rendered pair: the full token ids and a label per token (IGNORE_INDEX outside the answer)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def answer_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def _ids(rendered: Any) -> list[int]:
    # apply_chat_template returns a list, or a BatchEncoding-like mapping in newer transformers.
    if isinstance(rendered, dict) or hasattr(rendered, "keys"):
        rendered = rendered["input_ids"]
    return [int(i) for i in rendered]


def encode_pair(tokenizer: Any, pair: Pair, max_seq_len: int, system_prompt: str | None = None) -> Example | None:
    """Render question as the user turn and answer as the assistant turn; label only the answer.

    The prompt is the template with a generation prompt; the answer is whatever the full
    conversation adds after it (including the end-of-turn token), so the model learns to stop.
    `system_prompt`, when given, is rendered first, as the server renders it when it serves the
    answer: training and serving then see the same context. Returns None when the prompt alone
    does not fit.
    """
    head = [{"role": "system", "content": system_prompt}] if system_prompt else []
    user = [*head, {"role": "user", "content": pair.instruction}]
    prompt = _ids(tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True))
    full_msgs = [*user, {"role": "assistant", "content": pair.output}]
    full = _ids(tokenizer.apply_chat_template(full_msgs, tokenize=True))
    if full[: len(prompt)] != prompt:
        # Templates that rewrite earlier turns (e.g. strip reasoning) break the prefix property:
        # fall back to prompt + answer + EOS, which is what generation would produce.
        full = prompt + tokenizer.encode(pair.output, add_special_tokens=False) + [tokenizer.eos_token_id]
    while len(full) > len(prompt) and full[-1] != tokenizer.eos_token_id and _is_whitespace(tokenizer, full[-1]):
        full = full[:-1]  # trailing template newline after EOS is not part of what the model emits
    if len(prompt) >= max_seq_len:
        return None
    full = full[:max_seq_len]
    labels = [IGNORE_INDEX] * len(prompt) + full[len(prompt):]
    return Example(input_ids=full, labels=labels)


def _is_whitespace(tokenizer: Any, token_id: int) -> bool:
    return tokenizer.decode([token_id]).strip() == ""


def encode_pairs(tokenizer: Any, pairs: Sequence[Pair], max_seq_len: int,
                 system_prompt: str | None = None) -> list[Example]:
    """Encode every pair that fits, dropping the ones whose prompt alone exceeds `max_seq_len`."""
    encoded = (encode_pair(tokenizer, pair, max_seq_len, system_prompt) for pair in pairs)
    return [ex for ex in encoded if ex is not None and ex.answer_tokens > 0]


def collate(examples: Sequence[Example], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-pad a batch: (input_ids, attention_mask, labels), pads masked and ignored."""
    width = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(ex.labels)
    return ids, mask, labels
