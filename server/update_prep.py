"""Everything an update needs before training: the session's new text in small chunks, QA pairs extracted
from each chunk (by the session's own adapter, or the base model) and filtered, the supervision built
from them (raw text where a chunk yields none), the refreshed summary, and the B to start from.

Nothing is learned silently or not at all: every update reports what it extracted, kept and fell back
to (`UpdateReport`, shown as the session's `last_update`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from tmem.adapters.checkpoint import Checkpoint, CheckpointError
from tmem.adapters.extraction import QAPair, parse_pairs, parse_summary
from tmem.adapters.grounding import filter_pairs, pair_key
from tmem.adapters.memory_prompts import (
    EXAMPLE_PAIRS,
    as_user_question,
    build_extraction_messages,
    build_summary_messages,
    summary_refusal,
)
from tmem.adapters.supervision import ContextPair, RawText, Supervision
from tmem.server.generation import SessionGenerator
from tmem.server.metrics import METRICS
from tmem.server.prompting import session_system
from tmem.server.settings import Settings
from tmem.server.store import Job, RedisStore, UpdateSnapshot
from tmem.server.store.verified import newest_verified, read_verified
from tmem.server.trainer_runtime import TrainerRuntime

log = logging.getLogger(__name__)


class UpdateReport(BaseModel):
    """What one update did, in numbers a user can check (the session's `last_update`)."""

    chunks: int = 0
    replies_parsed: int = 0  # extraction replies that held a JSON array (every one, with structured output)
    pairs_extracted: int = 0  # pairs the extraction replies held
    pairs_kept: int = 0  # of those, grounded in the text, new, and not copied from the prompt
    pairs_taught: int = 0
    pairs_replayed: int = 0  # earlier memories rehearsed so this update does not overwrite them
    raw_chunks: int = 0  # chunks trained on as raw text (the fallback, or supervision raw / qa+raw)
    fallback: bool = False  # some chunk yielded no usable pair and was learned as raw text instead
    examples: int = 0  # training examples (pairs under each rendering, raw-text windows)
    summary: str = "unchanged"  # updated | unchanged | refused: <why>
    dropped: dict[str, int] = {}  # reason → count, for the pairs the filter dropped
    final_loss: float | None = None
    # Seconds per stage (queued, extract, summary, train_wait, train): where an update's lag goes.
    timings: dict[str, float] = {}

    def timed(self, stage: str, seconds: float) -> None:
        self.timings[stage] = round(self.timings.get(stage, 0.0) + seconds, 4)
        METRICS.update_seconds.labels(stage).observe(seconds)


@dataclass
class PreparedUpdate:
    """One session's update, ready to train and commit."""

    job: Job
    snap: UpdateSnapshot
    supervision: list[Supervision]
    memories: list[dict[str, Any]]  # the pairs learned from, as stored in the session's memory list
    summary: str | None
    report: UpdateReport
    b: Any = None  # the B to train from (set only when there is supervision)
    checkpoint: Checkpoint | None = None  # set by training when the update applied
    rejection: str | None = None  # set by training when the update was rejected (NaN/inf, nothing to train)


@dataclass
class _Extracted:
    """One chunk's extraction: the chunk, and the pairs the filter kept from it."""

    text: str
    kept: list[QAPair] = field(default_factory=list)


class UpdatePreparer:
    """Turns a claimed job's snapshot into supervision, memories, a summary and the B to start from."""

    def __init__(self, store: RedisStore, runtime: TrainerRuntime, generator: SessionGenerator,
                 settings: Settings) -> None:
        self.store, self.runtime, self.generator, self.settings = store, runtime, generator, settings
        self.format = settings.extraction_format()

    async def prepare(self, job: Job) -> PreparedUpdate:
        snap = await self.store.claim_snapshot(job.tenant, job.sid)
        known = [QAPair(instruction=m["instruction"], output=m["output"])
                 for m in await self.store.get_memories(job.tenant, job.sid, self.settings.max_memories)]
        taught = [QAPair(instruction=p["instruction"], output=p["output"]) for p in snap.teach_pairs]
        report = UpdateReport(pairs_taught=len(taught))
        # In a thread: a long ingest tokenizes every turn, which would stall every stream on the event loop.
        texts = await asyncio.to_thread(chunk_turns, self.runtime.trainer.tokenizer, snap.new_turns,
                                        self.settings.extraction_chunk_tokens)
        started = time.perf_counter()
        chunks = await self._extract_all(job, snap, texts, [*known, *taught], report)
        report.timed("extract", time.perf_counter() - started)
        extracted = [pair for chunk in chunks for pair in chunk.kept]
        raw = [RawText(c.text) for c in chunks if self._learn_raw(c)]
        report.raw_chunks, report.fallback = len(raw), self.settings.supervision == "qa" and bool(raw)
        started = time.perf_counter()
        summary = await self._summary(job, snap, [*known, *taught, *extracted], [c.text for c in chunks], report)
        report.timed("summary", time.perf_counter() - started)
        learned = [*taught, *extracted]
        replayed = rehearsal(known, learned, self.settings.replay_memories) if (learned or raw) else []
        report.pairs_replayed = len(replayed)
        memory = summary if summary is not None else snap.summary
        supervision = [*self._rendered(replayed, ""), *self._rendered(learned, memory), *raw]
        memories = [{"instruction": p.instruction, "output": p.output, "source": "taught"} for p in taught]
        memories += [{"instruction": p.instruction, "output": p.output, "source": "extracted"} for p in extracted]
        prepared = PreparedUpdate(job, snap, supervision, memories, summary, report)
        if supervision:
            prepared.b = await self.current_b(job, snap.version)
        return prepared

    def _learn_raw(self, chunk: _Extracted) -> bool:
        mode = self.settings.supervision
        return mode != "qa" or not chunk.kept

    def _rendered(self, pairs: list[QAPair], summary: str) -> list[Supervision]:
        """Each pair as serving renders its question: without memory, and under the session's memory if any.

        Rehearsed pairs go bare only: under the memory they would carry the whole summary (up to
        `summary_max_facts` lines) into every row, which made a steady-state update on SmolLM2-135M cost
        ~50 s instead of ~30 s (16 replays); and the summary already holds them for a full-context reply.
        """
        tokenizer = self.runtime.trainer.tokenizer
        bare = session_system(tokenizer, self.settings.system_prompt, "")
        with_memory = session_system(tokenizer, self.settings.system_prompt, summary)
        contexts = [bare] if with_memory == bare else [bare, with_memory]
        return [ContextPair(p.instruction, p.output, system) for system in contexts for p in pairs]

    async def _extract_all(self, job: Job, snap: UpdateSnapshot, texts: list[str], known: list[QAPair],
                           report: UpdateReport) -> list[_Extracted]:
        """Extract every chunk concurrently (vLLM batches them), then filter in order against what came before."""
        replies = await asyncio.gather(*(self._extract(job, snap, text, known) for text in texts))
        seen = list(known)
        chunks = []
        for text, (parsed, pairs) in zip(texts, replies, strict=True):
            report.replies_parsed += parsed
            result = filter_pairs(pairs, text, known=seen, examples=EXAMPLE_PAIRS)
            report.pairs_extracted += len(pairs)
            for _, reason in result.dropped:
                report.dropped[reason] = report.dropped.get(reason, 0) + 1
            seen += result.kept
            chunks.append(_Extracted(text, result.kept))
        report.chunks = len(chunks)
        report.pairs_kept = sum(len(c.kept) for c in chunks)
        METRICS.pairs_extracted.inc(report.pairs_kept)
        return chunks

    async def _extract(self, job: Job, snap: UpdateSnapshot, text: str,
                       known: list[QAPair]) -> tuple[bool, list[QAPair]]:
        """Whether the reply parsed, and its pairs with the questions put in the user's words."""
        if self.settings.supervision == "raw":
            return True, []
        messages = build_extraction_messages(text, known, max_known=self.settings.extraction_known_pairs)
        max_tokens = self.settings.extraction_max_tokens or self.format.token_budget()
        version = snap.version if self.settings.extraction_adapter == "session" else None
        raw = await self.generator.generate(job.tenant, job.sid, version, messages, max_tokens, self.format.schema())
        parsed = parse_pairs(raw)
        if not parsed.ok:
            METRICS.extraction_failures.inc()
            log.info("extraction for %s/%s gave no JSON array: %s", job.tenant, job.sid, parsed.problems[:3])
        return parsed.ok, [QAPair(instruction=as_user_question(p.instruction), output=p.output) for p in parsed.pairs]

    async def _summary(self, job: Job, snap: UpdateSnapshot, learned: list[QAPair], texts: list[str],
                       report: UpdateReport) -> str | None:
        """The new summary, or None to keep the stored one (mode off, nothing new, or a refused reply)."""
        mode = self.settings.summary_mode
        if mode == "off" or (not texts and not report.pairs_taught):
            return None
        if mode == "pairs":
            summary = pairs_summary(learned, self.settings.summary_max_facts)
        else:
            summary = snap.summary
            for text in texts:  # rolls forward chunk by chunk, each refusal keeps the previous notes
                summary = await self._summarize(job, snap, summary, text, report) or summary
        if summary == snap.summary:
            return None
        if not report.summary.startswith("refused"):  # a refusal on an earlier chunk stays reported
            report.summary = "updated"
        return summary

    async def _summarize(self, job: Job, snap: UpdateSnapshot, previous: str, text: str,
                         report: UpdateReport) -> str | None:
        messages = build_summary_messages(previous, text)
        raw = await self.generator.generate(job.tenant, job.sid, snap.version, messages,
                                            self.settings.summary_max_tokens)
        summary = parse_summary(raw)
        refusal = summary_refusal(summary)
        if refusal:
            METRICS.summaries_refused.inc()
            report.summary = f"refused: {refusal}"
            log.info("summary for %s/%s refused: %s", job.tenant, job.sid, refusal)
            return None
        return summary

    async def current_b(self, job: Job, version: int) -> Any:
        """B of the live version, or of the newest earlier one that verifies (as the pool serves): a corrupt
        one is never built on."""
        b = await newest_verified(job.tenant, job.sid, version, lambda v: self._trainable_b(job, v))
        return b if b is not None else self.runtime.zero_b()

    async def _trainable_b(self, job: Job, version: int) -> Any:
        """B of one stored version, verified and shaped for this worker's model; None when not stored."""
        found = await read_verified(self.store, job.tenant, job.sid, version)
        if found is None:
            return None
        try:
            self.runtime.fast.check_b(found.b)
        except ValueError as exc:
            raise CheckpointError(str(exc)) from exc
        return found.b


def chunk_turns(tokenizer: Any, turns: list[dict[str, str]], budget: int) -> list[str]:
    """Turns as extraction chunks: one exchange each (a user message and the replies to it), and any
    piece longer than `budget` tokens split between words, never cut.

    Small chunks are what a weak model extracts well: measured on SmolLM2-135M, a chunk holding one
    fact gave the right pair far more often than a chunk holding two or more.
    """
    chunks: list[str] = []
    lines: list[str] = []
    used = 0
    for turn in turns:
        if lines and turn.get("role") == "user":  # a new exchange starts a new chunk
            chunks.append("\n".join(lines))
            lines, used = [], 0
        for piece, size in _pieces(tokenizer, as_text([turn]), budget):
            if lines and used + size > budget:
                chunks.append("\n".join(lines))
                lines, used = [], 0
            lines.append(piece)
            used += size
    if lines:
        chunks.append("\n".join(lines))
    return chunks


def _pieces(tokenizer: Any, text: str, budget: int) -> list[tuple[str, int]]:
    """`text` with its token count, or split between words into pieces of at most `budget` tokens each."""
    size = len(tokenizer.encode(text, add_special_tokens=False))
    if size <= budget:
        return [(text, size)]
    pieces: list[tuple[str, int]] = []
    words: list[str] = []
    used = 0
    for word in text.split(" "):
        cost = len(tokenizer.encode(" " + word, add_special_tokens=False))
        if words and used + cost > budget:
            pieces.append((" ".join(words), used))
            words, used = [], 0
        words.append(word)
        used += cost
    pieces.append((" ".join(words), used))
    return pieces


def rehearsal(known: list[QAPair], learned: list[QAPair], count: int) -> list[QAPair]:
    """The newest `count` earlier memories, one per question and not re-taught now, to rehearse in an update.

    Measured on SmolLM2-135M (20 facts taught 2 per update over 10 updates): without rehearsal each
    update overwrote the last, and 5 of 20 facts were recalled at the end.
    """
    if count <= 0:
        return []
    fresh = {pair_key(p)[0] for p in learned}
    latest: dict[str, QAPair] = {}
    for pair in known:
        key = pair_key(pair)[0]
        if key not in fresh:
            latest.pop(key, None)
            latest[key] = pair
    return list(latest.values())[-count:]


def pairs_summary(pairs: list[QAPair], max_facts: int) -> str:
    """Notes from the newest learned pairs, one per question (a newer answer replaces an older one)."""
    latest: dict[str, QAPair] = {}
    for pair in pairs:
        key = pair_key(pair)[0]
        latest.pop(key, None)
        latest[key] = pair
    newest = list(latest.values())[-max_facts:]
    return "\n".join(f"- {p.instruction} {p.output}" for p in newest)


def as_text(messages: list[dict[str, str]]) -> str:
    return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in messages)
