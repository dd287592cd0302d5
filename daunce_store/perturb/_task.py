"""The user extension point: how to get outputs, per-example losses and the recorded signal from a batch."""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from daunce_store.errors import InvalidInputError

__all__ = ["Task", "ClassificationTask", "SequenceClassificationTask", "CausalLMTask"]


class Task(abc.ABC):
    """What the runner needs to know about a model and its data (like kronfluence's ``Task``).

    Implement :meth:`outputs` and :meth:`per_example_loss`; override :meth:`signal` to record something
    other than the loss, :meth:`trainable_parameters` to fine-tune a subset of the weights, and
    :meth:`collate` when items are not stackable by ``torch.utils.data.default_collate``. Set
    :attr:`weight_decay` to the L2 strength the target was trained with.

    The loss must be a function of the outputs alone (``per_example_loss(outputs, batch)``): the
    perturbation term is written in output space, ``<f_theta(x) - f_theta0(x), dl/df at theta0>``, so no
    per-example parameter gradient is ever formed.

    Examples
    --------
    >>> import torch
    >>> class Regression(Task):
    ...     def outputs(self, model, batch):
    ...         return model(batch[0])
    ...     def per_example_loss(self, outputs, batch):
    ...         return ((outputs.squeeze(-1) - batch[1]) ** 2)
    >>> task = Regression()
    >>> model = torch.nn.Linear(3, 1)
    >>> batch = (torch.zeros(4, 3), torch.ones(4))
    >>> task.per_example_loss(task.outputs(model, batch), batch).shape
    torch.Size([4])
    """

    #: lambda of the regulariser theta0 was trained with (it minimised mean loss + lambda/2 ||theta||^2).
    #: The runner adds the same term to every perturbed objective (unless ``PerturbConfig.weight_decay``
    #: overrides it), so theta0 stays the optimum of the unperturbed objective. None means 0.
    weight_decay: float | None = None

    def outputs(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """Return the model outputs f (e.g. logits) for ``batch``: a tensor whose first axis is the batch."""
        raise NotImplementedError(
            f"{type(self).__name__}.outputs(model, batch) is not implemented: return the model's outputs "
            "(logits), one row per example, e.g. `return model(batch[0])`"
        )

    def per_example_loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        """Return the training loss of every example in ``batch``, shape (B,), from ``outputs`` alone."""
        raise NotImplementedError(
            f"{type(self).__name__}.per_example_loss(outputs, batch) is not implemented: return a (B,) tensor, "
            "e.g. `F.cross_entropy(outputs, batch[1], reduction='none')`"
        )

    def signal(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        """The value recorded per example in the store, shape (B,). Default: the per-example loss."""
        return self.per_example_loss(outputs, batch)

    def trainable_parameters(self, model: torch.nn.Module) -> Iterable[torch.nn.Parameter]:
        """Parameters the fine-tune updates. Default: every parameter that requires grad."""
        return [p for p in model.parameters() if p.requires_grad]

    def collate(self, items: Sequence[Any]) -> Any:
        """Build a batch from dataset items. Default: ``torch.utils.data.default_collate``."""
        return torch.utils.data.default_collate(list(items))

    def describe(self) -> dict[str, Any]:
        """A JSON-able description kept in each commit's metadata."""
        return {"task": type(self).__name__, **_weight_decay_entry(self)}


def _checked_weight_decay(weight_decay: float | None) -> float | None:
    if weight_decay is None:
        return None
    value = float(weight_decay)
    if not value >= 0.0:  # also refuses NaN
        raise InvalidInputError(f"weight_decay {weight_decay!r} must be >= 0 (the L2 strength the target was trained with)")
    return value


def _weight_decay_entry(task: Task) -> dict[str, Any]:
    wd = getattr(task, "weight_decay", None)
    return {} if wd is None else {"weight_decay": float(wd)}


class ClassificationTask(Task):
    """Classifiers: batches are ``(x, y)`` tensors, the model maps x to logits, the loss is cross-entropy.

    Parameters
    ----------
    signal
        ``"loss"`` (cross-entropy) or ``"margin"``: records ``-margin = -(logit_y - logsumexp of the other
        logits)``, so that, like a loss, larger means worse.
    weight_decay
        lambda of the L2 term the target was trained with (mean loss + lambda/2 ||theta||^2); the perturbed
        fine-tunes keep it (:attr:`Task.weight_decay`). None: 0.
    """

    def __init__(self, signal: str = "loss", weight_decay: float | None = None):
        if signal not in ("loss", "margin"):
            raise InvalidInputError(f"ClassificationTask signal must be 'loss' or 'margin', not {signal!r}")
        self.signal_kind = signal
        self.weight_decay = _checked_weight_decay(weight_decay)

    def outputs(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        return model(batch[0])

    def per_example_loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        return F.cross_entropy(outputs.float(), batch[1].long(), reduction="none")

    def signal(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        if self.signal_kind == "loss":
            return self.per_example_loss(outputs, batch)
        return -margin(outputs.float(), batch[1].long())

    def describe(self) -> dict[str, Any]:
        return {"task": type(self).__name__, "signal": self.signal_kind, **_weight_decay_entry(self)}


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """logit of the true class minus logsumexp of the other logits, per example."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return true - torch.logsumexp(others, dim=1)


class SequenceClassificationTask(Task):
    """Hugging Face sequence classifiers (``AutoModelForSequenceClassification``): items are dicts with
    ``input_ids`` and ``label``; the loss is the cross-entropy of the logits, the signal the loss or
    ``-margin`` (as :class:`ClassificationTask`)."""

    def __init__(self, pad_token_id: int = 0, signal: str = "loss", weight_decay: float | None = None):
        if signal not in ("loss", "margin"):
            raise InvalidInputError(f"signal must be 'loss' or 'margin', not {signal!r}")
        self.pad_token_id = int(pad_token_id)
        self.signal_kind = signal
        self.weight_decay = _checked_weight_decay(weight_decay)

    def outputs(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def per_example_loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        return F.cross_entropy(outputs.float(), batch["labels"], reduction="none")

    def signal(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        if self.signal_kind == "loss":
            return self.per_example_loss(outputs, batch)
        return -margin(outputs.float(), batch["labels"])

    def collate(self, items: Sequence[Any]) -> dict[str, torch.Tensor]:
        width = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(items), width), dtype=torch.long)
        for r, item in enumerate(items):  # right padding, masked
            input_ids[r, : len(item["input_ids"])] = torch.as_tensor(item["input_ids"], dtype=torch.long)
            attention[r, : len(item["input_ids"])] = 1
        labels = torch.as_tensor([item["label"] for item in items], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}

    def describe(self) -> dict[str, Any]:
        return {"task": type(self).__name__, "signal": self.signal_kind, **_weight_decay_entry(self)}


class CausalLMTask(Task):
    """Hugging Face causal LMs: per-example mean token cross-entropy over the target tokens.

    Batches are dicts with ``input_ids``, ``attention_mask`` and ``labels`` (B, T), labels ``-100`` on
    prompt and padding tokens; the loss of a sequence is the mean over its target tokens of the
    cross-entropy of predicting token t+1 from tokens <= t (the usual shift). Dataset items are dicts
    with ``input_ids`` and ``labels`` lists (see :meth:`encode`); :meth:`collate` pads them.
    ``weight_decay`` is the L2 strength the model was trained with (:attr:`Task.weight_decay`); with
    LoRA the runner applies it to the trainable (adapter) parameters.

    Examples
    --------
    >>> task = CausalLMTask(pad_token_id=0)
    >>> batch = task.collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5, 8], "labels": [-100, 8]}])
    >>> batch["labels"].tolist()
    [[-100, 6, 7], [-100, 8, -100]]
    """

    def __init__(self, pad_token_id: int = 0, max_length: int | None = None, weight_decay: float | None = None):
        self.pad_token_id = int(pad_token_id)
        self.max_length = max_length
        self.weight_decay = _checked_weight_decay(weight_decay)

    def outputs(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def per_example_loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        return sequence_loss(outputs, batch["labels"])

    def collate(self, items: Sequence[Any]) -> dict[str, torch.Tensor]:
        rows = [self._trim(item) for item in items]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (ids, lab) in enumerate(rows):
            input_ids[r, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            labels[r, : len(lab)] = torch.as_tensor(lab, dtype=torch.long)
            attention[r, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}

    def _trim(self, item: Any) -> tuple[list[int], list[int]]:
        try:
            ids = list(map(int, item["input_ids"]))
            labels = list(map(int, item.get("labels", ids)))
        except (KeyError, TypeError) as e:
            raise InvalidInputError(
                "CausalLMTask items must be dicts with 'input_ids' (and 'labels', -100 on prompt tokens); "
                "build them with CausalLMTask.encode(tokenizer, prompt, completion)"
            ) from e
        if len(ids) != len(labels) or not ids:
            raise InvalidInputError(f"an item has {len(ids)} input ids and {len(labels)} labels; they must match")
        if self.max_length is not None:
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        return ids, labels

    @staticmethod
    def encode(tokenizer: Any, prompt: str, completion: str, max_length: int | None = None) -> dict[str, list[int]]:
        """Tokenize a (prompt, completion) pair into an item whose loss covers the completion only.

        ``tokenizer`` is a Hugging Face tokenizer (``transformers``) or a ``tokenizers.Tokenizer``.
        """
        p, c = _token_ids(tokenizer, prompt), _token_ids(tokenizer, completion)
        ids = p + c
        labels = [-100] * len(p) + c
        if max_length is not None:
            ids, labels = ids[:max_length], labels[:max_length]
        return {"input_ids": ids, "labels": labels}

    def describe(self) -> dict[str, Any]:
        return {"task": type(self).__name__, "signal": "mean token cross-entropy over target tokens",
                **_weight_decay_entry(self)}


def _token_ids(tokenizer: Any, text: str) -> list[int]:
    if not text:
        return []
    out = tokenizer.encode(text, add_special_tokens=False)  # both HF tokenizer kinds take this flag
    return list(out.ids) if hasattr(out, "ids") else list(out)


def sequence_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each sequence over its target tokens (labels != -100), shape (B,).

    Position t predicts token t+1. A sequence with no target token gets loss 0.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    token_ce = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(shift_labels.shape)
    mask = (shift_labels != -100).to(token_ce.dtype)
    return (token_ce * mask).sum(1) / mask.sum(1).clamp(min=1.0)
