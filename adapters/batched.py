"""Online updates of many sessions at once: one forward/backward per step for every session's rows.

Same semantics as `OnlineTrainer.update` run once per session, at a fraction of the cost:

- **Batched sessions.** The rows of all sessions in a group go through the frozen model together. At
  each target the shared A0 projection is one GEMM over all rows (z = x·A0ᵀ); each row then goes
  through its own session's B (a stacked `B[session_of_row]` and one `bmm`). The loss is reduced per
  session (mean over that session's answer tokens in its batch) and the per-session losses are summed.
  Rows never mix (attention is within a row, norms and FFNs are per token) and B_s touches only the
  rows of session s, so ∂(Σ_s L_s)/∂B_s = ∂L_s/∂B_s: each session gets exactly the gradient it would
  get alone, and its own optimizer (SGD or Adam, own state) takes the same step.
- **Same schedule.** Each session draws its own per-epoch permutation from its own generator seeded
  with `config.seed`, exactly as `OnlineTrainer` does; joint step k combines the k-th batch of every
  session that still has one (sessions with fewer pairs, or that reached `target_loss` at an epoch
  boundary, simply finish earlier).
- **Per-session NaN guard.** A session whose loss, gradient or updated B is non-finite is rejected
  alone (B returned untouched, with the reason) and dropped from later steps; the others continue.
  Its loss is left out of the summed loss, and its NaN rows reach no other session's B.
- **Frozen prefix reuse.** The states entering the first adapted block do not depend on B: they are
  computed once per update (no grad) and each step runs only the adapted blocks, the final norm and
  the LM head (see `tmem.adapters.prefix`).
- **Logits where the loss is.** The LM head runs only at answer positions.

Tolerance (float32, `b_tolerance`): the updated B equals `OnlineTrainer.update`'s within atol 1e-5 with
SGD (measured ≤ 2e-8 on the tiny model: float rounding from other batch widths and kernels). Adam divides
each gradient entry by its own running RMS, so an entry whose gradient is at rounding level can move by
a fraction of lr either way: there the bound is 1e-2·lr (measured 3e-3·lr), i.e. ≤ 1e-5 for lr ≤ 1e-3.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tmem.adapters.fast_weights import FastWeightModel, SessionB
from tmem.adapters.prefix import DecoderStack, PrefixCache
from tmem.adapters.supervision import IGNORE_INDEX, Example, Supervision, collate, encode_pairs, padding_id, right_pad
from tmem.adapters.trainer import (
    NO_TRAINABLE_PAIRS,
    NonFiniteUpdate,
    Schedule,
    TrainerConfig,
    UpdateResult,
    check_loss,
    epoch_schedule,
    guarded_step,
    make_optimizer,
    reached_target,
    trainable_b,
)

DEFAULT_MAX_GROUP_SIZE = 16
# Documented equivalence with OnlineTrainer.update in float32 (what the unit tests assert).
B_ATOL = 1e-5
ADAM_B_ATOL_PER_LR = 1e-2

UpdateItem = tuple[SessionB, Sequence[Supervision]]


def b_tolerance(config: TrainerConfig) -> float:
    """Largest |ΔB| entry expected between this module's update and OnlineTrainer.update (float32)."""
    return B_ATOL if config.optimizer == "sgd" else max(B_ATOL, ADAM_B_ATOL_PER_LR * config.lr)


@dataclass
class _Session:
    """One session's state inside a group update."""

    result: UpdateResult
    examples: list[Example]
    started: float
    params: dict[str, Tensor] = field(default_factory=dict)
    optimizer: torch.optim.Optimizer | None = None
    schedule: Schedule = field(default_factory=list)
    states: list[Tensor] = field(default_factory=list)
    alive: bool = True
    finished_early: bool = False  # reached the target loss: no further steps

    def reject(self, reason: str) -> None:
        self.result.reason = reason
        self.alive = False
        self.result.seconds = time.perf_counter() - self.started


class BatchedTrainer:
    """Updates many sessions' B together; a drop-in for `OnlineTrainer` (same constructor, same `update`).

    `max_group_size` caps how many sessions share one forward (longer lists are chunked);
    `reuse_prefix=False` runs every block every step (the naive route, for comparison). A result's
    `seconds` is the wall time from the start of its group to that session's last step: sessions in a
    group share every step, so their times overlap rather than add up.
    """

    def __init__(self, fast_model: FastWeightModel, tokenizer: Any, config: TrainerConfig | None = None, *,
                 max_group_size: int = DEFAULT_MAX_GROUP_SIZE, reuse_prefix: bool = True,
                 anchors: Sequence[Supervision] = (), prefix_cache_bytes: int = 0) -> None:
        if max_group_size < 1:
            raise ValueError(f"max_group_size must be >= 1, got {max_group_size}")
        self.fast = fast_model
        self.tokenizer = tokenizer
        self.config = config or TrainerConfig()
        self.max_group_size = max_group_size
        self.anchors = list(anchors)  # the first `config.anchors` join every session's update
        # Torch threads for the next step, asked before each one: a server gives the trainer the cores its
        # engine leaves free at that moment (None: leave torch's setting alone).
        self.threads: Callable[[], int] | None = None
        self.stack = DecoderStack(fast_model)
        self.prefix_cache = PrefixCache(prefix_cache_bytes)  # 0: nothing kept between updates
        # Block at which per-step work starts: the first adapted one, or 0 to recompute everything.
        self.start = self.stack.first_adapted if reuse_prefix else 0
        self.pad_id = padding_id(tokenizer)
        # A0 in the model's dtype, once: shared by every session and every row.
        self._a0 = {t.name: fast_model.a0[t.name].to(fast_model.device, fast_model.dtype)
                    for t in fast_model.targets}

    def update(self, b: SessionB, pairs: Sequence[Supervision], config: TrainerConfig | None = None) -> UpdateResult:
        """Train a copy of one session's `b` on `pairs` (a group of one); the input is never modified."""
        return self.update_many([(b, pairs)], config)[0]

    def update_many(self, items: Sequence[UpdateItem], config: TrainerConfig | None = None) -> list[UpdateResult]:
        """Update every (B, pairs) item; results in input order, each as OnlineTrainer.update would give it."""
        cfg = config or self.config
        for b, _ in items:
            self.fast.check_b(b)  # a malformed B is a caller bug: refuse the whole call before any work
        results: list[UpdateResult] = []
        for start in range(0, len(items), self.max_group_size):
            results += self._update_group(items[start:start + self.max_group_size], cfg)
        return results

    @torch.no_grad()
    def batch_losses(self, bs: Sequence[SessionB], batches: Sequence[Sequence[Example]]) -> list[float]:
        """Mean answer-token loss of each B on its own batch, through this trainer's forward (no grad)."""
        states = [self.stack.prefix_states(batch, self.pad_id, self.start) for batch in batches]
        params = [{n: t.to(self.fast.device, torch.float32) for n, t in b.items()} for b in bs]
        rows = [list(zip(s, batch, strict=True)) for s, batch in zip(states, batches, strict=True)]
        return [float(v) for v in self._session_losses(params, rows)]

    def _update_group(self, items: Sequence[UpdateItem], cfg: TrainerConfig) -> list[UpdateResult]:
        started = time.perf_counter()
        sessions = [self._prepare(b, pairs, cfg, started) for b, pairs in items]
        live = [s for s in sessions if s.alive]
        self._size_threads()
        self._attach_states(live)
        step = 0
        while active := [s for s in live if s.alive and step < len(s.schedule) and not self._done(s, step, cfg)]:
            self._size_threads()
            self._joint_step(active, step, cfg)
            step += 1
        for s in live:
            if s.alive:
                s.result.apply(s.params, s.started)
        return [s.result for s in sessions]

    def _size_threads(self) -> None:
        if self.threads is not None and (wanted := max(1, self.threads())) != torch.get_num_threads():
            torch.set_num_threads(wanted)

    @staticmethod
    def _done(s: _Session, step: int, cfg: TrainerConfig) -> bool:
        """True from the first epoch boundary at which the session's loss reached `cfg.target_loss`."""
        s.finished_early = s.finished_early or reached_target(s.result.losses, s.schedule, step, cfg)
        return s.finished_early

    def _prepare(self, b: SessionB, pairs: Sequence[Supervision], cfg: TrainerConfig, started: float) -> _Session:
        """Encode one session's pairs and set up its trainable copy of B, optimizer and schedule."""
        examples = encode_pairs(self.tokenizer, pairs, cfg.max_seq_len, cfg.system_prompt)
        if examples:  # anchors steady an update, at most one per example: they never make one or drown it
            examples += encode_pairs(self.tokenizer, self.anchors[:min(cfg.anchors, len(examples))], cfg.max_seq_len)
        session = _Session(result=UpdateResult.before(b, examples), examples=examples, started=started)
        if not examples:
            session.reject(NO_TRAINABLE_PAIRS)
            return session
        # Same order of names as OnlineTrainer: the optimizer and grad clipping see the same list.
        session.params = trainable_b(b, self.fast.device)
        session.optimizer = make_optimizer(cfg, list(session.params.values()))
        session.schedule = epoch_schedule(examples, cfg)
        return session

    def _attach_states(self, sessions: Sequence[_Session]) -> None:
        """One no-grad pass for every session's examples: the states entering block `self.start`."""
        examples = [ex for s in sessions for ex in s.examples]
        if not examples:
            return
        states = self.prefix_cache.states(self.stack, examples, self.pad_id, self.start)
        offset = 0
        for s in sessions:
            s.states = states[offset:offset + len(s.examples)]
            offset += len(s.examples)

    def _joint_step(self, active: Sequence[_Session], step: int, cfg: TrainerConfig) -> None:
        """Batch `step` of every active session in one forward/backward; each session steps its own B."""
        for s in active:
            assert s.optimizer is not None
            s.optimizer.zero_grad(set_to_none=True)
        rows = [[(s.states[i], s.examples[i]) for i in s.schedule[step][1]] for s in active]
        losses = self._session_losses([s.params for s in active], rows)
        kept: list[int] = []
        for k, s in enumerate(active):
            try:
                check_loss(losses[k], s.result.steps + 1, s.schedule[step][0])
            except NonFiniteUpdate as exc:
                s.reject(str(exc))
            else:
                kept.append(k)
        if not kept:
            return
        # Only finite losses enter the sum: a rejected session contributes no gradient to anyone.
        losses[kept].sum().backward()
        for k in kept:
            self._step_session(active[k], float(losses[k].item()), cfg)

    def _step_session(self, s: _Session, loss: float, cfg: TrainerConfig) -> None:
        """The per-session half of a step, with OnlineTrainer's checks and messages."""
        n = s.result.steps + 1
        assert s.optimizer is not None
        try:
            guarded_step(s.params, s.optimizer, cfg, n)
        except NonFiniteUpdate as exc:
            s.reject(str(exc))
            return
        s.result.losses.append(loss)
        s.result.steps = n

    def _session_losses(self, params: Sequence[dict[str, Tensor]],
                        rows: Sequence[Sequence[tuple[Tensor, Example]]]) -> Tensor:
        """Loss per session (S,): mean cross-entropy over its own answer tokens, all rows in one pass."""
        flat = [row for session_rows in rows for row in session_rows]
        row_session = torch.tensor([k for k, session_rows in enumerate(rows) for _ in session_rows],
                                   device=self.fast.device)
        # Right-padded like `collate`: each state is as long as its example's ids, pad rows are zeros.
        hidden = right_pad([state for state, _ in flat], 0.0)
        _, mask, labels = collate([ex for _, ex in flat], self.pad_id)
        stacks = {t.name: torch.stack([p[t.name] for p in params]).to(self.fast.dtype) for t in self.fast.targets}
        with self.fast.using(None), self._per_row_b(stacks, row_session):
            top = self.stack.top(hidden, mask, self.start)
        # Position t predicts token t+1: shift labels left, run the head only where a label is.
        targets = labels[:, 1:].to(top.device)
        where = targets != IGNORE_INDEX
        logits = self.stack.head(top[:, :-1][where]).float()
        token_loss = F.cross_entropy(logits, targets[where], reduction="none")
        token_session = row_session[:, None].expand_as(targets)[where]
        sums = token_loss.new_zeros(len(rows)).index_add(0, token_session, token_loss)
        counts = torch.bincount(token_session, minlength=len(rows)).to(sums.dtype)
        return sums / counts

    @contextmanager
    def _per_row_b(self, stacks: dict[str, Tensor], row_session: Tensor) -> Iterator[None]:
        """Forward hooks adding B[session_of_row]·(A0·x) at every target, removed on exit.

        FastWeightModel's own hooks stay registered but are inactive (`using(None)`), so exactly one
        Δ is added per target.
        """
        handles = [self.fast.model.get_submodule(name).register_forward_hook(
            _row_delta_hook(self._a0[name], stack, row_session)) for name, stack in stacks.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _row_delta_hook(a0: Tensor, stack: Tensor, row_session: Tensor) -> Any:
    """A hook computing output + B_{s(row)}·(A0·x): one shared A0 GEMM, then one bmm over per-row B."""

    def hook(module: torch.nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        z = F.linear(inputs[0], a0)  # (rows, width, rank): one GEMM for every session's rows
        if stack.shape[0] == 1:
            return output + F.linear(z, stack[0])  # a group of one: the reference hook's exact math
        per_row = stack.index_select(0, row_session)  # (rows, out, rank); backward sums rows into B_s
        return output + torch.bmm(z, per_row.transpose(1, 2))

    return hook


def update_many(fast: FastWeightModel, tokenizer: Any, items: Sequence[UpdateItem],
                config: TrainerConfig | None = None, *, max_group_size: int = DEFAULT_MAX_GROUP_SIZE,
                reuse_prefix: bool = True) -> list[UpdateResult]:
    """Update many sessions' B at once; equal (float32, within `b_tolerance`) to OnlineTrainer.update per session."""
    trainer = BatchedTrainer(fast, tokenizer, config, max_group_size=max_group_size, reuse_prefix=reuse_prefix)
    return trainer.update_many(items)
