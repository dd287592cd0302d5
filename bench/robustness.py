"""Adversarial cases of issue 21 ("Never lose a committed column"), by class, against one or more checkouts.

    python bench/robustness.py                      # before (6359129, a worktree at /tmp/old) and after (this checkout)
    python bench/robustness.py --src PATH [--src PATH ...] [--only NAME ...] [--json OUT]

Each case runs in its own temporary directory and its own process (``--child``, with a timeout), so a hang or a
crash is contained. The checkout under test comes first on PYTHONPATH, with ``DAUNCE_STORE_NO_EXT=1`` (no
compiled extension needed); the child checks ``daunce_store.__file__`` before it runs anything. The CLI is run
as ``python -c "from daunce_store.cli import app; app()" ...`` (COLUMNS=400: one line is one line).

Every case ends in one outcome:

* ``clear``: the correct result, or a refusal in one DaunceStoreError-style line, exit code 2, no traceback;
* ``traceback``: an uncaught exception (a Python or rich traceback, or a process killed by a signal);
* ``silent-wrong``: it succeeds but the result is wrong (Infinity in JSON, ids changed, markup eaten, a false
  error message, a leftover that is never reclaimed, a false alarm of damage);
* ``data-loss``: a committed column no longer reads back bit-identical, ``verify`` reports damage after a
  sequence of legitimate commands, or gc reclaimed a slot whose writer was still in flight;
* ``hang``: no answer within the case's timeout;
* ``harness-error``: the harness itself failed (not a finding; fix the harness).

The disk-full cases mount a 1 MiB tmpfs (root only); without root they end in harness-error.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OLD_COMMIT = "6359129"
OLD_WORKTREE = Path("/tmp/old")
OUTCOMES = ("clear", "traceback", "silent-wrong", "data-loss", "hang")
CLASSES = ("gc", "OS errors", "values", "ids", "odd layouts")
CLI_CODE = "from daunce_store.cli import app; app()"
RESULT_MARK = "@@ROBUSTNESS-RESULT "

# ------------------------------------------------------------------------------------------------------------
# The child side: helpers a case uses
# ------------------------------------------------------------------------------------------------------------


class Verdict(Exception):
    """Ends a case with an outcome."""

    def __init__(self, outcome: str, detail: str):
        super().__init__(detail)
        self.outcome, self.detail = outcome, detail


@dataclasses.dataclass
class Run:
    what: str
    rc: int | None
    out: str
    err: str
    hung: bool
    seconds: float

    @property
    def text(self) -> str:
        return self.out + "\n" + self.err

    @property
    def tb(self) -> bool:
        return "Traceback" in self.text or (self.rc is not None and self.rc < 0)

    def lines(self, stream: str = "err") -> list[str]:
        return [line.strip() for line in (self.err if stream == "err" else self.out).splitlines() if line.strip()]

    def first(self) -> str:
        """The error line (``error: ...``) if there is one, else the first line that is not a warning."""
        lines = self.lines() or self.lines("out")
        for line in lines:
            if line.lower().startswith("error"):
                return line
        plain = [line for line in lines if not line.lower().startswith("warning")]
        return (plain or lines or [""])[0]

    def exception_line(self) -> str:
        """The exception a traceback ends with (the last line that names one)."""
        if self.rc is not None and self.rc < 0:
            return f"killed by signal {-self.rc}"
        lines = [line.strip(" │╰─╯╭╮") for line in self.text.splitlines() if line.strip(" │╰─╯╭╮")]
        for line in reversed(lines):
            head = line.split(":", 1)[0]
            if head and " " not in head and (head.endswith(("Error", "Exception", "Interrupt", "Exit")) or "." in head):
                return line[:200]
        return lines[-1][:200] if lines else "(no output)"

    @property
    def refused(self) -> bool:
        """Exit code 2 with an error line and no traceback (typer usage errors also exit 2)."""
        return self.rc == 2 and not self.tb


def short(text: str, n: int = 150) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


class Ctx:
    """What a case gets: its temporary directory and ways to run the checkout under test."""

    def __init__(self, tmp: Path, src: Path):
        self.tmp, self.src = tmp, src
        self.env = dict(os.environ)
        self.env.update({"COLUMNS": "400", "PYTHONIOENCODING": "utf-8", "NO_COLOR": "1", "TERM": "dumb"})
        for key in ("DAUNCE_STORE_FAILPOINT", "DAUNCE_STORE_TRACE_OPS"):
            self.env.pop(key, None)
        self.steps: list[str] = []

    @property
    def new_api(self) -> bool:
        """Whether this checkout has named failpoints (store/_failpoints.py)."""
        return (self.src / "daunce_store" / "store" / "_failpoints.py").exists()

    def run(self, argv: list[str], what: str, *, timeout: float = 60, env: dict[str, str] | None = None,
            limit_mb: int | None = None) -> Run:
        def preexec() -> None:
            if limit_mb:
                import resource

                resource.setrlimit(resource.RLIMIT_AS, (limit_mb << 20, limit_mb << 20))

        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**self.env, **(env or {})},
                                cwd=self.tmp, preexec_fn=preexec if limit_mb else None)
        try:
            out, err = proc.communicate(timeout=timeout)
            hung = False
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            hung = True
        text = [b.decode("utf-8", "replace").replace(str(self.tmp), "$TMP") for b in (out, err)]
        run = Run(what, None if hung else proc.returncode, text[0], text[1], hung, time.monotonic() - t0)
        self.steps.append(f"{what}: rc={run.rc}{' HUNG' if hung else ''} {short(run.first(), 100)!r}")
        return run

    def cli(self, *args: str, what: str | None = None, timeout: float = 60, env: dict[str, str] | None = None,
            prefix: list[str] | None = None, limit_mb: int | None = None) -> Run:
        argv = [*(prefix or []), sys.executable, "-c", CLI_CODE, *map(str, args)]
        return self.run(argv, what or f"daunce {args[0]}", timeout=timeout, env=env, limit_mb=limit_mb)

    def py(self, code: str, *args: str, what: str = "python", timeout: float = 60, env: dict[str, str] | None = None) -> Run:
        return self.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code), *map(str, args)], what, timeout=timeout, env=env)

    def spawn(self, code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(code), *map(str, args)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env={**self.env, **(env or {})}, cwd=self.tmp)


def expect(run: Run, *, allow_refusal: bool = False) -> Run:
    """A step that must not hang or crash (and, unless ``allow_refusal``, must succeed)."""
    if run.hung:
        raise Verdict("hang", f"{run.what}: no answer in {run.seconds:.0f} s")
    if run.tb:
        raise Verdict("traceback", f"{run.what}: {run.exception_line()}")
    if run.rc != 0 and not (allow_refusal and run.refused):
        raise Verdict("traceback", f"{run.what}: exit {run.rc}: {short(run.first())}")
    return run


PRELUDE = """\
import json, os, sys, signal, time
import numpy as np
def col(k, n, salt=0, scale=1.0):
    return (np.random.default_rng([int(k), int(salt), 21]).random(n).astype(np.float64) * scale + 0.5 * scale).astype(np.float32)
"""
exec(PRELUDE)  # the same col() in the child
col: Callable[..., Any]


def make_store(path: Path, *, n: int = 64, m: int = 3, k: int = 8, chunk_rows: int = 16, pack_width: int | None = None,
               capacity: int = 256, scale: float = 1.0, train_ids: list[str] | None = None) -> dict[str, tuple[Any, Any]]:
    """A store with k committed columns p0..p{k-1} (API); returns {pid: (train, query)} as appended."""
    import daunce_store

    ids = train_ids or [f"t{i}" for i in range(n)]
    s = daunce_store.init(str(path), train_ids=ids, query_sets={"test": [f"q{j}" for j in range(m)]}, chunk_rows=chunk_rows,
                          capacity=capacity, pack_width=pack_width)
    expected = {}
    for j in range(k):
        train, query = col(j, len(ids), 0, scale), col(j, m, 1, scale)
        s.append(f"p{j}", train, {"test": query})
        expected[f"p{j}"] = (train, query)
    return expected


def read_problems(path: Path, expected: dict[str, tuple[Any, Any]]) -> list[str]:
    """What is wrong with the committed columns: missing, unreadable, or not bit-identical."""
    import numpy as np

    import daunce_store

    try:
        s = daunce_store.open(str(path), mode="r")
        snap = s.snapshot()
        train = np.asarray(s.train_losses(snapshot=snap))
        query = np.asarray(s.query_losses("test", snapshot=snap))
        qpids = [c.perturbation for c in snap.commits if c.slot in set(snap.query_slots.get("test", ()))]
    except Exception as e:  # noqa: BLE001 - any failure to read is the finding
        return [f"reading the columns fails: {type(e).__name__}: {short(str(e), 120)}"]
    pids = list(snap.perturbations)
    out = []
    for pid, (t, q) in expected.items():
        if pid not in pids:
            out.append(f"{pid} is not committed")
            continue
        if not np.array_equal(train[:, pids.index(pid)].view(np.uint32), np.asarray(t, np.float32).view(np.uint32)):
            out.append(f"{pid}'s train column differs")
        if q is not None and (pid not in qpids or not np.array_equal(query[:, qpids.index(pid)].view(np.uint32),
                                                                     np.asarray(q, np.float32).view(np.uint32))):
            out.append(f"{pid}'s query column differs")
    return out


def verify_cli(ctx: Ctx, path: Path, what: str = "daunce verify") -> dict[str, Any]:
    """`daunce verify --format json`: {ok, damage: [...], reclaimable: n, notes: [...]} (traceback/hang raise)."""
    run = ctx.cli("verify", path, "--format", "json", "--no-progress", what=what)
    if run.hung or run.tb or run.rc not in (0, 1):
        expect(run)
    try:
        report = json.loads(run.out)
    except ValueError:
        raise Verdict("traceback", f"{what}: exit {run.rc}, no JSON report: {short(run.first())}") from None
    findings = report.get("findings", [])
    return {"ok": report.get("ok"), "damage": [f for f in findings if f["kind"] == "damage"],
            "reclaimable": [f for f in findings if f["kind"] == "reclaimable"], "notes": [f for f in findings if f["kind"] == "note"],
            "rc": run.rc}


def no_loss(ctx: Ctx, path: Path, expected: dict[str, tuple[Any, Any]], when: str) -> dict[str, Any]:
    """verify (CLI) and read every committed column back: data-loss when either finds damage."""
    report = verify_cli(ctx, path, f"verify {when}")
    problems = read_problems(path, expected)
    if report["damage"] or problems:
        where = f"verify: {len(report['damage'])} damaged ({short(report['damage'][0]['message'], 90)})" if report["damage"] else "verify ok"
        raise Verdict("data-loss", f"{when}: {where}; reads: {problems[:2] or 'all columns bit-identical'}"
                      + (f" (+{len(problems) - 2} more)" if len(problems) > 2 else ""))
    return report


def status_json(path: Path) -> dict[str, Any]:
    import daunce_store

    return daunce_store.open(str(path), mode="r").status()


def wait_stopped(proc: subprocess.Popen[bytes], timeout: float = 30) -> bool:
    """Wait until ``proc`` is stopped (SIGSTOP: state T); False if it exited or the time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        if state == "T":
            return True
        time.sleep(0.05)
    return False


def last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                return json.loads(line)
    return {}


def strict_json(text: str) -> Any:
    """json.loads refusing Infinity/NaN (not JSON); ValueError naming the constant otherwise."""

    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


# --- a tmpfs "disk" -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(ctx: Ctx, size: str = "1m") -> Any:
    disk = ctx.tmp / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"cannot mount a tmpfs (needs root): {done.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def fill(disk: Path, leave: int) -> int:
    """Fill ``disk`` with a ballast file until at most ``leave`` bytes are free; returns the bytes left."""
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    with open(disk / "ballast", "ab") as f:
        with contextlib.suppress(OSError):
            f.write(b"\0" * max(0, free - leave))
            f.flush()
    st = os.statvfs(disk)
    return st.f_bavail * st.f_frsize


# ------------------------------------------------------------------------------------------------------------
# The cases
# ------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    cls: str
    name: str
    fn: Callable[[Ctx], str]
    timeout: float
    title: str


CASES: list[Case] = []


def case(cls: str, name: str, title: str, timeout: float = 60) -> Callable[[Callable[[Ctx], str]], Callable[[Ctx], str]]:
    def register(fn: Callable[[Ctx], str]) -> Callable[[Ctx], str]:
        CASES.append(Case(cls, name, fn, timeout, title))
        return fn

    return register


# --- gc -----------------------------------------------------------------------------------------------------


@case("gc", "gc-missing-manifest", "compact; gc --grace 0; move packs/00000000.json aside; gc --grace 0; move it back")
def gc_missing_manifest(ctx: Ctx) -> str:
    s = ctx.tmp / "s.zarr"
    expected = make_store(s, n=64, k=64, chunk_rows=16, capacity=256)  # pack width 64: one group
    expect(ctx.cli("compact", s))
    expect(ctx.cli("gc", s, "--grace", "0", what="gc #1"))
    manifest = s / "_daunce" / "packs" / "00000000.json"
    aside = ctx.tmp / "manifest.aside"
    shutil.move(str(manifest), aside)
    run = expect(ctx.cli("gc", s, "--grace", "0", what="gc #2 (manifest missing)"), allow_refusal=True)
    said = short(run.first() if run.refused else " ".join(run.lines("out") + run.lines()), 110)
    os.replace(aside, manifest)
    no_loss(ctx, s, expected, "after the manifest is back")
    return f"64 columns read back bit-identical, verify clean; gc #2 said: {said}"


@case("gc", "gc-missing-manifest-legacy-fate", "as gc-missing-manifest, the group's fate in 6359129's form {fate: published, at} (no manifest copy)")
def gc_missing_manifest_legacy(ctx: Ctx) -> str:
    s = ctx.tmp / "s.zarr"
    expected = make_store(s, n=64, k=64, chunk_rows=16, capacity=256)
    expect(ctx.cli("compact", s))
    fate = s / "_daunce" / "fates" / "group-00000000.json"
    fate.write_text(json.dumps({"fate": "published", "at": dt.datetime.now(dt.timezone.utc).isoformat()}))  # as 6359129 writes it
    expect(ctx.cli("gc", s, "--grace", "0", what="gc #1"))
    manifest = s / "_daunce" / "packs" / "00000000.json"
    aside = ctx.tmp / "manifest.aside"
    shutil.move(str(manifest), aside)
    run = expect(ctx.cli("gc", s, "--grace", "0", what="gc #2 (manifest missing)"), allow_refusal=True)
    said = short(run.first() if run.refused else " ".join(run.lines("out") + run.lines()), 160)
    os.replace(aside, manifest)
    no_loss(ctx, s, expected, "after the manifest is back")
    return f"64 columns read back bit-identical, verify clean; gc #2 said: {said}"


SETUP_STORE = """
import daunce_store
path, n, m, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = daunce_store.init(path, train_ids=[f"t{i}" for i in range(n)], query_sets={"test": [f"q{j}" for j in range(m)]}, chunk_rows=16,
                      capacity=256, pack_width=4)
for j in range(k):
    s.append(f"p{j}", col(j, n), {"test": col(j, m, 1)})
s.compact()
s.gc(grace_seconds=0)
"""


def _missing_commit(ctx: Ctx, writer: Path) -> str:
    s = ctx.tmp / "s.zarr"
    n, m, k = 32, 2, 8
    expect(ctx.run([sys.executable, "-c", PRELUDE + SETUP_STORE, str(s), str(n), str(m), str(k)], "8 appends, compact, gc --grace 0",
                   env={"PYTHONPATH": str(writer)}))
    expected = {f"p{j}": (col(j, n), col(j, m, 1)) for j in range(k)}
    two_hours_ago = time.time() - 7200
    for f in (s / "_daunce").rglob("*"):  # a store written two hours ago
        os.utime(f, (two_hours_ago, two_hours_ago))
    commit = s / "_daunce" / "commits" / "p5.json"
    aside = ctx.tmp / "p5.aside"
    shutil.move(str(commit), aside)
    run = expect(ctx.cli("gc", s, what="gc (default grace) with commits/p5.json missing"), allow_refusal=True)
    said = short(run.first() if run.refused else " ".join(run.lines("out") + run.lines()), 130)
    os.replace(aside, commit)
    no_loss(ctx, s, expected, "after the commit record is back")
    return f"gc said: {said}; all 8 columns bit-identical, verify clean"


@case("gc", "gc-missing-commit", "a compacted store 2 h old; move commits/p5.json aside; gc (default grace); move it back")
def gc_missing_commit(ctx: Ctx) -> str:
    return _missing_commit(ctx, ctx.src)


@case("gc", "gc-missing-commit-upgraded", "as gc-missing-commit, the store written (appends, compact, gc) by 6359129, then gc by the checkout")
def gc_missing_commit_upgraded(ctx: Ctx) -> str:
    if not (OLD_WORKTREE / "daunce_store").exists():
        raise RuntimeError(f"needs the 6359129 worktree at {OLD_WORKTREE}")
    return _missing_commit(ctx, OLD_WORKTREE)


GC_LOOP_APPENDER = """
import daunce_store
from daunce_store.errors import DaunceStoreError, ReclaimedError
path, k0, k1, n, m, flag = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
s = daunce_store.open(path)
done, retries, errors = [], 0, []
for k in range(k0, k1):
    for attempt in range(50):
        try:
            s.append(f"p{k}", col(k, n), {"test": col(k, m, 1)})
            done.append(k)
            break
        except ReclaimedError:
            retries += 1
        except DaunceStoreError as e:
            errors.append(f"p{k}: {type(e).__name__}: {e}"[:200]); break
        except Exception as e:
            errors.append(f"p{k}: TRACEBACK {type(e).__name__}: {e}"[:200]); break
open(flag, "w").close()
print(json.dumps({"done": done, "retries": retries, "errors": errors}))
"""

GC_LOOP_COMPACTOR = """
import daunce_store
from daunce_store.errors import DaunceStoreError
path, flag, out_flag = sys.argv[1], sys.argv[2], sys.argv[3]
runs, groups, errors = 0, 0, []
def once():
    global runs, groups
    runs += 1
    try:
        groups += len(daunce_store.open(path).compact())
    except DaunceStoreError as e:
        errors.append(f"{type(e).__name__}: {e}"[:200])
    except Exception as e:
        errors.append(f"TRACEBACK {type(e).__name__}: {e}"[:200])
while not os.path.exists(flag):
    once()
once()
open(out_flag, "w").close()
print(json.dumps({"runs": runs, "groups": groups, "errors": errors}))
"""

GC_LOOP_GC = """
import daunce_store
from daunce_store.errors import DaunceStoreError
path, flag, least = sys.argv[1], sys.argv[2], int(sys.argv[3])
runs, reclaimed, errors = 0, [0, 0, 0], []
while runs < least or not os.path.exists(flag):
    runs += 1
    try:
        r = daunce_store.open(path).gc(grace_seconds=0)
        reclaimed[0] += len(r.slots); reclaimed[1] += len(r.groups); reclaimed[2] += len(r.packed_slots)
    except DaunceStoreError as e:
        errors.append(f"{type(e).__name__}: {e}"[:200])
    except Exception as e:
        errors.append(f"TRACEBACK {type(e).__name__}: {e}"[:200])
print(json.dumps({"runs": runs, "reclaimed": reclaimed, "errors": errors}))
"""


@case("gc", "gc-loop-beside-compact", "gc(grace 0) in a loop (>= 40 runs) beside compact, on a store receiving 48 appends (4 rounds)",
      timeout=240)
def gc_loop(ctx: Ctx) -> str:
    n, m, rounds = 128, 3, 4
    total = {"gc": 0, "compacts": 0, "groups": 0, "appends": 0, "retries": 0, "reclaimed": [0, 0, 0]}
    refusals: list[str] = []
    for rnd in range(rounds):
        s = ctx.tmp / f"s{rnd}.zarr"
        expected = make_store(s, n=n, m=m, k=16, chunk_rows=32, pack_width=4, capacity=1024)
        appended, compacted = ctx.tmp / f"appended{rnd}", ctx.tmp / f"compacted{rnd}"
        procs = {
            "gc": ctx.spawn(GC_LOOP_GC, str(s), str(compacted), "40"),
            "compact": ctx.spawn(GC_LOOP_COMPACTOR, str(s), str(appended), str(compacted)),
            "append": ctx.spawn(GC_LOOP_APPENDER, str(s), "16", "64", str(n), str(m), str(appended)),
        }
        results = {}
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=120)
            results[name] = last_json(out.decode())
            if proc.returncode != 0 or not results[name]:
                raise Verdict("traceback", f"round {rnd}: the {name} process died: {short(err.decode()[-300:])}")
        for k in results["append"]["done"]:
            expected[f"p{k}"] = (col(k, n), col(k, m, 1))
        total["gc"] += results["gc"]["runs"]
        total["compacts"] += results["compact"]["runs"]
        total["groups"] += results["compact"]["groups"]
        total["appends"] += len(results["append"]["done"])
        total["retries"] += results["append"]["retries"]
        total["reclaimed"] = [a + b for a, b in zip(total["reclaimed"], results["gc"]["reclaimed"])]
        errors = [e for r in results.values() for e in r["errors"]]
        report = verify_cli(ctx, s, f"verify round {rnd}")
        problems = read_problems(s, expected)
        desc = (f"round {rnd + 1} of {rounds}: {results['gc']['runs']} gc runs, {results['compact']['runs']} compacts "
                f"({results['compact']['groups']} groups), {len(results['append']['done'])}/48 appends")
        if report["damage"] or problems:
            raise Verdict("data-loss", f"{desc}: verify {len(report['damage'])} damaged chunks/records, reads: {problems[:1]}"
                          + (f" (+{len(problems) - 1})" if len(problems) > 1 else ""))
        tracebacks = [e for e in errors if "TRACEBACK" in e]
        if tracebacks:
            raise Verdict("traceback", f"{desc}: {short(tracebacks[0])}")
        refusals += [e.split(":", 1)[0] for e in errors]
        if len(results["append"]["done"]) < 48:
            raise Verdict("silent-wrong", f"{desc}: an append failed for good: {short(results['append']['errors'][0])}")
    said = f"; refusals met: {sorted(set(refusals))} x{len(refusals)}" if refusals else ""
    return (f"{rounds} rounds: {total['gc']} gc runs (reclaimed slots/groups/own copies {total['reclaimed']}), {total['compacts']} compacts "
            f"({total['groups']} groups), {total['appends']} appends ({total['retries']} retried after ReclaimedError){said}; "
            "each round: verify clean, all 64 columns bit-identical")


KILL_BEFORE_COMMIT = """
import daunce_store
from daunce_store.store._storage import Storage
original = Storage.put_if_absent
def put_if_absent(self, key, record):
    if key.startswith("_daunce/commits/"):
        os._exit(9)  # the writer dies between its fate record and its commit record
    return original(self, key, record)
Storage.put_if_absent = put_if_absent
path, n, m = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
daunce_store.open(path).append("pX", col(99, n), {"test": col(99, m, 1)})
"""


@case("gc", "gc-fate-without-commit", "writer killed between its fate record and its commit record; gc --grace 0 (twice), status")
def gc_fate_without_commit(ctx: Ctx) -> str:
    s = ctx.tmp / "s.zarr"
    n, m = 64, 3
    expected = make_store(s, n=n, m=m, k=4)
    run = ctx.py(KILL_BEFORE_COMMIT, str(s), str(n), str(m), what="writer killed before its commit")
    if run.rc != 9:
        raise RuntimeError(f"the writer did not die at its commit record: rc {run.rc} {run.err[-300:]}")
    info = status_json(s)
    before, pending = info["leaked_slots"], info.get("commits_pending", "(not in status)")
    fates = [p.name for p in (s / "_daunce" / "fates").iterdir() if any(f"{slot:08d}" in p.name for slot in before)]
    runs = [expect(ctx.cli("gc", s, "--grace", "0", what=f"gc #{i}"), allow_refusal=True) for i in (1, 2)]
    said = short(" ".join(runs[0].lines("out") + runs[0].lines()), 110)
    after = status_json(s)["leaked_slots"]
    committed = "pX" in status_and_commits(s)
    if committed:
        expected["pX"] = (col(99, n), col(99, m, 1))
    report = no_loss(ctx, s, expected, "after gc")
    if after:
        return verdict("silent-wrong", f"{fates} (committed) with no commit record: status leaked_slots {before} before gc and {after} after two "
                       f"`gc --grace 0` (leaked forever); gc said: {said}")
    if report["reclaimable"]:
        return verdict("silent-wrong", f"after gc, verify still lists {len(report['reclaimable'])} reclaimable leftover(s)")
    outcome = "committed by gc from the fate (reads back bit-identical)" if committed else "reclaimed"
    return f"before gc: leaked_slots {before}, commits_pending {pending}; none leaked after; the column was {outcome}; gc said: {said}"


def status_and_commits(path: Path) -> list[str]:
    import daunce_store

    return list(daunce_store.open(str(path), mode="r").snapshot().perturbations)


def verdict(outcome: str, detail: str) -> str:
    raise Verdict(outcome, detail)


LEGACY_FATE = """
import daunce_store, datetime
path, n, m = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = daunce_store.open(path)
slot = s._claim_slot("pL", "legacy-writer")
s._write_column(s._train_losses, slot, col(98, n))
s._write_column(s._query("test")[0], slot, col(98, m, 1))
now = datetime.datetime.now(datetime.timezone.utc).isoformat()
# the fate record exactly as 6359129's append writes it (no commit inside), then the writer dies
assert s._storage.put_if_absent(f"_daunce/fates/slot-{slot:08d}.json", {"fate": "committed", "perturbation": "pL", "at": now})
print(slot)
"""


@case("gc", "gc-legacy-fate", "a 6359129-format fate {fate: committed, perturbation, at} with no commit record; gc --grace 0")
def gc_legacy_fate(ctx: Ctx) -> str:
    s = ctx.tmp / "s.zarr"
    n, m = 64, 3
    expected = make_store(s, n=n, m=m, k=4)
    expect(ctx.py(LEGACY_FATE, str(s), str(n), str(m), what="legacy fate by hand"))
    before = status_json(s)["leaked_slots"]
    time.sleep(1.1)  # the fate's mtime is then older than grace 0 on any clock granularity
    runs = [expect(ctx.cli("gc", s, "--grace", "0", what=f"gc #{i}"), allow_refusal=True) for i in (1, 2)]
    said = short(" ".join(runs[0].lines("out") + runs[0].lines()), 110)
    after = status_json(s)["leaked_slots"]
    report = no_loss(ctx, s, expected, "after gc")
    if after:
        return verdict("silent-wrong", f"status leaked_slots {before} before gc, {after} after two `gc --grace 0` (leaked forever); "
                       f"gc said: {said}")
    if report["reclaimable"]:
        return verdict("silent-wrong", f"after gc, verify still lists {len(report['reclaimable'])} reclaimable leftover(s)")
    return f"leaked {before} before gc, none after; gc said: {said}"


LEGACY_WRITER = """
import daunce_store
from daunce_store.store._storage import Storage
original, fired = Storage.put_if_absent, []
def put_if_absent(self, key, record):
    if key.startswith("_daunce/commits/") and not fired:
        fired.append(key)
        os.kill(os.getpid(), signal.SIGSTOP)  # between its fate record and its commit record
    return original(self, key, record)
Storage.put_if_absent = put_if_absent
path, n, m = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
try:
    daunce_store.open(path).append("pV", col(96, n), {"test": col(96, m, 1)})
    print(json.dumps({"ok": True}))
except daunce_store.DaunceStoreError as e:
    print(json.dumps({"ok": False, "error": type(e).__name__, "message": str(e)[:300]}))
"""


@case("gc", "gc-beside-6359129-writer", "a 6359129 writer stopped between its fate and commit records (mixed versions); gc --grace 0; resume")
def gc_legacy_writer(ctx: Ctx) -> str:
    if not (OLD_WORKTREE / "daunce_store").exists():
        raise RuntimeError(f"needs the 6359129 worktree at {OLD_WORKTREE}")
    s = ctx.tmp / "s.zarr"
    n, m = 64, 3
    expected = make_store(s, n=n, m=m, k=4)
    env = {"PYTHONPATH": str(OLD_WORKTREE)}
    proc = ctx.spawn(LEGACY_WRITER, str(s), str(n), str(m), env=env)
    if not wait_stopped(proc):
        raise RuntimeError(f"the 6359129 writer never paused: {proc.communicate(timeout=30)}")
    try:
        time.sleep(1.1)  # its records are then older than grace 0 on any clock granularity
        run = expect(ctx.cli("gc", s, "--grace", "0", what="gc --grace 0"), allow_refusal=True)
    finally:
        result = resume(proc, "6359129 writer")
    said = short(" ".join(run.lines("out") + run.lines()), 110)
    if result.get("ok"):
        expected["pV"] = (col(96, n), col(96, m, 1))
    no_loss(ctx, s, expected, "after the 6359129 writer resumed")
    outcome = "committed pV (reads back bit-identical)" if result.get("ok") else f"was refused ({result.get('error')})"
    return f"gc said: {said}; the resumed 6359129 writer {outcome}; verify clean"


PAUSE_BEFORE = """
import daunce_store
from daunce_store.store._storage import Storage
prefix = os.environ.get("ROBUSTNESS_PAUSE_PREFIX")
if prefix:  # 6359129 has no failpoints: stop this process just before its first create-if-absent under prefix
    original, fired = Storage.put_if_absent, []
    def put_if_absent(self, key, record):
        if key.startswith(prefix) and not fired:
            fired.append(key)
            os.kill(os.getpid(), signal.SIGSTOP)
        return original(self, key, record)
    Storage.put_if_absent = put_if_absent
path, what, n, m = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
try:
    if what == "append":
        daunce_store.open(path).append("pW", col(97, n), {"test": col(97, m, 1)})
        print(json.dumps({"ok": True}))
    else:
        print(json.dumps({"ok": True, "groups": daunce_store.open(path).compact()}))
except daunce_store.DaunceStoreError as e:
    print(json.dumps({"ok": False, "error": type(e).__name__, "message": str(e)[:300]}))
"""


def paused(ctx: Ctx, s: Path, what: str, key_prefix: str, n: int, m: int) -> tuple[subprocess.Popen[bytes], str]:
    """A writer (``append``) or compactor (``compact``) stopped just before its first create-if-absent under
    ``key_prefix``: the named failpoint on the new checkout, a patched put_if_absent on the old one."""
    if ctx.new_api:
        env, how = {"DAUNCE_STORE_FAILPOINT": f"pause@put:1:{key_prefix}*"}, f"failpoint pause@put:1:{key_prefix}*"
    else:
        env, how = {"ROBUSTNESS_PAUSE_PREFIX": key_prefix}, f"SIGSTOP before put_if_absent({key_prefix}…) (no failpoints here)"
    proc = ctx.spawn(PAUSE_BEFORE, str(s), what, str(n), str(m), env=env)
    if not wait_stopped(proc):
        out, err = proc.communicate(timeout=30)
        raise RuntimeError(f"the {what} process never paused: {out.decode()[-200:]} {err.decode()[-300:]}")
    return proc, how


def resume(proc: subprocess.Popen[bytes], what: str) -> dict[str, Any]:
    os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=60)
    result = last_json(out.decode())
    if not result:
        raise Verdict("traceback", f"the resumed {what}: {short(err.decode()[-300:])}")
    return result


FAKETIME = ["faketime", "-f", "+2h"]


@case("gc", "gc-clock-skew-writer", "writer stopped after its slot claim and chunks; gc on a clock 2 h ahead (faketime), default grace")
def gc_clock_skew_writer(ctx: Ctx) -> str:
    s = ctx.tmp / "s.zarr"
    n, m = 64, 3
    expected = make_store(s, n=n, m=m, k=8)
    proc, how = paused(ctx, s, "append", "_daunce/fates/", n, m)
    try:
        run = expect(ctx.cli("gc", s, prefix=FAKETIME, what="gc under faketime +2h"), allow_refusal=True)
    finally:
        result = resume(proc, "writer")
    said = short(" ".join(run.lines("out") + run.lines()), 100)
    if result.get("ok"):
        expected["pW"] = (col(97, n), col(97, m, 1))
    no_loss(ctx, s, expected, "after the writer resumed")
    if not result.get("ok"):
        return verdict("data-loss", f"writer paused ({how}) <1 s after its slot claim; gc +2h said: {said}; the resumed writer's "
                       f"commit was refused ({result.get('error')}): gc reclaimed a slot in flight, the column is thrown away")
    return f"writer paused ({how}); gc +2h said: {said}; the writer then committed pW, reads back bit-identical, verify clean"


@case("gc", "gc-clock-skew-compactor", "compactor stopped before its manifest; gc on a clock 2 h ahead; resume; gc --grace 0")
def gc_clock_skew_compactor(ctx: Ctx) -> str:
    s = ctx.tmp / "s.zarr"
    n, m = 64, 3
    expected = make_store(s, n=n, m=m, k=16, pack_width=8)
    proc, how = paused(ctx, s, "compact", "_daunce/packs/", n, m)
    try:
        run = expect(ctx.cli("gc", s, prefix=FAKETIME, what="gc under faketime +2h"), allow_refusal=True)
    finally:
        result = resume(proc, "compactor")
    said = short(" ".join(run.lines("out") + run.lines()), 100)
    expect(ctx.cli("gc", s, "--grace", "0", what="gc --grace 0 (right clock)"), allow_refusal=True)
    no_loss(ctx, s, expected, "after the compactor resumed and gc --grace 0")
    done = "made groups " + str(result.get("groups")) if result.get("ok") else f"failed: {result.get('error')}"
    return f"compactor paused ({how}); gc +2h said: {said}; the compactor {done}; verify clean, all columns bit-identical"


# --- OS errors: a full 1 MiB tmpfs ---------------------------------------------------------------------------

BIG_N = 8192  # 32 KiB a column: two 16 KiB chunks of 4096 rows


def _ids_file(ctx: Ctx, n: int) -> tuple[Path, Path]:
    ids, q = ctx.tmp / "ids.txt", ctx.tmp / "q.txt"
    ids.write_text("".join(f"t{i}\n" for i in range(n)))
    q.write_text("q0\nq1\n")
    return ids, q


def one_line_refusal(run: Run, what: str) -> str:
    expect(run, allow_refusal=True)
    if run.rc == 0:
        raise Verdict("silent-wrong", f"{what} exited 0 on a full disk: {short(run.first())}")
    lines = run.lines()
    msg = (lines[0] if lines else "").replace(" (free space, or move the store, then run the command again)", " (…)")
    return f"{what}: exit 2, {len(lines)} line(s): {short(msg, 260)}"


@case("OS errors", "disk-full-init", "daunce init on a full 1 MiB tmpfs (8 KiB left)")
def disk_full_init(ctx: Ctx) -> str:
    ids, q = _ids_file(ctx, 2000)
    with tmpfs(ctx) as disk:
        left = fill(disk, 8192)
        said = one_line_refusal(ctx.cli("init", disk / "s.zarr", "--train-ids", ids, "--query-set", f"test={q}"), "init")
    return f"{left} B free; {said}"


def _disk_full_append(ctx: Ctx, leave: int) -> str:
    import numpy as np

    with tmpfs(ctx) as disk:
        s = disk / "s.zarr"
        expected = make_store(s, n=BIG_N, m=2, k=3, chunk_rows=4096)
        np.save(ctx.tmp / "t.npy", col(3, BIG_N))
        left = fill(disk, leave)
        run = ctx.cli("append", s, "--perturbation", "p3", "--train", ctx.tmp / "t.npy")
        if run.rc == 0 and not run.tb:
            expected["p3"] = (col(3, BIG_N), None)
            no_loss(ctx, s, expected, "after the append")
            return f"{left} B free; the append fitted and committed; verify clean, 4 columns bit-identical"
        said = one_line_refusal(run, "append")
        no_loss(ctx, s, expected, "after the failed append")
    return f"{left} B free; {said}; verify clean, 3 columns bit-identical"


@case("OS errors", "disk-full-append", "daunce append on a full 1 MiB tmpfs (20 KiB left: fails among its chunks); then verify and reads")
def disk_full_append(ctx: Ctx) -> str:
    return _disk_full_append(ctx, 20 * 1024)


@case("OS errors", "disk-full-append-0B", "daunce append on a 1 MiB tmpfs with 0 B left (fails at its slot claim); then verify and reads")
def disk_full_append_0(ctx: Ctx) -> str:
    return _disk_full_append(ctx, 0)


@case("OS errors", "disk-full-append-44K", "daunce append with 44 KiB left (room for the claim and the chunks, not for every record)")
def disk_full_append_44(ctx: Ctx) -> str:
    return _disk_full_append(ctx, 44 * 1024)


@case("OS errors", "disk-full-compact", "daunce compact on a full 1 MiB tmpfs (8 KiB left); then verify and reads")
def disk_full_compact(ctx: Ctx) -> str:
    with tmpfs(ctx) as disk:
        s = disk / "s.zarr"
        expected = make_store(s, n=BIG_N, m=2, k=4, chunk_rows=4096, pack_width=4, capacity=64)
        left = fill(disk, 8192)
        said = one_line_refusal(ctx.cli("compact", s), "compact")
        no_loss(ctx, s, expected, "after the failed compact")
    return f"{left} B free; {said}; verify clean, 4 columns bit-identical"


@case("OS errors", "disk-full-gc", "daunce gc --grace 0 on a full 1 MiB tmpfs (0 B left, a compacted store); then verify and reads")
def disk_full_gc(ctx: Ctx) -> str:
    import daunce_store

    with tmpfs(ctx) as disk:
        s = disk / "s.zarr"
        expected = make_store(s, n=BIG_N, m=2, k=4, chunk_rows=4096, pack_width=4, capacity=64)
        daunce_store.open(str(s)).compact()
        left = fill(disk, 0)
        said = one_line_refusal(ctx.cli("gc", s, "--grace", "0"), "gc")
        no_loss(ctx, s, expected, "after the failed gc")
    return f"{left} B free; {said}; verify clean, 4 columns bit-identical"


@case("OS errors", "disk-full-recover", "after a failed append on a full disk: free space, gc --grace 0, verify, append again")
def disk_full_recover(ctx: Ctx) -> str:
    import numpy as np

    with tmpfs(ctx) as disk:
        s = disk / "s.zarr"
        expected = make_store(s, n=BIG_N, m=2, k=3, chunk_rows=4096)
        np.save(ctx.tmp / "t.npy", col(3, BIG_N))
        fill(disk, 20 * 1024)
        first = ctx.cli("append", s, "--perturbation", "p3", "--train", ctx.tmp / "t.npy", what="append on a full disk")
        if first.rc == 0:
            raise RuntimeError("the append on a full disk succeeded; the case did not fill the disk")
        (disk / "ballast").unlink()
        gc_run = expect(ctx.cli("gc", s, "--grace", "0", what="gc after freeing space"))
        report = verify_cli(ctx, s, "verify after gc")
        if report["damage"]:
            raise Verdict("data-loss", f"verify after gc: {short(report['damage'][0]['message'])}")
        if report["reclaimable"]:
            raise Verdict("silent-wrong", f"after gc, verify still lists {short(report['reclaimable'][0]['message'])}")
        run = expect(ctx.cli("append", s, "--perturbation", "p3", "--train", ctx.tmp / "t.npy", what="append again"), allow_refusal=True)
        if run.rc != 0:
            raise Verdict("silent-wrong", f"append again refused: {short(run.first())}")
        expected["p3"] = (col(3, BIG_N), None)
        no_loss(ctx, s, expected, "after the append again")
    return (f"gc said: {short(' '.join(gc_run.lines('out')), 80)}; then verify clean and p3 appended; 4 columns bit-identical "
            f"(the first append's own output is classified in disk-full-append)")


# --- values ---------------------------------------------------------------------------------------------------


def _topk_json(ctx: Ctx, s: Path, *args: str, what: str) -> tuple[Run, Any]:
    run = ctx.cli("topk", s, "--query-set", "test", "-k", "5", "--format", "json", *args, what=what)
    expect(run, allow_refusal=True)
    if run.rc != 0:
        return run, None
    try:
        return run, strict_json(run.out)
    except ValueError as e:
        bad = [w for w in ("Infinity", "-Infinity", "NaN") if w in run.out]
        raise Verdict("silent-wrong", f"{what}: output is not strict JSON ({e}; holds {bad})") from None


def _false_constant(run: Run, what: str) -> None:
    """A refusal claiming the losses are constant (they never are in these cases)."""
    import re

    if run.rc != 0 and re.search(r"\b(is|are) constant", run.first().lower()):
        raise Verdict("silent-wrong", f"{what}: refused with a false reason: {short(run.first())}")


def _finite_scores(records: Any, what: str) -> None:
    import math

    bad = [r for r in records if not isinstance(r.get("score"), (int, float)) or not math.isfinite(r["score"])]
    if bad:
        raise Verdict("silent-wrong", f"{what}: {len(bad)} non-finite scores ({bad[0].get('score')!r})")


def _reference_scores(s: Path, measure: str) -> dict[tuple[str, str], float]:
    """(query, train id) -> Pearson correlation (corr) or covariance (cov) across the stored columns, in float64."""
    import numpy as np

    import daunce_store

    st = daunce_store.open(str(s), mode="r")
    snap = st.snapshot()
    train = np.asarray(st.train_losses(snapshot=snap), dtype=np.float64)
    query = np.asarray(st.query_losses("test", snapshot=snap), dtype=np.float64)
    scale = 1.0 / np.abs(train).max()  # exact power-free rescale, so subnormals do not underflow here
    train, query = train * scale, query * scale
    tc, qc = train - train.mean(1, keepdims=True), query - query.mean(1, keepdims=True)
    out = {}
    for j, qid in enumerate(st._query("test")[1]):
        if measure == "corr":
            score = (tc @ qc[j]) / (np.linalg.norm(tc, axis=1) * np.linalg.norm(qc[j]))
        else:
            score = tc @ qc[j]
        for i, tid in enumerate(st.train_ids):
            out[(str(qid), str(tid))] = float(score[i])
    return out


def _ranking_matches(records: Any, ref: dict[tuple[str, str], float], what: str, compare_values: bool) -> None:
    """Every returned pos record is among the reference top-k (ties allowed), and (``compare_values``) its
    score equals the reference's."""
    for r in records:
        if r["side"] != "pos":
            continue
        scores = sorted((v for (q, _), v in ref.items() if q == r["query"]), reverse=True)
        kth = scores[r["rank"] - 1] if "rank" in r and r["rank"] >= 1 else scores[0]
        mine = ref[(r["query"], r["train_id"])]
        if mine < kth - 1e-3 * max(1.0, abs(kth)):
            raise Verdict("silent-wrong", f"{what}: rank {r['rank']} of {r['query']} is {r['train_id']} (reference score {mine:.4g}), "
                          f"the reference's rank-{r['rank']} score is {kth:.4g}: ranked wrong")
        if compare_values and abs(r["score"] - mine) > 1e-3:
            raise Verdict("silent-wrong", f"{what}: {r['query']}/{r['train_id']} scored {r['score']:.4g}, reference {mine:.4g}")


def _diverged_store(ctx: Ctx, scale: float) -> tuple[Path, Run]:
    """8 ordinary columns, then `daunce append` of a diverged one (losses ~``scale``)."""
    import numpy as np

    s = ctx.tmp / "s.zarr"
    make_store(s, n=40, m=3, k=8)
    np.save(ctx.tmp / "big.npy", col(8, 40, 0, scale))
    np.save(ctx.tmp / "bigq.npy", col(8, 3, 1, scale))
    run = ctx.cli("append", s, "--perturbation", "p8", "--train", ctx.tmp / "big.npy", "--query", f"test={ctx.tmp / 'bigq.npy'}",
                  what=f"append of {scale:.0e} losses")
    expect(run, allow_refusal=True)
    return s, run


def _diverged(ctx: Ctx, fmt_args: list[str], measure: str | None, scale: float = 1e20) -> str:
    s, app = _diverged_store(ctx, scale)
    refused = app.rc != 0
    if refused and not ("p8" in app.first() and "max" in app.first().lower()):
        note = " (does not name the perturbation and max |loss|)"
    else:
        note = ""
    what = f"topk {'--measure ' + measure if measure else '(default measure)'} {' '.join(fmt_args)}"
    if fmt_args[-1] == "csv":
        run = ctx.cli("topk", s, "--query-set", "test", "-k", "5", *(["--measure", measure] if measure else []), *fmt_args, what=what)
        expect(run, allow_refusal=True)
        _false_constant(run, what)
        bad = [w for w in ("inf", "nan") if any(w == cell.strip().lower().lstrip("-") for line in run.out.splitlines() for cell in line.split(","))]
        if bad:
            raise Verdict("silent-wrong", f"append {'refused' if refused else 'accepted'}; {what}: the CSV holds {bad}")
        result = f"exit {run.rc}, no inf/nan in the CSV" if run.rc == 0 else f"refused: {short(run.first(), 80)}"
    else:
        run, records = _topk_json(ctx, s, *(["--measure", measure] if measure else []), what=what)
        _false_constant(run, what)
        if records is None:
            result = f"refused: {short(run.first(), 90)}"
        else:
            _finite_scores(records, what)
            if measure in ("cov", "corr"):
                _ranking_matches(records, _reference_scores(s, measure), what, compare_values=measure == "corr")
            result = f"{len(records)} finite records" + (", ranked as a float64 reference" if measure in ("cov", "corr") else "")
    head = (f"append refused: {short(app.first(), 120)}{note}" if refused else f"append of {scale:.0e} losses accepted")
    return f"{head}; {what} on the store: {result}"


@case("values", "1e20-cov-json", "append a column of 1e20 losses; topk --measure cov --format json (strict parse)")
def v_1e20_cov(ctx: Ctx) -> str:
    return _diverged(ctx, ["--format", "json"], "cov")


@case("values", "1e20-default-json", "append a column of 1e20 losses; topk (default measure) --format json")
def v_1e20_default(ctx: Ctx) -> str:
    return _diverged(ctx, ["--format", "json"], None)


@case("values", "1e20-cov-csv", "append a column of 1e20 losses; topk --measure cov --format csv (no inf/nan)")
def v_1e20_csv(ctx: Ctx) -> str:
    return _diverged(ctx, ["--format", "csv"], "cov")


@case("values", "near-bound-cov-json", "append a column of ~6e14-9e14 losses (under the new ±1e15 bound); topk --measure cov --format json")
def v_near_cov(ctx: Ctx) -> str:
    return _diverged(ctx, ["--format", "json"], "cov", 6e14)


@case("values", "near-bound-default-json", "append a column of ~6e14-9e14 losses; topk (default measure) --format json")
def v_near_default(ctx: Ctx) -> str:
    return _diverged(ctx, ["--format", "json"], None, 6e14)


def _subnormal(ctx: Ctx, measure: str | None) -> str:
    import daunce_store

    s = ctx.tmp / "s.zarr"
    try:
        make_store(s, n=40, m=3, k=8, scale=1e-40)
    except daunce_store.DaunceStoreError as e:
        return f"subnormal losses refused at append: {short(str(e))}"
    what = f"topk {'--measure ' + measure if measure else '(default measure)'} --format json"
    run, records = _topk_json(ctx, s, *(["--measure", measure] if measure else []), what=what)
    _false_constant(run, what)
    if records is None:
        return f"refused: {short(run.first())}"
    _finite_scores(records, what)
    if measure == "corr":
        _ranking_matches(records, _reference_scores(s, "corr"), what, compare_values=True)
        return f"{len(records)} finite records, equal to a float64 Pearson reference (1e-3)"
    if measure == "cov":
        zero = sum(r["score"] == 0 for r in records)
        try:
            _ranking_matches(records, _reference_scores(s, "cov"), what, compare_values=False)
        except Verdict as v:
            raise Verdict(v.outcome, f"{v.detail} ({zero} of {len(records)} scores are 0: the covariances, ~1e-81, underflow float32)") from None
        return f"{len(records)} finite records, ranked as a float64 covariance reference"
    return f"{len(records)} finite records"


@case("values", "subnormal-corr-json", "losses at 1e-40 (float32 subnormals); topk --measure corr --format json vs a float64 reference")
def v_subnormal_corr(ctx: Ctx) -> str:
    return _subnormal(ctx, "corr")


@case("values", "subnormal-cov-json", "losses at 1e-40 (float32 subnormals); topk --measure cov --format json, ranked as a float64 reference?")
def v_subnormal_cov(ctx: Ctx) -> str:
    return _subnormal(ctx, "cov")


@case("values", "subnormal-default-json", "losses at 1e-40 (float32 subnormals); topk (default measure) --format json")
def v_subnormal_default(ctx: Ctx) -> str:
    return _subnormal(ctx, None)


# --- ids --------------------------------------------------------------------------------------------------------


def _ids_store(ctx: Ctx, ids: list[str], queries: list[str] | None = None) -> Path:
    import daunce_store

    (ctx.tmp / "ids.txt").write_text("".join(i + "\n" for i in ids), encoding="utf-8")
    (ctx.tmp / "q.txt").write_text("".join(q + "\n" for q in (queries or ["q0", "q1"])), encoding="utf-8")
    s = ctx.tmp / "s.zarr"
    expect(ctx.cli("init", s, "--train-ids", ctx.tmp / "ids.txt", "--query-set", f"test={ctx.tmp / 'q.txt'}", "--chunk-rows", "16"))
    st = daunce_store.open(str(s))
    for k in range(4):
        st.append(f"p{k}", col(k, len(ids)), {"test": col(k, len(queries or [0, 1]), 1)})
    return s


def _id_in_table(ctx: Ctx, special: str) -> str:
    ids = ["t0", special, "t2", "t3", "t4"]
    s = _ids_store(ctx, ids)
    run = expect(ctx.cli("topk", s, "--query-set", "test", "--query", "q0", "-k", "5", "--side", "pos", what="topk table"),
                 allow_refusal=True)
    if run.rc != 0:
        raise Verdict("traceback", f"topk table: exit {run.rc}: {short(run.first())}")
    if special not in run.out:
        rows = [line for line in run.out.splitlines() if "│" in line or "|" in line]
        eaten = special.replace("[b]", "").replace("[/]", "")
        hint = f"; the table shows {eaten!r} instead" if eaten in run.out else ""
        raise Verdict("silent-wrong", f"the id {special!r} is not in the topk table (markup eaten){hint}; {len(rows)} table rows")
    return f"init, 4 appends, topk table shows {special!r} literally"


@case("ids", "markup-id-[b]t1-table", "train id '[b]t1' through init and the topk table")
def ids_markup_bold(ctx: Ctx) -> str:
    return _id_in_table(ctx, "[b]t1")


@case("ids", "markup-id-x[/]y-table", "train id 'x[/]y' through init and the topk table")
def ids_markup_close(ctx: Ctx) -> str:
    return _id_in_table(ctx, "x[/]y")


def _error_path(ctx: Ctx, bad: str) -> str:
    s = _ids_store(ctx, ["t0", "t1", "t2"])
    run = expect(ctx.cli("topk", s, "--query-set", "test", "--query", bad, "-k", "2", what="topk --query (unknown id)"), allow_refusal=True)
    if run.rc == 0:
        raise Verdict("silent-wrong", f"topk --query {bad!r} (unknown) exited 0")
    if bad not in run.err:
        raise Verdict("silent-wrong", f"the error line lost the markup of {bad!r}: {short(run.first())}")
    return f"exit 2, {short(run.first(), 120)}"


@case("ids", "markup-id-error-path-[/]", "topk --query 'x[/]nope' (an unknown id holding [/]): the error line")
def ids_error_close(ctx: Ctx) -> str:
    return _error_path(ctx, "x[/]nope")


@case("ids", "markup-id-error-path-[b]", "topk --query '[b]nope' (an unknown id holding [b]): the error line keeps it")
def ids_error_bold(ctx: Ctx) -> str:
    return _error_path(ctx, "[b]nope")


def _ids_file_case(ctx: Ctx, raw: bytes, want: list[str], label: str) -> str:
    import daunce_store

    (ctx.tmp / "ids.txt").write_bytes(raw)
    (ctx.tmp / "q.txt").write_text("q0\n")
    s = ctx.tmp / "s.zarr"
    run = expect(ctx.cli("init", s, "--train-ids", ctx.tmp / "ids.txt", "--query-set", f"test={ctx.tmp / 'q.txt'}"), allow_refusal=True)
    if run.rc != 0:
        return f"init refused: {short(run.first())}"
    got = [str(i) for i in daunce_store.open(str(s), mode="r").train_ids]
    if got != want:
        raise Verdict("silent-wrong", f"{label}: ids {want!r} were stored as {got!r}")
    return f"{label}: stored as {got!r}"


@case("ids", "ids-txt-U+2028", "a .txt id file with U+2028 (line separator) inside an id")
def ids_u2028(ctx: Ctx) -> str:
    return _ids_file_case(ctx, "t0\na\u2028b\nt2\n".encode(), ["t0", "a\u2028b", "t2"], "U+2028")


@case("ids", "ids-txt-NEL", "a .txt id file with NEL (U+0085) inside an id")
def ids_nel(ctx: Ctx) -> str:
    return _ids_file_case(ctx, "t0\na\u0085b\nt2\n".encode(), ["t0", "a\u0085b", "t2"], "NEL")


@case("ids", "ids-txt-form-feed", "a .txt id file with a form feed inside an id")
def ids_ff(ctx: Ctx) -> str:
    return _ids_file_case(ctx, b"t0\na\x0cb\nt2\n", ["t0", "a\x0cb", "t2"], "form feed")


@case("ids", "ids-txt-BOM", "a .txt id file starting with a UTF-8 BOM")
def ids_bom(ctx: Ctx) -> str:
    return _ids_file_case(ctx, b"\xef\xbb\xbft0\nt1\nt2\n", ["t0", "t1", "t2"], "BOM")


@case("ids", "ids-newline-select-ids-output", "train ids holding a newline (from a CSV id file); daunce select --ids-output; read back")
def ids_newline_select(ctx: Ctx) -> str:
    import daunce_store

    want = ["a\nx", "b\ny", "c\nz"]
    (ctx.tmp / "ids.csv").write_text("id\n" + "".join(f'"{i}"\n' for i in want))
    (ctx.tmp / "q.txt").write_text("q0\n")
    s = ctx.tmp / "s.zarr"
    run = expect(ctx.cli("init", s, "--train-ids", f"{ctx.tmp / 'ids.csv'}:id", "--query-set", f"test={ctx.tmp / 'q.txt'}"), allow_refusal=True)
    if run.rc != 0:
        return f"init refused: {short(run.first())}"
    st = daunce_store.open(str(s))
    got = [str(i) for i in st.train_ids]
    if got != want:
        raise Verdict("silent-wrong", f"ids {want!r} were stored as {got!r}")
    for k in range(4):
        st.append(f"p{k}", col(k, 3), {"test": col(k, 1, 1)})
    out = ctx.tmp / "sel.txt"
    run = expect(ctx.cli("select", s, "--query-set", "test", "--top", "2", "--remove", "helpful", "--write", "removed",
                         "--ids-output", out, what="select --ids-output"), allow_refusal=True)
    if run.rc != 0:
        return f"select refused: {short(run.first())}"
    lines = out.read_text(encoding="utf-8").split("\n")
    lines = lines[:-1] if lines and lines[-1] == "" else lines
    stray = [line for line in lines if line not in want]
    if len(lines) != 2 or stray:
        raise Verdict("silent-wrong", f"select said {short(' '.join(run.lines()[-1:]), 60)!r} but {out.name} holds {len(lines)} lines "
                      f"{lines!r}, {len(stray)} of them no train id: ids holding a newline are split at it")
    return f"select wrote 2 ids, one per line: {lines!r}"


@case("ids", "ids-NFC-NFD", "train ids 'café' (NFC) and 'café' (NFD): a warning naming both is expected")
def ids_nfc_nfd(ctx: Ctx) -> str:
    nfc, nfd = unicodedata.normalize("NFC", "caf\u00e9"), unicodedata.normalize("NFD", "caf\u00e9")
    (ctx.tmp / "ids.txt").write_text(f"t0\n{nfc}\n{nfd}\n", encoding="utf-8")
    (ctx.tmp / "q.txt").write_text("q0\n")
    run = expect(ctx.cli("init", ctx.tmp / "s.zarr", "--train-ids", ctx.tmp / "ids.txt", "--query-set", f"test={ctx.tmp / 'q.txt'}"),
                 allow_refusal=True)
    if run.rc != 0:
        return f"init refused: {short(run.first())}"
    warned = [line for line in run.lines() if "warning" in line.lower()]
    if not warned:
        raise Verdict("silent-wrong", "init accepted both spellings without a warning")
    both = (nfc in warned[0] and nfd in warned[0]) or ("\\u0301" in warned[0])
    return f"warned{'' if both else ' (does not show both spellings)'}: {short(warned[0], 120)}"


# --- odd layouts -------------------------------------------------------------------------------------------------


def _nested(ctx: Ctx, sub: str) -> str:
    s = ctx.tmp / "s.zarr"
    expected = make_store(s, n=32, m=2, k=4)
    (ctx.tmp / "ids.txt").write_text("a\nb\n")
    run = expect(ctx.cli("init", s / sub, "--train-ids", ctx.tmp / "ids.txt", what=f"init S/{sub}"), allow_refusal=True)
    said = "refused: " + short(run.first(), 110) if run.rc != 0 else f"init S/{sub} accepted (not refused)"
    expect(ctx.cli("status", s, what="status S"))
    no_loss(ctx, s, expected, f"S after init S/{sub}")
    return f"{said}; S: status runs, verify clean, 4 columns bit-identical"


@case("odd layouts", "init-inside-store", "daunce init S/sub inside an existing store S; then status, verify S and read its columns")
def odd_nested(ctx: Ctx) -> str:
    return _nested(ctx, "sub")


@case("odd layouts", "init-inside-store-queries", "daunce init S/queries/sub (inside S's query-set group); then status, verify, read S")
def odd_nested_queries(ctx: Ctx) -> str:
    return _nested(ctx, "queries/sub")


BOMB = """\
factory: "robustness_factory:make"
factory_kwargs:
  a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
  b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
  c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
  d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
  e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
  f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
  g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
  h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
  i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


@case("odd layouts", "yaml-billion-laughs", "daunce perturb --config with a billion-laughs alias bomb in factory_kwargs (10 s, 4 GiB)")
def odd_bomb(ctx: Ctx) -> str:
    s = ctx.tmp / "s.zarr"
    make_store(s, n=8, m=1, k=0)
    (ctx.tmp / "cfg.yaml").write_text(BOMB)
    run = ctx.cli("perturb", s, "--config", ctx.tmp / "cfg.yaml", "--no-progress", "--workers", "1", timeout=10, limit_mb=4096,
                  what="perturb --config bomb")
    expect(run, allow_refusal=True)
    if run.rc == 0:
        raise Verdict("silent-wrong", "perturb accepted the alias bomb and exited 0")
    msg = run.first()
    if "alias" not in msg.lower() and "yaml" not in msg.lower():
        return f"refused in {run.seconds:.1f} s, not for the aliases: {short(msg)}"
    return f"refused in {run.seconds:.1f} s: {short(msg)}"


def _stray(ctx: Ctx, rel: str) -> str:
    s = ctx.tmp / "s.zarr"
    expected = make_store(s, n=32, m=2, k=8, pack_width=4)
    expect(ctx.cli("compact", s))
    (s / rel).parent.mkdir(parents=True, exist_ok=True)
    (s / rel).write_text('{"note": "left by someone"}\n' if rel.endswith(".json") else "a note someone left\n")
    refused = []
    run = expect(ctx.cli("verify", s, "--format", "json", "--no-progress", what=f"verify with {rel}"), allow_refusal=True)
    if run.rc == 2:
        refused.append(f"verify refused: {short(run.first(), 90)}")
        noted = []
    else:
        report = verify_cli(ctx, s, f"verify with {rel}")
        if report["damage"]:
            raise Verdict("silent-wrong", f"verify calls the stray file damage: {short(report['damage'][0]['message'])}")
        noted = [f["message"] for f in report["notes"] if rel.rsplit("/", 1)[-1] in f["message"] or rel in f.get("key", "")]
    gc_run = expect(ctx.cli("gc", s, "--grace", "0", what=f"gc with {rel}"), allow_refusal=True)
    if gc_run.rc != 0:
        refused.append(f"gc refused: {short(gc_run.first(), 60)}")
    st = expect(ctx.cli("status", s, what=f"status with {rel}"), allow_refusal=True)
    if st.rc != 0:
        refused.append(f"status refused: {short(st.first(), 60)}")
    (s / rel).unlink()  # what was committed is intact once the note is gone
    no_loss(ctx, s, expected, "after removing the stray file")
    if refused:
        return "; ".join(refused) + " (one line, exit 2: not a note, as the issue asks); columns intact"
    return f"verify ok{' with a note: ' + short(noted[0], 90) if noted else ' (no note about it)'}; gc and status run; columns intact"


@case("odd layouts", "stray-slots-notes.txt", "a stray _daunce/slots/notes.txt; verify, gc --grace 0, status")
def odd_stray_slots(ctx: Ctx) -> str:
    return _stray(ctx, "_daunce/slots/notes.txt")


@case("odd layouts", "stray-_daunce-junk", "a stray file _daunce/junk; verify, gc --grace 0, status")
def odd_stray_junk(ctx: Ctx) -> str:
    return _stray(ctx, "_daunce/junk")


@case("odd layouts", "stray-slots-notes.json", "a stray _daunce/slots/notes.json holding a JSON object; verify, gc --grace 0, status")
def odd_stray_slots_json(ctx: Ctx) -> str:
    return _stray(ctx, "_daunce/slots/notes.json")


@case("odd layouts", "stray-packs-notes.json", "a stray _daunce/packs/notes.json holding a JSON object; verify, gc --grace 0, status")
def odd_stray_packs(ctx: Ctx) -> str:
    return _stray(ctx, "_daunce/packs/notes.json")


@case("odd layouts", "stray-fates-notes.json", "a stray _daunce/fates/notes.json holding a JSON object; verify, gc --grace 0, status")
def odd_stray_fates(ctx: Ctx) -> str:
    return _stray(ctx, "_daunce/fates/notes.json")


# ------------------------------------------------------------------------------------------------------------
# The child entry point
# ------------------------------------------------------------------------------------------------------------


def child(name: str, tmp: Path, src: Path) -> None:
    import daunce_store

    got = Path(daunce_store.__file__).resolve()
    if not got.is_relative_to(src.resolve()):
        result = {"outcome": "harness-error", "detail": f"imported {got}, not from {src}", "steps": []}
    else:
        ctx = Ctx(tmp, src)
        chosen = next(c for c in CASES if c.name == name)
        try:
            detail = chosen.fn(ctx)
            result = {"outcome": "clear", "detail": detail}
        except Verdict as v:
            result = {"outcome": v.outcome, "detail": v.detail}
        except Exception as e:  # noqa: BLE001 - a failure of the harness, not a finding
            result = {"outcome": "harness-error", "detail": f"{type(e).__name__}: {e}; {traceback.format_exc()[-600:]}"}
        result["steps"] = ctx.steps
    result = json.loads(json.dumps(result).replace(str(tmp), "$TMP"))
    sys.stdout.write("\n" + RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------------------------
# The parent: run every case against every checkout and print the tables
# ------------------------------------------------------------------------------------------------------------


def checkout_label(src: Path) -> str:
    sha = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no", "--", "daunce_store"],
                           capture_output=True, text=True).stdout.strip()
    return f"{sha or src}{' + uncommitted' if dirty else ''}"


def child_env(src: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [env.get("PYTHONPATH")])])
    env["DAUNCE_STORE_NO_EXT"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def check_import(src: Path) -> str:
    done = subprocess.run([sys.executable, "-c", "import daunce_store; print(daunce_store.__file__)"], capture_output=True, text=True,
                          env=child_env(src), cwd=tempfile.gettempdir())
    where = done.stdout.strip()
    if not where or not Path(where).resolve().is_relative_to(src.resolve()):
        raise SystemExit(f"--src {src}: daunce_store imports from {where or done.stderr.strip()[-300:]}, not from {src}")
    return where


def unmount_under(path: Path) -> None:
    for line in Path("/proc/mounts").read_text().splitlines():
        point = line.split()[1]
        if point.startswith(str(path)):
            subprocess.run(["umount", "-l", point], capture_output=True)


def run_case(c: Case, src: Path) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="robust-" + "".join(ch if ch.isalnum() else "-" for ch in c.name[:20]) + "-"))
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", c.name, "--tmp", str(tmp), "--src", str(src)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(src), cwd=tmp, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=c.timeout)
        text = out.decode("utf-8", "replace")
        mark = text.rfind(RESULT_MARK)
        if mark >= 0:
            result = json.loads(text[mark + len(RESULT_MARK):].splitlines()[0])
        else:
            result = {"outcome": "harness-error", "detail": f"the child died (rc {proc.returncode}): {err.decode()[-400:]}", "steps": []}
    except subprocess.TimeoutExpired:
        result = {"outcome": "hang", "detail": f"no answer in {c.timeout:.0f} s", "steps": []}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the case and whatever it started (stopped writers included)
        with contextlib.suppress(Exception):
            proc.communicate(timeout=5)
        unmount_under(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    result["seconds"] = round(time.monotonic() - t0, 1)
    return result


def ensure_old_worktree() -> Path:
    if not (OLD_WORKTREE / "daunce_store").exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(OLD_WORKTREE), OLD_COMMIT], check=True,
                       capture_output=True)
    return OLD_WORKTREE


def md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def tables(labels: list[str], results: dict[str, dict[str, dict[str, Any]]], cases: list[Case]) -> str:
    extra = any(r["outcome"] not in OUTCOMES for res in results.values() for r in res.values())
    head = ["class", "checkout", "cases", *OUTCOMES, *(["harness-error"] if extra else [])]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for cls in [*CLASSES, None]:
        names = [c.name for c in cases if cls is None or c.cls == cls]
        if not names:
            continue
        for label in labels:
            counts = [sum(results[label][n]["outcome"] == o for n in names) for o in OUTCOMES]
            if extra:
                counts.append(sum(results[label][n]["outcome"] not in OUTCOMES for n in names))
            cells = [str(len(names)), *map(str, counts)]
            if cls is None:
                cells = [f"**{v}**" for v in cells]
            lines.append(f"| {cls or '**all**'} | {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| class | case | " + " | ".join(labels) + " | " + " | ".join(f"{label}: detail" for label in labels) + " |")
    lines.append("|" + "---|" * (2 + 2 * len(labels)))
    for c in cases:
        outs = [results[label][c.name]["outcome"] for label in labels]
        details = [md_escape(results[label][c.name]["detail"]) for label in labels]
        lines.append(f"| {c.cls} | {c.name} | " + " | ".join(f"**{o}**" if o != "clear" else o for o in outs) + " | "
                     + " | ".join(details) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", action="append", type=Path, help="a checkout to test (repeatable); default: 6359129 and this one")
    parser.add_argument("--only", action="append", help="run only these cases (repeatable)")
    parser.add_argument("--json", type=Path, help="also write every result (steps included) here")
    parser.add_argument("--list", action="store_true", help="list the cases")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.tmp, args.src[0])
        return
    if args.list:
        for c in CASES:
            print(f"{c.cls:12} {c.name:28} {c.title}")
        return
    cases = [c for c in CASES if not args.only or c.name in args.only]
    srcs = [p.resolve() for p in args.src] if args.src else [ensure_old_worktree(), REPO]
    labels, results, started = [], {}, time.monotonic()
    for i, src in enumerate(srcs):
        label = checkout_label(src)
        if not args.src:
            label = f"{'before' if i == 0 else 'after'} ({label})"
        labels.append(label)
        print(f"# {label}: daunce_store from {check_import(src)} (DAUNCE_STORE_NO_EXT=1)", file=sys.stderr, flush=True)
        results[label] = {}
        for c in cases:
            r = run_case(c, src)
            results[label][c.name] = r
            print(f"  {c.cls:12} {c.name:28} {r['outcome']:13} {r['seconds']:6.1f} s  {short(r['detail'], 140)}", file=sys.stderr, flush=True)
    print(f"# {len(cases)} cases x {len(srcs)} checkouts in {time.monotonic() - started:.0f} s, "
          f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC", file=sys.stderr)
    print(tables(labels, results, cases))
    if args.json:
        args.json.write_text(json.dumps({"labels": labels, "cases": [dataclasses.asdict(c) | {"fn": c.fn.__name__} for c in cases],
                                         "results": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
