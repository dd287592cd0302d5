"""A store made by `daunce perturb --recipe` remembers its recipe: `topk` / `self-influence` show the examples'
text without `--data`, and `check-removal` needs no YAML, checks the store before loading any model, and
runs 3 seeds by default. A tiny random-weight Llama (tests/perturb/perturb_factories.py), K = 3."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from typer.testing import CliRunner  # noqa: E402

import daunce_store  # noqa: E402
from daunce_store.cli import app  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "perturb"))
import perturb_factories as F  # noqa: E402

pytestmark = pytest.mark.train

runner = CliRunner()
N_TRAIN, N_QUERY = 16, 3
FAST = ["--max-steps", "2", "--batch-size", "4", "--no-progress", "--no-compact", "--lora"]


def _ok(*args: object) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def _refused(*args: object) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and text.startswith("error:") and "Traceback" not in text, result.output + repr(result.exception)
    return text


def _model(path: Path) -> Path:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=F.tiny_tokenizer(), pad_token="<pad>", unk_token="<unk>", eos_token="<s>")
    F.tiny_llama(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _recipe_store(tmp: Path, k: int) -> tuple[Path, Path, Path, Path]:
    """(store, model dir, train file, query file) of a causal-lm recipe run with K = k."""
    model = _model(tmp / "model")
    texts = F.topic_texts(N_TRAIN + N_QUERY, words=14)
    rows = [{"id": f"ex{i:02d}", "prompt": " ".join(t.split()[:6]), "completion": " ".join(t.split()[6:])} for i, t in enumerate(texts)]
    train, queries = tmp / "train.jsonl", tmp / "queries.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:N_TRAIN]))
    queries.write_text("".join(json.dumps(r) + "\n" for r in rows[N_TRAIN:]))
    store = tmp / "lm.zarr"
    _ok("perturb", store, "--recipe", "causal-lm", "--model", model, "--train", train, "--queries", f"test={queries}", "-K", k, *FAST)
    return store, model, train, queries


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> tuple[Path, Path, Path, Path]:
    return _recipe_store(tmp_path_factory.mktemp("recipe"), 3)


def test_the_recipe_names_live_in_the_module_the_facade_reads() -> None:
    from daunce_store._api import RECIPE_MODULE
    from daunce_store.perturb._recipes import RECIPES

    assert all(factory.startswith(RECIPE_MODULE + ":") for factory in RECIPES.values())


def test_a_recipe_store_shows_its_examples_text_without_data(recipe) -> None:
    store, _, train, queries = recipe
    s = daunce_store.open(store, "r")
    assert s.data_files() == {"train": str(train.resolve()), "test": str(queries.resolve())}
    out = json.loads(_ok("topk", store, "--query-set", "test", "-k", 2, "--format", "json"))
    rows = {json.loads(line)["id"]: json.loads(line) for line in train.read_text().splitlines()}
    qrows = {json.loads(line)["id"]: json.loads(line) for line in queries.read_text().splitlines()}
    assert out["measure"] == "nystrom-corr" and len(out["records"]) == N_QUERY * 2 * 2  # topk's default: auto-corr
    for rec in out["records"]:
        assert rec["train_prompt"] == rows[rec["train_id"]]["prompt"] and rec["train_completion"] == rows[rec["train_id"]]["completion"]
        assert rec["query_completion"] == qrows[rec["query"]]["completion"]
    si = json.loads(_ok("self-influence", store, "-k", 3, "--format", "json"))
    assert all(r["train_prompt"] == rows[r["train_id"]]["prompt"] for r in si["records"])


def test_serve_shows_a_recipe_stores_remembered_files(recipe) -> None:
    pytest.importorskip("fastapi")
    from daunce_store.serve import ServedStore, load_data, remembered_data

    store, _, train, queries = recipe
    served = ServedStore.open_served(str(store))
    specs = remembered_data(served)
    assert specs == [str(train.resolve()), f"test={queries.resolve()}"]
    data = load_data(served, specs)
    first = json.loads(train.read_text().splitlines()[0])
    fields = {f["name"]: f["value"] for f in data["train"].content([first["id"]])[first["id"]]["fields"]}
    assert fields["prompt"] == first["prompt"] and fields["completion"] == first["completion"]


def test_a_moved_data_file_is_said_and_the_ids_still_show(tmp_path, recipe) -> None:
    store, _, train, _ = recipe
    copy = tmp_path / "lm.zarr"
    shutil.copytree(store, copy)
    moved = train.with_name("moved.jsonl")
    train.rename(moved)
    try:
        result = runner.invoke(app, ["influence", str(copy), "--query-set", "test", "-k", 2, "--format", "json"])
        assert result.exit_code == 0, result.output
        text = " ".join(result.stderr.split())
        assert "no longer exists" in text and str(train.resolve()) in text and "--data FILE" in text
        assert "train_prompt" not in json.loads(result.stdout)["records"][0]
        given = json.loads(_ok("influence", copy, "--query-set", "test", "-k", 2, "--data", moved, "--format", "json"))
        assert "train_prompt" in given["records"][0]
        from daunce_store.serve import ServedStore, remembered_data

        said: list[str] = []
        assert remembered_data(ServedStore.open_served(str(copy)), said.append) == [f"test={recipe[3].resolve()}"]
        assert len(said) == 1 and "no longer exists" in said[0] and str(train.resolve()) in said[0]
    finally:
        moved.rename(train)


def test_check_removal_on_a_recipe_store_needs_no_yaml_and_runs_three_seeds(recipe) -> None:
    store, *_ = recipe
    out = " ".join(_ok("check-removal", store, "--query-set", "test", "-k", 4, "--no-progress").split())
    assert "over 3 seeds" in out and "Verdict:" in out and "delta_top_helpful" in out and "±" in out
    for seed in ("0", "1", "2"):
        assert f"│ {seed} " in out


def test_check_removal_checks_the_store_before_any_model(tmp_path) -> None:
    """With the model gone, too few columns, a bad query set or k is still what is named (the store is checked
    before the recipe's files and model)."""
    store, model, *_ = _recipe_store(tmp_path, 1)
    shutil.rmtree(model)
    assert "at least 2 committed perturbation columns" in _refused("check-removal", store, "--query-set", "test", "-k", 2)
    assert "query set" in _refused("check-removal", store, "--query-set", "nope", "-k", 2)
    assert "k must be a whole number between 1 and" in _refused("check-removal", store, "--query-set", "test", "-k", 99)


def test_check_removal_says_what_it_needs_on_other_stores(tmp_path, recipe) -> None:
    empty = tmp_path / "e.zarr"
    daunce_store.init(empty, ["a", "b", "c"], {"test": ["q"]})
    assert "no committed perturbation columns" in _refused("check-removal", empty, "--query-set", "test", "-k", 1)
    plain = tmp_path / "p.zarr"
    s = daunce_store.init(plain, ["a", "b", "c"], {"test": ["q"]})
    for c in range(3):
        s.append(f"p{c}", [0.1 * c, 0.2, 0.3 + c], {"test": [0.5 * c]})
    assert "was not made by a recipe" in _refused("check-removal", plain, "--query-set", "test", "-k", 1)
    store, model, *_ = recipe
    copy = tmp_path / "lm.zarr"
    shutil.copytree(store, copy)
    model.rename(model.with_name("model-moved"))
    try:
        text = _refused("check-removal", copy, "--query-set", "test", "-k", 2)
        assert "no longer exists" in text and str(model.resolve()) in text and "--config" in text
    finally:
        model.with_name("model-moved").rename(model)
