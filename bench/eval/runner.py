"""Ask LoCoMo / LongMemEval questions of a TMEM server in several memory modes, resumably.

Every mode gets the same question text (:func:`question_prompt`); they differ only in what the model
sees besides it:

- ``full-context``: a stateless request holding the whole history, newest messages kept, cut to
  ``context_chars`` and the server's request limits (the server then trims to its token budget).
- ``window``: a stateless request holding only the newest ``window_turns`` messages.
- ``summary``: a session that ingested the history and was flushed, asked with ``X-TMEM-Adapter: off``:
  the server's working context (summary memory + the newest stored turns that fit its budget) on the
  base model, no weight update.
- ``tmem``: the same session asked normally: the same context plus the session's adapter Δ_t.

``summary`` and ``tmem`` share ONE ingested session per conversation (ingest once, flush once, ask
twice).  Questions are sent with ``X-TMEM-Record: false`` so asking never teaches the session.
"""

from __future__ import annotations

import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from tmem.bench.eval.datasets import Conversation, Question
from tmem.bench.eval.report import ANSWERS_FILE, AnswerLog, pending_questions, score_table, selection_keys
from tmem.bench.eval.scoring import (
    ScoreTable,
    exact_match,
    is_abstention,
    judge_messages,
    locomo_em,
    locomo_f1,
    parse_judge,
    token_f1,
)
from tmem.client import BadRequestError, ServiceUnavailableError, Session, TMEMClient, TMEMError

Message = dict[str, str]

# The server's default per-request limits (Settings.max_messages_per_request / max_message_chars).
MAX_MESSAGES = 256
MAX_MESSAGE_CHARS = 32_000
FLUSH_CALL_MAX_S = 600.0  # the flush endpoint refuses longer waits; longer flushes are several calls

ANSWER_INSTRUCTION = (
    "Answer the question below in a few words, from what was said in our conversation. "
    'If the conversation does not say, answer "no information available".'
)


@dataclass(frozen=True)
class EvalConfig:
    """How to reach the server and what to ask it."""

    url: str
    modes: tuple[str, ...]
    api_key: str | None = None
    max_tokens: int = 32
    flush_timeout: float = 1800.0
    context_chars: int = 16_000
    window_turns: int = 8
    keep_sessions: bool = False
    flush_each_session: bool = False
    request_timeout: float = 300.0
    max_messages: int = MAX_MESSAGES
    max_message_chars: int = MAX_MESSAGE_CHARS


# --- modes ---

HistoryFn = Callable[[list[Message], EvalConfig], list[Message]]


@dataclass(frozen=True)
class Mode:
    """One way of asking: a stateless request carrying (part of) the history, or the ingested session."""

    uses_session: bool
    use_adapter: bool = True
    history: HistoryFn | None = None  # stateless modes: which history messages go into the request


def newest_within(messages: Sequence[Message], max_chars: int, max_messages: int) -> list[Message]:
    """The newest messages totalling at most ``max_chars`` characters and ``max_messages`` messages.

    The oldest kept message is cut to its tail when only part of it fits, so the budget is used fully.
    """
    kept: list[Message] = []
    room = max_chars
    for message in reversed(messages[-max_messages:] if max_messages > 0 else []):
        if room <= 0:
            break
        content = message["content"]
        kept.append(message if len(content) <= room else {**message, "content": content[-room:]})
        room -= len(content)
    return kept[::-1]


def full_context_history(history: list[Message], cfg: EvalConfig) -> list[Message]:
    """All history that fits, newest first; one message slot is left for the question."""
    budget = min(cfg.context_chars, cfg.max_message_chars * (cfg.max_messages - 1))
    return newest_within(history, budget, cfg.max_messages - 1)


def window_history(history: list[Message], cfg: EvalConfig) -> list[Message]:
    """The newest ``window_turns`` messages (a LoCoMo turn is one message), within the same limits."""
    return full_context_history(history[-cfg.window_turns :] if cfg.window_turns > 0 else [], cfg)


MODES: dict[str, Mode] = {
    "full-context": Mode(uses_session=False, history=full_context_history),
    "window": Mode(uses_session=False, history=window_history),
    "summary": Mode(uses_session=True, use_adapter=False),
    "tmem": Mode(uses_session=True, use_adapter=True),
}


def parse_modes(text: str) -> tuple[str, ...]:
    """``"window,tmem"`` -> ``("window", "tmem")``; unknown names raise ``ValueError``."""
    modes = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"unknown mode(s) {unknown or [text]}; choose from {', '.join(MODES)}")
    return modes


# --- requests ---


def question_prompt(question: Question) -> str:
    """The user message for a question, identical in every mode."""
    dated = f"(question date: {question.question_date}) " if question.question_date else ""
    return f"{ANSWER_INSTRUCTION}\n\n{dated}Question: {question.question}"


def split_for_limits(messages: Sequence[Message], max_messages: int, max_chars: int) -> list[list[Message]]:
    """Chunks of ``messages`` that each pass the server's limits, order and text preserved.

    A message longer than ``max_chars`` becomes consecutive messages of the same role; the chunks then
    hold at most ``max_messages`` messages each.
    """
    pieces = [
        {**m, "content": m["content"][start : start + max_chars]}
        for m in messages
        for start in range(0, max(1, len(m["content"])), max_chars)
    ]
    return [pieces[i : i + max_messages] for i in range(0, len(pieces), max_messages)]


_UNSAFE_ID = re.compile(r"[^A-Za-z0-9._:\-]")


def session_id_for(run_id: str, sample_id: str) -> str:
    """``eval-<run>-<sample_id>`` in the server's session-id alphabet (at most 128 characters)."""
    return _UNSAFE_ID.sub("-", f"eval-{run_id}-{sample_id}")[:128]


def score_answer(benchmark: str, question: Question, prediction: str) -> dict[str, float]:
    """F1 and EM: LoCoMo's per-category rules, or plain token F1/EM for LongMemEval, where an
    abstention question (id ``_abs``) scores 1 for declining, as LoCoMo's category 5 does."""
    if benchmark == "locomo":
        return {
            "f1": locomo_f1(prediction, question.answer, question.category),
            "em": locomo_em(prediction, question.answer, question.category),
        }
    if question.is_abstention:
        declined = float(is_abstention(prediction))
        return {"f1": declined, "em": declined}
    return {"f1": token_f1(prediction, question.answer), "em": exact_match(prediction, question.answer)}


def _http(transport: httpx.BaseTransport | None, headers: dict[str, str] | None = None) -> httpx.Client:
    return httpx.Client(transport=transport, headers=headers)


class Judge:
    """A yes/no LLM judge behind any OpenAI-compatible URL (LongMemEval's protocol)."""

    def __init__(
        self,
        url: str,
        model: str | None = None,
        api_key: str | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = _http(transport)
        # "" rather than None: TMEMClient would otherwise send $TMEM_API_KEY, our server's key, to the judge.
        self.client = TMEMClient(url, api_key=api_key or "", http_client=self._http)
        self.model = model

    def __call__(self, question: Question, prediction: str) -> float:
        """1.0 when the judge says the prediction answers the question, else 0.0."""
        if self.model is None:
            self.model = self.client.models().data[0].id
        messages = judge_messages(
            question.question, question.answer, prediction, question.category, question.is_abstention
        )
        reply = self.client.chat(messages, model=self.model, temperature=0, max_tokens=10)
        return float(parse_judge(reply.text))

    def close(self) -> None:
        self._http.close()


# --- the run ---


@dataclass
class RunSummary:
    """What one invocation did; the scores cover every selected answer, earlier runs' included."""

    table: ScoreTable
    run_id: str
    answered_now: Counter[str] = field(default_factory=Counter)
    skipped: int = 0
    errors: int = 0
    sessions: list[dict[str, Any]] = field(default_factory=list)


class EvalRunner:
    """Ingests each conversation into a fresh session (when a session mode still has questions), asks
    every unanswered (mode, question), scores it and appends it to ``answers.jsonl`` at once."""

    def __init__(
        self,
        cfg: EvalConfig,
        benchmark: str,
        out_dir: Path,
        judge: Judge | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.cfg, self.benchmark, self.judge = cfg, benchmark, judge
        self.log = AnswerLog(out_dir / ANSWERS_FILE)
        self.run_id = uuid.uuid4().hex[:8]
        record_off = {"X-TMEM-Record": "false"}
        self._https = {
            "plain": _http(transport),
            "adapter-on": _http(transport, record_off),
            "adapter-off": _http(transport, {**record_off, "X-TMEM-Adapter": "off"}),
        }
        # TMEMClient has no per-call headers, so the question headers ride on the httpx client it is given.
        self.clients = {
            name: TMEMClient(cfg.url, api_key=cfg.api_key, timeout=cfg.request_timeout, http_client=http)
            for name, http in self._https.items()
        }

    def close(self) -> None:
        for http in self._https.values():
            http.close()

    def run(self, conversations: Sequence[Conversation]) -> RunSummary:
        """Answer what is missing, then score every selected (mode, question) from the log."""
        summary = RunSummary(ScoreTable(), self.run_id)
        keys = selection_keys(conversations, self.cfg.modes)
        todos = [(conv, pending_questions(conv, self.cfg.modes, self.log)) for conv in conversations]
        total = sum(len(qs) for _, todo in todos for qs in todo.values())
        summary.skipped = len(keys) - total
        with tqdm(total=total, unit="answer", desc=f"{self.benchmark} {','.join(self.cfg.modes)}") as bar:
            for conv, todo in todos:
                if todo:  # all answered in every mode asked for: no ingest, no requests
                    self._conversation(conv, todo, summary, bar)
        summary.table = score_table(self.log.records.values(), keys, self.cfg.modes)
        return summary

    def _conversation(
        self, conv: Conversation, todo: dict[str, list[Question]], summary: RunSummary, bar: tqdm[Any]
    ) -> None:
        session: Session | None = None
        if any(MODES[mode].uses_session for mode in todo):
            # A fresh session each time: one interrupted earlier may be half-ingested or already deleted.
            session = self.clients["plain"].session(session_id_for(self.run_id, conv.sample_id))
            bar.set_postfix_str(f"{conv.sample_id}: ingest + flush")
            summary.sessions.append(self._ingest(session, conv))
        try:
            self._ask_all(conv, todo, session, summary, bar)
        finally:
            if session is not None and not self.cfg.keep_sessions:
                self._delete(session)

    def _ask_all(
        self,
        conv: Conversation,
        todo: dict[str, list[Question]],
        session: Session | None,
        summary: RunSummary,
        bar: tqdm[Any],
    ) -> None:
        history = conv.history_messages()
        bar.set_postfix_str(f"{conv.sample_id}: asking")
        for question in conv.questions:  # question-major, so a partial run has every mode on the same questions
            for mode in self.cfg.modes:
                if question in todo.get(mode, ()):
                    record = self._answer(mode, conv, question, history, session)
                    summary.answered_now[mode] += 1
                    summary.errors += int("error" in record)
                    bar.update(1)

    @staticmethod
    def _delete(session: Session) -> None:
        try:
            session.delete()
        except TMEMError as err:
            # Cleanup only: a failure here must not hide the error that ended the run (if any).
            tqdm.write(f"could not delete eval session {session.id}: {err}")

    def _ingest(self, session: Session, conv: Conversation) -> dict[str, Any]:
        """Replay the history in order (one call per history session, split to the limits), then flush."""
        started, requests, flush_s = time.perf_counter(), 0, 0.0
        for history_session in conv.sessions:
            for chunk in split_for_limits(
                history_session.as_messages(), self.cfg.max_messages, self.cfg.max_message_chars
            ):
                session.ingest(chunk)
                requests += 1
            if self.cfg.flush_each_session:
                flush_s += self._flush(session)
        ingest_s = time.perf_counter() - started - flush_s
        flush_s += self._flush(session)
        info = session.info()
        return {
            "sample_id": conv.sample_id,
            "session_id": session.id,
            "messages": info.turns,
            "ingest_requests": requests,
            "ingest_s": round(ingest_s, 3),
            "flush_s": round(flush_s, 3),
            "adapter_version": info.adapter_version,
            "summary_chars": len(info.summary or ""),
        }

    def _flush(self, session: Session) -> float:
        """Flush within ``flush_timeout`` overall, in calls of at most the endpoint's maximum wait."""
        started = time.perf_counter()
        deadline = time.monotonic() + self.cfg.flush_timeout
        while True:
            wait = min(FLUSH_CALL_MAX_S, max(1.0, deadline - time.monotonic()))
            try:
                session.flush(timeout=wait)
                return time.perf_counter() - started
            except ServiceUnavailableError as err:
                if err.code != "flush_timeout" or time.monotonic() >= deadline:
                    raise

    def _answer(
        self, mode: str, conv: Conversation, question: Question, history: list[Message], session: Session | None
    ) -> dict[str, Any]:
        spec = MODES[mode]
        ask = {"role": "user", "content": question_prompt(question)}
        params: dict[str, Any] = {"temperature": 0, "max_tokens": self.cfg.max_tokens}
        record: dict[str, Any] = {"run": self.run_id, "mode": mode, "qid": question.qid, "sample_id": conv.sample_id}
        started = time.perf_counter()
        try:
            if spec.uses_session:
                assert session is not None
                client = self.clients["adapter-on" if spec.use_adapter else "adapter-off"]
                reply = client.session(session.id).chat([ask], **params)
                record["session_id"] = session.id
            else:
                assert spec.history is not None
                reply = self.clients["plain"].chat([*spec.history(history, self.cfg), ask], **params)
            prediction, record["adapter_version"] = reply.text, reply.adapter_version
        except BadRequestError as err:
            # A refused request (e.g. a prompt over the model's window) would fail again on resume:
            # it is recorded, scored as a wrong answer and counted in the summary instead.
            prediction, record["error"] = "", str(err)
        record["latency_s"] = round(time.perf_counter() - started, 3)
        scores = score_answer(self.benchmark, question, prediction)
        if self.judge is not None:
            scores["judge"] = self.judge(question, prediction)
        record.update(
            category=question.category,
            question=question.question,
            gold=question.answer,
            prediction=prediction,
            scores=scores,
        )
        self.log.append(record)
        return record
