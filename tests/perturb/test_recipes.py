"""`daunce perturb --recipe causal-lm|classifier`: a data file and a saved model in, a store of K columns out,
no Python factory. Tiny random-weight models saved with save_pretrained beside a tokenizer trained here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import daunce_store  # noqa: E402
from daunce_store.cli import app  # noqa: E402
from daunce_store.perturb import SequenceClassificationTask, read_examples  # noqa: E402
from daunce_store.perturb._recipes import causal_lm_items  # noqa: E402

import perturb_factories as F  # noqa: E402

pytestmark = pytest.mark.train

runner = CliRunner()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
FAST = ["--max-steps", "2", "--batch-size", "4", "--no-progress", "--no-compact"]


def _tokenizer():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=F.tiny_tokenizer(), pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<s>", chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama and its tokenizer (with a chat template), saved like a Hub model."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = _tokenizer()
    F.tiny_llama(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A 1-layer random BERT classifier with named classes (neg, pos)."""
    from transformers import BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("tiny-bert")
    tok = _tokenizer()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2, pad_token_id=0,
                        id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    BertForSequenceClassification(config).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _pairs(n: int, offset: int = 0) -> list[tuple[str, str]]:
    out = []
    for text in F.topic_texts(offset + n, words=20)[offset:]:
        ws = text.split()
        out.append((" ".join(ws[:6]), " ".join(ws[6:14])))
    return out


def _write(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def _refused(args: list[str], store: Path, *fragments: str) -> None:
    result = runner.invoke(app, [str(a) for a in args])
    text = " ".join(result.output.split())  # rich wraps long lines
    assert result.exit_code == 2, result.output + repr(result.exception)
    assert text.startswith("error:") and text.count("error:") == 1 and "Traceback" not in text, result.output
    for fragment in fragments:
        assert fragment in text, result.output
    assert not store.exists(), "nothing may be written before the inputs are checked"


# --- causal LM -------------------------------------------------------------------------------------------
def test_causal_lm_recipe_jsonl_parquet(tmp_path, lm_dir):
    """jsonl train (with an id column) + parquet queries (row-number ids) -> a new store of K columns;
    a second command with a larger K resumes the same store; the YAML gives settings, the recipe the factory."""
    train = _write(tmp_path / "train.jsonl", [{"id": f"ex-{i:02d}", "prompt": p, "completion": c} for i, (p, c) in enumerate(_pairs(10))])
    queries = _write(tmp_path / "q.parquet", [{"prompt": p, "completion": c} for p, c in _pairs(3, offset=10)])
    (tmp_path / "run.yaml").write_text("objective: fisher\nconvergence_probe: 0\nfactory_kwargs: {max_length: 64}\n")
    store = tmp_path / "lm.zarr"
    args = ["perturb", store, "--recipe", "causal-lm", "--model", lm_dir, "--train", train, "--queries", f"test={queries}",
            "--config", tmp_path / "run.yaml", "--lora", *FAST]
    out = _ok([*args, "-K", "2"])
    assert "2 of 2 perturbations committed" in out
    s = daunce_store.open(store, mode="r")
    assert s.train_ids.tolist() == [f"ex-{i:02d}" for i in range(10)]
    assert s.query_ids("test").tolist() == ["0", "1", "2"]
    commits = s.commits()
    assert sorted(c.perturbation for c in commits) == ["000000", "000001"]
    cfg = commits[0].metadata["config"]
    assert cfg["factory"] == "daunce_store.perturb._recipes:causal_lm" and cfg["objective"] == "fisher"
    assert cfg["factory_kwargs"]["max_length"] == 64 and cfg["factory_kwargs"]["train"] == str(train)
    assert cfg["lora"] == {} and cfg["lr"] == 3e-4 and cfg["max_steps"] == 2  # recipe default, flag
    train_losses = s.train_losses()
    assert train_losses.shape == (10, 2) and np.isfinite(train_losses).all()
    assert not np.allclose(train_losses[:, 0], train_losses[:, 1])  # two different perturbed fine-tunes

    # The store exists: same ids, one more column; a new query set is added, evaluated from now on.
    out = _ok([*args, "--queries", f"extra={queries}", "-K", "3"])
    assert "query set(s) extra added" in " ".join(out.split()) and "2 committed columns without their losses" in " ".join(out.split())
    s = daunce_store.open(store, mode="r")
    assert s.num_columns() == 3 and len(s.snapshot().query_slots["extra"]) == 1


def test_causal_lm_recipe_chat_and_csv(tmp_path, lm_dir):
    """Chats (`messages`) through the tokenizer's chat template, and CSV queries with renamed fields."""
    chats = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]} for p, c in _pairs(6)]
    train = _write(tmp_path / "chat.jsonl", chats)
    queries = _write(tmp_path / "q.csv", [{"id": f"00{j}", "question": p, "answer": c} for j, (p, c) in enumerate(_pairs(2, offset=6))])
    store = tmp_path / "chat.zarr"
    _ok(["perturb", store, "--recipe", "causal-lm", "--model", lm_dir, "--train", train, "--queries", f"qa={queries}",
         "--prompt-field", "question", "--completion-field", "answer", "-K", "1", *FAST])
    s = daunce_store.open(store, mode="r")
    assert s.query_ids("qa").tolist() == ["000", "001"]  # CSV cells stay text
    assert np.isfinite(s.query_losses("qa")).all()

    # The loss covers exactly the assistant reply as the template renders it.
    tok = _tokenizer()
    item = causal_lm_items(tok, read_examples(train)[:1], "chat.jsonl")[0]
    target = [t for t, label in zip(item["input_ids"], item["labels"]) if label != -100]
    assert tok.decode(target).replace(" ", "") == (_pairs(1)[0][1] + " <s>\n").replace(" ", "").replace("\n", "")


# --- classifier ------------------------------------------------------------------------------------------
def test_classifier_recipe(tmp_path, bert_dir):
    """Label names mapped through label2id (jsonl), integer labels (parquet); the recorded signal at K = 1 is
    the per-example cross-entropy of a fine-tuned copy, which the task computes as the model's own loss."""
    texts = F.topic_texts(14, words=12)
    train = _write(tmp_path / "train.jsonl", [{"text": t, "label": "pos" if i % 3 else "neg"} for i, t in enumerate(texts[:10])])
    queries = _write(tmp_path / "q.parquet", [{"text": t, "label": i % 2} for i, t in enumerate(texts[10:])])
    store = tmp_path / "cls.zarr"
    _ok(["perturb", store, "--recipe", "classifier", "--model", bert_dir, "--train", train, "--queries", f"test={queries}",
         "-K", "2", *FAST])
    s = daunce_store.open(store, mode="r")
    assert s.n_train == 10 and s.query_sets() == {"test": 4} and s.num_columns() == 2
    commit = s.commits()[0]
    assert commit.metadata["task"]["task"] == "SequenceClassificationTask"
    assert (s.train_losses() > 0).all() and np.isfinite(s.query_losses("test")).all()


def test_sequence_classification_task_loss_is_the_models_loss(bert_dir):
    from transformers import AutoModelForSequenceClassification

    from daunce_store.perturb import classifier

    model, task, items, _ = classifier(str(bert_dir), os.fspath(_write(bert_dir.parent / "few.jsonl",
                                       [{"text": t, "label": i % 2} for i, t in enumerate(F.topic_texts(3, words=5 + 0))])))
    assert isinstance(task, SequenceClassificationTask)
    batch = task.collate(items)
    per_example = task.per_example_loss(task.outputs(model, batch), batch)
    hf = AutoModelForSequenceClassification.from_pretrained(bert_dir).eval()
    for r, item in enumerate(items):  # unpadded, one at a time
        ids = torch.as_tensor([item["input_ids"]])
        expected = hf(input_ids=ids, labels=torch.as_tensor([item["label"]])).loss
        torch.testing.assert_close(per_example[r], expected, rtol=1e-4, atol=1e-5)


# --- bad input: one line, nothing written ----------------------------------------------------------------
def _lm_rows(n: int = 4) -> list[dict]:
    return [{"prompt": p, "completion": c} for p, c in _pairs(n)]


@pytest.mark.parametrize("case", [
    "missing-field", "empty-completion", "duplicate-ids", "model-not-a-model", "model-missing", "queries-without-name",
    "no-such-file", "unknown-extension", "no-K", "flag-without-recipe", "flag-of-other-recipe", "chat-without-assistant",
    "config-with-factory",
])
def test_causal_lm_bad_input(tmp_path, lm_dir, case):
    rows = _lm_rows()
    model, extra = lm_dir, ["-K", "1"]
    expect: tuple[str, ...]
    if case == "missing-field":
        del rows[2]["completion"]
        expect = ("row 2 has no 'completion' field",)
    elif case == "empty-completion":
        rows[1]["completion"] = "  "
        expect = ("row 1: field 'completion' is empty",)
    elif case == "duplicate-ids":
        rows = [{"id": ["a", "b", "a", "c"][i], **r} for i, r in enumerate(rows)]
        expect = ("duplicate id 'a' in rows 0 and 2",)
    elif case == "model-not-a-model":
        model = tmp_path / "empty-dir"
        model.mkdir()
        expect = ("is a directory without config.json",)
    elif case == "model-missing":
        model = tmp_path / "nope.gguf"
        expect = ("does not exist", "Hugging Face model directory")
    elif case == "chat-without-assistant":
        rows = [{"messages": [{"role": "user", "content": "hi"}]}]
        expect = ("row 0: the 'messages' have no assistant turn",)
    train = _write(tmp_path / "train.jsonl", rows)
    if case == "queries-without-name":
        extra += ["--queries", str(train)]
        expect = ("expected NAME=FILE",)
    elif case == "no-such-file":
        train = tmp_path / "missing.jsonl"
        expect = ("does not exist",)
    elif case == "unknown-extension":
        train = tmp_path / "train.xlsx"
        train.write_text("x")
        expect = ("unknown extension '.xlsx'", ".jsonl")
    elif case == "no-K":
        extra = []
        expect = ("how many perturbations?",)
    elif case == "flag-of-other-recipe":
        extra += ["--text-field", "body"]
        expect = ("has no setting text_field (--text-field)",)
    elif case == "config-with-factory":
        (tmp_path / "run.yaml").write_text("factory: mypkg.models:build\n")
        extra += ["--config", str(tmp_path / "run.yaml")]
        expect = ("names factory 'mypkg.models:build' and --recipe 'causal-lm' is given; drop one",)
    store = tmp_path / "never.zarr"
    if case == "flag-without-recipe":
        _refused(["perturb", store, "--model", model, "--train", train, "-K", "1"], store, "--model, --train need --recipe")
        return
    _refused(["perturb", store, "--recipe", "causal-lm", "--model", model, "--train", train, *extra], store, *expect)


@pytest.mark.parametrize("case", ["label-outside", "label-unknown-name", "missing-label", "lora-targets", "causal-lm-model"])
def test_classifier_bad_input(tmp_path, bert_dir, lm_dir, case):
    rows = [{"text": t, "label": "neg"} for t in F.topic_texts(4, words=8)]
    extra: list[str] = []
    if case == "label-outside":
        rows[3]["label"] = 2
        expect = ("row 3: label 2 is not one of the model's 2 classes", "neg, pos")
    elif case == "label-unknown-name":
        rows[1]["label"] = "positive"
        expect = ("row 1: label 'positive' is not one of the model's 2 classes",)
    elif case == "missing-label":
        del rows[0]["label"]
        expect = ("row 0 has no 'label' field",)
    elif case == "lora-targets":
        extra = ["--lora"]  # the default targets are Llama's MLP projections; BERT has none
        expect = ("no modules named gate_proj, up_proj, down_proj", "target_modules", "query")
    else:  # its classification head would be random
        bert_dir = lm_dir
        expect = ("--recipe classifier needs a trained sequence classifier", "LlamaForCausalLM")
    store = tmp_path / "never.zarr"
    _refused(["perturb", store, "--recipe", "classifier", "--model", bert_dir, "--train", _write(tmp_path / "t.jsonl", rows),
              "-K", "1", *extra], store, *expect)


def test_bad_input_is_one_line_from_the_real_command(tmp_path, lm_dir):
    rows = _lm_rows()
    del rows[1]["prompt"]
    store = tmp_path / "never.zarr"
    out = subprocess.run([str(Path(sys.executable).with_name("daunce")), "perturb", str(store), "--recipe", "causal-lm",
                          "--model", str(lm_dir), "--train", str(_write(tmp_path / "t.jsonl", rows)), "-K", "1"],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, COLUMNS="500"))  # no wrapping: one logical line
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "row 1 has no 'prompt' field" in out.stderr and not store.exists()


def test_existing_store_with_other_data_is_refused(tmp_path, lm_dir):
    train = _write(tmp_path / "train.jsonl", _lm_rows())
    store = tmp_path / "s.zarr"
    daunce_store.init(store, ["a", "b", "c", "d"])
    result = runner.invoke(app, ["perturb", str(store), "--recipe", "causal-lm", "--model", str(lm_dir), "--train", str(train), "-K", "1"])
    assert result.exit_code == 2 and "row 0: 'a' in the store, '0' in the data" in " ".join(result.output.split()), result.output
    assert daunce_store.open(store, mode="r").num_columns() == 0


# --- workers and real models -----------------------------------------------------------------------------
@pytest.mark.slow
def test_recipe_runs_in_spawned_workers(tmp_path, bert_dir):
    """--workers 2: each spawned worker re-creates the recipe from its factory_kwargs."""
    texts = F.topic_texts(8, words=10)
    train = _write(tmp_path / "t.csv", [{"text": t, "label": str(i % 2)} for i, t in enumerate(texts)])
    store = tmp_path / "w.zarr"
    out = subprocess.run([str(Path(sys.executable).with_name("daunce")), "perturb", str(store), "--recipe", "classifier",
                          "--model", str(bert_dir), "--train", str(train), "-K", "2", "--workers", "2", *FAST],
                         capture_output=True, text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout + out.stderr
    commits = daunce_store.open(store, mode="r").commits()
    assert sorted(c.perturbation for c in commits) == ["000000", "000001"]
    # With --workers 2 the command's own process trains nothing: spawned workers made both columns.
    assert all(c.metadata["config"]["factory_kwargs"]["train"] == str(train) for c in commits)


@pytest.mark.slow
def test_datasets_directory(tmp_path, lm_dir):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(_lm_rows(6))
    ds.save_to_disk(tmp_path / "ds")
    store = tmp_path / "ds.zarr"
    _ok(["perturb", store, "--recipe", "causal-lm", "--model", lm_dir, "--train", tmp_path / "ds", "-K", "1", *FAST])
    assert daunce_store.open(store, mode="r").train_ids.tolist() == [str(i) for i in range(6)]


@pytest.mark.slow
def test_smollm2_gguf_recipe(tmp_path):
    """The real SmolLM2-135M-Instruct GGUF, chats through its own chat template, LoRA, K = 2."""
    gguf = F.smollm2_gguf_or_skip()
    torch.set_num_threads(2)
    chats = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]} for p, c in _pairs(3)]
    train = _write(tmp_path / "chat.jsonl", chats)
    queries = _write(tmp_path / "q.jsonl", [{"prompt": p, "completion": c} for p, c in _pairs(1, offset=3)])
    (tmp_path / "run.yaml").write_text("lora: {r: 8}\nconvergence_probe: 0\n")  # bounded: the load dominates
    store = tmp_path / "smol.zarr"
    _ok(["perturb", store, "--recipe", "causal-lm", "--model", gguf, "--train", train,
         "--queries", f"test={queries}", "--config", tmp_path / "run.yaml", "--lora", "--max-length", "64", "-K", "2",
         "--max-steps", "1", "--batch-size", "2", "--no-progress", "--no-compact"])
    s = daunce_store.open(store, mode="r")
    losses = s.train_losses()
    assert losses.shape == (3, 2) and np.isfinite(losses).all() and (losses > 0).all()
    assert s.commits()[0].metadata["config"]["lora"] == {"r": 8}
    assert s.commits()[0].metadata["config"]["factory_kwargs"]["model"] == str(gguf)
