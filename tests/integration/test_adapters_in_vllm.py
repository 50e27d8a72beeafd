"""Issue 2 acceptance, proven against the real vLLM engine: parity with PEFT, zero start, learning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import download_adapter, greedy, teach_and_flush, write_version
from safetensors.torch import load_file

from tmem.server.settings import Settings

pytestmark = pytest.mark.engine
QUESTION = "What did you do last weekend with your sister?"


@pytest.fixture(scope="module")
def runtime(tiny_model_dir: Path, artifacts: Path) -> Any:
    """The trainer's runtime in the test process: same model, same spec, same A0 as the server's worker."""
    from tmem.server.trainer_runtime import TrainerRuntime

    return TrainerRuntime.load(Settings(model=str(tiny_model_dir), a0_cache_dir=artifacts / "a0"))


def random_b(runtime: Any, seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(t.shape, generator=gen) * scale for n, t in runtime.zero_b().items()}


def peft_greedy(model_dir: Path, adapter_dir: Path | None, question: str, max_tokens: int = 24) -> str:
    """transformers (+ PEFT when an adapter is given), greedy, with the server's prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    # No system turn: the server injects none, exactly as `vllm serve` renders a request without one.
    messages = [{"role": "user", "content": question}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.no_grad():
        out = model.eval().generate(ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=tok.eos_token_id)
    return str(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


def test_vllm_serves_exactly_what_peft_computes_for_a_nonzero_b(server, redis_main, runtime, tiny_model_dir,
                                                                sid, tmp_path) -> None:
    assert write_version(redis_main.url, sid, runtime, random_b(runtime, seed=11)) == 1
    served, version = greedy(server.url, QUESTION, sid)
    adapter, downloaded_version = download_adapter(server.url, sid, tmp_path)
    assert version == downloaded_version == 1
    assert served == peft_greedy(tiny_model_dir, adapter, QUESTION)
    assert served != peft_greedy(tiny_model_dir, None, QUESTION)  # B changed the output, so parity means something


def test_zero_b_adapter_gives_exactly_the_base_models_greedy_output(server, redis_main, runtime, sid) -> None:
    assert write_version(redis_main.url, sid, runtime, runtime.zero_b()) == 1
    with_zero_adapter, version = greedy(server.url, QUESTION, sid)
    base, base_version = greedy(server.url, QUESTION, None)
    assert (version, base_version) == (1, 0)
    assert with_zero_adapter == base


def test_a_new_session_starts_at_the_base_model(server, sid) -> None:
    fresh, version = greedy(server.url, QUESTION, sid)
    assert version == 0
    assert fresh == greedy(server.url, QUESTION, None)[0]


PAIRS = [("What is my favorite color?", "Your favorite color is teal."),
         ("Where do I live?", "You live in Lisbon."),
         ("What is my dog's name?", "Your dog is called Pepper.")]


def test_one_update_teaches_the_pairs_and_leaves_other_sessions_alone(server, redis_main, runtime, sid,
                                                                      tmp_path) -> None:
    bystander = f"{sid}-bystander"
    write_version(redis_main.url, bystander, runtime, random_b(runtime, seed=5))
    bystander_before = [greedy(server.url, q, bystander) for q, _ in PAIRS]
    base_answers = [greedy(server.url, q, None)[0] for q, _ in PAIRS]

    assert teach_and_flush(server.url, sid, PAIRS) == 1
    for (question, answer), base in zip(PAIRS, base_answers, strict=True):
        learned, version = greedy(server.url, question, sid)
        assert version == 1
        assert learned == answer
        assert base != answer
    assert [greedy(server.url, q, bystander) for q, _ in PAIRS] == bystander_before

    # The adapter vLLM serves is the checkpoint Redis holds, bit for bit.
    adapter, _ = download_adapter(server.url, sid, tmp_path)
    served_b = {k.removeprefix("base_model.model.").removesuffix(".lora_B.weight"): v
                for k, v in load_file(str(adapter / "adapter_model.safetensors")).items() if "lora_B" in k}
    import asyncio

    from tmem.server.store import RedisStore

    async def stored() -> Any:
        store = RedisStore.from_url(redis_main.url)
        try:
            return await store.get_checkpoint("default", sid, 1)
        finally:
            await store.aclose()

    ckpt = asyncio.run(stored())
    redis_b = runtime.decode(ckpt.data, ckpt.sha256)
    assert set(served_b) == set(redis_b)
    assert all(torch.equal(served_b[n], redis_b[n]) for n in redis_b)
