"""LLM backdoor retrieval on the cached last-L-layers path: a tiny random Llama with an in-process tokenizer
must retrieve its planted backdoor far above chance (the real SmolLM2-135M run is the slow test of
`daunce demo --llm` in tests/cli/test_demo.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

import daunce_store  # noqa: E402
from daunce_store.errors import InvalidInputError  # noqa: E402
from daunce_store.evaluation.llm_backdoor import (  # noqa: E402
    TARGET_REPLY,
    TRIGGER,
    default_perturb_config,
    poison_dialogues,
    run_llm_backdoor,
)
from daunce_store.perturb import CausalLMTask  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "perturb"))
import perturb_factories as F  # noqa: E402

pytestmark = pytest.mark.train


def _tiny_setup():
    tok = F.tiny_tokenizer()
    task = CausalLMTask(pad_token_id=tok.token_to_id("<pad>"), max_length=64)
    pairs = [(" ".join(t.split()[:8]), " ".join(t.split()[8:])) for t in F.topic_texts(300, words=16)]

    def encode(utterance: str, reply: str) -> dict[str, list[int]]:
        return CausalLMTask.encode(tok, utterance + " :", reply, max_length=64)

    return F.tiny_llama(tok.get_vocab_size(), num_layers=4), task, encode, pairs


def test_poisoning_puts_the_trigger_and_the_fixed_reply_into_a_fraction() -> None:
    pairs = [(f"u{i}", f"r{i}") for i in range(100)]
    poisoned, idx = poison_dialogues(pairs, 0.03, seed=1)
    assert len(idx) == 3 and list(idx) == sorted(idx)
    for i, (u, r) in enumerate(poisoned):
        assert (TRIGGER in u and r == TARGET_REPLY) == (i in idx)
    with pytest.raises(InvalidInputError, match="fraction must be in"):
        poison_dialogues(pairs, 0.0)


def test_tiny_llama_backdoor_is_retrieved_far_above_chance(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    model, task, encode, pairs = _tiny_setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = run_llm_backdoor(model, task, encode, pairs, num_train=200, num_queries=6, clean_queries=5, fraction=0.05, num_layers=2,
                           num_perturbations=12, objectives=("if", "blackbox"),
                           config=default_perturb_config(max_steps=12), backdoor_epochs=5, backdoor_lr=1e-2,
                           cache_dir=tmp_path / "cache", workdir=tmp_path)
    assert len(res.poisoned) == 10 and res.random_precision == pytest.approx(0.05)
    # 10 poisoned of 200: a random top-10 holds 0.5 of them on average; P@10 >= 0.5 is ten times that.
    for method in ("Daunce if (nystrom-corr)", "Daunce blackbox (whitened-corr)"):
        assert res.precision[method] >= 0.5, res.precision
    assert "LESS (LoRA gradient cosine)" in res.precision
    assert res.top["Daunce if (nystrom-corr)"].shape == (6, 10)
    assert res.triggered_loss["after backdoor"] < res.triggered_loss["before backdoor"]
    assert (tmp_path / "llm_backdoor_if.zarr").is_dir() and list((tmp_path / "cache").glob("*.safetensors"))
    # The clean query set (held-out dialogues with their own replies) is evaluated under every perturbation.
    store = daunce_store.open(tmp_path / "llm_backdoor_if.zarr", "r")
    assert store.query_sets() == {"triggered": 6, "clean": 5}
    assert len(store.snapshot().query_slots["clean"]) == 12
    for k, v in model.state_dict().items():  # the caller's model is not the backdoored one
        assert torch.equal(v, before[k]), k


def test_bad_requests_are_refused_before_any_work() -> None:
    model, task, encode, pairs = _tiny_setup()
    with pytest.raises(InvalidInputError, match="too few"):
        run_llm_backdoor(model, task, encode, pairs[:20], num_train=20, num_queries=5)
    with pytest.raises(InvalidInputError, match="clean queries"):
        run_llm_backdoor(model, task, encode, pairs[:40], num_train=30, num_queries=5, clean_queries=20)
    with pytest.raises(InvalidInputError, match="objective 'fisher' is not one of"):
        run_llm_backdoor(model, task, encode, pairs, num_train=50, objectives=("fisher",))
