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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from daunce_store.errors import InvalidInputError
from daunce_store.perturb._config import PerturbConfig, read_yaml
from daunce_store.perturb._model_files import cache_root, local_copy
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
    "causal-lm": {"lr": 3e-4, "warmup_ratio": 0.03, "epochs": 1, "batch_size": 8, "eval_batch_size": 32, "lora": {}},
    "classifier": {"lr": 5e-5, "warmup_ratio": 0.03, "epochs": 3, "batch_size": 16, "eval_batch_size": 64},
}
# The causal-lm recipe's fast path (perturb/_cached.py): LoRA on the last L decoder layers only, θ0's hidden
# states at layer N − L computed once and cached, the head applied at target tokens only. L = 2 is the
# default: on SmolLM2-135M it retrieves the planted backdoor (P@10 1.00, the LLM demo and the recipe test),
# and L = 4 costs ~20 % more per perturbation (the head at the reply tokens costs more than two layers),
# while the full model costs 4.3x (bench/RESULTS.md "LLM attribution"). `--full-model` runs every layer.
DEFAULT_TRAIN_LAYERS = 2


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


# --- models ---------------------------------------------------------------------------------------------
# Cached per process: the checks before the store is created and the factory in the same process read one
# model's config and tokenizer once (from a GGUF file each read parses the file: ~4 s for SmolLM2-135M).
@functools.lru_cache(maxsize=4)
def _load_config(model: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(local_copy(model))
    except (OSError, ValueError, KeyError) as e:
        raise InvalidInputError(f"--model {model!r} is not a model transformers can read: {_first_line(e)}") from None


@functools.lru_cache(maxsize=4)
def _load_tokenizer(model: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(local_copy(model))
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
        classes = ", ".join(sorted(names, key=lambda name: names[name])) or "none"
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
    queries_built = {name: v for name, v in built.items() if name is not None}  # every set but the train set
    return _Parts(task, train_items, train_ids,
                  {name: v[0] for name, v in queries_built.items()}, {name: v[1] for name, v in queries_built.items()})


_PARTS: dict[str, Callable[..., _Parts]] = {"causal-lm": _causal_lm_parts, "classifier": _classifier_parts}


def _load_model(recipe: str, model: str, parts: _Parts) -> torch.nn.Module:
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights" bars in every worker's log, ~0.2 s each: noise
    try:
        net = _auto_class(recipe).from_pretrained(local_copy(model), dtype=torch.float32).eval()
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if recipe == "classifier" and getattr(net.config, "pad_token_id", None) is None:
        # GPT-2-style classifiers find each sequence's last token through pad_token_id; without one they
        # refuse batches of more than one sequence.
        assert isinstance(parts.task, SequenceClassificationTask)
        net.config.pad_token_id = parts.task.pad_token_id
    return net


def causal_lm(model: str, train: str, queries: Mapping[str, str] | None = None, train_layers: int | None = None,
              reporter: Any = None, **fields: Any) -> tuple[Any, Task, list[Any], dict[str, list[Any]]]:
    """The ``causal-lm`` recipe as a factory: ``(model, CausalLMTask, train items, query items)``, or with
    ``train_layers`` L the cached fast path's ``(tail, CachedCausalLMTask, cached train, cached queries)``
    (:func:`~daunce_store.perturb.cached_lm`; hidden states cached under ``cache_root()/hidden-states``).

    ``fields``: ``prompt_field`` ("prompt"), ``completion_field`` ("completion"), ``messages_field``
    ("messages": a chat, rendered by the tokenizer's chat template; its last assistant turn is the
    completion), ``max_length`` (None), ``weight_decay`` (None). ``reporter``: progress of the cache.
    """
    parts = _causal_lm_parts(model, train, queries, **fields)
    net = _load_model("causal-lm", model, parts)
    if not train_layers:
        return net, parts.task, parts.train, parts.queries
    from daunce_store.perturb._cached import cached_lm

    assert isinstance(parts.task, CausalLMTask)
    return cached_lm(net, parts.task, parts.train, parts.queries, int(train_layers),
                     cache_dir=cache_root() / "hidden-states", reporter=reporter)


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
    given: set[str] = set()
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
    if recipe is not None and "keep_adapters" not in given:
        # A recipe keeps its LoRA adapters (a few MB each) unless told otherwise: `daunce attribute` and
        # `add-queries` evaluate new examples under them. A full fine-tune's state is the whole model: not kept.
        data["keep_adapters"] = data.get("lora") is not None
    return PerturbConfig.from_dict(data)


def prepare_recipe(url: str, recipe: str, options: Mapping[str, Any], config: PerturbConfig, *, until: int | None = None,
                   storage_options: dict[str, Any] | None = None, full_model: bool = False,
                   say: Any = None) -> PerturbConfig:
    """Check a recipe run end to end (data, model, classes, LoRA targets, K) and then open the store at
    ``url``, or create it from the data's ids; returns ``config`` with the recipe as its factory, ready for
    :func:`run_workers`. ``options`` (``model``, ``train``, ``queries`` {name: file}, field names, ...) go
    over the config's ``factory_kwargs``. Nothing is written when a check fails.

    ``causal-lm`` runs on the cached fast path (``train_layers``, default :data:`DEFAULT_TRAIN_LAYERS`) unless
    ``full_model`` or the architecture has no cached tail; ``say(line)`` is told which, in one line."""
    if recipe not in RECIPES:
        raise InvalidInputError(f"--recipe {recipe!r} is not one of {', '.join(RECIPES)}")
    options = {**config.factory_kwargs, **{k: v for k, v in options.items() if v is not None}}
    known = list(inspect.signature(_PARTS[recipe]).parameters) + (["train_layers"] if recipe == "causal-lm" else [])
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
    lora = config.lora_settings()
    if lora is not None:
        _check_lora_targets(skeleton, lora, options["model"])
    options["train_layers"], note = _fast_path(recipe, options, skeleton, config, full_model)
    if options["train_layers"] is None:
        del options["train_layers"]
    parts = _PARTS[recipe](**{k: v for k, v in options.items() if k != "train_layers"})
    validate_ids(parts.train_ids, what=f"train ids of {options['train']}", check_normalization=False)  # the store warns
    _open_or_create(url, parts, storage_options)
    if say is not None:
        say(note)  # once every check passed: an error stays the command's one line
    return config.replace(factory=RECIPES[recipe], factory_kwargs=options)


def _fast_path(recipe: str, options: Mapping[str, Any], skeleton: torch.nn.Module, config: PerturbConfig,
               full_model: bool) -> tuple[int | None, str]:
    """The number of cached-tail layers to train (None: the whole model runs at every step), and one line saying so."""
    from daunce_store.perturb._cached import decoder_layers

    asked = options.get("train_layers")
    if asked is not None and (full_model or recipe != "causal-lm"):
        raise InvalidInputError("--train-layers is the causal-lm recipe's fast path; drop it" +
                                (" or --full-model" if full_model else ""))
    if recipe != "causal-lm":
        return None, ("fast path off: the cached tail is built for causal LMs, so every training step and every evaluation "
                      "runs the whole classifier (expect each perturbation to cost about its fine-tune's forward and backward passes)")
    if full_model:
        return None, "fast path off (--full-model): every training step and every evaluation runs all layers of the model"
    try:
        total = len(decoder_layers(skeleton))
    except InvalidInputError:
        return None, (f"fast path off: {type(skeleton).__name__} is not a Llama-family model (the cached tail needs model.model.layers, "
                      ".norm, .rotary_emb, .embed_tokens and lm_head), so every step runs all of it (expect several times the fast path's cost)")
    layers = DEFAULT_TRAIN_LAYERS if asked is None else asked
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= total:
        raise InvalidInputError(f"--train-layers must be a whole number from 1 to {total} (the model's decoder layers), not {layers!r}")
    if config.lora_settings() is None:
        raise InvalidInputError("the fast path trains LoRA adapters on the last --train-layers layers; drop --no-lora "
                                "(or `lora: null` in --config), or add --full-model for a full fine-tune of every layer")
    return layers, (f"fast path: LoRA on the last {layers} of {total} decoder layers; θ0's hidden states at layer {total - layers} "
        f"are computed once and cached under {cache_root() / 'hidden-states'}; the head runs at target tokens only")


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


# --- a recipe run, read back from its commits -------------------------------------------------------------
class RecipeModel:
    """θ0 of a recipe run and how its data rows become items the runner evaluates: what ``daunce attribute``
    and ``daunce add-queries`` need to put new examples under the run's kept adapters.

    Built from the run's ``factory_kwargs`` (kept in every commit's metadata): the model (its local copy),
    the tokenizer, the task and, on the fast path, the tail (``train_layers``) with new rows' hidden states
    computed by θ0's lower layers. Loading it takes ~1 s for SmolLM2-135M once the local copy exists.
    """

    def __init__(self, recipe: str, options: Mapping[str, Any], device: str = "cpu"):
        if recipe not in RECIPES:
            raise InvalidInputError(f"unknown recipe {recipe!r}; one of {', '.join(RECIPES)}")
        self.recipe, self.options = recipe, dict(options)
        self.fields = {k: v for k, v in self.options.items() if k not in ("model", "train", "queries", "train_layers")}
        model = self.options["model"]
        self.tokenizer = _load_tokenizer(model)
        self.config = _load_config(model)
        if recipe == "causal-lm":
            base_task: Task = CausalLMTask(pad_token_id=_pad_id(self.tokenizer), max_length=self.fields.get("max_length"),
                                           weight_decay=self.fields.get("weight_decay"))
        else:
            base_task = SequenceClassificationTask(pad_token_id=_pad_id(self.tokenizer), signal=self.fields.get("signal", "loss"),
                                                   weight_decay=self.fields.get("weight_decay"))
        self._base_task = base_task
        self.full = _load_model(recipe, model, _Parts(base_task, [], [], {}, {})).to(device)
        self.train_layers = self.options.get("train_layers")
        if self.train_layers:
            from daunce_store.perturb._cached import CachedCausalLMTask, LlamaTail

            self.model: torch.nn.Module = LlamaTail(self.full, int(self.train_layers))
            self.task: Task = CachedCausalLMTask(weight_decay=self.fields.get("weight_decay"))
        else:
            self.model, self.task = self.full, base_task
        self.device = device

    @staticmethod
    def run_of(commits: Sequence[Any], url: str) -> tuple[str, dict[str, Any]]:
        """(recipe, factory_kwargs) of a store's commits (all from one recipe run), or InvalidInputError saying
        why not; reads only the commit records."""
        factories = {str((c.metadata.get("config") or {}).get("factory")) for c in commits}
        recipes = [name for name, spec in RECIPES.items() if {spec} == factories]
        if not commits or not recipes:
            raise InvalidInputError(
                f"{url} was not made by a recipe (daunce perturb --recipe ...): its commits name "
                f"{', '.join(sorted(factories)) or 'no columns'}; evaluate new examples as a query set instead "
                f"(daunce add-queries {url} --query-set NAME=ids.txt --config run.yaml)"
            )
        options = [(c.metadata.get("config") or {}).get("factory_kwargs") or {} for c in commits]
        if any(o != options[0] for o in options[1:]):
            raise InvalidInputError(f"{url} holds columns of recipe runs with different settings (model, data or fields); "
                                    "new examples can only be evaluated under one run's models")
        return recipes[0], dict(options[0])

    def _as_run_fields(self, row: Mapping[str, Any]) -> Mapping[str, Any]:
        """A ``{prompt, completion}`` row in the run's own fields: renamed, or as a two-turn chat for a chat run."""
        prompt_field = self.fields.get("prompt_field", "prompt")
        if "prompt" not in row or "completion" not in row or prompt_field in row:
            return row
        if self._chat:
            return {**row, self.fields.get("messages_field", "messages"): [
                {"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]}
        return {**row, prompt_field: row["prompt"], self.fields.get("completion_field", "completion"): row["completion"]}

    @functools.cached_property
    def _chat(self) -> bool:
        """Was the run's train data chats (``messages``) rather than prompt/completion fields?"""
        first = read_data_file(self.options["train"], dataset_dir=True).rows[:1] if os.path.exists(self.options["train"]) else []
        return bool(first) and first[0].get(self.fields.get("messages_field", "messages")) is not None \
            and first[0].get(self.fields.get("prompt_field", "prompt")) is None

    def rows_items(self, rows: Sequence[Mapping[str, Any]], where: str) -> list[Any]:
        """Items of data rows (the run's field names: prompt/completion or messages; text/label), ready for
        :attr:`task` and :attr:`model`."""
        if not rows:
            raise InvalidInputError(f"{where} holds no rows")
        if self.recipe == "causal-lm":
            rows = [self._as_run_fields(r) for r in rows]
            names: tuple[str, ...] = ("prompt_field", "completion_field", "messages_field", "max_length")
            items = causal_lm_items(self.tokenizer, rows, where, **{k: v for k, v in self.fields.items() if k in names})
        else:
            names = ("text_field", "label_field", "max_length")
            items = classifier_items(self.tokenizer, self.config, rows, where, **{k: v for k, v in self.fields.items() if k in names})
        if not self.train_layers:
            return items
        from daunce_store.perturb._cached import cache_hidden_states

        assert isinstance(self._base_task, CausalLMTask)
        return cache_hidden_states(self.full, self._base_task, items, int(self.train_layers), device=self.device)
