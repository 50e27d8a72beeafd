"""A0 is published once per base model and every worker trains against the stored one (issue 12): a second
worker whose A0 differs adopts the first's, a corrupted or misshapen stored A0 stops the worker."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from transformers import AutoModelForCausalLM, AutoTokenizer

from tmem.adapters.fast_weights import FastWeightModel
from tmem.adapters.spec import FastWeightSpec
from tmem.adapters.tiny_model import build_tiny_model
from tmem.adapters.trainer import TrainerConfig
from tmem.server.settings import Settings
from tmem.server.store import A0Corrupt, RedisStore
from tmem.server.trainer_runtime import TrainerRuntime
from tmem.server.worker import UpdateWorker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), layers=2, hidden=128, seed=5)


def runtime(model_dir: Path) -> TrainerRuntime:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    fast = FastWeightModel(model, FastWeightSpec(last_layers=1))
    return TrainerRuntime(fast, AutoTokenizer.from_pretrained(model_dir), TrainerConfig(anchors=0), "tiny")


def worker(store: RedisStore, rt: TrainerRuntime) -> UpdateWorker:
    return UpdateWorker(store, rt, None, Settings(), name="w")  # type: ignore[arg-type]


async def test_a_second_worker_adopts_the_a0_published_first(store: RedisStore, model_dir: Path) -> None:
    rt = runtime(model_dir)
    # Another device's SVD of the same weights: here, every singular vector's sign flipped.
    theirs = {name: -t for name, t in rt.fast.a0.items()}
    first_blob = save_tensors({n: t.contiguous() for n, t in theirs.items()})
    await store.put_a0(rt.identity, first_blob)
    own_blob = rt.a0_blob
    assert own_blob != first_blob

    await worker(store, rt)._publish_a0()
    assert rt.a0_blob == first_blob and await store.get_a0(rt.identity) == first_blob  # the first one stays
    for copies in (rt.fast.a0, rt.fast._a0_device, rt.batched._a0):
        for name, tensor in copies.items():
            assert torch.equal(tensor.float().cpu(), theirs[name])
    # The hooks project with the stored A0: the trainer computes W·x + B·(A0_stored·x).
    name = next(iter(rt.fast.a0))
    x = torch.randn(3, rt.fast.a0[name].shape[1])
    assert torch.allclose(torch.nn.functional.linear(x, rt.fast._a0_device[name]), x @ theirs[name].T)


async def test_the_first_worker_keeps_its_own_a0(store: RedisStore, model_dir: Path) -> None:
    rt = runtime(model_dir)
    before = {n: t.clone() for n, t in rt.fast.a0.items()}
    await worker(store, rt)._publish_a0()
    assert await store.get_a0(rt.identity) == rt.a0_blob
    assert all(torch.equal(rt.fast.a0[n], before[n]) for n in before)
    assert load_tensors(await store.get_a0(rt.identity) or b"").keys() == before.keys()


async def test_a_stored_a0_of_another_shape_or_corrupted_stops_the_worker(store: RedisStore, model_dir: Path) -> None:
    rt = runtime(model_dir)
    wrong = save_tensors({n: torch.zeros(t.shape[0] + 1, t.shape[1]) for n, t in rt.fast.a0.items()})
    await store.put_a0(rt.identity, wrong)
    with pytest.raises(A0Corrupt, match="does not fit"):
        await worker(store, rt)._publish_a0()
    await store.client.hset(f"{store.prefix}:a0v2:{rt.identity}", "data", rt.a0_blob)  # bytes ≠ stored sha256
    with pytest.raises(A0Corrupt, match="sha256"):
        await worker(store, rt)._publish_a0()
