"""The online update: a few cheap gradient steps on a session's B from QA pairs.

Answer-only next-token cross-entropy, plain SGD (or Adam) over B alone; A0 and θ0 stay frozen.
A NaN/inf loss, gradient or updated B rejects the whole update and returns B untouched.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tmem.adapters.fast_weights import FastWeightModel, SessionB
from tmem.adapters.spec import TrainerConfig
from tmem.adapters.supervision import IGNORE_INDEX, Example, Supervision, collate, encode_pairs, padding_id


@dataclass
class UpdateResult:
    """What one update did. When `applied` is False, `b` is the input B, bit for bit, and `reason` says why."""

    b: SessionB
    applied: bool
    reason: str | None = None
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    examples: int = 0
    answer_tokens: int = 0
    seconds: float = 0.0

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    @classmethod
    def before(cls, b: SessionB, examples: Sequence[Example]) -> UpdateResult:
        """The result of an update of `b` on `examples` before it has applied anything."""
        return cls(b=b, applied=False, examples=len(examples), answer_tokens=sum(ex.answer_tokens for ex in examples))

    def apply(self, params: Mapping[str, Tensor], started: float) -> None:
        """Take the trained `params` as the new B (float32, on the CPU); `started` is when the update began."""
        self.b = {n: p.detach().to("cpu", torch.float32).clone() for n, p in params.items()}
        self.applied = True
        self.seconds = time.perf_counter() - started


NO_TRAINABLE_PAIRS = "no trainable pairs (empty, or every prompt longer than max_seq_len)"


class NonFiniteUpdate(Exception):
    """A step produced a NaN/inf loss, gradient or B; the message says which and at what step."""


class OnlineTrainer:
    """Runs updates of per-session B tensors against one frozen FastWeightModel."""

    def __init__(self, fast_model: FastWeightModel, tokenizer: Any, config: TrainerConfig | None = None) -> None:
        self.fast = fast_model
        self.tokenizer = tokenizer
        self.config = config or TrainerConfig()
        self.pad_id = padding_id(tokenizer)

    def encode(self, pairs: Sequence[Supervision]) -> list[Example]:
        return encode_pairs(self.tokenizer, pairs, self.config.max_seq_len, self.config.system_prompt)

    def update(self, b: SessionB, pairs: Sequence[Supervision], config: TrainerConfig | None = None) -> UpdateResult:
        """Train a copy of `b` on `pairs`; the input tensors are never modified."""
        cfg = config or self.config
        self.fast.check_b(b)
        started = time.perf_counter()
        examples = encode_pairs(self.tokenizer, pairs, cfg.max_seq_len, cfg.system_prompt)
        result = UpdateResult.before(b, examples)
        if not examples:
            result.reason = NO_TRAINABLE_PAIRS
            return result
        params = trainable_b(b, self.fast.device)
        try:
            self._run(params, examples, cfg, result)
        except NonFiniteUpdate as exc:
            result.reason = str(exc)
            result.seconds = time.perf_counter() - started
            return result
        result.apply(params, started)
        return result

    def _run(self, params: dict[str, Tensor], examples: list[Example], cfg: TrainerConfig,
             result: UpdateResult) -> None:
        optimizer = make_optimizer(cfg, list(params.values()))
        schedule = epoch_schedule(examples, cfg)
        for index, (epoch, rows) in enumerate(schedule):
            if reached_target(result.losses, schedule, index, cfg):
                break
            batch = [examples[i] for i in rows]
            optimizer.zero_grad(set_to_none=True)
            loss = self.batch_loss(params, batch)
            step = result.steps + 1
            check_loss(loss, step, epoch)
            loss.backward()
            guarded_step(params, optimizer, cfg, step)
            result.losses.append(float(loss.item()))
            result.steps = step

    def batch_loss(self, params: SessionB, batch: Sequence[Example]) -> Tensor:
        """Mean cross-entropy over the batch's answer tokens; the LM head runs only where labels are."""
        ids, mask, labels = collate(batch, self.pad_id)
        with self.fast.using(params):
            hidden = self.fast.hidden_states(ids, mask)
        # Position t predicts token t+1: shift labels left and keep positions with a real label.
        targets = labels[:, 1:].to(hidden.device)
        where = targets != IGNORE_INDEX
        logits = self.fast.head(hidden[:, :-1][where]).float()
        return F.cross_entropy(logits, targets[where])


Schedule = list[tuple[int, list[int]]]


def epoch_schedule(examples: Sequence[Example], config: TrainerConfig) -> Schedule:
    """(epoch, example indices) of every step: a seeded permutation per epoch, cut into batches.

    Raw-text examples (the fallback) take part in the first `config.raw_epochs` epochs only: they are
    long, weakly targeted, and the next update sees the session's text again anyway.
    """
    generator = torch.Generator().manual_seed(config.seed)
    steps: Schedule = []
    for epoch in range(config.epochs):
        order = [i for i in torch.randperm(len(examples), generator=generator).tolist()
                 if not examples[i].raw or epoch < config.raw_epochs]
        steps += [(epoch, order[start:start + config.batch_size])
                  for start in range(0, len(order), config.batch_size)]
    return steps


def reached_target(losses: Sequence[float], schedule: Schedule, step: int, cfg: TrainerConfig) -> bool:
    """True at an epoch boundary (`step` opens a new epoch) when the finished epoch's mean step loss is at or
    below `cfg.target_loss`."""
    if cfg.target_loss is None or step == 0 or schedule[step][0] == schedule[step - 1][0]:
        return False
    finished = sum(1 for epoch, _ in schedule[:step] if epoch == schedule[step - 1][0])
    last = losses[-finished:]
    return bool(last) and sum(last) / len(last) <= cfg.target_loss


def make_optimizer(cfg: TrainerConfig, params: list[Tensor]) -> torch.optim.Optimizer:
    """The optimizer `cfg` names, over one session's B."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    return torch.optim.SGD(params, lr=cfg.lr)


def trainable_b(b: SessionB, device: torch.device | str) -> dict[str, Tensor]:
    """A float32 copy of `b` on `device` that takes gradients, in `b`'s order of names; `b` is never modified."""
    return {n: t.detach().to(device, torch.float32).clone().requires_grad_(True) for n, t in b.items()}


# The NaN guard, in the two places a step can go wrong: the loss before backward, and the rest of the step.

def check_loss(loss: Tensor, step: int, epoch: int) -> None:
    """Raise NonFiniteUpdate when step `step`'s loss (in 0-based `epoch`) is NaN or infinite."""
    if not _finite(loss.detach()):
        raise NonFiniteUpdate(f"loss is {loss.item()} at step {step} (epoch {epoch + 1})")


def guarded_step(params: Mapping[str, Tensor], optimizer: torch.optim.Optimizer, cfg: TrainerConfig,
                 step: int) -> None:
    """After backward: refuse a non-finite gradient, clip (`cfg.max_grad_norm`), step, refuse a non-finite B.

    Raises NonFiniteUpdate; the caller then discards `params` and keeps the B it started from.
    """
    for name, p in params.items():
        if not _finite(p.grad):
            raise NonFiniteUpdate(f"gradient of {name} is not finite at step {step}")
    if cfg.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
    optimizer.step()
    for name, p in params.items():
        if not _finite(p.detach()):
            raise NonFiniteUpdate(f"B of {name} became non-finite after step {step}")


def _finite(t: Tensor | None) -> bool:
    return t is not None and bool(torch.isfinite(t).all())


def answer_loss(fast: FastWeightModel, b: SessionB | None, examples: Sequence[Example], pad_id: int) -> float:
    """Mean answer-token loss without gradients, e.g. to measure what an update learned."""
    ids, mask, labels = collate(examples, pad_id)
    with torch.no_grad(), fast.using(b):
        logits = fast.logits(ids, mask)[:, :-1].float()
    targets = labels[:, 1:].to(logits.device)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    return float(loss) if math.isfinite(float(loss)) else math.inf
