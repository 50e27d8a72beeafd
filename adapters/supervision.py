"""Supervision → token ids with labels, through the model's own chat template.

Two kinds of supervision item (the paper's QA-pair and raw-text variants):
- a QA pair: the question is the user turn, the answer the assistant turn; only answer tokens are
  labelled. A pair may carry the `system` text it is served under (a session's memory), so that
  training renders exactly what serving renders;
- `RawText`: plain next-token prediction on every token of a text (the fallback when a chunk of
  conversation yields no usable pairs).

`render_chat_ids` is the one place that turns chat messages into ids: the server renders prompts
through it too, so training and serving can never disagree on a template detail.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

IGNORE_INDEX = -100
Message = dict[str, str]
T = TypeVar("T")


class Pair(Protocol):
    """Anything with a question and an answer (read-only, so frozen models and dataclasses fit)."""

    @property
    def instruction(self) -> str: ...

    @property
    def output(self) -> str: ...


@dataclass(frozen=True)
class ContextPair:
    """A pair rendered under the system text a session's request would carry (None: no system turn)."""

    instruction: str
    output: str
    system: str | None = None


@dataclass(frozen=True)
class RawText:
    """Text learned by plain next-token prediction: the paper's raw-text supervision."""

    text: str


Supervision = Pair | RawText


@dataclass(frozen=True)
class Example:
    """One rendered item: the full token ids and a label per token (IGNORE_INDEX where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]
    raw: bool = False  # raw-text supervision (next-token on a text), not a rendered pair

    @property
    def answer_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


_BY_TEMPLATE: dict[tuple[str, str], Any] = {}  # (what, chat template text) → what the template does


def _per_template(tokenizer: Any, what: str, probe: Callable[[Any], T]) -> T:
    """`probe(tokenizer)`, worked out once per chat template: the answer depends on the template's text alone."""
    key = (what, str(getattr(tokenizer, "chat_template", None)))
    if key not in _BY_TEMPLATE:
        _BY_TEMPLATE[key] = probe(tokenizer)
    return cast(T, _BY_TEMPLATE[key])


def supports_system_role(tokenizer: Any) -> bool:
    """True when the chat template renders a system message (some, e.g. Gemma's, refuse or drop it)."""
    return _per_template(tokenizer, "system role", _probe_system_role)


def _probe_system_role(tokenizer: Any) -> bool:
    probe = "tmem-system-probe-7f3a"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": probe}, {"role": "user", "content": "hi"}], tokenize=False)
    except Exception:  # a template that raises on a system role (jinja's TemplateError and kin)
        return False
    return probe in str(text)


def template_default_system(tokenizer: Any) -> str | None:
    """The system text the chat template renders when the messages hold none (SmolLM2's, Qwen's), else None.

    Found by rendering one user message with and without a probe system message: where the template
    puts the probe, it otherwise puts its default.
    """
    return _per_template(tokenizer, "default system",
                         lambda t: _probe_default_system(t) if supports_system_role(t) else None)


def _probe_default_system(tokenizer: Any) -> str | None:
    user, probe = [{"role": "user", "content": "tmem-user-probe"}], "tmem-system-probe"
    bare = str(tokenizer.apply_chat_template(user, tokenize=False))
    with_probe = str(tokenizer.apply_chat_template([{"role": "system", "content": probe}, *user], tokenize=False))
    head, _, tail = with_probe.partition(probe)
    if len(bare) <= len(head) + len(tail) or not (bare.startswith(head) and bare.endswith(tail)):
        return None
    return bare[len(head):len(bare) - len(tail)].strip() or None


def fold_system(messages: Sequence[Message]) -> list[Message]:
    """Messages for a template without a system role: the system text opens the first user turn."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [dict(m) for m in messages if m["role"] != "system"]
    if not system:
        return rest
    for m in rest:
        if m["role"] == "user":
            m["content"] = f"{system}\n\n{m['content']}"
            return rest
    return [{"role": "user", "content": system}, *rest]


def render_chat_ids(tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` through the model's chat template, exactly as the template renders them."""
    msgs = list(messages) if supports_system_role(tokenizer) else fold_system(messages)
    rendered = tokenizer.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=True)
    # apply_chat_template returns a list, or a BatchEncoding-like mapping in newer transformers.
    if isinstance(rendered, dict) or hasattr(rendered, "keys"):
        rendered = rendered["input_ids"]
    return [int(i) for i in rendered]


def encode_pair(tokenizer: Any, pair: Pair, max_seq_len: int, system_prompt: str | None = None) -> Example | None:
    """Render question as the user turn and answer as the assistant turn; label only the answer.

    The prompt is the template with a generation prompt; the answer is whatever the full
    conversation adds after it (including the end-of-turn token), so the model learns to stop. The
    system text is the pair's own (`ContextPair.system`) or else `system_prompt`; none renders no
    system turn, as a request without one is served. Returns None when the prompt alone does not fit.
    """
    system = getattr(pair, "system", None) or system_prompt
    head = [{"role": "system", "content": system}] if system else []
    user = [*head, {"role": "user", "content": pair.instruction}]
    prompt = render_chat_ids(tokenizer, user)
    full = render_chat_ids(tokenizer, [*user, {"role": "assistant", "content": pair.output}], False)
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


def encode_text(tokenizer: Any, raw: RawText, max_seq_len: int) -> list[Example]:
    """Next-token examples over the whole text, in windows of `max_seq_len` tokens (nothing is dropped).

    Each window opens with one context token that is not a target: BOS where the tokenizer has one,
    else the last token of the previous window, so every text token but the very first is a target once.
    """
    ids = [int(i) for i in tokenizer.encode(raw.text, add_special_tokens=False)]
    bos = tokenizer.bos_token_id
    width = max(1, max_seq_len - 1)
    examples = []
    for start in range(0, len(ids), width):
        context = [int(bos)] if bos is not None else ids[start - 1 : start]
        targets = ids[start:start + width]
        window = context + targets
        labels = [IGNORE_INDEX] * len(context) + targets
        labels[0] = IGNORE_INDEX  # the very first token (no BOS) has nothing to be predicted from
        if any(label != IGNORE_INDEX for label in labels):
            examples.append(Example(input_ids=window, labels=labels, raw=True))
    return examples


def _is_whitespace(tokenizer: Any, token_id: int) -> bool:
    return tokenizer.decode([token_id]).strip() == ""


def encode_pairs(tokenizer: Any, items: Sequence[Supervision], max_seq_len: int,
                 system_prompt: str | None = None) -> list[Example]:
    """Encode every item that fits: pairs whose prompt alone exceeds `max_seq_len` are dropped."""
    examples: list[Example] = []
    for item in items:
        if isinstance(item, RawText):
            examples += encode_text(tokenizer, item, max_seq_len)
            continue
        example = encode_pair(tokenizer, item, max_seq_len, system_prompt)
        if example is not None and example.answer_tokens > 0:
            examples.append(example)
    return examples


def padding_id(tokenizer: Any) -> int:
    """The id batches are right-padded with: the tokenizer's pad token, else its EOS (pads are masked anyway)."""
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else tokenizer.eos_token_id)


def right_pad(rows: Sequence[Tensor], fill: float) -> Tensor:
    """Stack (length, ...) rows into one (rows, width, ...) batch, each right-padded with `fill` to the longest."""
    return pad_sequence(list(rows), batch_first=True, padding_value=fill)


def collate(examples: Sequence[Example], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-pad a batch: (input_ids, attention_mask, labels), pads masked and ignored."""
    ids = right_pad([torch.tensor(ex.input_ids, dtype=torch.long) for ex in examples], pad_id)
    mask = right_pad([torch.ones(len(ex.input_ids), dtype=torch.long) for ex in examples], 0)
    labels = right_pad([torch.tensor(ex.labels, dtype=torch.long) for ex in examples], IGNORE_INDEX)
    return ids, mask, labels
