"""Run perturbations: draw D_k and xi_k, fine-tune a copy of theta0 with the Daunce objective, evaluate
the signal of every train and query example, append the column to the store.

D_k and xi_k are those of :class:`daunce_store.store.PerturbationDraw` (store seed, k, ratio, objective,
rho, gamma), recorded in every commit under ``metadata["draw"]`` so that scoring can regenerate the weights
of any row block. The batch order and the torch seed (LoRA initialization, dropout) come from
``SeedSequence([store seed, k])``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import math
import platform
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from daunce_store.errors import AlreadyCommittedError, ConvergenceWarning, DivergedError, InvalidInputError, LeaseError
from daunce_store.perturb._config import CONVERGENCE_THRESHOLD, PROBE_FRACTION, PerturbConfig, lora_layer_count
from daunce_store.perturb._fingerprint import model_fingerprint
from daunce_store.perturb._objective import LOSS_ONLY, batch_objective, l2_center, l2_penalty
from daunce_store.perturb._progress import NullReporter, Reporter, duration
from daunce_store.perturb._task import Task
from daunce_store.perturb._theta0 import Theta0Check
from daunce_store.store import Commit, Lease, PerturbationDraw, StoreLike, perturbation_id, validate_losses

__all__ = [
    "run_perturbation",
    "draw_perturbation",
    "evaluate_signal",
    "fill_query_losses",
    "finetune_losses",
    "perturbation_draw",
    "resolve_weight_decay",
]



def _seed_sequence(store_seed: int, k: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(store_seed), int(k)])


def _torch_seed(store_seed: int, k: int) -> int:
    return int(_seed_sequence(store_seed, k).generate_state(1, dtype=np.uint64)[0] % (2**63 - 1))


def perturbation_draw(store_seed: int, k: int, config: PerturbConfig) -> PerturbationDraw:
    """The :class:`~daunce_store.store.PerturbationDraw` the runner uses for perturbation k under ``config``."""
    return PerturbationDraw(int(store_seed), int(k), float(config.ratio), config.objective, float(config.rho),
                            float(config.gamma))


def draw_perturbation(
    store_seed: int, k: int, n: int, ratio: float, *, objective: str = "if", rho: float = 1.0, gamma: float = 1.0
) -> tuple[np.ndarray, np.ndarray, int]:
    """Perturbation k's random subset D_k (ascending indices), xi_k ~ U(0, 1) for every train example, and
    the torch seed of its fine-tune; all from (store seed, k) only, exactly as the runner draws them.

    D_k is Poisson-sampled (each example independently with probability ``ratio``, so |D_k| varies around
    ratio * n); the weights are ``PerturbationDraw(store_seed, k, ratio, objective, rho, gamma).c(0, n)``.
    When appending such a column by hand, record ``{"draw": draw.to_metadata()}`` in its metadata so the
    Nyström measure knows its weights.

    >>> subset, xi, seed = draw_perturbation(0, 3, 100, 0.3)
    >>> bool((subset == PerturbationDraw(0, 3, 0.3).subset(100)).all()), xi.shape
    (True, (100,))
    """
    draw = PerturbationDraw(int(store_seed), int(k), float(ratio), objective, float(rho), float(gamma))
    return draw.subset(int(n)), draw.xi(0, int(n)), _torch_seed(store_seed, k)


def resolve_weight_decay(config: PerturbConfig, task: Task) -> float:
    """lambda of the L2 term added to the perturbed objective: the config's value if set, else the task's
    (:attr:`Task.weight_decay`), else 0."""
    if config.weight_decay is not None:
        return float(config.weight_decay)
    wd = getattr(task, "weight_decay", None)
    if wd is None:
        return 0.0
    if not float(wd) >= 0.0:
        raise InvalidInputError(f"{type(task).__name__}.weight_decay is {wd!r}; it must be >= 0")
    return float(wd)


# --- batches -----------------------------------------------------------------------------------------
def _fetch(data: Any, idx: np.ndarray, task: Task) -> Any:
    if isinstance(data, torch.utils.data.TensorDataset) and type(task).collate is Task.collate:
        t = torch.as_tensor(idx, dtype=torch.long)
        return tuple(x[t] for x in data.tensors)  # what default_collate of the items gives, without the loop
    return task.collate([data[int(i)] for i in idx])


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _autocast(config: PerturbConfig, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if config.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _batches(order: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for s in range(0, len(order), size):
        yield order[s : s + size]


# --- evaluation ----------------------------------------------------------------------------------------
def evaluate_signal(
    model: torch.nn.Module,
    task: Task,
    data: Any,
    config: PerturbConfig,
    reporter: Reporter | None = None,
    label: str = "",
) -> np.ndarray:
    """``task.signal`` of every item of ``data`` under ``model``, in order, batched and without grad."""
    device = torch.device(config.device)
    reporter = reporter or NullReporter()
    n = len(data)
    out = np.empty(n, dtype=np.float32)
    was_training = model.training
    model.eval()
    reporter.begin(label, "eval rows", n)
    try:
        with torch.no_grad(), _autocast(config, device):
            for idx in _batches(np.arange(n), config.eval_batch_size):
                batch = _to_device(_fetch(data, idx, task), device)
                values = task.signal(task.outputs(model, batch), batch)
                if values.shape != (len(idx),):
                    raise InvalidInputError(
                        f"{type(task).__name__}.signal returned shape {tuple(values.shape)} for a batch of "
                        f"{len(idx)}; it must return one value per example"
                    )
                out[idx] = values.float().cpu().numpy()
                reporter.advance(len(idx))
    finally:
        model.train(was_training)
    return out


# --- the model being fine-tuned --------------------------------------------------------------------------
class _Prepared:
    """The model to fine-tune, theta0's outputs, and how to save the trained weights."""

    def __init__(self, model: torch.nn.Module, reference: Callable[[Any], torch.Tensor], state: Callable[[], dict[str, torch.Tensor]]):
        self.model = model
        self.reference = reference
        self.state = state


@contextlib.contextmanager
def _prepared(model: torch.nn.Module, task: Task, config: PerturbConfig, torch_seed: int) -> Iterator[_Prepared]:
    lora = config.lora_settings()
    if lora is None:
        # Full fine-tuning: a copy is trained, the caller's model stays theta0 (frozen, eval mode).
        work = copy.deepcopy(model)
        work.train()

        def reference(batch: Any) -> torch.Tensor:
            was = model.training
            model.eval()
            try:
                return task.outputs(model, batch)
            finally:
                model.train(was)

        yield _Prepared(work, reference, lambda: {k: v.detach() for k, v in work.state_dict().items()})
        return

    # LoRA: inject fresh adapters into the caller's model, train them, take them out again. theta0's
    # outputs are the same model with the adapters disabled, so one copy of the weights is enough.
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    torch.manual_seed(torch_seed)  # the adapters' initialization is part of perturbation k
    peft_config = LoraConfig(
        r=int(lora["r"]), lora_alpha=int(lora["alpha"]), lora_dropout=float(lora["dropout"]),
        target_modules=list(lora["target_modules"]) if not isinstance(lora["target_modules"], str) else lora["target_modules"],
        bias="none", **_lora_layers(model, lora.get("layers")),
    )
    try:
        with warnings.catch_warnings():
            # peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` alias on every call: a
            # FutureWarning about peft's code, which no user setting changes.
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
            peft_model = get_peft_model(model, peft_config)
    except ValueError as e:
        raise InvalidInputError(
            f"could not add LoRA adapters ({e}); set lora.target_modules to the names of the model's "
            "linear layers, e.g. ['gate_proj', 'up_proj', 'down_proj'] for Llama-style models"
        ) from e
    peft_model.train()

    def reference_lora(batch: Any) -> torch.Tensor:
        was = peft_model.training
        peft_model.eval()
        try:
            with peft_model.disable_adapter():
                return task.outputs(peft_model, batch)
        finally:
            peft_model.train(was)

    try:
        yield _Prepared(peft_model, reference_lora, lambda: get_peft_model_state_dict(peft_model))
    finally:
        peft_model.unload()  # removes the adapter layers, restoring the original modules
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, p.requires_grad))
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            if attr in getattr(model, "__dict__", {}):
                delattr(model, attr)


# Names of the decoder-layer list in common model families (Llama/Mistral/Qwen "layers", GPT-2 "h"), as peft's.
_LAYER_LISTS = ("layers", "h", "blocks", "layer")


def _lora_layers(model: torch.nn.Module, spec: Any) -> dict[str, Any]:
    """peft's ``layers_to_transform``/``layers_pattern`` for ``lora.layers`` = L: the last L decoder layers."""
    if spec is None:
        return {}
    count = lora_layer_count(spec)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in _LAYER_LISTS:
            total = len(module)
            if count is None or count > total:
                raise InvalidInputError(f"lora.layers {spec!r} asks for more than the model's {total} decoder layers")
            return {"layers_to_transform": list(range(total - count, total)), "layers_pattern": name.rsplit(".", 1)[-1]}
    raise InvalidInputError(f"lora.layers is set but {type(model).__name__} has no decoder-layer list named one of "
                            f"{', '.join(_LAYER_LISTS)}; set lora.layers to null")


def _optimizer(params: list[torch.nn.Parameter], config: PerturbConfig) -> torch.optim.Optimizer:
    # No decay in the optimizer: the target's L2 term is part of the objective (l2_penalty), so it enters
    # the gradient exactly as it did when theta0 was trained (AdamW's decoupled decay would not).
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=0.0)
    return torch.optim.SGD(params, lr=config.lr, weight_decay=0.0, momentum=0.9)


def _schedule(config: PerturbConfig, total: int) -> Callable[[int], float]:
    warmup = int(config.warmup_ratio * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if config.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if config.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _training_order(subset: np.ndarray, config: PerturbConfig, rng: np.random.Generator) -> list[np.ndarray]:
    """The batches of the fine-tune: epochs over D_k, or max_steps batches cycling over D_k."""
    batches: list[np.ndarray] = []
    target = config.max_steps
    while True:
        order = rng.permutation(subset)
        for b in _batches(order, config.batch_size):
            batches.append(b)
            if target is not None and len(batches) == target:
                return batches
        if target is None and len(batches) >= config.epochs * math.ceil(len(subset) / config.batch_size):
            return batches




# --- the convergence check -----------------------------------------------------------------------------------
def _convergence_probe(subset: np.ndarray, config: PerturbConfig, steps: int) -> np.ndarray:
    """The probe: a fixed prefix of D_k (the same before and after the fine-tune), at most
    ``config.convergence_probe`` examples and at most PROBE_FRACTION of the examples trained on."""
    if int(config.convergence_probe) <= 0:
        return subset[:0]
    cap = max(1, math.ceil(PROBE_FRACTION * steps * config.batch_size))
    return subset[: min(len(subset), int(config.convergence_probe), cap)]


def _objective_grad_norm(prep: _Prepared, task: Task, train_data: Any, probe: np.ndarray, c_all: torch.Tensor,
                         params: list[torch.nn.Parameter], weight_decay: float, config: PerturbConfig,
                         device: torch.device, center: list[torch.Tensor] | None = None) -> float:
    """||grad|| of the perturbed objective at the current weights: the mean over the ``probe`` examples (in
    eval mode, so dropout does not add noise) plus the L2 term (centred on ``center``, as the fine-tune's),
    accumulated over chunks of the training batch size (a backward of that size is known to fit in memory). Leaves ``.grad`` untouched."""
    model = prep.model
    was = model.training
    model.eval()
    total = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
    try:
        for idx in _batches(probe, config.batch_size):
            batch = _to_device(_fetch(train_data, idx, task), device)
            c = c_all[torch.as_tensor(idx, dtype=torch.long)].to(device)
            with _autocast(config, device):
                obj = batch_objective(task, model, batch, c, config.objective, config.gamma, prep.reference)
            # Each chunk's objective is a mean over its examples: weight it so the sum is the probe's mean.
            grads = torch.autograd.grad(obj * (len(idx) / len(probe)), params, allow_unused=True)
            for t, g in zip(total, grads):
                if g is not None:
                    t += g.float()
        for i, (t, p) in enumerate(zip(total, params)):  # d/dp of lambda/2 ||p - p0||^2
            t += float(weight_decay) * (p.detach().float() - (0.0 if center is None else center[i].float()))
    finally:
        model.train(was)
    return float(torch.sqrt(sum(((t * t).sum() for t in total), torch.zeros(()))).cpu())  # a tensor start: 0 + x is x


def _convergence_record(start: float, end: float, probe_size: int, seconds: float) -> dict[str, Any]:
    ratio = end / start if start > 0 else (0.0 if end == 0 else None)
    return {"grad_norm_start": start, "grad_norm_end": end, "ratio": ratio, "probe_size": int(probe_size),
            "threshold": CONVERGENCE_THRESHOLD, "seconds": round(seconds, 4)}


# The settings that make columns one run for the convergence verdict (not the device, batch sizes of
# evaluation, leases or K).
_RUN_KEYS = ("objective", "ratio", "rho", "gamma", "epochs", "max_steps", "batch_size", "lr", "weight_decay",
             "l2_center", "optimizer", "scheduler", "warmup_ratio", "lora", "convergence_probe")


def _warn_if_unconverged(store: StoreLike, commit: Any, config: PerturbConfig) -> None:
    """Warn once per run when its fine-tunes typically stop far from the perturbed optimum.

    The verdict is the run's, not one column's: the median ratio over the store's columns made with the same
    settings, this one included. The ratio of one minibatch fine-tune is noisy (settings that converge, the
    digits demo's, give 0.35-0.72 over 64 columns, median 0.46), so one column in the tail says nothing about
    the settings, while too few steps or too low a learning rate move every column. It warns when this
    column moves the median above CONVERGENCE_THRESHOLD, so once per run, even across resumes.

    A fixed-budget fine-tune, shorter than one pass over D_k (``max_steps`` x ``batch_size`` < |D_k|: the
    LLM runs, a few steps of LoRA from a pretrained model), is not held to it: the probe's gradient at the
    end compares with theta0's only when the fine-tune was meant to approach the perturbed optimum; for a
    short run the ratio is recorded, and advice to train to the optimum would be advice for another method.
    """
    conv = commit.metadata.get("convergence")
    if not conv or conv.get("ratio") is None or conv["ratio"] <= CONVERGENCE_THRESHOLD:
        return  # a column under the line cannot move the median above it
    steps = int(commit.metadata.get("steps") or 0)
    if config.max_steps is not None and steps * config.batch_size < int(commit.metadata.get("subset_size") or 0):
        return
    mine = {key: config.to_dict()[key] for key in _RUN_KEYS}
    ratios, before = [], []
    for c in store.commits():
        rec, cfg = c.metadata.get("convergence") or {}, c.metadata.get("config") or {}
        cfg = {"l2_center": "zero", **cfg}  # columns made before l2_center existed: all were zero-centred
        if rec.get("ratio") is None or any(cfg.get(key) != value for key, value in mine.items()):
            continue
        ratios.append(rec["ratio"])
        if c.perturbation != commit.perturbation:
            before.append(rec["ratio"])
    if not ratios or float(np.median(ratios)) <= CONVERGENCE_THRESHOLD:
        return
    if before and float(np.median(before)) > CONVERGENCE_THRESHOLD:
        return  # said when the median crossed the line
    warnings.warn(
        f"perturbation {commit.perturbation}: this run's fine-tunes stop far from the perturbed optimum that "
        f"Daunce's scores assume: the gradient norm of the perturbed objective fell only to "
        f"{float(np.median(ratios)):.3g} of its value at theta0 (median over {len(ratios)} column"
        f"{'s' if len(ratios) > 1 else ''} with these settings; threshold {CONVERGENCE_THRESHOLD}; {steps} steps "
        f"of {config.batch_size}). {_advice(config)}; each column's ratio is in its metadata['convergence'].",
        ConvergenceWarning,
        stacklevel=3,
    )


def _advice(config: PerturbConfig) -> str:
    """What to change, relative to this run's own settings."""
    if config.max_steps is not None:
        longer = f"max_steps {config.max_steps} -> {2 * config.max_steps}"
    else:
        longer = f"epochs {config.epochs} -> {2 * config.epochs}"
    faster = f"lr {config.lr:g} -> {3 * config.lr:g}"
    if config.optimizer == "sgd":
        faster += ", or optimizer adam"
    if config.scheduler == "constant":
        faster += " (with scheduler cosine, so the last steps settle)"
    return f"Train longer ({longer}) or raise the learning rate ({faster})"


class _Heartbeat:
    """Renews a lease from a background thread while the perturbation trains and evaluates."""

    def __init__(self, store: StoreLike, lease: Lease | None, ttl: float):
        self.lease = lease
        self.lost: Exception | None = None
        self._store, self._ttl = store, ttl
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(lease,), name=f"lease-{lease.perturbation}", daemon=True) if lease else None

    def _run(self, lease: Lease) -> None:
        while not self._stop.wait(self._ttl / 3.0):
            try:
                lease = self.lease = self._store.renew(lease, ttl=self._ttl)
            except LeaseError as e:
                self.lost = e
                return
            except Exception:  # a transient storage error: try again at the next beat
                continue

    def __enter__(self) -> _Heartbeat:
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _check_sizes(store: StoreLike, train_data: Any, query_data: Mapping[str, Any]) -> None:
    if len(train_data) != store.n_train:
        raise InvalidInputError(
            f"train_data has {len(train_data)} examples but the store has {store.n_train} train ids; "
            "pass the training set in the store's id order"
        )
    sets = store.query_sets()
    for name, data in query_data.items():
        if name not in sets:
            raise InvalidInputError(
                f"query set {name!r} is not in the store (it has: {', '.join(sets) or 'none'}); "
                "add it with `daunce add-queries` first"
            )
        if len(data) != sets[name]:
            raise InvalidInputError(f"query set {name!r} has {len(data)} examples but the store has {sets[name]} ids")


# --- one perturbation -----------------------------------------------------------------------------------
def run_perturbation(
    store: StoreLike,
    k: int,
    model: torch.nn.Module,
    task: Task,
    train_data: Any,
    query_data: Mapping[str, Any] | None,
    config: PerturbConfig,
    *,
    lease: Lease | None = None,
    reporter: Reporter | None = None,
) -> Commit:
    """Run perturbation ``k`` and append its column to ``store``; returns the :class:`~daunce_store.Commit`.

    Seeds come from ``(store.seed, k)``: the subset D_k, the weights xi_k, the batch order and the
    initialization of LoRA adapters, so re-running k gives the same column (on the same hardware and
    thread count). ``model`` is theta0: it is moved to ``config.device`` and otherwise left unchanged (LoRA
    adapters are added and removed in place; full fine-tuning trains a copy). With ``lease`` the lease is
    renewed while training, and given back if the perturbation fails.

    Examples
    --------
    >>> commit = run_perturbation(store, 0, model, ClassificationTask(), train, {"test": test},
    ...                           PerturbConfig(epochs=2, lr=1e-2))          # doctest: +SKIP
    """
    query_data = dict(query_data or {})
    _check_sizes(store, train_data, query_data)
    reporter = reporter or NullReporter()
    pid = perturbation_id(k)
    device = torch.device(config.device)
    model.to(device)
    fingerprint = model_fingerprint(model)
    draw = perturbation_draw(store.seed, k, config)
    subset = draw.subset(len(train_data))
    c_all = torch.as_tensor(draw.c(0, len(train_data)), dtype=torch.float32)
    torch_seed = _torch_seed(store.seed, k)
    rng = np.random.default_rng(_seed_sequence(store.seed, k).spawn(1)[0])
    order = _training_order(subset, config, rng)
    weight_decay = resolve_weight_decay(config, task)

    beat = _Heartbeat(store, lease, config.lease_seconds)
    try:
        commit = _train_evaluate_append(_Run(
            store=store, k=k, pid=pid, model=model, task=task, train_data=train_data, query_data=query_data, config=config,
            beat=beat, reporter=reporter, draw=draw, subset=subset, c_all=c_all, order=order, torch_seed=torch_seed,
            weight_decay=weight_decay, fingerprint=fingerprint, device=device,
        ))
    except BaseException as e:
        # Give the id back at once (another worker may take it) unless the lease is already someone else's.
        if beat.lease is not None and not isinstance(e, (LeaseError, AlreadyCommittedError)):
            with contextlib.suppress(Exception):
                store.release(beat.lease)
        raise
    _warn_if_unconverged(store, commit, config)
    return commit


@dataclasses.dataclass(frozen=True)
class _Run:
    """One perturbation's fine-tune, everything decided before it starts (:func:`run_perturbation`)."""

    store: StoreLike
    k: int
    pid: str
    model: torch.nn.Module  # theta0, on ``device``
    task: Task
    train_data: Any
    query_data: dict[str, Any]
    config: PerturbConfig
    beat: _Heartbeat  # renews the lease while training
    reporter: Reporter
    draw: PerturbationDraw
    subset: np.ndarray  # D_k
    c_all: torch.Tensor  # the weights c_i of every train row
    order: list[np.ndarray]  # the batches, in training order
    torch_seed: int
    weight_decay: float
    fingerprint: str  # theta0's model_fingerprint
    device: torch.device


def _train_evaluate_append(run: _Run) -> Commit:
    probe = _convergence_probe(run.subset, run.config, len(run.order))
    convergence = None
    n_eval = len(run.train_data) + sum(len(d) for d in run.query_data.values())
    theta0 = Theta0Check(run.task, run.fingerprint)
    with run.beat:
        signal0 = theta0_signal(run.model, run.task, run.train_data, run.config, run.reporter)  # the loss-change record's reference
        torch.manual_seed(run.torch_seed)
        t0 = time.perf_counter()
        with _prepared(run.model, run.task, run.config, run.torch_seed) as prep:
            if theta0.active:  # theta0's losses of the batches the objective sees anyway decide the check
                prep.reference = theta0.wrap(prep.reference)
            params = list(run.task.trainable_parameters(prep.model))
            if not params:
                raise InvalidInputError("the task's trainable_parameters(model) is empty; nothing to fine-tune")
            center = l2_center(params, run.config.l2_center)  # theta0's values, before the first step ('theta0')
            opt = _optimizer(params, run.config)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(run.config, len(run.order)))
            t_probe = time.perf_counter()
            if len(probe):
                norm_start = _objective_grad_norm(prep, run.task, run.train_data, probe, run.c_all, params, run.weight_decay,
                                                  run.config, run.device, center)
            t_probe = time.perf_counter() - t_probe
            run.reporter.begin(run.pid, "train steps", len(run.order))
            losses_seen = []
            t_loop = t_first = time.perf_counter()
            for step, idx in enumerate(run.order, 1):
                if run.beat.lost is not None:
                    raise run.beat.lost
                batch = _to_device(_fetch(run.train_data, idx, run.task), run.device)
                c = run.c_all[torch.as_tensor(idx, dtype=torch.long)].to(run.device)
                with _autocast(run.config, run.device):
                    if theta0.active and run.config.objective in LOSS_ONLY:  # its objective needs no reference
                        with torch.no_grad():
                            prep.reference(batch)
                    obj = batch_objective(run.task, prep.model, batch, c, run.config.objective, run.config.gamma, prep.reference)
                obj = obj + l2_penalty(params, run.weight_decay, center)  # the target's regularizer (or its Bregman form)
                if not torch.isfinite(obj):
                    raise DivergedError(
                        f"perturbation {run.pid}: the objective became {obj.item()} at step {step} of {len(run.order)}: the "
                        "fine-tune diverged; lower the learning rate (lr) or rho and run it again"
                    )
                opt.zero_grad(set_to_none=True)
                obj.backward()
                opt.step()
                sched.step()
                losses_seen.append(float(obj.detach()))
                run.reporter.advance()
                if step == 1:
                    t_first = time.perf_counter()  # the first step pays one-time costs (allocation, kernel choice)
                if step == min(1 + _TIMED_STEPS, len(run.order)):
                    timed = (step - 1, time.perf_counter() - t_first) if step > 1 else (1, time.perf_counter() - t_loop)
                    run.reporter.estimate(*_first_estimate(run.pid, *timed, t_probe, len(run.order), n_eval, run.config), measured=False)
            theta0.decide()  # fewer than its sample in the whole fine-tune: decide on what it saw
            if len(probe):
                t_end = time.perf_counter()
                norm_end = _objective_grad_norm(prep, run.task, run.train_data, probe, run.c_all, params, run.weight_decay,
                                                run.config, run.device, center)
                convergence = _convergence_record(norm_start, norm_end, len(probe), t_probe + time.perf_counter() - t_end)
            t_train = time.perf_counter() - t0 - (convergence["seconds"] if convergence else 0.0)
            t1 = time.perf_counter()
            train_signal = evaluate_signal(prep.model, run.task, run.train_data, run.config, run.reporter, f"{run.pid} train")
            query_signal = {
                name: evaluate_signal(prep.model, run.task, data, run.config, run.reporter, f"{run.pid} {name}")
                for name, data in run.query_data.items()
            }
            t_eval = time.perf_counter() - t1
            # The store's own rule (validate_losses: NaN, inf, |loss| > MAX_ABS_LOSS), before anything of this
            # perturbation is written, its weights included: a fine-tune that diverged is refused here.
            validate_losses(train_signal, len(run.train_data), what=f"perturbation {run.pid}: train losses")
            for name, values in query_signal.items():
                validate_losses(values, len(values), what=f"perturbation {run.pid}: query set {name!r} losses")
            adapter = None
            if run.config.keep_adapters:
                adapter = _save_state(run.store, run.pid, prep.state())
        if run.beat.lost is not None:
            raise run.beat.lost
    took = time.perf_counter() - t0
    run.reporter.estimate(took, f"measured: perturbation {run.pid} took {duration(took)}", measured=True)
    metadata = {
        "source": "daunce_store.perturb",
        "perturbation_index": int(run.k),
        "seed": [run.store.seed, int(run.k)],
        "torch_seed": run.torch_seed,
        "draw": run.draw.to_metadata(),
        "objective": run.config.objective,
        "weight_decay": run.weight_decay,
        "l2_center": run.config.l2_center,
        "train_change": train_change(train_signal, signal0),
        "config": {key: v for key, v in run.config.to_dict().items()},
        "task": run.task.describe(),
        "subset_size": int(len(run.subset)),
        "steps": len(run.order),
        "final_objective": losses_seen[-1] if losses_seen else None,
        "convergence": convergence,
        "theta0_check": theta0.record,
        "model_sha256": run.fingerprint,
        "train_ids_sha256": hashlib.sha256("\n".join(run.store.train_ids.tolist()).encode()).hexdigest(),
        "train_seconds": round(t_train, 4),
        "eval_seconds": round(t_eval, 4),
        "eval_examples_per_second": round(n_eval / max(t_eval, 1e-9), 1),
        "device": str(run.device),
        "torch_version": torch.__version__,
        "host": platform.node(),
        "adapter": adapter,
    }
    return run.store.append(run.pid, train_signal, query_signal, metadata=metadata, lease=run.beat.lease)


# theta0's train signal, for the loss-change record of each commit: one evaluation pass per worker, not one
# per perturbation (the last (model, task, data) evaluated; strong references keep their ids from being reused).
_THETA0_SIGNAL: list[Any] = []


def theta0_signal(model: torch.nn.Module, task: Task, train_data: Any, config: PerturbConfig,
                  reporter: Reporter | None = None) -> np.ndarray:
    """``task.signal`` of every train example under theta0 (``model`` as given, no adapters), remembered for the
    next perturbation of the same model, task, data, device and precision."""
    key = (model_fingerprint(model), str(torch.device(config.device)), config.precision)
    if _THETA0_SIGNAL and _THETA0_SIGNAL[0] is model and _THETA0_SIGNAL[1] is task and _THETA0_SIGNAL[2] is train_data \
            and _THETA0_SIGNAL[3] == key:
        return _THETA0_SIGNAL[4]
    values = evaluate_signal(model, task, train_data, config, reporter, "θ0 train")
    _THETA0_SIGNAL[:] = [model, task, train_data, key, values]
    return values


def train_change(signal: np.ndarray, signal0: np.ndarray) -> dict[str, Any]:
    """A commit's ``metadata["train_change"]``: its train column's change from theta0's, d_k = L_k - L0, as
    ``sum_sq`` = ||d_k||^2 and ``mean`` = mean_i d_ik over ``rows`` rows (float64). With every column's
    ``sum_sq`` the share of the loss change common to all columns (the drift) follows from the stored columns
    alone (:func:`daunce_store.scoring.drift_share`)."""
    d = np.asarray(signal, np.float64) - np.asarray(signal0, np.float64)
    return {"sum_sq": float(np.dot(d, d)), "mean": float(d.mean()) if len(d) else 0.0, "rows": int(len(d))}


_TIMED_STEPS = 3  # the first estimate of a perturbation's time: from this many training steps, after the first


def _first_estimate(pid: str, steps: int, seconds: float, t_probe: float, total_steps: int, n_eval: int,
                    config: PerturbConfig) -> tuple[float, str]:
    """A perturbation's time from its first training steps: the steps, the convergence probe twice (measured
    at the start), and the evaluation of every row at the cost of one forward pass per example, guessed as a
    quarter of a training step's per-example cost (IF/Fisher: theta0's forward, the forward and the backward,
    ~2 forwards; black-box: a third)."""
    per_step = seconds / steps
    forwards = 3 if config.objective in LOSS_ONLY else 4
    guess = 2 * t_probe + per_step * total_steps + n_eval * per_step / (config.batch_size * forwards)
    basis = (f"from {steps} timed training step{'s' if steps > 1 else ''} of {pid} ({duration(per_step)} each); "
             f"the evaluation of {n_eval:,} rows guessed from them; refined after the first perturbation")
    return guess, basis


# --- keeping the trained weights -----------------------------------------------------------------------------
def _save_state(store: StoreLike, perturbation: str, state: Mapping[str, torch.Tensor]) -> str:
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    return store.save_adapter(perturbation, save(tensors))


def _load_state(store: StoreLike, perturbation: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    data = store.load_adapter(perturbation)
    if data is None:
        raise InvalidInputError(f"{store.url} kept no weights for {perturbation!r}; run perturb with keep_adapters: true")
    return load(data)


def fill_query_losses(
    store: StoreLike,
    model: torch.nn.Module,
    task: Task,
    name: str,
    query_data: Any,
    config: PerturbConfig,
    *,
    reporter: Reporter | None = None,
) -> list[str]:
    """Evaluate query set ``name`` under every committed perturbation whose weights the store kept,
    and add the losses to those columns (:meth:`LossStore.append_query_losses`). Returns the ids filled."""
    _check_sizes(store, [None] * store.n_train, {name: query_data})
    reporter = reporter or NullReporter()
    device = torch.device(config.device)
    model.to(device)
    snap = store.snapshot()
    have = set(snap.query_slots.get(name, ()))
    done = []
    for commit in snap.commits:
        if commit.slot in have or not commit.metadata.get("adapter"):
            continue
        cfg = PerturbConfig.from_dict(commit.metadata["config"]).replace(device=config.device, eval_batch_size=config.eval_batch_size)
        state = _load_state(store, commit.perturbation)
        with _prepared(model, task, cfg, 0) as prep:
            if cfg.lora is None:
                prep.model.load_state_dict(state)
            else:
                from peft import set_peft_model_state_dict

                set_peft_model_state_dict(prep.model, state)
            values = evaluate_signal(prep.model, task, query_data, cfg, reporter, f"{commit.perturbation} {name}")
        try:
            store.append_query_losses(commit.perturbation, name, values)
        except AlreadyCommittedError:
            continue
        done.append(commit.perturbation)
    return done


def finetune_losses(
    model: Any, task: Any, train_data: Any, keep: np.ndarray, query_data: Any, config: Any, seed: int,
    weight_decay: float,
) -> np.ndarray:
    """Fine-tune a copy of ``model`` (θ0; LoRA adapters when the config has ``lora``) on the train examples
    ``keep`` with the config's settings, minimizing mean loss + weight_decay/2·‖θ‖², and return each query
    example's loss under the result. ``model`` itself is left as it was.

    The fine-tune is the runner's (same batches, optimizer, schedule and LoRA handling) with the blackbox
    objective: ``PerturbConfig.epochs`` passes over ``keep`` (or ``max_steps`` batches)."""
    # The runner's own pieces, so that this fine-tune (`daunce check-removal`'s retraining) is the one
    # `daunce perturb` runs, minus the perturbation term.
    device = torch.device(config.device)
    model.to(device)
    order = _training_order(np.asarray(keep, dtype=np.int64), config, np.random.default_rng([int(seed), 1]))
    torch.manual_seed(int(seed))
    with _prepared(model, task, config, int(seed)) as prep:
        params = list(task.trainable_parameters(prep.model))
        opt = _optimizer(params, config)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(config, len(order)))
        prep.model.train()
        for idx in order:
            batch = _to_device(_fetch(train_data, idx, task), device)
            with _autocast(config, device):
                loss = task.per_example_loss(task.outputs(prep.model, batch), batch).mean()
            loss = loss + l2_penalty(params, weight_decay)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        prep.model.eval()
        out = np.empty(len(query_data), np.float64)
        with torch.no_grad(), _autocast(config, device):
            for s in range(0, len(query_data), config.eval_batch_size):
                idx = np.arange(s, min(s + config.eval_batch_size, len(query_data)))
                batch = _to_device(_fetch(query_data, idx, task), device)
                out[idx] = task.per_example_loss(task.outputs(prep.model, batch), batch).double().cpu().numpy()
    return out
