"""Small fakes the fast tests share: a word-level tokenizer, an engine that streams words, a pool that logs leases.

Everything else in those tests is real (redis-server, the store, the services): these stand in only for
vLLM and the GPU-side adapter pool.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tmem.server.auth import KeyRing, RateLimiter
from tmem.server.chat import ChatService
from tmem.server.deps import Auth, Services
from tmem.server.lifecycle import SessionLifecycle
from tmem.server.pool import AdapterLease
from tmem.server.sessions import SessionService
from tmem.server.settings import Settings
from tmem.server.store import RedisStore


class FakeTokenizer:
    """One token per word; its chat template adds `overhead` marker words per message.

    `encoded` counts encode() calls (one per priced message); the template refuses any field but role
    and content, as a strict Jinja template would render a stray `tokens` key into the prompt.
    """

    eos_token_id = 0

    def __init__(self, overhead: int = 2) -> None:
        self.overhead = overhead
        self.chat_template = f"fake-template-{overhead}"
        self.encoded = 0

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        self.encoded += 1
        return [self.token_id(w) for w in text.split()]

    @staticmethod
    def token_id(word: str) -> int:
        return 10 + zlib.crc32(word.encode()) % 1000

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
                            tokenize: bool = True) -> Any:
        for m in messages:
            assert set(m) == {"role", "content"}, f"the template was given {sorted(m)}"
        markers = " ".join(["<|sep|>"] * max(0, self.overhead - 1))
        text = " ".join(f"<|{m['role']}|> {markers} {m['content']}" for m in messages)
        text += " <|assistant|>" if add_generation_prompt else ""
        return [self.token_id(w) for w in text.split()] if tokenize else text


@dataclass
class FakeEngine:
    """vLLM's part of the engine: streams `words` words `delay_s` apart, the last output carrying `finish`
    (vLLM's finish reason), and loads or unloads adapters as add_lora / remove_lora would."""

    tokenizer: FakeTokenizer = field(default_factory=FakeTokenizer)
    words: int = 6
    delay_s: float = 0.002
    finish: str = "stop"
    max_model_len: int = 100_000
    prompts: list[list[int]] = field(default_factory=list)  # the prompt ids of each generate(), in order
    aborted: list[str] = field(default_factory=list)
    loaded: dict[int, str] = field(default_factory=dict)  # LoRA id -> name

    async def generate(self, prompt_ids: list[int], params: Any, request_id: str, lora: Any) -> AsyncIterator[Any]:
        self.prompts.append(list(prompt_ids))
        text = ""
        for i in range(self.words):
            await asyncio.sleep(self.delay_s)
            text = f"{text} w{i}".strip()
            last = i == self.words - 1
            completion = SimpleNamespace(text=text, token_ids=list(range(i + 1)),
                                         finish_reason=self.finish if last else None)
            yield SimpleNamespace(outputs=[completion], finished=last)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def add_lora(self, lora: Any) -> None:
        assert Path(lora.lora_path).is_dir(), "the directory must exist before the engine loads it"
        self.loaded[lora.lora_int_id] = lora.lora_name

    async def remove_lora(self, lora_id: int) -> None:
        del self.loaded[lora_id]


@dataclass
class LeaseLog:
    """Stands in for AdapterPool: leases every version asked for and logs each lease, release and forget."""

    leased: list[tuple[str, str, int]] = field(default_factory=list)
    released: list[tuple[str, str, int]] = field(default_factory=list)
    forgotten: list[tuple[str, str]] = field(default_factory=list)

    async def lease(self, tenant: str, sid: str, version: int) -> AdapterLease:
        key = (tenant, sid, version)
        self.leased.append(key)

        async def unpin() -> None:
            self.released.append(key)

        return AdapterLease(version, SimpleNamespace(lora_name=f"{tenant}/{sid}@v{version}"), unpin)  # type: ignore[arg-type]

    async def forget(self, tenant: str, sid: str) -> None:
        self.forgotten.append((tenant, sid))

    @property
    def held(self) -> int:
        """Leases not released yet."""
        return len(self.leased) - len(self.released)


def services(store: RedisStore, engine: FakeEngine | None = None, pool: LeaseLog | None = None,
             **settings: Any) -> Services:
    """The real chat and session services over `store`, with a fake engine and pool and no rate limits."""
    config = Settings(**{"model": "fake", **settings})
    engine, pool = engine or FakeEngine(), pool or LeaseLog()
    lifecycle = SessionLifecycle(store, pool, engine.tokenizer, config)  # type: ignore[arg-type]
    chat = ChatService(engine, lifecycle, pool, config)  # type: ignore[arg-type]
    auth = Auth(KeyRing.from_settings(config), RateLimiter(None, 0, 0))
    sessions = SessionService(lifecycle, store, pool, config)  # type: ignore[arg-type]
    return Services(config, auth, chat, sessions, pool, store)  # type: ignore[arg-type]
