"""Batched multi-session updates, frozen-prefix reuse and the answer-only head against the reference trainer."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from test_fast_weights import Pair, random_b  # the same pair type and random B as the fast-weight tests
from transformers import AutoModelForCausalLM

from tmem.adapters.batched import BatchedTrainer, UpdateItem, b_tolerance, update_many
from tmem.adapters.fast_weights import FastWeightModel, SessionB
from tmem.adapters.prefix import PrefixCache
from tmem.adapters.spec import FastWeightSpec
from tmem.adapters.supervision import encode_pairs
from tmem.adapters.tiny_model import build_tiny_model
from tmem.adapters.trainer import OnlineTrainer, TrainerConfig, UpdateResult, answer_loss

SPEC = FastWeightSpec(last_layers=2)  # blocks 2 and 3 of 4: blocks 0-1 are the reusable prefix
# Per-token loss equality: the same float32 math summed in a different order.
LOSS_ATOL = 1e-5


PAIRS = [Pair(f"What did {name} do on {day}?", f"{name} went to {place} with a friend.")
         for name, day, place in [("Alice", "Monday", "Paris"), ("Bob", "Friday", "the park"),
                                  ("Carol", "Sunday", "the museum"), ("David", "Tuesday", "Tokyo"),
                                  ("Emma", "Saturday", "the lake"), ("Frank", "Thursday", "Berlin"),
                                  ("Grace", "Wednesday", "the library"), ("Henry", "Monday", "Rome")]]
# Pair counts per session: with batch 3, sessions take 3, 1, 3 and 2 steps per epoch.
COUNTS = (7, 2, 8, 5)
# lr far above the paper's so that B moves well clear of the tolerance in a few steps.
CONFIGS = {"sgd": TrainerConfig(optimizer="sgd", lr=5e-2, epochs=2, batch_size=3),
           "adam": TrainerConfig(optimizer="adam", lr=1e-2, epochs=2, batch_size=3)}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tensors here are tiny: a second intra-op thread only adds sync, and on a loaded 2-core machine the
    spinning pool made this module 10-20x slower (measured 4 s with one thread vs 40-90 s with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), layers=4, hidden=128, seed=3)


@pytest.fixture(scope="module")
def fast(model_dir: Path) -> FastWeightModel:
    return FastWeightModel(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), SPEC)


def sessions(fast: FastWeightModel) -> list[tuple[SessionB, list[Pair]]]:
    """Sessions with different pair counts, each starting from its own non-zero B."""
    return [(random_b(fast, seed=i), (PAIRS[i:] + PAIRS[:i])[:n]) for i, n in enumerate(COUNTS)]


def one_by_one(fast: FastWeightModel, tokenizer, items, cfg: TrainerConfig) -> list[UpdateResult]:
    trainer = OnlineTrainer(fast, tokenizer, cfg)
    return [trainer.update(b, pairs) for b, pairs in items]


def assert_same_update(got: UpdateResult, ref: UpdateResult, start: SessionB,
                       cfg: TrainerConfig = CONFIGS["sgd"]) -> None:
    assert got.applied and ref.applied, (got.reason, ref.reason)
    assert got.steps == ref.steps and got.examples == ref.examples
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), atol=LOSS_ATOL, rtol=0)
    atol = b_tolerance(cfg)
    moved = max(float((ref.b[n] - start[n]).abs().max()) for n in start)
    assert moved > 100 * atol  # B really trained, so matching within the tolerance is not trivial
    for name in ref.b:
        torch.testing.assert_close(got.b[name], ref.b[name], atol=atol, rtol=0)


@pytest.fixture(scope="module")
def references(fast: FastWeightModel, tokenizer) -> dict[str, list[UpdateResult]]:
    return {opt: one_by_one(fast, tokenizer, sessions(fast), cfg) for opt, cfg in CONFIGS.items()}


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_batched_update_equals_one_by_one(fast: FastWeightModel, tokenizer, references, opt: str) -> None:
    items = sessions(fast)
    before = [{n: t.clone() for n, t in b.items()} for b, _ in items]
    results = update_many(fast, tokenizer, items, CONFIGS[opt])
    assert [r.steps for r in results] == [CONFIGS[opt].epochs * s for s in (3, 1, 3, 2)]
    for got, ref, (b, _), start in zip(results, references[opt], items, before, strict=True):
        assert_same_update(got, ref, start, CONFIGS[opt])
        assert all(torch.equal(b[n], start[n]) for n in b)  # the caller's B is never modified


def test_single_session_update_equals_online_trainer(fast: FastWeightModel, tokenizer, references) -> None:
    b, pairs = sessions(fast)[2]
    got = BatchedTrainer(fast, tokenizer, CONFIGS["sgd"]).update(b, pairs)
    assert_same_update(got, references["sgd"][2], b)


def test_prefix_reuse_equals_naive_and_skips_the_prefix(fast: FastWeightModel, tokenizer) -> None:
    items, cfg = sessions(fast), CONFIGS["sgd"]
    calls = {"prefix block": 0}

    def count(*_: object) -> None:
        calls["prefix block"] += 1

    handle = fast.model.get_decoder().layers[0].register_forward_pre_hook(count)
    try:
        reused = BatchedTrainer(fast, tokenizer, cfg, reuse_prefix=True).update_many(items)
        reused_calls = calls["prefix block"]
        naive = BatchedTrainer(fast, tokenizer, cfg, reuse_prefix=False).update_many(items)
        naive_calls = calls["prefix block"] - reused_calls
    finally:
        handle.remove()
    assert reused_calls == 1  # one no-grad pass over every session's examples
    assert naive_calls == max(r.steps for r in naive)  # the naive route runs block 0 every joint step
    for got, ref, (b, _) in zip(reused, naive, items, strict=True):
        assert_same_update(got, ref, b)


def test_prefix_losses_equal_the_model_forward(fast: FastWeightModel, tokenizer) -> None:
    trainer = BatchedTrainer(fast, tokenizer)
    reference = OnlineTrainer(fast, tokenizer)
    batches = [encode_pairs(tokenizer, PAIRS[:n], 512) for n in (3, 5)]
    bs = [random_b(fast, seed=10), random_b(fast, seed=11)]
    got = trainer.batch_losses(bs, batches)
    with torch.no_grad():
        expected = [float(reference.batch_loss(b, batch)) for b, batch in zip(bs, batches, strict=True)]
    assert got == pytest.approx(expected, abs=LOSS_ATOL)
    assert abs(got[0] - trainer.batch_losses([fast.zero_b()], batches[:1])[0]) > 100 * LOSS_ATOL


def test_head_at_answers_equals_full_vocab_head(fast: FastWeightModel, tokenizer) -> None:
    trainer = BatchedTrainer(fast, tokenizer)
    examples = encode_pairs(tokenizer, PAIRS, 512)
    b = random_b(fast, seed=5)
    full = answer_loss(fast, b, examples, trainer.pad_id)  # logits at every position, ignore_index loss
    assert trainer.batch_losses([b], [examples]) == pytest.approx([full], abs=LOSS_ATOL)


def test_nan_session_is_rejected_alone(fast: FastWeightModel, tokenizer, references) -> None:
    items = sessions(fast)
    poisoned = {n: torch.full_like(t, float("nan")) for n, t in items[1][0].items()}
    items[1] = (poisoned, items[1][1])
    items.append((fast.zero_b(), []))  # nothing to train on: not applied, and no harm to the others
    results = update_many(fast, tokenizer, items, CONFIGS["sgd"])
    assert not results[1].applied and "loss is nan at step 1" in (results[1].reason or "")
    assert results[1].b is poisoned and results[1].steps == 0
    assert not results[4].applied and "no trainable pairs" in (results[4].reason or "")
    for k in (0, 2, 3):
        assert_same_update(results[k], references["sgd"][k], items[k][0])


def test_session_whose_b_blows_up_is_rejected_alone(fast: FastWeightModel, tokenizer) -> None:
    items = sessions(fast)[:2]
    items[0] = ({n: t * 1e30 for n, t in items[0][0].items()}, items[0][1])  # overflows in the forward
    cfg = CONFIGS["sgd"]
    results = update_many(fast, tokenizer, items, cfg)
    alone = one_by_one(fast, tokenizer, items, cfg)
    assert not results[0].applied and not alone[0].applied
    assert results[0].reason == alone[0].reason
    assert_same_update(results[1], alone[1], items[1][0])


class _RecordingTrainer(BatchedTrainer):
    """Records the size of every group it trains together."""

    groups: list[int]

    def _update_group(self, items: Sequence[UpdateItem], cfg: TrainerConfig) -> list[UpdateResult]:
        self.groups = [*getattr(self, "groups", []), len(items)]
        return super()._update_group(items, cfg)


def test_group_size_cap_chunks_and_gives_the_same_results(fast: FastWeightModel, tokenizer, references) -> None:
    items = sessions(fast)
    capped = _RecordingTrainer(fast, tokenizer, CONFIGS["adam"], max_group_size=3)
    results = capped.update_many(items)
    assert capped.groups == [3, 1]
    for got, ref, (b, _) in zip(results, references["adam"], items, strict=True):
        assert_same_update(got, ref, b, CONFIGS["adam"])
    with pytest.raises(ValueError, match="max_group_size"):
        BatchedTrainer(fast, tokenizer, max_group_size=0)


def test_malformed_b_is_refused_before_any_work(fast: FastWeightModel, tokenizer) -> None:
    good, bad = fast.zero_b(), fast.zero_b()
    bad.pop(next(iter(bad)))
    with pytest.raises(ValueError, match="spec"):
        update_many(fast, tokenizer, [(good, PAIRS[:2]), (bad, PAIRS[:2])])


def test_raw_text_joins_only_the_first_raw_epochs(tokenizer) -> None:
    from tmem.adapters.supervision import RawText
    from tmem.adapters.trainer import epoch_schedule

    examples = encode_pairs(tokenizer, [*PAIRS[:3], RawText("Anna went hiking on Saturday.")], 512)
    raw = [i for i, ex in enumerate(examples) if ex.raw]
    assert raw == [3]
    cfg = TrainerConfig(epochs=3, batch_size=2, raw_epochs=1)
    seen = {epoch: [i for e, rows in epoch_schedule(examples, cfg) if e == epoch for i in rows] for epoch in range(3)}
    assert sorted(seen[0]) == [0, 1, 2, 3] and sorted(seen[1]) == sorted(seen[2]) == [0, 1, 2]


def test_target_loss_stops_both_trainers_at_the_same_epoch_boundary(fast: FastWeightModel, tokenizer) -> None:
    cfg = TrainerConfig(optimizer="adam", lr=3e-2, epochs=30, batch_size=4, target_loss=1.0)
    start = fast.zero_b()
    ref = OnlineTrainer(fast, tokenizer, cfg).update(start, PAIRS[:4])
    got = BatchedTrainer(fast, tokenizer, cfg).update(start, PAIRS[:4])
    assert 1 < ref.steps < 30  # stopped early, after at least one full epoch
    assert got.steps == ref.steps and ref.losses[-1] <= 1.0
    assert_same_update(got, ref, start, cfg)


def test_anchors_join_an_update_but_never_make_one(fast: FastWeightModel, tokenizer) -> None:
    anchors = [Pair("What is the capital of Italy?", "The capital of Italy is Rome.")] * 3
    cfg = TrainerConfig(optimizer="adam", lr=1e-2, epochs=1, batch_size=16, anchors=2)
    trainer = BatchedTrainer(fast, tokenizer, cfg, anchors=anchors)
    with_pairs, one, empty = trainer.update_many([(fast.zero_b(), PAIRS[:2]), (fast.zero_b(), PAIRS[:1]),
                                                  (fast.zero_b(), [])])
    assert with_pairs.applied and with_pairs.examples == 2 + 2
    assert one.applied and one.examples == 1 + 1  # never more anchors than the session's own examples
    assert not empty.applied and empty.examples == 0


def test_prefix_cache_reuses_states_across_updates_with_the_same_results(fast: FastWeightModel, tokenizer) -> None:
    items, cfg = sessions(fast), CONFIGS["sgd"]
    rows = {"prefix": 0}

    def count(_: object, args: tuple[torch.Tensor, ...]) -> None:
        rows["prefix"] += args[0].shape[0]

    plain = BatchedTrainer(fast, tokenizer, cfg).update_many(items)
    cached = BatchedTrainer(fast, tokenizer, cfg, prefix_cache_bytes=64 << 20)
    handle = fast.model.get_decoder().layers[0].register_forward_pre_hook(count)
    try:
        first = cached.update_many(items)
        computed_first = rows["prefix"]
        second = cached.update_many(items)
    finally:
        handle.remove()
    distinct = len({(p.instruction, p.output) for _, pairs in items for p in pairs})
    assert computed_first == distinct < sum(len(pairs) for _, pairs in items)  # shared rows computed once
    assert rows["prefix"] == computed_first  # the second update found every row cached
    assert cached.prefix_cache.hits == sum(len(pairs) for _, pairs in items) * 2 - distinct
    for got, again, ref, (b, _) in zip(first, second, plain, items, strict=True):
        assert_same_update(got, ref, b)
        assert_same_update(again, ref, b)


def test_prefix_cache_drops_the_least_recently_used_past_its_budget(fast: FastWeightModel, tokenizer) -> None:
    trainer = BatchedTrainer(fast, tokenizer, CONFIGS["sgd"])
    examples = encode_pairs(tokenizer, PAIRS[:3], max_seq_len=64)
    sizes = [s.numel() * s.element_size() for s in trainer.stack.prefix_states(examples, trainer.pad_id)]
    cache = PrefixCache(max_bytes=sizes[0] + max(sizes[1:]))  # room for row 0 and one other
    states = cache.states(trainer.stack, examples[:2], trainer.pad_id, trainer.start)
    cache.states(trainer.stack, examples[:1], trainer.pad_id, trainer.start)  # row 0 is now the newest
    cache.states(trainer.stack, examples[2:], trainer.pad_id, trainer.start)  # evicts row 1, the oldest
    assert (cache.hits, cache.misses, len(cache)) == (1, 3, 2) and cache.bytes <= cache.max_bytes
    again = cache.states(trainer.stack, examples[:1], trainer.pad_id, trainer.start)
    assert cache.hits == 2 and again[0] is states[0]


def test_the_thread_policy_is_asked_before_every_step(fast: FastWeightModel, tokenizer) -> None:
    asked: list[int] = []

    def policy() -> int:
        asked.append(torch.get_num_threads())
        return 1

    trainer = BatchedTrainer(fast, tokenizer, CONFIGS["sgd"])
    trainer.threads = policy
    (result,) = trainer.update_many([(fast.zero_b(), PAIRS[:4])])
    assert len(asked) == result.steps + 1  # once for the prefix pass, once per joint step
    assert torch.get_num_threads() == 1
