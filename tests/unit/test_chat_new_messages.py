"""Which messages of a chat request the chat service stores: the new ones only, however the client sends them.

A plain OpenAI client resends the whole conversation each turn; the SDK sends only the new message. Both
must leave the same history in the store. Real ChatService, lifecycle, store and redis-server; the engine
is tests/fakes.py's, which replies six words. test_working_context holds the rule (new_suffix) case by case.
"""

from __future__ import annotations

import uuid

import pytest
from fakes import services

from tmem.server.chat import ChatService, TurnContext
from tmem.server.protocol import ChatCompletionRequest
from tmem.server.store import RedisStore

pytestmark = pytest.mark.asyncio(loop_scope="session")
T = "acme"
REPLY = "w0 w1 w2 w3 w4 w5"  # what the fake engine says
QUESTIONS = ["My name is Ana.", "I live in Porto.", "What is my name?"]
Message = dict[str, str]


def user(text: str) -> Message:
    return {"role": "user", "content": text}


def assistant(text: str) -> Message:
    return {"role": "assistant", "content": text}


async def turn(chat: ChatService, sid: str, messages: list[Message]) -> None:
    request = ChatCompletionRequest.model_validate({"messages": messages, "max_tokens": 8})
    response, _ = await chat.complete(request, TurnContext(tenant=T, session_id=sid))
    assert response.choices[0].message.content == REPLY


async def stored(store: RedisStore, sid: str) -> list[Message]:
    return [{"role": m["role"], "content": m["content"]} for m in await store.get_turns(T, sid)]


def conversation(questions: list[str]) -> list[Message]:
    """The conversation after these questions, each answered."""
    return [m for q in questions for m in (user(q), assistant(REPLY))]


# How a client builds request i (0-based) of the conversation: from what it asked before and its question.
CLIENTS = {
    "sends only the new message": lambda i: [user(QUESTIONS[i])],
    "resends the whole conversation": lambda i: [*conversation(QUESTIONS[:i]), user(QUESTIONS[i])],
    "resends it with its system message": lambda i: [{"role": "system", "content": "Be brief."},
                                                     *conversation(QUESTIONS[:i]), user(QUESTIONS[i])],
    "resends it with stray spaces": lambda i: [*({**m, "content": f" {m['content']}\n"}
                                                 for m in conversation(QUESTIONS[:i])), user(QUESTIONS[i])],
}


@pytest.mark.parametrize("client", list(CLIENTS))
async def test_every_client_leaves_each_message_stored_once(store: RedisStore, client: str) -> None:
    chat, sid = services(store).chat, f"s-{uuid.uuid4().hex[:10]}"
    for i in range(len(QUESTIONS)):
        await turn(chat, sid, CLIENTS[client](i))
    assert await stored(store, sid) == conversation(QUESTIONS)


async def test_a_resent_conversation_with_an_edited_message_is_stored_as_new(store: RedisStore) -> None:
    chat, sid = services(store).chat, f"s-{uuid.uuid4().hex[:10]}"
    await turn(chat, sid, [user("My name is Ana.")])
    edited = [user("My name is Bo."), assistant(REPLY), user("What is my name?")]
    await turn(chat, sid, edited)  # not the stored history plus more: a different conversation, all of it new
    assert await stored(store, sid) == [user("My name is Ana."), assistant(REPLY), *edited, assistant(REPLY)]


async def test_a_resent_conversation_after_an_update_absorbed_its_start_adds_only_the_new_message(
        store: RedisStore) -> None:
    chat, sid = services(store, update_policy="context-budget", context_tokens=4096).chat, f"s-{uuid.uuid4().hex[:10]}"
    for i in range(2):
        await turn(chat, sid, CLIENTS["resends the whole conversation"](i))
    snapshot = await store.claim_snapshot(T, sid)  # the worker absorbs the first two turns, as an update would
    await store.commit_update(T, sid, snapshot, checkpoint=None, sha256=None, summary=None, job_id=f"test:{sid}")
    state = await store.get_session(T, sid)
    assert state is not None and state.absorbed_turns == 4
    await turn(chat, sid, CLIENTS["resends the whole conversation"](2))
    assert await stored(store, sid) == conversation(QUESTIONS)
