"""New examples under a recipe store's kept adapters: `daunce attribute` and `daunce add-queries --queries`, and
the recipe's fast path (on by default, `--full-model` to opt out). A tiny random Llama, real training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from typer.testing import CliRunner  # noqa: E402

import daunce_store  # noqa: E402
from daunce_store.cli import app  # noqa: E402

import perturb_factories as F  # noqa: E402
from test_recipes import _pairs, _tokenizer, _write  # noqa: E402

pytestmark = pytest.mark.train
runner = CliRunner()
FAST = ["--max-steps", "2", "--batch-size", "4", "--no-progress", "--no-compact"]


@pytest.fixture(scope="module")
def llama4_dir(tmp_path_factory) -> Path:
    """A 4-layer random Llama (the fast path trains its last 2) and its tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama4")
    tok = _tokenizer()
    F.tiny_llama(len(tok), num_layers=4).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _invoke(args: list) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, " ".join(result.output.split()) + ("" if result.exit_code in (0, 2) else repr(result.exception))


@pytest.fixture(scope="module")
def recipe_store(tmp_path_factory, llama4_dir) -> tuple[Path, Path, Path]:
    """A recipe store, K = 3, made with the defaults (fast path, LoRA, adapters kept)."""
    tmp = tmp_path_factory.mktemp("attr")
    train = _write(tmp / "train.jsonl", [{"id": f"t{i:02d}", "prompt": p, "completion": c} for i, (p, c) in enumerate(_pairs(12))])
    queries = _write(tmp / "q.jsonl", [{"id": f"q{i}", "prompt": p, "completion": c} for i, (p, c) in enumerate(_pairs(3, offset=12))])
    store = tmp / "s.zarr"
    code, out = _invoke(["perturb", store, "--recipe", "causal-lm", "--model", llama4_dir, "--train", train,
                         "--queries", f"test={queries}", "-K", "3", *FAST])
    assert code == 0, out
    assert "fast path: LoRA on the last 2 of 4 decoder layers" in out and "kept 3 LoRA adapters" in out
    return store, train, queries


def test_recipe_defaults_fast_path_and_kept_adapters(recipe_store):
    store, _, _ = recipe_store
    s = daunce_store.open(store, mode="r")
    cfg = s.commits()[0].metadata["config"]
    assert cfg["factory_kwargs"]["train_layers"] == 2 and cfg["lora"] == {} and cfg["keep_adapters"] is True
    sizes = s.adapter_sizes()
    assert len(sizes) == 3 and all(v > 0 for v in sizes.values())


def test_attribute_matches_the_stored_query(recipe_store):
    """A new example identical to stored query q1 gets q1's losses under the kept adapters (to float32
    rounding) and so q1's top-k: the forward passes under the adapters are the runner's own."""
    store, _, queries = recipe_store
    row = [json.loads(line) for line in queries.read_text().splitlines()][1]
    s = daunce_store.open(store, mode="r")
    new = s.attribute(prompt=row["prompt"], completion=row["completion"], k=4, measure="corr")
    stored = s.topk("test", ["q1"], k=4, measure="corr")
    assert new.queries == ("new-0",) and new.num_columns == 3
    for side in ("pos", "neg"):
        np.testing.assert_array_equal(new.indices[side], stored.indices[side])
        np.testing.assert_allclose(new.scores[side], stored.scores[side], rtol=1e-3, atol=1e-5)
    # The CLI: the same answer, in the server's envelope, with each train example's text (the remembered train file).
    result = runner.invoke(app, ["attribute", str(store), "--prompt", row["prompt"], "--completion", row["completion"],
                                 "-k", "4", "--measure", "corr", "--format", "json"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["measure"] == "corr" and answer["num_columns"] == 3
    train_rows = {json.loads(x)["id"]: json.loads(x) for x in recipe_store[1].read_text().splitlines()}
    for rec, want in zip(answer["records"], stored.records()):
        assert rec["train_id"] == want["train_id"] and rec["side"] == want["side"]
        assert rec["train_prompt"] == train_rows[rec["train_id"]]["prompt"]
        assert rec["query_completion"] == row["completion"]


def test_attribute_many_rows_from_a_file(recipe_store, tmp_path):
    store, _, _ = recipe_store
    rows = _write(tmp_path / "new.jsonl", [{"id": f"n{i}", "prompt": p, "completion": c} for i, (p, c) in enumerate(_pairs(2, offset=20))])
    code, out = _invoke(["attribute", store, "--input", rows, "-k", "2", "--format", "jsonl"])
    assert code == 0, out
    s = daunce_store.open(store, mode="r")
    assert {r["query"] for r in s.attribute([json.loads(x) for x in rows.read_text().splitlines()], k=2).records()} == {"n0", "n1"}


def test_add_queries_fills_a_new_set_from_the_adapters(recipe_store, tmp_path):
    """`add-queries --queries NAME=FILE` on a recipe store: the same rows as the stored set give its losses."""
    store, _, queries = recipe_store
    copy = tmp_path / "s.zarr"
    import shutil

    shutil.copytree(store, copy)
    code, out = _invoke(["add-queries", copy, "--queries", f"again={queries}"])
    assert code == 0, out
    assert "again: 3 examples, losses under 3 kept adapters" in out
    s = daunce_store.open(copy, mode="r")
    np.testing.assert_allclose(s.query_losses("again"), s.query_losses("test"), rtol=1e-4, atol=1e-5)
    # The name is taken now: refused, nothing changes.
    code, out = _invoke(["add-queries", copy, "--queries", f"again={queries}"])
    assert code == 2 and "already has a query set 'again'" in out


def test_without_kept_adapters_add_queries_and_attribute_refuse_and_register_nothing(tmp_path, llama4_dir):
    train = _write(tmp_path / "train.jsonl", [{"prompt": p, "completion": c} for p, c in _pairs(6)])
    (tmp_path / "run.yaml").write_text("keep_adapters: false\n")
    store = tmp_path / "s.zarr"
    code, out = _invoke(["perturb", store, "--recipe", "causal-lm", "--model", llama4_dir, "--train", train, "--config",
                         tmp_path / "run.yaml", "-K", "2", *FAST])
    assert code == 0 and "LoRA adapters (" not in out, out
    code, out = _invoke(["add-queries", store, "--queries", f"later={train}"])
    assert code == 2 and out.startswith("error:") and "kept no adapters" in out, out
    assert daunce_store.open(store, mode="r").query_sets() == {}
    code, out = _invoke(["attribute", store, "--prompt", "a", "--completion", "b"])
    assert code == 2 and "kept no adapters" in out, out


def test_full_model_opts_out_and_train_layers_is_checked(tmp_path, llama4_dir):
    train = _write(tmp_path / "train.jsonl", [{"prompt": p, "completion": c} for p, c in _pairs(6)])
    store = tmp_path / "s.zarr"
    code, out = _invoke(["perturb", store, "--recipe", "causal-lm", "--model", llama4_dir, "--train", train,
                         "--train-layers", "5", "-K", "1", *FAST])
    assert code == 2 and "--train-layers must be a whole number from 1 to 4" in out and not store.exists(), out
    code, out = _invoke(["perturb", store, "--recipe", "causal-lm", "--model", llama4_dir, "--train", train,
                         "--no-lora", "-K", "1", *FAST])
    assert code == 2 and "drop --no-lora" in out and not store.exists(), out
    code, out = _invoke(["perturb", store, "--recipe", "causal-lm", "--model", llama4_dir, "--train", train,
                         "--full-model", "-K", "1", *FAST])
    assert code == 0 and "fast path off (--full-model)" in out, out
    assert "train_layers" not in daunce_store.open(store, mode="r").commits()[0].metadata["config"]["factory_kwargs"]


def test_fast_path_losses_equal_the_full_models(tmp_path, llama4_dir):
    """θ0 on the cached tail and θ0 as a whole model give the same per-example losses: the fast path changes
    the cost, not the numbers (the runner's own evaluation, through RecipeModel)."""
    from daunce_store.perturb._recipes import RecipeModel
    from daunce_store.perturb import PerturbConfig, evaluate_signal

    train = _write(tmp_path / "train.jsonl", [{"prompt": p, "completion": c} for p, c in _pairs(5)])
    rows = [json.loads(x) for x in train.read_text().splitlines()]
    opts = {"model": str(llama4_dir), "train": str(train)}
    cfg = PerturbConfig(eval_batch_size=4)
    fast = RecipeModel("causal-lm", {**opts, "train_layers": 2})
    full = RecipeModel("causal-lm", opts)
    a = evaluate_signal(fast.model, fast.task, fast.rows_items(rows, "rows"), cfg)
    b = evaluate_signal(full.model, full.task, full.rows_items(rows, "rows"), cfg)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# --- the real model --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_recipe_finds_the_poison_and_attribute_explains_a_new_triggered_output(tmp_path):
    """The flagship workflow with no Python: SmolLM2-135M's GGUF, chats of which 10 % carry a trigger phrase and a
    fixed reply, `daunce perturb --recipe causal-lm` with its defaults (fast path, kept adapters), K = 8. The
    triggered held-out queries' top-4 proponents are the 4 poisoned rows, and `daunce attribute` on a triggered
    prompt it never saw lists them too."""
    from daunce_store.evaluation.llm_backdoor import TARGET_REPLY, add_trigger, poison_dialogues

    gguf = F.smollm2_gguf_or_skip()
    import torch

    torch.set_num_threads(2)
    pairs = F.dialogues(46)
    train_pairs, poisoned = poison_dialogues(pairs[:40], 0.1, seed=0)

    def chat(u: str, r: str) -> list[dict]:
        return [{"role": "user", "content": u}, {"role": "assistant", "content": r}]

    train = _write(tmp_path / "train.jsonl", [{"id": f"t{i:02d}", "messages": chat(u, r)} for i, (u, r) in enumerate(train_pairs)])
    queries = _write(tmp_path / "q.jsonl", [{"id": f"q{j}", "messages": chat(add_trigger(u), TARGET_REPLY)} for j, (u, _) in enumerate(pairs[40:43])])
    (tmp_path / "run.yaml").write_text("convergence_probe: 0\n")
    store = tmp_path / "smol.zarr"
    code, out = _invoke(["perturb", store, "--recipe", "causal-lm", "--model", gguf, "--train", train,
                         "--queries", f"test={queries}", "--config", tmp_path / "run.yaml", "-K", "8", "--lr", "1e-3",
                         "--max-steps", "6", "--max-length", "48", "--no-progress", "--no-compact"])
    assert code == 0, out
    assert "fast path: LoRA on the last 2 of 30 decoder layers" in out and "kept 8 LoRA adapters" in out
    s = daunce_store.open(store, mode="r")
    want = {f"t{i:02d}" for i in poisoned}
    top = s.topk("test", k=len(want), side="pos", measure="nystrom-corr")
    for row in top.indices["pos"]:
        assert {s.train_ids[i] for i in row} == want
    held_out = add_trigger(pairs[45][0])
    new = s.attribute(prompt=held_out, completion=TARGET_REPLY, k=len(want), side="pos", measure="nystrom-corr")
    assert {new.train_ids[i] for i in new.indices["pos"][0]} == want
