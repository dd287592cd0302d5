"""The cached LLM path: run θ0's frozen lower layers once, perturb and evaluate only the last L layers.

Evaluating every example under every perturbation costs K × n × T forward tokens (DESIGN §8). When the
LoRA adapters sit on the last L decoder layers only, the input of decoder layer N − L is the same under
θ0 and under every perturbed model, so it is computed once (:func:`cache_hidden_states`) and each
perturbation runs only :class:`LlamaTail`: the last L layers, the final norm and the LM head, the head
applied only at the positions that predict a target token (SmolLM2-135M's 49152 × 576 head is its
largest matrix). :class:`CachedCausalLMTask` is the matching :class:`~daunce_store.perturb.Task`; the
runner needs nothing else: the model is the tail, the data the cached items.

    full model, LoRA on layers N−L..N−1   ==   LlamaTail(model, L) on cache_hidden_states(model, task, items, L)

(per-example losses equal to float32 rounding; ``tests/perturb/test_cached_lm.py``).

On-disk cache: one safetensors file per (lower layers' weights, L, dtype, token ids), under ``cache_dir``.
safetensors rather than ``torch.save``: loading it runs no pickle (a cache folder may be shared), and
the file is one flat tensor plus offsets.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from daunce_store.errors import InvalidInputError
from daunce_store.perturb._fingerprint import model_fingerprint
from daunce_store.perturb._progress import Reporter, current_reporter
from daunce_store.perturb._task import CausalLMTask, Task, _checked_weight_decay, _weight_decay_entry

__all__ = ["LlamaTail", "CachedCausalLMTask", "cache_hidden_states", "cached_lm", "decoder_layers"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder-layer list of a Llama-family causal LM (``model.model.layers``) or of a :class:`LlamaTail`."""
    if isinstance(model, LlamaTail):
        return model.layers
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not all(hasattr(inner, a) for a in ("norm", "rotary_emb", "embed_tokens")) \
            or not hasattr(model, "lm_head"):
        raise InvalidInputError(
            f"{type(model).__name__} is not a Llama-family causal LM (model.model.layers, .norm, .rotary_emb, "
            ".embed_tokens and model.lm_head); the cached path supports Llama, SmolLM2, Mistral, Qwen2-style models"
        )
    return layers


def _checked_layers(model: torch.nn.Module, num_layers: int) -> int:
    total = len(decoder_layers(model))
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= total:
        raise InvalidInputError(f"num_layers must be a whole number from 1 to {total} (the model's decoder layers), not {num_layers!r}")
    return total - num_layers


class LlamaTail(torch.nn.Module):
    """The last ``num_layers`` decoder layers of a Llama-family causal LM, its final norm and its LM head.

    The modules are the model's own (shared, not copied): LoRA adapters on the tail's layers are LoRA on
    the model's last L layers. ``forward(hidden, attention_mask, positions)`` takes the hidden states at
    the input of layer N − L (B, T, H), the padding mask (B, T) and the positions whose next token is a
    target (B, P), and returns the logits at those positions only, (B, P, V).
    """

    def __init__(self, model: torch.nn.Module, num_layers: int):
        super().__init__()
        first = _checked_layers(model, num_layers)
        inner: Any = model.model  # a transformers model's submodules: torch types them only as Tensor | Module
        self.config = inner.config
        self.first_layer = first
        self.layers = torch.nn.ModuleList(list(inner.layers)[first:])
        self.norm = inner.norm
        self.rotary_emb = inner.rotary_emb
        self.lm_head: Any = model.lm_head

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        hidden = hidden.to(self.lm_head.weight.dtype)
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        # The same mask and rotary embedding the full model builds for a right-padded batch (LlamaModel.forward).
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None,
                                  position_ids=position_ids)
        rotary = self.rotary_emb(hidden, position_ids=position_ids)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=position_ids)
        picked = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
        return self.lm_head(self.norm(picked))  # the head only where a target token is predicted


class CachedCausalLMTask(Task):
    """:class:`CausalLMTask` on cached hidden states: the same per-example loss (mean cross-entropy over the
    completion tokens), computed by a :class:`LlamaTail` from items of :func:`cache_hidden_states`.

    Items are dicts with ``hidden`` (T, H) and ``labels`` (T,) tensors (labels −100 on prompt tokens, as
    in CausalLMTask). Batches hold ``hidden`` (B, T, H) zero-padded, ``attention_mask`` (B, T),
    ``positions`` (B, P): the positions t with a target token at t + 1, and ``targets`` (B, P), −100 on
    padding. Outputs are the logits at ``positions`` only, (B, P, V).
    """

    def __init__(self, weight_decay: float | None = None):
        self.weight_decay = _checked_weight_decay(weight_decay)

    def outputs(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        return model(batch["hidden"], batch["attention_mask"], batch["positions"])

    def per_example_loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        targets = batch["targets"]
        ce = F.cross_entropy(outputs.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                             reduction="none").view(targets.shape)
        mask = (targets != -100).to(ce.dtype)
        return (ce * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # sequence_loss's value, fp32 accumulation

    def collate(self, items: Sequence[Any]) -> dict[str, torch.Tensor]:
        try:
            hidden = [it["hidden"] for it in items]
            labels = [torch.as_tensor(it["labels"], dtype=torch.long) for it in items]
        except (KeyError, TypeError) as e:
            raise InvalidInputError("CachedCausalLMTask items must be dicts with 'hidden' and 'labels' tensors; "
                                    "build them with cache_hidden_states(model, task, items, num_layers)") from e
        width = max(h.shape[0] for h in hidden)
        # Position t predicts token t + 1 (the shift of sequence_loss).
        wanted = [torch.nonzero(lab[1:] != -100).flatten() for lab in labels]
        p_width = max(1, max(len(w) for w in wanted))
        out_hidden = torch.zeros((len(items), width, hidden[0].shape[1]), dtype=hidden[0].dtype)
        attention = torch.zeros((len(items), width), dtype=torch.long)
        positions = torch.zeros((len(items), p_width), dtype=torch.long)
        targets = torch.full((len(items), p_width), -100, dtype=torch.long)
        for r, (h, lab, w) in enumerate(zip(hidden, labels, wanted)):
            out_hidden[r, : h.shape[0]] = h
            attention[r, : h.shape[0]] = 1
            positions[r, : len(w)] = w
            targets[r, : len(w)] = lab[w + 1]
        return {"hidden": out_hidden, "attention_mask": attention, "positions": positions, "targets": targets}

    def describe(self) -> dict[str, Any]:
        return {"task": type(self).__name__, "signal": "mean token cross-entropy over target tokens",
                **_weight_decay_entry(self)}


# --- the cache -------------------------------------------------------------------------------------------
def _trunk_fingerprint(model: torch.nn.Module, first: int) -> str:
    """sha256 of what the hidden states at layer ``first`` depend on: embeddings, layers < first, rotary buffers."""
    inner: Any = model.model  # as in LlamaTail
    parts = torch.nn.ModuleList([inner.embed_tokens, inner.rotary_emb, *list(inner.layers)[:first]])
    return model_fingerprint(parts)


def _cache_key(model: torch.nn.Module, first: int, rows: list[tuple[list[int], list[int]]], dtype: str) -> str:
    h = hashlib.sha256(f"daunce-cache-v1:{_trunk_fingerprint(model, first)}:{first}:{dtype}:".encode())
    for ids, labels in rows:
        h.update(np.asarray(ids, dtype=np.int64).tobytes() + b"|" + np.asarray(labels, dtype=np.int64).tobytes() + b";")
    return h.hexdigest()


class _Stop(Exception):
    pass


def _run_trunk(model: torch.nn.Module, first: int, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Hidden states at the input of decoder layer ``first``: the model's own forward, stopped there."""
    captured: list[torch.Tensor] = []

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append(args[0] if args else kwargs["hidden_states"])
        raise _Stop

    handle = decoder_layers(model)[first].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured[0]


def cache_hidden_states(
    model: torch.nn.Module,
    task: CausalLMTask,
    items: Sequence[Any],
    num_layers: int,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    dtype: str = "fp32",
    batch_size: int = 32,
    device: str = "cpu",
    reporter: Reporter | None = None,
    label: str = "cache",
) -> list[dict[str, torch.Tensor]]:
    """θ0's hidden states at the input of its last ``num_layers`` decoder layers, one item per CausalLMTask item.

    Returns items for :class:`CachedCausalLMTask`: ``{"hidden": (T, H) tensor, "labels": (T,) tensor}`` (T
    after ``task.max_length``). With ``cache_dir`` the result is kept in
    ``cache_dir/<sha256>.safetensors``, keyed to the weights below layer N − L, L, ``dtype`` and the token
    ids and labels, and read back on the next call (fine-tuning only the last L layers keeps it valid).
    ``dtype`` 'bf16' halves the memory; the tail computes in its own dtype either way.
    """
    if dtype not in _DTYPES:
        raise InvalidInputError(f"dtype must be one of {', '.join(_DTYPES)}, not {dtype!r}")
    first = _checked_layers(model, num_layers)
    if int(batch_size) < 1:
        raise InvalidInputError(f"batch_size must be >= 1, not {batch_size}")
    rows = [task._trim(item) for item in items]
    if not rows:
        return []
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{_cache_key(model, first, rows, dtype)}.safetensors"
        if path.exists():
            return _read_cache(path, rows)
    reporter = reporter or current_reporter()  # inside `daunce perturb`'s factory call: the run's own bars / lines
    dev = torch.device(device)
    model.to(dev)
    was = model.training
    model.eval()
    out: list[dict[str, torch.Tensor]] = []
    reporter.begin(label, f"θ0 layers 0..{first - 1}", math.ceil(len(rows) / batch_size))
    try:
        with torch.no_grad():
            for s in range(0, len(rows), batch_size):
                part = rows[s : s + batch_size]
                batch = task.collate([{"input_ids": ids, "labels": lab} for ids, lab in part])
                hidden = _run_trunk(model, first, {k: v.to(dev) for k, v in batch.items()})
                for r, (ids, lab) in enumerate(part):
                    out.append({"hidden": hidden[r, : len(ids)].to("cpu", _DTYPES[dtype]).clone(),
                                "labels": torch.as_tensor(lab, dtype=torch.long)})
                reporter.advance()
    finally:
        model.train(was)
    if path is not None:
        _write_cache(path, out)
    return out


def _write_cache(path: Path, items: list[dict[str, torch.Tensor]]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"hidden": torch.cat([it["hidden"] for it in items]).contiguous(),
               "lengths": torch.as_tensor([it["hidden"].shape[0] for it in items], dtype=torch.long)}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)  # readers see the whole file or none


def _read_cache(path: Path, rows: list[tuple[list[int], list[int]]]) -> list[dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    lengths = tensors["lengths"].tolist()
    if lengths != [len(ids) for ids, _ in rows]:
        raise InvalidInputError(f"the hidden-state cache {path} does not match the items; delete it and run again")
    parts = torch.split(tensors["hidden"], lengths)
    return [{"hidden": h, "labels": torch.as_tensor(lab, dtype=torch.long)} for h, (_, lab) in zip(parts, rows)]


def cached_lm(
    model: torch.nn.Module,
    task: CausalLMTask,
    train_items: Sequence[Any],
    query_items: Mapping[str, Sequence[Any]] | None,
    num_layers: int,
    **cache_kwargs: Any,
) -> tuple[LlamaTail, CachedCausalLMTask, list[dict[str, torch.Tensor]], dict[str, list[dict[str, torch.Tensor]]]]:
    """(tail, task, train, queries) for :func:`~daunce_store.perturb.run_worker`, from a full causal LM and
    CausalLMTask items: LoRA on the tail (``lora.target_modules`` as usual) is LoRA on the last ``num_layers``.

    Examples
    --------
    >>> tail, ctask, train, queries = cached_lm(model, CausalLMTask(pad), train_items, {"test": test_items}, 4)  # doctest: +SKIP
    >>> run_worker(store, tail, ctask, train, queries, PerturbConfig(lora={}, max_steps=32), until=64)  # doctest: +SKIP
    """
    train = cache_hidden_states(model, task, train_items, num_layers, label="cache train", **cache_kwargs)
    queries = {name: cache_hidden_states(model, task, items, num_layers, label=f"cache {name}", **cache_kwargs)
               for name, items in (query_items or {}).items()}
    return LlamaTail(model, num_layers), CachedCausalLMTask(weight_decay=task.weight_decay), train, queries
