"""Everything an update needs before training: the session's new text read in window-sized chunks,
QA pairs extracted and a summary refreshed through the session's own adapter, and its current B."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from adapters.checkpoint import Checkpoint, CheckpointError
from adapters.extraction import (
    EXTRACTION_JSON_SCHEMA,
    QAPair,
    build_extraction_messages,
    build_summary_messages,
    parse_pairs,
    parse_summary,
)
from server.generation import SessionGenerator
from server.metrics import METRICS
from server.settings import Settings
from server.store import Job, RedisStore, UpdateSnapshot
from server.trainer_runtime import TrainerRuntime

log = logging.getLogger(__name__)


@dataclass
class PreparedUpdate:
    """One session's update, ready to train and commit."""

    job: Job
    snap: UpdateSnapshot
    pairs: list[QAPair]
    summary: str | None
    b: Any = None  # the B to train from (set only when there are pairs)
    checkpoint: Checkpoint | None = None  # set by training when the update applied
    rejection: str | None = None  # set by training when the update was rejected (NaN/inf)


class UpdatePreparer:
    """Turns a claimed job's snapshot into pairs, a summary and the B to start from."""

    def __init__(self, store: RedisStore, runtime: TrainerRuntime, generator: SessionGenerator,
                 settings: Settings) -> None:
        self.store, self.runtime, self.generator, self.settings = store, runtime, generator, settings

    async def prepare(self, job: Job) -> PreparedUpdate:
        snap = await self.store.claim_snapshot(job.tenant, job.sid)
        pairs = [QAPair(instruction=p["instruction"], output=p["output"]) for p in snap.teach_pairs]
        summary: str | None = None
        # Long ingests are read chunk by chunk, each fitting the window; the summary rolls forward.
        running = snap.summary
        for text in self.chunks(snap.new_turns):
            pairs += await self._extract(job, snap, text, known=pairs)
            running = await self._summarize(job, snap, running, text) or running
            summary = running
        prepared = PreparedUpdate(job, snap, pairs, summary)
        if pairs:
            prepared.b = await self.current_b(job, snap.version)
        return prepared

    def chunks(self, turns: list[dict[str, str]]) -> list[str]:
        """Turns as text blocks of at most `extraction_chunk_tokens` tokens (a longer single turn is cut)."""
        tokenizer = self.runtime.trainer.tokenizer
        budget = self.settings.extraction_chunk_tokens
        chunks: list[str] = []
        lines: list[str] = []
        used = 0
        for line in (as_text([turn]) for turn in turns):
            ids = tokenizer.encode(line, add_special_tokens=False)
            if len(ids) > budget:
                line, ids = tokenizer.decode(ids[:budget]), ids[:budget]
            if lines and used + len(ids) > budget:
                chunks.append("\n".join(lines))
                lines, used = [], 0
            lines.append(line)
            used += len(ids)
        if lines:
            chunks.append("\n".join(lines))
        return chunks

    async def _extract(self, job: Job, snap: UpdateSnapshot, text: str, known: list[QAPair]) -> list[QAPair]:
        # The newest pairs are shown (to avoid repeats) within a bounded prompt; all are used for dedupe.
        messages = build_extraction_messages(text, known, max_known=self.settings.extraction_known_pairs)
        raw = await self.generator.generate(job.tenant, job.sid, snap.version, messages,
                                            self.settings.extraction_max_tokens, EXTRACTION_JSON_SCHEMA)
        report = parse_pairs(raw, known=known)
        if not report.ok:
            METRICS.extraction_failures.inc()
            log.info("extraction for %s/%s gave no JSON array: %s", job.tenant, job.sid, report.problems[:3])
        METRICS.pairs_extracted.inc(len(report.pairs))
        return report.pairs

    async def _summarize(self, job: Job, snap: UpdateSnapshot, previous: str, text: str) -> str | None:
        messages = build_summary_messages(previous, text)
        raw = await self.generator.generate(job.tenant, job.sid, snap.version, messages,
                                            self.settings.summary_max_tokens)
        return parse_summary(raw) or None

    async def current_b(self, job: Job, version: int) -> Any:
        """B of the live version, or of the newest earlier one that verifies: a corrupt one is never built on."""
        for candidate in range(version, 0, -1):
            stored = await self.store.get_checkpoint(job.tenant, job.sid, candidate)
            if stored is None:
                continue
            try:
                return self.runtime.decode(stored.data, stored.sha256)
            except (CheckpointError, ValueError) as exc:
                METRICS.checkpoint_faults.inc()
                log.error("checkpoint %s/%s@v%d refused: %s", job.tenant, job.sid, candidate, exc)
        return self.runtime.zero_b()


def as_text(messages: list[dict[str, str]]) -> str:
    return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in messages)
