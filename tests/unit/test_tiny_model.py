"""The tiny test model: files, loading, chat template, byte-level tokenizer, determinism, decoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerBase

from tmem.adapters.tiny_model import CHAT_TEMPLATE, build_tiny_model

SMALL = {"layers": 2, "hidden": 128, "vocab_size": 1024}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), **SMALL)


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def model(model_dir: Path) -> LlamaForCausalLM:
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def _file_bytes(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_writes_the_files_loaders_need(model_dir: Path) -> None:
    names = {path.name for path in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == CHAT_TEMPLATE


def test_config_has_head_dim_64_and_untied_embeddings(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] == 128
    assert config["hidden_size"] // config["num_attention_heads"] == 64
    assert config["head_dim"] == 64
    assert config["num_key_value_heads"] == config["num_attention_heads"]
    assert config["num_hidden_layers"] == 2
    assert config["intermediate_size"] % 64 == 0
    assert config["vocab_size"] == 1024
    assert config["tie_word_embeddings"] is False


def test_loads_as_float32_llama(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase) -> None:
    assert all(param.dtype == torch.float32 for param in model.parameters())
    ids = tokenizer("hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 1024)
    assert torch.isfinite(logits).all()


def test_chat_template_renders_chatml(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where does Alice live?"},
    ]
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhere does Alice live?<|im_end|>\n"
    assert tokenizer.apply_chat_template(messages, tokenize=False) == expected
    with_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert with_prompt == expected + "<|im_start|>assistant\n"


def test_special_tokens_are_single_ids_and_eos_is_im_end(
    model_dir: Path, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase
) -> None:
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None
    im_end = tokenizer.encode("<|im_end|>")
    assert im_end == [tokenizer.eos_token_id]
    assert len(tokenizer.encode("<|im_start|>")) == 1
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    generation_config = json.loads((model_dir / "generation_config.json").read_text())
    assert generation_config["eos_token_id"] == tokenizer.eos_token_id


def test_english_chat_text_gets_word_level_merges(tokenizer: PreTrainedTokenizerBase) -> None:
    text = "My name is Caroline and I moved to Seattle last year. What did you do on Saturday?"
    ids = tokenizer.encode(text)
    # Whole words, not bytes: about one token per word.
    assert len(ids) <= len(text.split()) + 6


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_encode_decode_round_trips_any_unicode(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("text", ["naïve café ☕ 東京 🙂", "tabs\tand\nnewlines\r\n  spaces  ", "\x00\x7f"])
def test_encode_decode_round_trips_examples(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_same_seed_gives_identical_files_and_other_seed_other_weights(tmp_path: Path) -> None:
    first = _file_bytes(build_tiny_model(tmp_path / "a", seed=7, **SMALL))
    again = _file_bytes(build_tiny_model(tmp_path / "b", seed=7, **SMALL))
    other = _file_bytes(build_tiny_model(tmp_path / "c", seed=8, **SMALL))
    assert first == again
    assert other["model.safetensors"] != first["model.safetensors"]
    # The tokenizer does not depend on the model seed.
    assert other["tokenizer.json"] == first["tokenizer.json"]


def test_build_leaves_the_global_rng_untouched(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(tmp_path, **SMALL)
    assert torch.equal(torch.rand(3), expected)


def test_greedy_decoding_is_not_one_repeated_token(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase) -> None:
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is your favorite food?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        # transformers 5 types `generate`'s self as a protocol mypy cannot match to a concrete model.
        out = model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False)  # type: ignore[misc]
    new_tokens = out[0, ids.shape[1] :].tolist()
    assert len(new_tokens) == 10
    # Mostly distinct, not merely >1: a too-small init range loops on a few tokens (5 of 10 at 0.02).
    assert len(set(new_tokens)) > 5


@pytest.mark.parametrize("hidden", [0, 100])
def test_rejects_hidden_not_a_multiple_of_head_dim(tmp_path: Path, hidden: int) -> None:
    with pytest.raises(ValueError, match="multiple of 64"):
        build_tiny_model(tmp_path, layers=1, hidden=hidden)
