"""Is θ0 trained for its data? One check, run by the runner for recipes and factories alike.

Daunce perturbs θ0 around the optimum of its training loss; a model that never learned the task (a
classifier with a fresh head, a language model with random weights or the wrong tokenizer) gives losses
whose covariances rank noise. The check reads θ0's per-example losses on the train data that the fine-tune
computes anyway (the reference terms of the IF / Fisher objective, on the convergence probe and the first
batches; black-box fine-tunes need one no-grad forward of their first batches), and warns once per model
and process, in one line, when their mean is near what a model that knows nothing scores:

- a classifier (:class:`ClassificationTask`, :class:`SequenceClassificationTask`) at or above
  ``UNTRAINED_CLASSIFIER`` · log C (C classes): log C is the cross-entropy of the uniform prediction, what a
  fresh head gives (its logits are ~0); a classifier trained on its data is far below it (the digits
  logistic regression: 0.16 against log 10 = 2.3);
- a language model (:class:`CausalLMTask`, :class:`CachedCausalLMTask`) at or above ``UNTRAINED_LM`` · log V
  (V tokens) mean token cross-entropy: random weights score log V (measured 6.01 against log 400 = 5.99 on
  the test's tiny Llama); a pretrained model that never saw the data already scores far less (SmolLM2-135M
  on chatterbot dialogues: 3.9 = 0.36 log V; after the LLM demo's LoRA fine-tune on them: 2.5 = 0.23 log V),
  and fine-tuning only lowers it. Above half of
  log V the model predicts the completions no better than a model that knows only how often each token
  occurs; a pretrained model that was not fine-tuned on the data is not flagged: Daunce finds poisoned rows
  with it (issue 22: P@8 1.00 with SmolLM2 as shipped).

Other tasks (a regression, a custom loss) have no scale to compare with and are not checked.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from daunce_store.errors import UntrainedModelWarning
from daunce_store.perturb._task import CausalLMTask, ClassificationTask, SequenceClassificationTask, Task

__all__ = ["UNTRAINED_CLASSIFIER", "UNTRAINED_LM", "Theta0Check", "untrained_verdict"]

UNTRAINED_CLASSIFIER = 0.9
UNTRAINED_LM = 0.5
#: θ0's losses on this many train examples decide (or all that the first perturbation trains on, if fewer).
SAMPLE = 64

_CHECKED: set[str] = set()  # model fingerprints already checked in this process


def _kind(task: Task) -> str | None:
    from daunce_store.perturb._cached import CachedCausalLMTask

    if isinstance(task, (CausalLMTask, CachedCausalLMTask)):
        return "lm"
    if isinstance(task, (ClassificationTask, SequenceClassificationTask)):
        return "classifier"
    return None


def untrained_verdict(kind: str, mean_loss: float, width: int) -> dict[str, Any]:
    """The check's record: θ0's mean train loss, the chance level log(width) (C classes or V tokens), the
    threshold, and ``untrained``."""
    chance = math.log(width) if width > 1 else 0.0
    fraction = UNTRAINED_CLASSIFIER if kind == "classifier" else UNTRAINED_LM
    return {"kind": kind, "mean_loss": float(mean_loss), "chance_loss": chance, "threshold": fraction * chance,
            "untrained": bool(width > 1 and mean_loss >= fraction * chance)}


class Theta0Check:
    """Collects θ0's per-example train losses from the reference outputs the runner computes, and decides
    once :data:`SAMPLE` examples (or the end of the first training loop) are in."""

    def __init__(self, task: Task, fingerprint: str):
        self.task = task
        self.kind = _kind(task)
        self.fingerprint = fingerprint
        self.active = self.kind is not None and fingerprint not in _CHECKED
        self._losses: list[torch.Tensor] = []
        self._width = 0
        self.record: dict[str, Any] | None = None

    def wrap(self, reference: Callable[[Any], torch.Tensor]) -> Callable[[Any], torch.Tensor]:
        """``reference`` that also records θ0's losses of the batches it sees, while the check needs them."""

        def recording(batch: Any) -> torch.Tensor:
            out = reference(batch)
            if self.active:
                self.observe(out, batch)
            return out

        return recording

    def observe(self, outputs0: torch.Tensor, batch: Any) -> None:
        with torch.no_grad():
            losses = self.task.per_example_loss(outputs0.detach().float(), batch)
        self._losses.append(losses.detach().float().cpu())
        self._width = int(outputs0.shape[-1])
        if sum(len(x) for x in self._losses) >= SAMPLE:
            self.decide()

    def decide(self) -> None:
        """Warn (once per model and process) when the mean loss seen says θ0 is untrained for the data."""
        if not self.active or not self._losses:
            return
        self.active = False
        _CHECKED.add(self.fingerprint)
        losses = torch.cat(self._losses)
        self.record = {**untrained_verdict(str(self.kind), float(losses.mean()), self._width), "examples": len(losses)}
        if self.record["untrained"]:
            warnings.warn(_message(self.record), UntrainedModelWarning, stacklevel=2)


def _message(rec: dict[str, Any]) -> str:
    if rec["kind"] == "classifier":
        what = (f"a classifier whose mean train cross-entropy under θ0 is {rec['mean_loss']:.3g}, at chance "
                f"(log C = {rec['chance_loss']:.3g} for {round(math.exp(rec['chance_loss']))} classes; a fresh or "
                "random head)")
        todo = ("fine-tune θ0 on this train data first (the head and, as usual, the model) and pass the trained "
                "model")
    else:
        what = (f"a language model whose mean token cross-entropy on the train completions under θ0 is "
                f"{rec['mean_loss']:.3g}, near chance (log V = {rec['chance_loss']:.3g}; a pretrained model scores "
                "well under half of it)")
        todo = "pass a pretrained or fine-tuned model, with its own tokenizer and chat template"
    return (f"θ0 looks untrained for this data: {what}, over {rec['examples']} train examples. Daunce's scores "
            f"assume θ0 fits its train data, so these columns would rank noise; {todo}, then run again.")
