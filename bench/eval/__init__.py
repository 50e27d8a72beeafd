"""Evaluation harness pieces for LoCoMo and LongMemEval: data loaders and answer scoring."""

from tmem.bench.eval.datasets import (
    Conversation,
    HistorySession,
    Question,
    Turn,
    load_locomo,
    load_longmemeval,
)
from tmem.bench.eval.scoring import (
    ScoreTable,
    exact_match,
    judge_messages,
    locomo_em,
    locomo_f1,
    normalize_answer,
    parse_judge,
    token_f1,
    tokens,
)

__all__ = [
    "Conversation",
    "HistorySession",
    "Question",
    "ScoreTable",
    "Turn",
    "exact_match",
    "judge_messages",
    "load_locomo",
    "load_longmemeval",
    "locomo_em",
    "locomo_f1",
    "normalize_answer",
    "parse_judge",
    "token_f1",
    "tokens",
]
