"""The fast-weight math against PEFT: same logits, exact zero start, learning, NaN guard, checkpoints."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tmem.adapters.a_init import compute_a0, load_or_compute_a0
from tmem.adapters.checkpoint import CheckpointError, decode_b, encode_b, read_metadata
from tmem.adapters.fast_weights import FastWeightModel
from tmem.adapters.peft_io import read_peft_dir, write_peft_dir
from tmem.adapters.spec import FastWeightSpec
from tmem.adapters.supervision import render_chat_ids
from tmem.adapters.tiny_model import build_tiny_model
from tmem.adapters.trainer import OnlineTrainer, TrainerConfig

# fp32 forward of the same math in a different order (hook vs PEFT's LoRA layer).
LOGIT_ATOL = 1e-4
SPEC = FastWeightSpec(last_layers=2)


@dataclass(frozen=True)
class Pair:
    instruction: str
    output: str


PAIRS = [Pair("What is my favorite color?", "Your favorite color is teal."),
         Pair("Where do I live?", "You live in Lisbon."),
         Pair("When is my sister's birthday?", "Her birthday is on 3 May.")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), layers=3, hidden=128, seed=1)


def load(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def fast(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> FastWeightModel:
    return FastWeightModel(load(model_dir), SPEC, a0_cache_dir=tmp_path_factory.mktemp("a0"))


def random_b(fast: FastWeightModel, seed: int = 0, scale: float = 0.05) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(t.shape, generator=gen) * scale for n, t in fast.zero_b().items()}


def prompt_ids(tokenizer, question: str) -> list[int]:
    return render_chat_ids(tokenizer, [{"role": "user", "content": question}])


def test_targets_are_ffn_projections_of_the_last_layers(fast: FastWeightModel) -> None:
    assert fast.layers == [1, 2]
    assert sorted({t.name.rsplit(".", 1)[1] for t in fast.targets}) == ["down_proj", "gate_proj", "up_proj"]
    assert len(fast.targets) == 6


def test_svd_a0_is_sigma_times_top_right_singular_vectors(fast: FastWeightModel) -> None:
    name = fast.targets[0].name
    weight = fast.model.get_submodule(name).weight.detach()
    _, s, vh = torch.linalg.svd(weight, full_matrices=False)
    a0 = fast.a0[name]
    assert a0.shape == (SPEC.rank, weight.shape[1])
    torch.testing.assert_close(a0.norm(dim=1), s[:SPEC.rank], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a0, s[:SPEC.rank, None] * vh[:SPEC.rank], atol=1e-5, rtol=1e-5)


def test_a0_cache_is_reused_and_keyed_by_the_weights(model_dir: Path, tmp_path: Path) -> None:
    model = load(model_dir)
    fast = FastWeightModel(model, SPEC, a0_cache_dir=tmp_path)
    files = list(tmp_path.glob("a0-*.safetensors"))
    assert len(files) == 1
    again = load_or_compute_a0(model, fast.targets, SPEC, tmp_path)
    assert all(torch.equal(again[n], fast.a0[n]) for n in fast.a0)
    other = build_tiny_model(tmp_path / "other", layers=3, hidden=128, seed=2)
    FastWeightModel(load(other), SPEC, a0_cache_dir=tmp_path)
    assert len(list(tmp_path.glob("a0-*.safetensors"))) == 2  # different weights, different key


def test_random_init_differs_from_svd_and_is_seeded(fast: FastWeightModel) -> None:
    rnd = compute_a0(fast.model, fast.targets, SPEC.model_copy(update={"a_init": "random"}))
    rnd2 = compute_a0(fast.model, fast.targets, SPEC.model_copy(update={"a_init": "random"}))
    name = fast.targets[0].name
    assert torch.equal(rnd[name], rnd2[name])
    assert not torch.allclose(rnd[name], fast.a0[name])


def test_zero_b_gives_exactly_the_base_logits(fast: FastWeightModel, tokenizer) -> None:
    ids = torch.tensor([prompt_ids(tokenizer, "Hello there, how are you?")])
    with fast.using(None):
        base = fast.logits(ids)
    with fast.using(fast.zero_b()):
        zero = fast.logits(ids)
    assert torch.equal(base, zero)


def test_trainer_forward_matches_peft_logits(fast: FastWeightModel, model_dir: Path, tokenizer,
                                             tmp_path: Path) -> None:
    from peft import PeftModel

    b = random_b(fast)
    path = write_peft_dir(tmp_path / "v1", SPEC, fast.layers, fast.a0, b, str(model_dir))
    peft_model = PeftModel.from_pretrained(load(model_dir), str(path)).eval()
    ids = torch.tensor([prompt_ids(tokenizer, "Tell me about your weekend in Paris.")])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    with fast.using(b):
        got = fast.logits(ids)
    with fast.using(None):
        base = fast.logits(ids)
    assert (expected - base).abs().max() > 100 * LOGIT_ATOL  # B really changes the output
    torch.testing.assert_close(got, expected, atol=LOGIT_ATOL, rtol=0)


def test_peft_dir_has_only_adapted_layers_and_alpha_equal_rank(fast: FastWeightModel, tmp_path: Path) -> None:
    b = random_b(fast)
    config, a0, b_back = read_peft_dir(write_peft_dir(tmp_path / "v", SPEC, fast.layers, fast.a0, b, "m"))
    assert config["r"] == config["lora_alpha"] == SPEC.rank
    assert config["layers_to_transform"] == [1, 2] and config["lora_dropout"] == 0.0
    assert set(b_back) == {t.name for t in fast.targets}
    assert all(torch.equal(b_back[n], b[n]) and torch.equal(a0[n], fast.a0[n]) for n in b)


def test_checkpoint_round_trip_is_bit_identical(fast: FastWeightModel) -> None:
    b = random_b(fast, seed=3)
    ckpt = encode_b(b, {"a0": "abc"})
    back = decode_b(ckpt.data, ckpt.sha256)
    assert all(torch.equal(back[n], b[n]) for n in b)
    assert encode_b(back, {"a0": "abc"}) == ckpt
    assert read_metadata(ckpt.data) == {"a0": "abc"}


@pytest.mark.parametrize("corrupt", ["flip_byte", "truncate", "wrong_sha"])
def test_corrupted_checkpoint_is_refused(fast: FastWeightModel, corrupt: str) -> None:
    ckpt = encode_b(random_b(fast))
    data, sha = bytearray(ckpt.data), ckpt.sha256
    if corrupt == "flip_byte":
        data[-5] ^= 0xFF
    elif corrupt == "truncate":
        data = data[: len(data) // 2]
    else:
        sha = "0" * 64
    with pytest.raises(CheckpointError, match="sha256"):
        decode_b(bytes(data), sha)


def test_checkpoint_with_nan_values_is_refused_even_with_matching_sha(fast: FastWeightModel) -> None:
    b = random_b(fast)
    b[next(iter(b))][0, 0] = float("nan")
    ckpt = encode_b(b)
    with pytest.raises(CheckpointError, match="NaN"):
        decode_b(ckpt.data, ckpt.sha256)


def test_update_learns_the_pairs_and_leaves_the_input_untouched(fast: FastWeightModel, tokenizer) -> None:
    trainer = OnlineTrainer(fast, tokenizer, TrainerConfig(optimizer="adam", lr=1e-2, epochs=40))
    b0 = fast.zero_b()
    other = random_b(fast, seed=7)
    other_before = {n: t.clone() for n, t in other.items()}
    result = trainer.update(b0, PAIRS)
    assert result.applied and result.reason is None
    assert result.losses[-1] < 0.1 * result.losses[0]
    assert all(torch.count_nonzero(t) == 0 for t in b0.values())  # input B is never modified
    assert all(torch.equal(other[n], other_before[n]) for n in other)  # another session's B untouched
    for pair in PAIRS:
        ids = prompt_ids(tokenizer, pair.instruction)
        with fast.using(result.b):
            learned = tokenizer.decode(fast.greedy(ids, 24, tokenizer.eos_token_id), skip_special_tokens=True)
        with fast.using(None):
            base = tokenizer.decode(fast.greedy(ids, 24, tokenizer.eos_token_id), skip_special_tokens=True)
        assert learned == pair.output
        assert base != pair.output


def test_default_sgd_update_lowers_the_loss(fast: FastWeightModel, tokenizer) -> None:
    result = OnlineTrainer(fast, tokenizer).update(fast.zero_b(), PAIRS)
    assert result.applied and result.steps == 5  # 5 epochs × 1 batch of ≤ 16
    assert result.losses[-1] < result.losses[0]


@pytest.mark.parametrize(("lr", "start_b", "reason"), [
    (float("inf"), "zero", "non-finite"),
    (1e-2, "nan", "loss is nan"),
])
def test_nan_guard_leaves_b_bit_identical_and_says_why(fast: FastWeightModel, tokenizer, lr: float,
                                                       start_b: str, reason: str) -> None:
    b = fast.zero_b() if start_b == "zero" else {n: torch.full_like(t, float("nan")) for n, t in fast.zero_b().items()}
    before = {n: t.clone() for n, t in b.items()}
    result = OnlineTrainer(fast, tokenizer, TrainerConfig(lr=lr)).update(b, PAIRS)
    assert not result.applied
    assert reason in (result.reason or "")
    assert result.b is b
    assert all(torch.equal(b[n], before[n], ) or torch.isnan(before[n]).all() for n in b)


def test_no_pairs_is_not_an_update(fast: FastWeightModel, tokenizer) -> None:
    result = OnlineTrainer(fast, tokenizer).update(fast.zero_b(), [])
    assert not result.applied and "no trainable pairs" in (result.reason or "")


def test_answer_only_labels(tokenizer) -> None:
    from tmem.adapters.supervision import IGNORE_INDEX, encode_pair

    ex = encode_pair(tokenizer, PAIRS[0], 512)
    assert ex is not None
    answer = [t for t, label in zip(ex.input_ids, ex.labels, strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(answer) == PAIRS[0].output + "<|im_end|>"
    assert ex.labels[: len(prompt_ids(tokenizer, PAIRS[0].instruction))] == [IGNORE_INDEX] * len(
        prompt_ids(tokenizer, PAIRS[0].instruction))
