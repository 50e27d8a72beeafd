"""Anchors: the frozen base model's own answers to general prompts, replayed in every update.

An update that sees only a session's facts learns more than the facts: every answer it is shown is
short and starts "Your ...", so the adapter pushes every reply that way ("What is the capital of
France?" → "Your question is ..."). Mixing a few of the base model's own greedy answers to ordinary
prompts into each update (self-distillation) tells the adapter what must not change. The prompts
here are disjoint from the benchmark's retention prompts (`tmem.bench.recall_data.GENERAL_PROMPTS`), so
retention is measured on prompts the anchors never showed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tmem.adapters.supervision import ContextPair, padding_id, render_chat_ids

ANCHOR_PROMPTS: tuple[str, ...] = (
    "What is the capital of Italy?",
    "How many months are in a year?",
    "What colour is grass?",
    "Name an animal that can fly.",
    "What is 3 plus 5?",
    "Who painted the Mona Lisa?",
    "What is a computer?",
    "Name a vegetable.",
    "How many wheels does a bicycle have?",
    "What do fish live in?",
    "What is the capital of Germany?",
    "Explain gravity in one sentence.",
    "What is the largest planet in the solar system?",
    "What is coffee made from?",
    "How many continents are there?",
    "What is my favourite movie?",
    "What is the capital of Japan?",
    "How many minutes are in an hour?",
    "What colour are bananas?",
    "Name a bird that cannot fly.",
    "What is 10 minus 4?",
    "Who wrote Hamlet?",
    "What is a bicycle?",
    "Name a kind of tree.",
    "How many sides does a square have?",
    "What do cows eat?",
    "What is the capital of Canada?",
    "Explain rain in one sentence.",
    "What is the smallest planet in the solar system?",
    "What is cheese made from?",
    "How many players are on a football team?",
    "How many legs does a dog have?",
    "What is the opposite of up?",
    "Which animal is known as the king of the jungle?",
    "What is the colour of snow?",
    "Name a country in South America.",
    "What is ice made of?",
    "Write one sentence about the forest.",
    "What is the longest river in the world?",
    "Give me a synonym for big.",
    "What do birds use to fly?",
    "Who discovered penicillin?",
    "How many weeks are in a year?",
    "Name two secondary colours.",
    "What language is spoken in Brazil?",
    "What is a baby dog called?",
    "What is the capital of Spain?",
    "What is the speed of light?",
)


def base_answers(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int) -> list[ContextPair]:
    """The model's greedy answer to each prompt, as served without a system text (no adapter active).

    An answer cut by `max_new_tokens` is kept up to its last full sentence (the pair ends with the
    end-of-turn token, and a cut mid-sentence would teach the model to stop mid-sentence); an answer
    without one is left out.
    """
    pairs = []
    for prompt in prompts:
        ids = torch.tensor([render_chat_ids(tokenizer, [{"role": "user", "content": prompt}])])
        with torch.no_grad():
            out = model.generate(ids.to(model.device), attention_mask=torch.ones_like(ids).to(model.device),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=padding_id(tokenizer))
        new = out[0, ids.shape[1]:]
        answer = tokenizer.decode(new, skip_special_tokens=True).strip()
        if int(new[-1]) != tokenizer.eos_token_id:
            end = max(answer.rfind(mark) for mark in (". ", "! ", "? ", ".", "!", "?"))
            answer = answer[: end + 1].strip() if end > 0 else ""
        if answer:
            pairs.append(ContextPair(prompt, answer))
    return pairs


def load_or_make_anchors(model: Any, tokenizer: Any, identity: str, cache_dir: Path | None,
                         count: int, max_new_tokens: int = 48) -> list[ContextPair]:
    """`count` anchor pairs for this base model, computed once and cached beside A0 (keyed by its identity)."""
    if count <= 0:
        return []
    path = cache_dir / f"anchors-{identity}-{count}-{max_new_tokens}.json" if cache_dir else None
    if path is not None and path.is_file():
        return [ContextPair(p["instruction"], p["output"]) for p in json.loads(path.read_text())]
    pairs = base_answers(model, tokenizer, ANCHOR_PROMPTS[:count], max_new_tokens)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([{"instruction": p.instruction, "output": p.output} for p in pairs], indent=1))
    return pairs
