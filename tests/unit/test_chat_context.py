"""A chat on a long session costs the event loop what fits the context, not the session's whole history.

Real redis-server, real ChatService and SessionLifecycle; the engine is a fake holding the counting
tokenizer (tests/fakes.py). Each test checks one promise of issue 12 item 3: turns are stored with their token
counts, a request tokenizes only what it adds, reads only the tail that can fit, and still builds the
very prompt the old code built (every stored turn read, decoded and tokenized on each request).
"""

from __future__ import annotations

import random
import uuid
from typing import Any

import pytest
from fakes import FakeEngine, FakeTokenizer, services
from test_prompting import conversation, fit_turns_before

from tmem.server.chat import ChatService, TurnContext
from tmem.server.prompting import new_suffix, session_system
from tmem.server.protocol import ChatCompletionRequest
from tmem.server.store import RedisStore

pytestmark = pytest.mark.asyncio(loop_scope="session")
T = "acme"


def service(store: RedisStore, tokenizer: FakeTokenizer, **settings: Any) -> ChatService:
    engine = FakeEngine(tokenizer=tokenizer, max_model_len=1_000_000)
    return services(store, engine, **{"context_tokens": 400, **settings}).chat


def spy_reads(store: RedisStore) -> list[int]:
    """Record how many stored messages each get_turns call returned (each one is decoded JSON)."""
    reads: list[int] = []
    real = store.get_turns

    async def get_turns(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        got = await real(*args, **kwargs)
        reads.append(len(got))
        return got

    store.get_turns = get_turns  # type: ignore[method-assign]
    return reads


async def seed(chat: ChatService, store: RedisStore, sid: str, turns: list[dict[str, Any]], legacy: bool) -> None:
    """Store `turns` as the chat path does now (with counts), or as stored before counts existed."""
    await store.ensure_session(T, sid)
    for pair in range(0, len(turns), 2):
        messages = turns[pair:pair + 2]
        if legacy:
            await store.append_turns(T, sid, messages)
        else:
            await chat.sessions.record(T, sid, messages, None, "", reason="turn")


async def prompt_before(store: RedisStore, tokenizer: FakeTokenizer, sid: str, sent: list[dict[str, str]],
                        summary: str, start: int, budget: int) -> list[int]:
    """The prompt ids as ChatService.prepare built them at 71800ce."""
    state = await store.get_session(T, sid)
    assert state is not None
    stored = await store.get_turns(T, sid, max(start, state.turns - 400))
    history = [{"role": m["role"], "content": m["content"]} for m in stored]
    new = new_suffix(history, sent) if history else sent
    return fit_turns_before(tokenizer, session_system(tokenizer, None, summary), history + new, budget)[0]


def request(messages: list[dict[str, str]]) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": messages, "max_tokens": 8})


CASES = {
    "long session, counts stored": dict(n=460, legacy=False, resend=False, summary="", absorbed=None),
    "long session stored before counts": dict(n=460, legacy=True, resend=False, summary="", absorbed=None),
    "client resends the conversation": dict(n=40, legacy=False, resend=True, summary="", absorbed=None),
    "memory summary as system text": dict(n=120, legacy=False, resend=False, summary="Ann lives in Lisbon.",
                                          absorbed=None),
    "context-budget: absorbed turns left out": dict(n=200, legacy=False, resend=False, summary="", absorbed=150),
}


@pytest.mark.parametrize("budget", [120, 400, 3000])
@pytest.mark.parametrize("case", list(CASES))
async def test_the_prompt_is_the_one_built_before(store: RedisStore, case: str, budget: int) -> None:
    spec = CASES[case]
    tokenizer, sid = FakeTokenizer(), f"s-{uuid.uuid4().hex[:8]}"
    policy = "context-budget" if spec["absorbed"] is not None else "every-turn"
    chat = service(store, tokenizer, context_tokens=max(budget, 64), update_policy=policy)
    turns = conversation(random.Random(budget + spec["n"]), spec["n"])
    await seed(chat, store, sid, turns, spec["legacy"])
    meta = {"summary": spec["summary"], "absorbed_turns": spec["absorbed"] or 0}
    await store.client.hset(store._key(T, sid, "meta"), mapping=meta)
    question = {"role": "user", "content": "And where does Ann live now?"}
    sent = [*turns, question] if spec["resend"] else [question]
    expected = await prompt_before(store, tokenizer, sid, sent, spec["summary"], spec["absorbed"] or 0, budget)
    prep = await chat.prepare(request(sent), TurnContext(tenant=T, session_id=sid))
    assert prep.prompt_ids == expected
    assert prep.new_messages == [{**question, "tokens": 6}]  # only the question is new, and it carries its count


@pytest.mark.parametrize("legacy", [False, True])
async def test_a_chat_tokenizes_what_it_adds_and_reads_only_the_tail_that_fits(store: RedisStore,
                                                                               legacy: bool) -> None:
    """Tokenizer calls and decoded messages per request, on a 40- and a 440-message session."""
    cost: dict[int, tuple[int, int]] = {}
    for n in (40, 440):
        tokenizer, sid = FakeTokenizer(), f"s-{uuid.uuid4().hex[:8]}"
        chat = service(store, tokenizer, context_tokens=300)
        await seed(chat, store, sid, conversation(random.Random(7), n), legacy)
        reads = spy_reads(store)
        tokenizer.encoded = 0
        prep = await chat.prepare(request([{"role": "user", "content": "What did I say?"}]),
                                  TurnContext(tenant=T, session_id=sid))
        assert len(prep.prompt_ids) <= 300
        cost[n] = (tokenizer.encoded, sum(reads))
    encoded, decoded = cost[440]
    if legacy:  # counted lazily: only the turns read, and those are only the tail that can fit
        assert encoded == 1 + decoded
    else:
        assert encoded == 1  # the question; before, all 400 stored turns were tokenized too
    assert decoded <= 32 + 2  # one page; the 300-token window holds a few of these turns
    assert cost[440] == cost[40] or legacy  # the same work whatever the length of the session


async def test_turns_are_stored_with_their_token_counts(store: RedisStore) -> None:
    tokenizer, sid = FakeTokenizer(), "counted"
    chat = service(store, tokenizer)
    await store.ensure_session(T, sid)
    await chat.sessions.record(T, sid, [{"role": "user", "content": "I moved to Lisbon"},
                                        {"role": "assistant", "content": "Nice!"}], None, "", reason="turn")
    assert await store.get_turns(T, sid) == [
        {"role": "user", "content": "I moved to Lisbon", "tokens": 4},
        {"role": "assistant", "content": "Nice!", "tokens": 1},
    ]


async def test_context_budget_queues_once_the_pending_tokens_reach_the_budget(store: RedisStore) -> None:
    """The old rule (queue when the unabsorbed text reaches --context-tokens), priced from stored counts."""
    tokenizer, sid = FakeTokenizer(), "budget"
    chat = service(store, tokenizer, context_tokens=100, update_policy="context-budget")
    await store.ensure_session(T, sid)
    forty = " ".join(["word"] * 40)
    for _ in range(2):  # 80 tokens pending: under the budget, kept in the prompt
        tokenizer.encoded = 0
        await chat.sessions.record(T, sid, [{"role": "user", "content": forty}], None, "", reason="turn")
        assert tokenizer.encoded == 1  # the new message only, not the pending ones
        state = await store.get_session(T, sid)
        assert state is not None and not state.job_pending
    await chat.sessions.record(T, sid, [{"role": "user", "content": forty}], None, "", reason="turn")  # 120 >= 100
    state = await store.get_session(T, sid)
    assert state is not None and state.job_pending
