"""The perturbed objective: its gradient at theta0, the three forms, reproducibility, the config."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import daunce_store  # noqa: E402
from daunce_store.errors import DaunceStoreError, InvalidInputError  # noqa: E402
from daunce_store.perturb import (  # noqa: E402
    ClassificationTask,
    PerturbConfig,
    PerturbationDraw,
    Task,
    batch_objective,
    draw_perturbation,
    perturbation_weights,
    run_perturbation,
)

import perturb_factories as F  # noqa: E402

pytestmark = pytest.mark.train


def _tiny(seed: int = 0) -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    return model, (x, y)


class _DoubleClassification(ClassificationTask):
    def per_example_loss(self, outputs, batch):  # keep float64 for a tight comparison
        return torch.nn.functional.cross_entropy(outputs, batch[1], reduction="none")


@pytest.mark.parametrize("objective", ["if", "fisher", "blackbox", "reweighted"])
def test_gradient_at_theta0_is_reweighted_per_example_gradients(objective: str) -> None:
    model, batch = _tiny()
    frozen = copy.deepcopy(model)
    task = _DoubleClassification()
    gamma, rho = 0.7, 0.9
    xi = np.linspace(0.05, 0.95, 6)
    c = torch.as_tensor(perturbation_weights(xi, objective, rho), dtype=torch.float64)
    obj = batch_objective(task, model, batch, c, objective, gamma, lambda b: task.outputs(frozen, b))
    grads = torch.autograd.grad(obj, list(model.parameters()))

    # Per-example parameter gradients by autograd, one example at a time (the thing Daunce never forms).
    weights = {"if": gamma - c, "fisher": -c, "blackbox": torch.ones(6, dtype=torch.float64), "reweighted": 2 - c}[objective]
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(6):
        one = (batch[0][i : i + 1], batch[1][i : i + 1])
        li = task.per_example_loss(task.outputs(model, one), one)
        gi = torch.autograd.grad(li.sum(), list(model.parameters()))
        for e, g in zip(expected, gi):
            e += weights[i] * g / 6
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    if objective in ("if", "fisher"):
        assert abs(obj.item()) < 1e-12  # both terms vanish at theta0


def _flat_hessian(fn, model: torch.nn.Module) -> torch.Tensor:
    from torch.func import functional_call

    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().flatten() for p in model.parameters()])

    def of_flat(flat: torch.Tensor) -> torch.Tensor:
        params, at = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = flat[at : at + shape.numel()].view(shape)
            at += shape.numel()
        return fn(lambda x: functional_call(model, params, (x,)))

    return torch.autograd.functional.hessian(of_flat, flat0)


def test_curvature_at_theta0_is_gauss_newton_for_the_if_form_and_the_full_hessian_for_the_reweighted_one() -> None:
    """docs/objectives.md's table, with c = 1 (rho = 0): the IF form's Hessian at theta0 is the Gauss-Newton
    matrix mean J_iᵀ (diag p_i − p_i p_iᵀ) J_i (it drops the model's own curvature N), the reweighted form's is
    the mean loss's Hessian H = GGN + N; on a tanh MLP the two differ."""
    model, batch = _tiny()
    frozen = copy.deepcopy(model)
    task = _DoubleClassification()
    c = torch.ones(6, dtype=torch.float64)
    hess = {o: _flat_hessian(lambda f, o=o: perturbed_objective_of(task, f, batch, c, o, frozen), model) for o in ("if", "reweighted")}
    full = _flat_hessian(lambda f: task.per_example_loss(f(batch[0]), batch).mean(), model)
    jac = torch.autograd.functional.jacobian(lambda flat: _outputs_of_flat(model, flat, batch[0]),
                                             torch.cat([p.detach().flatten() for p in model.parameters()]))  # (6, 3, P)
    p = torch.softmax(model(batch[0]), dim=1).detach()
    ggn = sum(jac[i].T @ (torch.diag(p[i]) - torch.outer(p[i], p[i])) @ jac[i] for i in range(6)) / 6
    torch.testing.assert_close(hess["reweighted"], full, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(hess["if"], ggn, rtol=1e-8, atol=1e-10)
    assert (full - ggn).abs().max() > 1e-3  # N is not 0 on the MLP: the forms target different curvatures


def perturbed_objective_of(task, forward, batch, c, objective, frozen):
    class _Fn(torch.nn.Module):
        def forward(self, x):
            return forward(x)

    return batch_objective(task, _Fn(), batch, c, objective, 1.0, lambda b: task.outputs(frozen, b))


def _outputs_of_flat(model: torch.nn.Module, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    from torch.func import functional_call

    params, at = {}, 0
    for name, p in model.named_parameters():
        params[name] = flat[at : at + p.numel()].view(p.shape)
        at += p.numel()
    return functional_call(model, params, (x,))


def test_forms_differ_away_from_theta0() -> None:
    """Away from theta0 the forms are different functions (the Fisher form is not the IF form)."""
    model, batch = _tiny()
    frozen = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    task = _DoubleClassification()
    xi = np.linspace(0.05, 0.95, 6)
    values = {
        o: batch_objective(task, model, batch, torch.as_tensor(perturbation_weights(xi, o, 1.0)), o, 1.0,
                                 lambda b: task.outputs(frozen, b)).item()
        for o in ("if", "fisher", "blackbox")
    }
    assert len({round(v, 9) for v in values.values()}) == 3
    assert values["blackbox"] == pytest.approx(task.per_example_loss(task.outputs(model, batch), batch).mean().item())


def test_perturbation_weights() -> None:
    xi = np.array([0.0, 0.25, 0.5, 1.0])
    np.testing.assert_allclose(perturbation_weights(xi, "if", 1.0), [0.0, 0.5, 1.0, 2.0])
    np.testing.assert_allclose(perturbation_weights(xi, "fisher", 0.5), [-0.5, -0.25, 0.0, 0.5])
    np.testing.assert_allclose(perturbation_weights(xi, "blackbox", 1.0), 0.0)
    np.testing.assert_allclose(perturbation_weights(xi, "reweighted", 1.0), perturbation_weights(xi, "if", 1.0))
    # Its linear response has the IF form's weights at gamma = 1: (2 - c) l moves theta by H^-1 mean (c - 1) g.
    a, _ = PerturbationDraw(0, 2, 1.0, "reweighted").linear_weights(0, 50)
    np.testing.assert_array_equal(a, PerturbationDraw(0, 2, 1.0, "if").linear_weights(0, 50)[0])
    with pytest.raises(InvalidInputError):
        perturbation_weights(xi, "newton", 1.0)


def test_draws_depend_on_store_seed_and_k_only() -> None:
    a = draw_perturbation(0, 5, 100, 0.3)
    b = draw_perturbation(0, 5, 100, 0.3)
    c = draw_perturbation(0, 6, 100, 0.3)
    d = draw_perturbation(1, 5, 100, 0.3)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    # Poisson subsets: each example in D_k with probability r, so |D_k| ~ Binomial(100, 0.3).
    assert 10 <= len(a[0]) <= 50 and np.all(np.diff(a[0]) > 0)
    assert np.array_equal(a[0], PerturbationDraw(0, 5, 0.3).subset(100))
    assert not np.array_equal(np.sort(a[0]), np.sort(c[0])) and not np.array_equal(a[1], d[1])


def _digits_store(path: Path, seed: int = 0) -> daunce_store.LossStore:
    tid, qid = F.digits_ids()
    return daunce_store.init(path, tid, {"test": qid}, seed=seed, chunk_rows=4096, capacity=64)


@pytest.fixture(scope="module")
def digits():
    torch.set_num_threads(1)
    return F.digits()


def test_rerunning_a_perturbation_gives_the_same_column(tmp_path: Path, digits) -> None:
    model, task, train, queries = digits
    cfg = PerturbConfig(epochs=2, lr=1e-2, batch_size=64, eval_batch_size=1024)
    columns = []
    for name, seed, k in (("a", 0, 3), ("b", 0, 3), ("c", 0, 4), ("d", 1, 3)):
        store = _digits_store(tmp_path / f"{name}.zarr", seed)
        commit = run_perturbation(store, k, model, task, train, queries, cfg)
        assert commit.perturbation == f"{k:06d}"
        columns.append((store.train_losses()[:, 0], store.query_losses("test")[:, 0]))
    np.testing.assert_array_equal(columns[0][0], columns[1][0])
    np.testing.assert_array_equal(columns[0][1], columns[1][1])
    assert not np.allclose(columns[0][0], columns[2][0])  # another k
    assert not np.allclose(columns[0][0], columns[3][0])  # another store seed


def test_objective_forms_are_selectable(tmp_path: Path, digits) -> None:
    model, task, train, queries = digits
    store = _digits_store(tmp_path / "s.zarr")
    cols = {}
    for k, objective in enumerate(("if", "fisher", "blackbox", "reweighted")):
        commit = run_perturbation(store, k, model, task, train, queries, PerturbConfig(objective=objective, epochs=2, lr=1e-2))
        assert commit.metadata["objective"] == objective
        cols[objective] = store.train_losses(slots=[commit.slot])[:, 0]
    # Plain fine-tuning on D_k lowers the subset's losses below theta0's; the IF/Fisher forms do not aim to.
    subset = draw_perturbation(store.seed, 2, len(train), 0.3)[0]
    with torch.no_grad():
        base = task.per_example_loss(model(train.tensors[0]), train.tensors).numpy()
    assert cols["blackbox"][subset].mean() < base[subset].mean()
    assert not np.allclose(cols["if"], cols["fisher"]) and not np.allclose(cols["if"], cols["blackbox"])
    assert not np.allclose(cols["reweighted"], cols["if"]) and not np.allclose(cols["reweighted"], cols["blackbox"])
    for bad, match in (({"gamma": 2.0}, "gamma 2.0 has no meaning"), ({"l2_center": "theta0"}, "'reweighted' fine-tune keeps")):
        with pytest.raises(InvalidInputError, match=match):
            PerturbConfig(objective="reweighted", **bad)


def test_margin_signal_and_bad_inputs(tmp_path: Path, digits) -> None:
    model, _, train, queries = digits
    store = _digits_store(tmp_path / "s.zarr")
    run_perturbation(store, 0, model, ClassificationTask("margin"), train, queries, PerturbConfig(epochs=1, lr=1e-2))
    neg_margin = store.train_losses()[:, 0]
    # -margin is negative on the (mostly) confidently right training examples
    assert (neg_margin < 0).mean() > 0.9
    with pytest.raises(DaunceStoreError, match="train ids"):
        run_perturbation(store, 1, model, ClassificationTask(), torch.utils.data.Subset(train, range(10)), queries, PerturbConfig())
    with pytest.raises(DaunceStoreError, match="not in the store"):
        run_perturbation(store, 1, model, ClassificationTask(), train, {"other": queries["test"]}, PerturbConfig())
    with pytest.raises(InvalidInputError, match="signal"):
        ClassificationTask("accuracy")

    class Half(Task):
        pass

    with pytest.raises(NotImplementedError, match="outputs"):
        Half().outputs(model, None)


def test_config_yaml_roundtrip_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("objective: fisher\nratio: 0.5\nlora: {r: 8}\nfactory: 'pkg.mod:build'\nfactory_kwargs: {l2: 0.01}\n")
    cfg = PerturbConfig.from_yaml(path)
    assert cfg.objective == "fisher" and cfg.ratio == 0.5 and cfg.factory_kwargs == {"l2": 0.01}
    assert cfg.lora_settings()["r"] == 8 and cfg.lora_settings()["alpha"] == 16
    assert PerturbConfig.from_dict(cfg.to_dict()) == cfg
    for text, match in (("objective: newton\n", "objective"), ("learning_rate: 1\n", "unknown keys"),
                        ("ratio: 0\n", "ratio"), ("lora: {rank: 3}\n", "lora"), ("[1, 2\n", "YAML")):
        path.write_text(text)
        with pytest.raises(InvalidInputError, match=match):
            PerturbConfig.from_yaml(path)
    with pytest.raises(InvalidInputError, match="does not exist"):
        PerturbConfig.from_yaml(tmp_path / "missing.yaml")
    assert "objective" in PerturbConfig.help()


def test_a_diverged_fine_tune_is_refused_and_its_lease_given_back(tmp_path: Path, digits) -> None:
    model, _, train, queries = digits

    class Exploding(ClassificationTask):
        def per_example_loss(self, outputs, batch):
            return super().per_example_loss(outputs, batch) * float("nan")

    store = _digits_store(tmp_path / "s.zarr")
    lease = store.claim("000002", ttl=600)
    with pytest.raises(InvalidInputError, match="diverged"):
        run_perturbation(store, 2, model, Exploding(), train, queries, PerturbConfig(objective="blackbox"), lease=lease)
    assert store.num_columns() == 0 and store.leases() == []
    assert store.claim("000002") is not None  # free for another worker at once, not after 600 s
