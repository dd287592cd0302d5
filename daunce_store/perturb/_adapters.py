"""New examples under a store's kept adapters: the losses ``daunce attribute`` scores and ``add-queries`` stores.

A recipe run (``daunce perturb --recipe``) records the recipe in every commit and keeps each perturbation's
LoRA adapter (a few MB). :class:`KeptModels` loads θ0 (:class:`RecipeModel`) and the adapters once; then
:meth:`KeptModels.losses` puts new examples under the K perturbed models — K forward passes, no gradients,
LoRA injected once and only its weights swapped per column — and returns losses aligned with the store's
columns, which scoring ranks like any query's (``scoring.topk_losses``). A server keeps one KeptModels, so
a request pays only the forward passes (``bench/recipe_llm.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from daunce_store.errors import InvalidInputError
from daunce_store.perturb._config import PerturbConfig
from daunce_store.perturb._progress import NullReporter, Reporter
from daunce_store.perturb._recipes import RecipeModel
from daunce_store.perturb._runner import _prepared, evaluate_signal
from daunce_store.store import Snapshot, StoreLike

__all__ = ["KeptModels", "add_query_data", "losses_under_states"]

# New examples up to this many are evaluated on one torch thread: their GEMMs are too small to split, and on a
# busy machine threads waiting for each other cost more than the work (SmolLM2, K = 16, one example, 2 cores at
# load 3: 1.0 s on one thread against 3.2-4.5 s on two; bench/RESULTS.md "Recipe and attribute").
FEW_ROWS = 16


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` (None: unchanged) inside the block."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def losses_under_states(model: torch.nn.Module, task: Any, data: Any, config: PerturbConfig,
                        states: Sequence[tuple[str, Mapping[str, torch.Tensor]]],
                        reporter: Reporter | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """``(perturbation, losses of data)`` under each kept weight set, in order. LoRA adapters are injected once
    (``config``'s LoRA settings, the run's) and only their weights are swapped; full states are loaded into
    one working copy."""
    reporter = reporter or NullReporter()
    with _prepared(model, task, config, 0) as prep:
        for pid, state in states:
            if config.lora_settings() is None:
                prep.model.load_state_dict(state)
            else:
                from peft import set_peft_model_state_dict

                unexpected = getattr(set_peft_model_state_dict(prep.model, state), "unexpected_keys", None)
                if unexpected:
                    raise InvalidInputError(f"the adapter kept for {pid!r} does not fit the run's LoRA settings "
                                            f"(unexpected weights {unexpected[:3]})")
            yield pid, evaluate_signal(prep.model, task, data, config, reporter, pid)


def _run_config(commit: Any, device: str, eval_batch_size: int | None) -> PerturbConfig:
    cfg = PerturbConfig.from_dict(commit.metadata["config"]).replace(device=device)
    return cfg.replace(eval_batch_size=eval_batch_size) if eval_batch_size else cfg


class KeptModels:
    """θ0 of a recipe store and the adapters its committed columns kept, loaded once.

    >>> kept = KeptModels(store)                                            # doctest: +SKIP
    >>> losses = kept.losses([{"prompt": "Hi", "completion": "Hello"}])      # (1, K), columns kept.slots
    """

    recipe: RecipeModel
    device: str

    def __init__(self, store: StoreLike, *, snapshot: Snapshot | None = None, device: str = "cpu", eval_batch_size: int | None = None,
                 reuse: KeptModels | None = None):
        snap = snapshot or store.snapshot()
        commits = list(snap.commits)
        if not commits:
            raise InvalidInputError(f"{store.url} has no committed columns yet; run `daunce perturb {store.url} --recipe ...` first")
        recipe, options = RecipeModel.run_of(commits, store.url)  # the records only: refusals come before any loading
        kept = [c for c in commits if c.metadata.get("adapter")]
        if not kept:
            raise InvalidInputError(
                f"{store.url} kept no adapters (its run had keep_adapters: false), so new examples cannot be put under "
                f"its {len(commits)} perturbed models; rerun `daunce perturb` into a new store (recipes keep LoRA adapters by default)"
            )
        # `reuse`: an earlier KeptModels of this store (fewer columns then): its loaded model and adapters stay.
        same = reuse is not None and reuse.recipe.options == options and reuse.device == device
        self.recipe = reuse.recipe if same and reuse is not None else RecipeModel(recipe, options, device)
        self.store, self.snapshot, self.device, self.eval_batch_size = store, snap, device, eval_batch_size
        self.commits = kept
        self.config = _run_config(kept[0], device, eval_batch_size)
        self._states: dict[str, Mapping[str, torch.Tensor]] = dict(reuse._states) if same and reuse is not None else {}

    @property
    def slots(self) -> list[int]:
        return [c.slot for c in self.commits]

    @property
    def perturbations(self) -> list[str]:
        return [c.perturbation for c in self.commits]

    def _state(self, pid: str) -> Mapping[str, torch.Tensor]:
        if pid not in self._states:
            from safetensors.torch import load

            data = self.store.load_adapter(pid)
            if data is None:
                raise InvalidInputError(f"{self.store.url}: the adapter of {pid!r} named by its commit is missing; "
                                        "run `daunce verify` on the store")
            self._states[pid] = load(data)
        return self._states[pid]

    def items(self, rows: Sequence[Mapping[str, Any]], where: str = "the new examples") -> list[Any]:
        return self.recipe.rows_items(rows, where)

    def losses(self, rows: Sequence[Mapping[str, Any]] | None = None, *, items: list[Any] | None = None,
               where: str = "the new examples", reporter: Reporter | None = None) -> np.ndarray:
        """(len(rows), K) float32 losses of data rows (the run's fields) under the kept adapters, columns in
        the order of :attr:`slots`; or of ``items`` already built by :meth:`items`."""
        few = len(items if items is not None else rows or []) <= FEW_ROWS
        with _torch_threads(1 if few else None):
            data = items if items is not None else self.items(rows or [], where)
            states = [(pid, self._state(pid)) for pid in self.perturbations]
            out = np.empty((len(data), len(states)), np.float32)
            for j, (_, values) in enumerate(losses_under_states(self.recipe.model, self.recipe.task, data, self.config, states, reporter)):
                out[:, j] = values
        return out


def add_query_data(store: StoreLike, sets: Mapping[str, Any], *, device: str = "cpu",
                   reporter: Reporter | None = None) -> dict[str, tuple[int, int]]:
    """Add query sets from data files (``{name: file}``, the run's fields) to a recipe store and fill their losses
    under every kept adapter. Everything is read, checked and evaluated before the first write, so a refusal
    (not a recipe store, no adapters kept, a bad row, a name in use) registers nothing. Returns
    ``{name: (examples, columns filled)}``."""
    from daunce_store.store import read_data_file, validate_ids, validate_losses
    from daunce_store.store._records import check_query_set_name

    have = store.query_sets()
    for name in sets:
        check_query_set_name(name)
        if name in have:
            raise InvalidInputError(f"{store.url} already has a query set {name!r}; pick a new name")
    kept = KeptModels(store, device=device)
    computed = {}
    for name, path in sets.items():
        data = read_data_file(path, dataset_dir=True)
        validate_ids(data.ids, what=f"ids of {path}", check_normalization=False)
        losses = kept.losses(data.rows, where=str(path), reporter=reporter)
        for j, pid in enumerate(kept.perturbations):
            validate_losses(losses[:, j], len(data.ids), what=f"query set {name!r} under {pid}")
        computed[name] = (data.ids, losses)
    for name, (ids, losses) in computed.items():  # every check and forward pass done: now the writes
        store.add_query_set(name, ids)
        for j, pid in enumerate(kept.perturbations):
            store.append_query_losses(pid, name, losses[:, j])
    return {name: (len(ids), len(kept.perturbations)) for name, (ids, _) in computed.items()}
