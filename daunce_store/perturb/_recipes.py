"""Recipes: ``daunce perturb STORE --recipe causal-lm|classifier --model M --train FILE`` with no Python.

A recipe is an ordinary factory (``daunce_store.perturb._recipes:causal_lm`` or ``:classifier``) whose
``factory_kwargs`` hold the model path, the data files and the field names, so the worker machinery runs
it unchanged: each spawned worker re-creates the model and the items from those kwargs, and the kwargs
land in every commit's metadata like any factory's. :func:`prepare_recipe` runs everything a worker will
do except loading the weights (read and check every row, tokenize, check the model's config, classes and
LoRA targets) and only then creates the store from the data's ids, so bad data never leaves a store.

Data: ``.jsonl`` / ``.ndjson`` (one JSON object a line), ``.json`` (a list of objects), ``.parquet``,
``.csv`` / ``.tsv`` (every cell read as text), or a directory saved by ``datasets.Dataset.save_to_disk``
(needs ``datasets``). Example ids: the ``id`` column when there is one, else row numbers ``"0", "1", ...``.
Models: a local Hugging Face directory (``save_pretrained``) or a ``.gguf`` file
(``from_pretrained(dir, gguf_file=name)``, which dequantizes).
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from daunce_store.errors import InvalidInputError
from daunce_store.perturb._config import PerturbConfig, read_yaml
from daunce_store.perturb._task import CausalLMTask, SequenceClassificationTask, Task
from daunce_store.store import LossStore, open_store, read_data_file, validate_ids

__all__ = [
    "RECIPES",
    "RECIPE_DEFAULTS",
    "SequenceClassificationTask",
    "causal_lm",
    "classifier",
    "load_config",
    "prepare_recipe",
    "read_examples",
]

RECIPES = {
    "causal-lm": "daunce_store.perturb._recipes:causal_lm",
    "classifier": "daunce_store.perturb._recipes:classifier",
}
# Training settings a recipe uses unless the YAML or a flag sets them: the usual fine-tuning settings of
# pretrained transformers (DESIGN §1: LLMs lr 3e-4 with 3 % warm-up), not PerturbConfig's defaults, which
# are tuned on small models (lr 3e-3, 20 epochs of batch 64) and would wreck a pretrained network.
RECIPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "causal-lm": {"lr": 3e-4, "warmup_ratio": 0.03, "epochs": 1, "batch_size": 8, "eval_batch_size": 32},
    "classifier": {"lr": 5e-5, "warmup_ratio": 0.03, "epochs": 3, "batch_size": 16, "eval_batch_size": 64},
}


# --- data files ------------------------------------------------------------------------------------------
def read_examples(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a data file (or a saved ``datasets`` directory) as dicts, in file order; InvalidInputError
    naming the file when it cannot be read (:func:`daunce_store.store.read_data_file`)."""
    return read_data_file(path, dataset_dir=True).rows


def _text(row: Mapping[str, Any], field: str, i: int, where: str, *, empty_ok: bool = False) -> str:
    if field not in row or row[field] is None:
        raise InvalidInputError(f"{where} row {i} has no {field!r} field (its fields: {', '.join(map(str, row)) or 'none'})")
    value = row[field]
    if not isinstance(value, str):
        raise InvalidInputError(f"{where} row {i}: field {field!r} is a {type(value).__name__}, not text")
    if not empty_ok and not value.strip():
        raise InvalidInputError(f"{where} row {i}: field {field!r} is empty; every example needs a non-empty {field}")
    return value


# --- models ----------------------------------------------------------------------------------------------
def _model_source(model: str) -> tuple[str, dict[str, Any]]:
    """(directory, extra from_pretrained kwargs) for a Hugging Face directory or a .gguf file."""
    p = Path(model)
    if p.is_file() and p.suffix.lower() == ".gguf":
        return os.fspath(p.parent), {"gguf_file": p.name}
    if p.is_dir() and (p / "config.json").exists():
        return os.fspath(p), {}
    what = "does not exist" if not p.exists() else "is a directory without config.json" if p.is_dir() else "is not a .gguf file"
    raise InvalidInputError(
        f"--model {model!r} {what}; give a Hugging Face model directory (save_pretrained) or a .gguf file"
    )


# Cached per process: the checks before the store is created and the factory in the same process read one
# model's config and tokenizer once (from a GGUF file each read parses the file: ~4 s for SmolLM2-135M).
@functools.lru_cache(maxsize=4)
def _load_config(model: str) -> Any:
    from transformers import AutoConfig

    directory, kw = _model_source(model)
    try:
        return AutoConfig.from_pretrained(directory, **kw)
    except (OSError, ValueError, KeyError) as e:
        raise InvalidInputError(f"--model {model!r} is not a model transformers can read: {_first_line(e)}") from None


@functools.lru_cache(maxsize=4)
def _load_tokenizer(model: str) -> Any:
    from transformers import AutoTokenizer

    directory, kw = _model_source(model)
    try:
        return AutoTokenizer.from_pretrained(directory, **kw)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InvalidInputError(f"--model {model!r} has no tokenizer transformers can load ({_first_line(e)}); save one beside the model (tokenizer.save_pretrained)") from None


def _auto_class(recipe: str) -> Any:
    import transformers

    return transformers.AutoModelForCausalLM if recipe == "causal-lm" else transformers.AutoModelForSequenceClassification


def _check_architecture(recipe: str, model: str, config: Any) -> torch.nn.Module:
    """The model's modules without its weights (meta device): is it a model of the recipe's kind?"""
    saved_as = list(getattr(config, "architectures", None) or [])  # GGUF configs may not say
    is_classifier = any(a.endswith("ForSequenceClassification") for a in saved_as)
    if saved_as and is_classifier != (recipe == "classifier"):
        # Loaded as the other kind, its head would be new random weights: attributions of a model never trained.
        kind = "a trained sequence classifier" if recipe == "classifier" else "a causal language model, not a classifier"
        raise InvalidInputError(f"--recipe {recipe} needs {kind}; --model {model!r} was saved as {', '.join(saved_as)}")
    try:
        with torch.device("meta"):
            return _auto_class(recipe).from_config(config)
    except (ValueError, KeyError) as e:
        kind = "causal language model" if recipe == "causal-lm" else "sequence-classification model"
        raise InvalidInputError(f"--model {model!r} ({type(config).__name__}) is not a {kind} for --recipe {recipe}: {_first_line(e)}") from None


def _check_lora_targets(skeleton: torch.nn.Module, lora: Mapping[str, Any], model: str) -> None:
    targets = lora["target_modules"]
    targets = [targets] if isinstance(targets, str) else list(targets)
    names = [n for n, _ in skeleton.named_modules()]
    if isinstance(lora["target_modules"], str) or any(n == t or n.endswith("." + t) for n in names for t in targets):
        return  # a string is peft's regular expression: peft itself says when it matches nothing
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in skeleton.named_modules() if "Linear" in type(m).__name__ or "Conv1D" in type(m).__name__})
    raise InvalidInputError(
        f"LoRA: --model {model!r} has no modules named {', '.join(targets)}; set `lora: {{target_modules: [...]}}` "
        f"in --config (its linear layers: {', '.join(linear)})"
    )


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _pad_id(tokenizer: Any) -> int:
    for pad in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if pad is not None:
            return int(pad)
    return 0  # every pad position is masked (attention 0, label -100), so any id works


# --- causal LM -------------------------------------------------------------------------------------------
def _chat_pair(tokenizer: Any, messages: Any, i: int, where: str, field: str) -> tuple[str, str]:
    """(prompt, completion) of a chat: the last assistant turn is the completion, the turns before it,
    rendered by the tokenizer's chat template with the generation prompt, the prompt."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise InvalidInputError(f"{where} row {i}: field {field!r} must be a list of {{role, content}} messages")
    last = max((j for j, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise InvalidInputError(f"{where} row {i}: the {field!r} have no assistant turn to use as the completion")
    if not isinstance(messages[last]["content"], str) or not messages[last]["content"].strip():
        raise InvalidInputError(f"{where} row {i}: the last assistant turn is empty; every example needs a non-empty completion")
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidInputError(f"{where} has {field!r} but the model's tokenizer has no chat template; give prompt and completion fields instead")
    prompt = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages[: last + 1], tokenize=False)
    if not full.startswith(prompt):
        raise InvalidInputError(f"{where} row {i}: the chat template does not render the conversation as prompt + reply; give prompt and completion fields instead")
    return prompt, full[len(prompt):]


def causal_lm_items(tokenizer: Any, rows: Sequence[Mapping[str, Any]], where: str, *, prompt_field: str = "prompt",
                    completion_field: str = "completion", messages_field: str = "messages",
                    max_length: int | None = None) -> list[dict[str, list[int]]]:
    """:meth:`CausalLMTask.encode` items of the rows: (prompt, completion) fields, or a chat in ``messages_field``
    (when the first row has it and no prompt field). The loss covers the completion tokens only."""
    chat = rows[0].get(messages_field) is not None and rows[0].get(prompt_field) is None
    items = []
    for i, row in enumerate(rows):
        if chat:
            if messages_field not in row or row[messages_field] is None:
                raise InvalidInputError(f"{where} row {i} has no {messages_field!r} field (its fields: {', '.join(map(str, row))})")
            prompt, completion = _chat_pair(tokenizer, row[messages_field], i, where, messages_field)
        else:
            prompt = _text(row, prompt_field, i, where, empty_ok=True)
            completion = _text(row, completion_field, i, where)
        item = CausalLMTask.encode(tokenizer, prompt, completion, max_length=max_length)
        if all(label == -100 for label in item["labels"]):
            raise InvalidInputError(
                f"{where} row {i}: no completion token left" + (f" within max_length={max_length}; raise --max-length" if max_length else "")
            )
        items.append(item)
    return items


# --- classifier ------------------------------------------------------------------------------------------
def _class_index(value: Any, config: Any, i: int, where: str, field: str) -> int:
    """A label as a class index: an int in 0..num_labels-1, or a name from the model's label2id."""
    n = int(config.num_labels)
    names = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    index = None
    if isinstance(value, str):
        index = names.get(value)
        if index is None and value.strip().lstrip("-").isdigit():  # CSV cells are text
            index = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        index = value
    if index is None or not 0 <= index < n:
        classes = ", ".join(sorted(names, key=names.get)) or "none"
        raise InvalidInputError(
            f"{where} row {i}: {field} {value!r} is not one of the model's {n} classes "
            f"(an index 0..{n - 1} or a name from its label2id: {classes})"
        )
    return index


def classifier_items(tokenizer: Any, config: Any, rows: Sequence[Mapping[str, Any]], where: str, *, text_field: str = "text",
                     label_field: str = "label", max_length: int | None = None) -> list[dict[str, Any]]:
    """Items ``{"input_ids", "label"}`` of the rows; labels checked against the model's classes."""
    items = []
    for i, row in enumerate(rows):
        text = _text(row, text_field, i, where)
        if row.get(label_field) is None:
            raise InvalidInputError(f"{where} row {i} has no {label_field!r} field (its fields: {', '.join(map(str, row))})")
        label = _class_index(row[label_field], config, i, where, label_field)
        ids = tokenizer(text, truncation=max_length is not None, max_length=max_length)["input_ids"]
        items.append({"input_ids": list(ids), "label": label})
    return items


# --- the two recipes -------------------------------------------------------------------------------------
class _Parts:
    """Everything a recipe builds except the weights: checked before the store is created, and again
    (cheaply, without the checks mattering any more) in every worker."""

    def __init__(self, task: Task, train: list[Any], train_ids: list[str],
                 queries: dict[str, list[Any]], query_ids: dict[str, list[str]]):
        self.task, self.train, self.train_ids = task, train, train_ids
        self.queries, self.query_ids = queries, query_ids


def _read_sets(train: str, queries: Mapping[str, str] | None) -> list[tuple[str | None, str, list[dict[str, Any]], list[str]]]:
    """(query-set name or None for train, file, rows, ids) of every data file."""
    out = []
    for name, path in [(None, train), *sorted((queries or {}).items())]:
        data = read_data_file(path, dataset_dir=True)
        out.append((name, os.fspath(path), data.rows, data.ids))
    return out


def _causal_lm_parts(model: str, train: str, queries: Mapping[str, str] | None = None, prompt_field: str = "prompt",
                     completion_field: str = "completion", messages_field: str = "messages",
                     max_length: int | None = None, weight_decay: float | None = None) -> _Parts:
    tokenizer = _load_tokenizer(model)
    task = CausalLMTask(pad_token_id=_pad_id(tokenizer), max_length=max_length, weight_decay=weight_decay)
    return _assemble(task, train, queries, lambda rows, where: causal_lm_items(
        tokenizer, rows, where, prompt_field=prompt_field, completion_field=completion_field,
        messages_field=messages_field, max_length=max_length))


def _classifier_parts(model: str, train: str, queries: Mapping[str, str] | None = None, text_field: str = "text",
                      label_field: str = "label", max_length: int | None = None, signal: str = "loss",
                      weight_decay: float | None = None) -> _Parts:
    hf_config = _load_config(model)
    tokenizer = _load_tokenizer(model)
    task = SequenceClassificationTask(pad_token_id=_pad_id(tokenizer), signal=signal, weight_decay=weight_decay)
    return _assemble(task, train, queries, lambda rows, where: classifier_items(
        tokenizer, hf_config, rows, where, text_field=text_field, label_field=label_field, max_length=max_length))


def _assemble(task: Task, train: str, queries: Mapping[str, str] | None, items: Any) -> _Parts:
    sets = _read_sets(train, queries)
    built = {name: (items(rows, where), ids) for name, where, rows, ids in sets}
    train_items, train_ids = built.pop(None)
    return _Parts(task, train_items, train_ids,
                  {name: v[0] for name, v in built.items()}, {name: v[1] for name, v in built.items()})


_PARTS = {"causal-lm": _causal_lm_parts, "classifier": _classifier_parts}


def _load_model(recipe: str, model: str, parts: _Parts) -> torch.nn.Module:
    directory, kw = _model_source(model)
    net = _auto_class(recipe).from_pretrained(directory, dtype=torch.float32, **kw).eval()
    if recipe == "classifier" and getattr(net.config, "pad_token_id", None) is None:
        # GPT-2-style classifiers find each sequence's last token through pad_token_id; without one they
        # refuse batches of more than one sequence.
        net.config.pad_token_id = parts.task.pad_token_id  # type: ignore[attr-defined]
    return net


def causal_lm(model: str, train: str, queries: Mapping[str, str] | None = None, **fields: Any) -> tuple[Any, Task, list[Any], dict[str, list[Any]]]:
    """The ``causal-lm`` recipe as a factory: ``(model, CausalLMTask, train items, query items)``.

    ``fields``: ``prompt_field`` ("prompt"), ``completion_field`` ("completion"), ``messages_field``
    ("messages": a chat, rendered by the tokenizer's chat template; its last assistant turn is the
    completion), ``max_length`` (None), ``weight_decay`` (None).
    """
    parts = _causal_lm_parts(model, train, queries, **fields)
    return _load_model("causal-lm", model, parts), parts.task, parts.train, parts.queries


def classifier(model: str, train: str, queries: Mapping[str, str] | None = None, **fields: Any) -> tuple[Any, Task, list[Any], dict[str, list[Any]]]:
    """The ``classifier`` recipe as a factory: ``(model, SequenceClassificationTask, train items, query items)``.

    ``fields``: ``text_field`` ("text"), ``label_field`` ("label": a class index, or a name from the model
    config's label2id), ``max_length`` (None), ``signal`` ("loss" or "margin"), ``weight_decay`` (None).
    """
    parts = _classifier_parts(model, train, queries, **fields)
    return _load_model("classifier", model, parts), parts.task, parts.train, parts.queries


# --- the run: config, checks, store ----------------------------------------------------------------------
def load_config(config_file: str | os.PathLike[str] | None, recipe: str | None = None, *,
                overrides: Mapping[str, Any] | None = None, lora: bool | None = None) -> PerturbConfig:
    """The run's PerturbConfig: the recipe's training defaults, then the YAML file, then ``overrides``
    (command-line flags); ``lora=True`` turns LoRA on (the YAML's settings, or the reference ones),
    ``False`` off."""
    if config_file is None and recipe is None:
        raise InvalidInputError("give --config run.yaml (a factory and its settings) or --recipe causal-lm|classifier")
    if recipe is not None and recipe not in RECIPES:
        raise InvalidInputError(f"--recipe {recipe!r} is not one of {', '.join(RECIPES)}")
    data: dict[str, Any] = dict(RECIPE_DEFAULTS[recipe]) if recipe else {}
    if config_file is not None:
        yaml_config = PerturbConfig.from_yaml(config_file)  # its own checks and errors first
        given = set(read_yaml(config_file) or {})  # the keys the file sets: they win over the recipe's defaults
        if recipe is not None and yaml_config.factory:
            raise InvalidInputError(f"--config {os.fspath(config_file)!r} names factory {yaml_config.factory!r} and --recipe {recipe!r} is given; drop one")
        data.update({k: v for k, v in yaml_config.to_dict().items() if k in given})
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if lora is False:
        data["lora"] = None
    elif lora and data.get("lora") is None:
        data["lora"] = {}
    return PerturbConfig.from_dict(data)


def prepare_recipe(url: str, recipe: str, options: Mapping[str, Any], config: PerturbConfig, *, until: int | None = None,
                   storage_options: dict[str, Any] | None = None) -> PerturbConfig:
    """Check a recipe run end to end (data, model, classes, LoRA targets, K) and then open the store at
    ``url``, or create it from the data's ids; returns ``config`` with the recipe as its factory, ready for
    :func:`run_workers`. ``options`` (``model``, ``train``, ``queries`` {name: file}, field names, ...) go
    over the config's ``factory_kwargs``. Nothing is written when a check fails."""
    if recipe not in RECIPES:
        raise InvalidInputError(f"--recipe {recipe!r} is not one of {', '.join(RECIPES)}")
    options = {**config.factory_kwargs, **{k: v for k, v in options.items() if v is not None}}
    known = list(inspect.signature(_PARTS[recipe]).parameters)
    unknown = sorted(set(options) - set(known))
    if unknown:
        flags = ", ".join(f"{k} (--{k.replace('_', '-')})" for k in unknown)
        raise InvalidInputError(f"--recipe {recipe} has no setting {flags}; its settings: {', '.join(known)}")
    for required in ("model", "train"):
        if not options.get(required):
            raise InvalidInputError(f"--recipe {recipe} needs --{required}")
    if not (until or config.num_perturbations):
        raise InvalidInputError("how many perturbations? pass -K/--until K or set num_perturbations in the config")
    # Absolute paths: spawned workers (and commit records) must find the files from anywhere.
    options["model"] = os.path.abspath(options["model"])
    options["train"] = os.path.abspath(options["train"])
    queries = options.get("queries") or {}
    if not isinstance(queries, Mapping):
        raise InvalidInputError("queries must map a query-set name to its data file (--queries NAME=FILE)")
    from daunce_store.store._records import check_query_set_name

    options["queries"] = {check_query_set_name(name): os.path.abspath(path) for name, path in queries.items()}

    skeleton = _check_architecture(recipe, options["model"], _load_config(options["model"]))  # the model first
    if config.lora_settings() is not None:
        _check_lora_targets(skeleton, config.lora_settings(), options["model"])
    parts = _PARTS[recipe](**options)
    validate_ids(parts.train_ids, what=f"train ids of {options['train']}", check_normalization=False)  # the store warns
    _open_or_create(url, parts, storage_options)
    return config.replace(factory=RECIPES[recipe], factory_kwargs=options)


def _open_or_create(url: str, parts: _Parts, storage_options: dict[str, Any] | None) -> LossStore:
    from daunce_store.errors import NotADaunceStoreError

    try:
        store = open_store(url, storage_options=storage_options)
    except NotADaunceStoreError:  # nothing there (create refuses a path that holds anything else)
        return LossStore.create(url, parts.train_ids, parts.query_ids, storage_options=storage_options)
    # An existing store (a resumed run, or more workers): the data must be the data it was made from.
    _same_ids(store.train_ids.tolist(), parts.train_ids, f"the train data ({len(parts.train_ids)} rows)", store.url)
    have = store.query_sets()
    for name, ids in parts.query_ids.items():
        if name in have:
            _same_ids(store.query_ids(name).tolist(), ids, f"query set {name!r}", store.url)
    new = {name: ids for name, ids in parts.query_ids.items() if name not in have}
    for name, ids in new.items():
        store.add_query_set(name, ids)
    if new and store.commits():
        warnings.warn(
            f"query set(s) {', '.join(new)} added to {store.url}, which has {len(store.commits())} committed "
            "columns without their losses; only perturbations run from now on evaluate them",
            stacklevel=3,
        )
    return store


def _same_ids(have: list[str], ids: list[str], what: str, url: str) -> None:
    if have == ids:
        return
    if len(have) != len(ids):
        detail = f"{len(have)} ids in the store"
    else:
        row = next(i for i, (a, b) in enumerate(zip(have, ids)) if a != b)
        detail = f"row {row}: {have[row]!r} in the store, {ids[row]!r} in the data"
    raise InvalidInputError(f"{what} does not match the ids of {url} ({detail}); use a new store path for new data")
