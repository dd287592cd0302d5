"""The perturbation config: one dataclass, saved into every commit's metadata, loadable from YAML.

This module does not import torch, so a config can be read and validated from the scoring install.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from daunce_store._constants import L2_CENTERS
from daunce_store.errors import InvalidInputError

__all__ = ["PerturbConfig", "DEFAULT_LORA", "CONVERGENCE_THRESHOLD", "PROBE_FRACTION"]

# The convergence check: a run whose fine-tunes' gradient norm of the perturbed objective (on the probe of
# D_k) ends, in the median over its columns, above this fraction of its value at theta0 raises a
# ConvergenceWarning (once; see _warn_if_unconverged in _runner.py). Calibrated on digits
# (1437 train examples, theta0 fitted with weight decay 1e-3 and fine-tuned with it, IF objective, K = 32
# per setting, r = 0.3 and 1.0): the settings the evaluations pick on LDS (adam, lr 3e-3, 20 epochs, batch
# 64) end at ratios 0.34-0.62 (median 0.45) on logistic regression and 0.13-0.66 (median 0.22-0.53) on the
# tanh MLP; the old defaults (adamw, lr 1e-3, 3 epochs, batch 32) at 0.69-1.08 (median 0.86-0.89) and
# 0.47-1.18 (median 0.75). A full-batch fine-tune run to the optimum reaches ~0.002. Minibatch Adam leaves
# gradient noise, so the line is drawn against gross under-training, not at a tight tolerance.
CONVERGENCE_THRESHOLD = 0.7
# The probe holds at most this fraction of the examples the fine-tune trains on (steps x batch size), so
# its two forward+backward passes cost at most ~20 % of the training. Uncapped, the 7-example probe of
# the SmolLM2-135M LoRA test (2 steps of 4) took 76 s against 30 s of training on 2 CPU cores.
PROBE_FRACTION = 0.1
# YAML aliases (`*name`) repeat their anchor's whole subtree, so nested ones grow exponentially: a
# "billion laughs" config of nine short lines expands to ~10^9 nodes, and walking them (validating, saving
# the config into each commit) took 1.5 GB and did not end; with this bound it is refused in ~2 ms. A real config shares a few small blocks (a LoRA
# section, tens of nodes), so aliases may add at most this many nodes beyond those the file itself holds.
MAX_YAML_ALIAS_NODES = 10_000

# The reference LLM setting of the Daunce paper: LoRA on the MLP projections.
DEFAULT_LORA: dict[str, Any] = {
    "r": 64,
    "alpha": 16,
    "dropout": 0.05,
    "target_modules": ["gate_proj", "up_proj", "down_proj"],  # Llama-style MLP; GPT-2: ["c_fc", "mlp.c_proj"]
    # Which decoder layers get adapters: null (all), L or "last-L" (the last L; with the cached path,
    # daunce_store.perturb.cached_lm, the lower layers then run once instead of K times).
    "layers": None,
}

_OBJECTIVES = ("if", "fisher", "blackbox", "reweighted")
_OPTIMIZERS = ("adamw", "adam", "sgd")
_SCHEDULERS = ("cosine", "linear", "constant")
_PRECISIONS = ("fp32", "bf16")


def _field(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (dict, list)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


@dataclasses.dataclass
class PerturbConfig:
    """How each perturbation k fine-tunes the target model (DESIGN §1). Field help: ``PerturbConfig.help()``.

    Examples
    --------
    >>> cfg = PerturbConfig(objective="fisher", ratio=0.5, epochs=3, lr=1e-2)
    >>> cfg.to_dict()["objective"]
    'fisher'
    >>> PerturbConfig.from_dict(cfg.to_dict()) == cfg
    True
    """

    objective: str = _field("if", "Objective form: 'if' (influence-function form, c = 1 + rho(2 xi - 1)), "
                            "'fisher' (squared loss change, c = rho(2 xi - 1)), 'blackbox' (plain fine-tuning on D_k) or "
                            "'reweighted' (the loss reweighted by 2 - c, c as for 'if': curvature H + lambda, the full "
                            "Hessian; gamma 1, l2_center zero; docs/objectives.md).")
    # r = 1.0 (every example perturbed in every column) had the best worst-case LDS over three testbeds at
    # every K from 16 to 256, with the nystrom measure, and costs less per column than it gains
    # (bench/RESULTS.md, "Accuracy"); the paper's 0.3 was slightly better for backdoor retrieval only.
    ratio: float = _field(1.0, "Probability r that a training example is in the random subset D_k (Poisson sampling; "
                          "1.0: every example, each with its own random weight).")
    rho: float = _field(1.0, "Strength rho of the random per-example weights c_ik.")
    gamma: float = _field(1.0, "Weight gamma of the loss-change term.")
    # Defaults: the small-model fine-tune the digits evaluations pick on LDS (adam, lr 3e-3, 20 epochs, batch
    # 64, no warm-up), which passes the convergence check where the old 3 epochs at lr 1e-3 mostly fail it
    # (CONVERGENCE_THRESHOLD's note). LLM runs set max_steps, lr ~3e-4 and warmup_ratio ~0.03 instead.
    epochs: int = _field(20, "Passes over D_k (ignored when max_steps is set). Small models need ~20 (with lr "
                         "3e-3, batch 64) to approach the perturbed optimum; a few epochs leave a ConvergenceWarning.")
    max_steps: int | None = _field(None, "Optimizer steps per perturbation (cycling over D_k); overrides epochs. "
                                   "The usual setting for LLMs.")
    batch_size: int = _field(64, "Training batch size.")
    lr: float = _field(3e-3, "Peak learning rate (LLM fine-tunes with LoRA: ~3e-4).")
    weight_decay: float | None = _field(None, "lambda of the target's own L2 regulariser (theta0 minimised mean loss "
                                        "+ lambda/2 ||theta||^2), added to every perturbed objective as lambda/2 "
                                        "||p||^2 over the trainable parameters; the optimizer itself decays nothing. "
                                        "null takes it from the task (Task.weight_decay, e.g. ClassificationTask("
                                        "weight_decay=...)), 0 if the task does not say; a number overrides the task's.")
    l2_center: str = _field("zero", "Where the L2 term of the perturbed objective is centred: 'zero', lambda/2 ||theta||^2 "
                            "(the target's own regulariser), or 'theta0', lambda/2 ||theta - theta0||^2 (theta0: the "
                            "trainable parameters' values when the fine-tune starts; for LoRA, the adapters' "
                            "initialisation), whose unperturbed optimum is theta0 itself, so the fine-tunes do not "
                            "all drift toward one shrunk point (docs/objectives.md). Same curvature, H + "
                            "lambda; recorded in each commit's metadata['l2_center'].")
    optimizer: str = _field("adam", "'adam', 'adamw' (the same here: the optimizer decays nothing, see "
                            "weight_decay) or 'sgd' (momentum 0.9).")
    scheduler: str = _field("cosine", "Learning-rate schedule after warm-up: 'cosine', 'linear' or 'constant'.")
    warmup_ratio: float = _field(0.0, "Fraction of the steps spent in linear warm-up (LLM fine-tunes: ~0.03).")
    eval_batch_size: int = _field(256, "Batch size of the no-grad evaluation passes over train and query sets.")
    convergence_probe: int = _field(1024, "Largest convergence probe: the first examples of D_k (at most this many, "
                                    "and at most a tenth of steps x batch_size), on which the gradient norm of the "
                                    "perturbed objective (L2 term included) is measured at theta0 and after the "
                                    "fine-tune. The ratio end/start goes into the commit's metadata['convergence']; "
                                    "a ConvergenceWarning is raised once when the median ratio of the run's columns "
                                    "rises above CONVERGENCE_THRESHOLD (not for runs shorter than one pass over D_k). "
                                    "Costs two forward+backward passes over the probe (<= ~20% of the training); "
                                    "0 disables it.")
    device: str = _field("cpu", "Torch device: 'cpu', 'cuda', 'cuda:1', ...")
    precision: str = _field("fp32", "'fp32', or 'bf16' (autocast; meant for GPUs).")
    lora: dict[str, Any] | None = _field(None, "LoRA adapter settings (keys r, alpha, dropout, target_modules, layers: "
                                         "null for every decoder layer, L or 'last-L' for the last L only); "
                                         "None fine-tunes all trainable parameters. `lora: {}` gives the reference "
                                         "r=64, alpha=16, dropout=0.05 on the MLP projections.")
    keep_adapters: bool = _field(False, "Keep each perturbation's trained weights (the LoRA adapter, or the full "
                                 "state) in the store under _daunce/adapters/, so a query set added later can be "
                                 "evaluated under the same K models.")
    lease_seconds: float = _field(600.0, "Lease time-to-live; a worker renews it while it trains, and another "
                                  "worker takes over the perturbation of a worker silent for this long (at once when that "
                                  "worker's process on the same host is gone).")
    num_perturbations: int | None = _field(None, "K: workers stop when perturbations 0..K-1 are committed "
                                           "(`daunce perturb --until` overrides).")
    factory: str | None = _field(None, "For `daunce perturb`: 'package.module:function' or 'path/file.py:function' "
                                 "returning (model, task, train_data, query_data).")
    factory_kwargs: dict[str, Any] = _field({}, "Keyword arguments passed to the factory.")

    def __post_init__(self) -> None:
        self.validate()

    # --- validation -------------------------------------------------------------------------------
    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise InvalidInputError(f"perturbation config: {msg}")

        # Types first, so every check below compares values of the type it expects.
        for f in dataclasses.fields(self):
            problem = _type_problem(f.type, getattr(self, f.name))
            if problem:
                bad(f"{f.name} {problem} (see PerturbConfig.help())")
        if self.objective not in _OBJECTIVES:
            bad(f"objective {self.objective!r} is not one of {', '.join(_OBJECTIVES)}")
        if not 0.0 < float(self.ratio) <= 1.0:
            bad(f"ratio {self.ratio} must be in (0, 1]")
        if self.max_steps is not None and int(self.max_steps) < 1:
            bad(f"max_steps {self.max_steps} must be >= 1 (or null to use epochs)")
        if int(self.epochs) < 1 and self.max_steps is None:
            bad(f"epochs {self.epochs} must be >= 1")
        for name in ("batch_size", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                bad(f"{name} must be >= 1")
        if float(self.lr) <= 0:
            bad(f"lr {self.lr} must be > 0")
        if self.weight_decay is not None and not float(self.weight_decay) >= 0.0:
            bad(f"weight_decay {self.weight_decay} must be >= 0 (or null to take it from the task)")
        if self.l2_center not in L2_CENTERS:
            bad(f"l2_center {self.l2_center!r} is not one of {', '.join(L2_CENTERS)}")
        if self.l2_center == "theta0" and self.objective in ("blackbox", "reweighted"):
            # Fine-tuning the loss itself has theta0 as its optimum with lambda/2 ||theta||^2 already (theta0 minimised
            # it); centred on theta0, its gradient there would be mean g = -lambda theta0: a drift (docs/objectives.md).
            bad(f"l2_center 'theta0' is for the 'if' and 'fisher' objectives; the {self.objective!r} fine-tune keeps the "
                "target's own lambda/2 ||theta||^2 (l2_center: zero), whose optimum is theta0 already")
        if self.objective == "reweighted" and float(self.gamma) != 1.0:
            # mean (2 - c) l has no loss-change term to weight: gamma would only scale the loss (and move the optimum).
            bad(f"gamma {self.gamma} has no meaning for the 'reweighted' objective (its loss weights are 2 - c); leave it at 1")
        if int(self.convergence_probe) < 0:
            bad(f"convergence_probe {self.convergence_probe} must be >= 0 (0 disables the convergence check)")
        if self.optimizer not in _OPTIMIZERS:
            bad(f"optimizer {self.optimizer!r} is not one of {', '.join(_OPTIMIZERS)}")
        if self.scheduler not in _SCHEDULERS:
            bad(f"scheduler {self.scheduler!r} is not one of {', '.join(_SCHEDULERS)}")
        if not 0.0 <= float(self.warmup_ratio) < 1.0:
            bad(f"warmup_ratio {self.warmup_ratio} must be in [0, 1)")
        if self.precision not in _PRECISIONS:
            bad(f"precision {self.precision!r} is not one of {', '.join(_PRECISIONS)}")
        if self.lora is not None:
            if not isinstance(self.lora, dict):
                bad("lora must be a mapping (r, alpha, dropout, target_modules) or null")
            unknown = set(self.lora) - set(DEFAULT_LORA)
            if unknown:
                bad(f"unknown lora keys {sorted(map(str, unknown))}; known: {sorted(DEFAULT_LORA)}")
            for key, expected in (("r", "int"), ("alpha", "float"), ("dropout", "float")):
                problem = _type_problem(expected, self.lora.get(key, DEFAULT_LORA[key]))
                if problem:
                    bad(f"lora.{key} {problem}")
            r, dropout = self.lora.get("r", DEFAULT_LORA["r"]), self.lora.get("dropout", DEFAULT_LORA["dropout"])
            if r < 1 or not 0.0 <= dropout < 1.0:
                bad(f"lora.r must be >= 1 and lora.dropout in [0, 1), not r={r}, dropout={dropout}")
            layers = self.lora.get("layers")
            if layers is not None and lora_layer_count(layers) is None:
                bad(f"lora.layers must be null (every layer), a whole number L >= 1 or 'last-L', not {layers!r}")
            modules = self.lora.get("target_modules", DEFAULT_LORA["target_modules"])
            if not isinstance(modules, str) and not (isinstance(modules, (list, tuple)) and modules and all(isinstance(m, str) for m in modules)):
                bad(f"lora.target_modules must be a module name or a non-empty list of them, not {modules!r}")
        if float(self.lease_seconds) <= 0:
            bad("lease_seconds must be > 0")
        if self.num_perturbations is not None and int(self.num_perturbations) < 1:
            bad("num_perturbations must be >= 1")
        if self.factory is not None and (not isinstance(self.factory, str) or ":" not in self.factory):
            bad(f"factory {self.factory!r} must look like 'package.module:function' or 'file.py:function'")
        if not isinstance(self.factory_kwargs, dict):
            bad("factory_kwargs must be a mapping")
        try:  # the config is saved in every commit record
            json.dumps(self.to_dict())
        except (TypeError, ValueError) as e:
            bad(f"every value must be JSON-serializable (it is saved with each column): {e}")

    def lora_settings(self) -> dict[str, Any] | None:
        """The LoRA settings with the reference defaults filled in, or None for full fine-tuning."""
        return None if self.lora is None else {**DEFAULT_LORA, **self.lora}

    # --- (de)serialization ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PerturbConfig:
        if not isinstance(data, dict):
            raise InvalidInputError(f"perturbation config must be a mapping, not {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in set(data) - set(fields))
        if unknown:
            raise InvalidInputError(
                f"perturbation config: unknown keys {unknown}; known keys: {sorted(fields)} "
                "(see PerturbConfig.help())"
            )
        # YAML 1.1 (PyYAML) reads an exponent without a dot, `lr: 3e-4`, as a string: take it as the number meant.
        data = {k: _yaml_float(v) if fields[k].type.startswith("float") else v for k, v in data.items()}
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> PerturbConfig:
        """Read a config from a YAML file (safe loading, aliases bounded by ``MAX_YAML_ALIAS_NODES``; keys are
        the field names)."""
        data = read_yaml(path)
        return cls.from_dict({} if data is None else data)

    def replace(self, **changes: Any) -> PerturbConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def help(cls) -> str:
        """One line per field: name, default and what it means."""
        lines = []
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            lines.append(f"{f.name} (default {default!r}): {f.metadata.get('help', '')}")
        return "\n".join(lines)


def read_yaml(path: str | os.PathLike[str]) -> Any:
    """A config file's YAML (``yaml.safe_load``), or InvalidInputError naming the file: unreadable, not
    UTF-8, not YAML, or aliases that expand past ``MAX_YAML_ALIAS_NODES`` (or into themselves)."""
    import yaml

    name = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            loader = yaml.SafeLoader(f)
            try:
                node = loader.get_single_node()  # the node graph: an alias is one shared node, not a copy
                if node is None:
                    return None
                extra = _alias_expansion(node)
                if extra is None:
                    raise InvalidInputError(f"config file {name!r}: a YAML alias (*name) refers to a node that holds it, "
                                            "a recursive structure; a config cannot hold one")
                if extra > MAX_YAML_ALIAS_NODES:
                    raise InvalidInputError(
                        f"config file {name!r}: its YAML aliases (*name) expand to {extra:,} more nodes than the file "
                        f"holds, past the limit of {MAX_YAML_ALIAS_NODES:,} (a 'billion laughs' document?); write the "
                        "values out, or share smaller blocks"
                    )
                return loader.construct_document(node)
            finally:
                loader.dispose()
    except FileNotFoundError as e:
        raise InvalidInputError(f"config file {name!r} does not exist") from e
    except IsADirectoryError as e:
        raise InvalidInputError(f"config file {name!r} is a directory; give the YAML file itself") from e
    except OSError as e:
        raise InvalidInputError(f"config file {name!r} cannot be read: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise InvalidInputError(f"config file {name!r} is not UTF-8 text (byte {e.start}: {e.reason})") from e
    except yaml.YAMLError as e:
        raise InvalidInputError(f"config file {name!r} is not valid YAML: {e}") from e
    except RecursionError:  # PyYAML composes nested blocks recursively
        raise InvalidInputError(f"config file {name!r} nests its YAML too deeply to read; a config is a few levels deep") from None


def _alias_expansion(root: Any) -> int | None:
    """How many nodes aliases add when the YAML node graph under ``root`` is expanded into a tree (its
    expanded size less its distinct nodes), or None when an alias makes it infinite (a node inside itself).
    Each distinct node is visited once and sizes are exact integers, so a billion laughs costs a few dozen steps."""
    import yaml

    def children(node: Any) -> list[Any]:
        if isinstance(node, yaml.MappingNode):
            return [part for pair in node.value for part in pair]
        return list(node.value) if isinstance(node, yaml.SequenceNode) else []

    size: dict[int, int] = {}  # expanded size of each finished node
    open_nodes: set[int] = set()  # nodes whose subtree is being walked
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:  # iterative depth-first walk: a deeply nested file cannot exhaust Python's stack here
        node, finished = stack.pop()
        key = id(node)
        if finished:
            open_nodes.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children(node))
        elif key in open_nodes:  # met again below itself
            return None
        elif key not in size:
            open_nodes.add(key)
            stack.append((node, True))
            stack.extend((c, False) for c in children(node))
    return size[id(root)] - len(size)


def lora_layer_count(spec: Any) -> int | None:
    """L from ``lora.layers`` (``4`` or ``"last-4"``), or None when ``spec`` is neither."""
    if isinstance(spec, str) and spec.startswith("last-"):
        spec = spec[len("last-"):]
        spec = int(spec) if spec.isdigit() else None
    if isinstance(spec, bool) or not isinstance(spec, int) or spec < 1:
        return None
    return spec


# What each annotation's base type accepts (bool is an int in Python, but never a count or a rate here).
_TYPES: dict[str, tuple[str, Any]] = {
    "int": ("a whole number", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "float": ("a finite number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "dict": ("a mapping", lambda v: isinstance(v, dict)),
}


def _type_problem(annotation: Any, value: Any) -> str | None:
    """None when ``value`` fits the field annotation (a string: this module has postponed annotations,
    e.g. ``"int | None"``), else what is expected."""
    parts = [p.strip() for p in str(annotation).split("|")]
    optional = "None" in parts
    base = next((p.split("[")[0] for p in parts if p != "None"), "")
    if base not in _TYPES or (value is None and optional):
        return None
    name, fits = _TYPES[base]
    if fits(value):
        return None
    expected = f"{name} or null" if optional else name
    return f"must be {expected}, not {type(value).__name__} {value!r}"


def _yaml_float(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value
