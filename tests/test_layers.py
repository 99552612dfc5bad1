"""The code's layering, locked in: every module of cascade/, jobs/ and workers/ sits in one layer
(LAYERS, bottom first) and imports only from its own layer or below, with no import cycle,
counting the imports written inside functions. An import inside a function is allowed only where
it saves import time: its target pulls in a heavy package (HEAVY) that the importer's other
callers never need, and the line says why in a comment; the command-line modules (CLI) import
what each command runs, so that `cascade --help` starts in a tenth of a second.

Also here: a healthy unit never runs through jobs/recovery.py (the happy path and the cleanup
are separate), and `cascade --help` lists every command however the package was imported."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

import tests.doubles  # noqa: F401  (registers the scripted engine for spec validation)

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cascade", "jobs", "workers")

# Bottom first. A module imports from its own layer or a lower one; a new module must be placed.
LAYERS = [
    # the decision-science library and the engines: neither knows about jobs
    ["cascade", "cascade.*", "workers", "workers.engines", "workers.engines.*"],
    # names and plumbing: a job directory's layout, storage, the spec, brokers, crash points
    ["jobs", "jobs.layout", "jobs.storage", "jobs.spec", "jobs.broker", "jobs.failpoints"],
    # the state store contract (memory, Redis: every Redis detail), and where job directories live
    ["jobs.state", "jobs.roots"],
    # inputs, the policy adapters, the job model, its progress as status shows it
    ["jobs.inputs", "jobs.policies", "jobs.job", "jobs.progress"],
    # work files, the answer store, finalize, and the reports and exports of a finished job
    ["jobs.workfiles", "jobs.answers", "jobs.finalize", "jobs.report", "jobs.export", "jobs.retention"],
    # the scheduling that follows a transition
    ["jobs.scheduling"],
    # submit, unit execution
    ["jobs.submit", "jobs.units"],
    # recovery: rebuild, reconcile, resume, cancel
    ["jobs.recovery"],
    # control: status, cancel, resume of a job directory
    ["jobs.control"],
    # executors: embedded, the worker's reconciler thread, the Celery app
    ["jobs.embedded", "workers.reconciler", "workers.celery_app"],
    # the command line: one root group
    ["jobs.cli"],
]
CLI = {"jobs.cli", "cascade.commands"}
HEAVY = {"torch", "duckdb", "redis", "celery", "vllm", "transformers", "sklearn", "polars",
         "scipy", "matplotlib", "safetensors"}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = f
    return out


def layer_of(mod: str) -> int:
    for k, layer in enumerate(LAYERS):
        for pat in layer:
            if mod == pat or (pat.endswith(".*") and mod.startswith(pat[:-1])):
                return k
    raise AssertionError(f"module {mod} is in no layer: place it in tests/test_layers.py LAYERS")


def imports(mods: dict[str, Path]):
    """(importer, imported project module, third-party top names, is inside a function, line)."""
    def resolve(name):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    for mod, f in mods.items():
        text = f.read_text()
        lines = text.splitlines()
        tree = ast.parse(text)
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            else:
                continue
            inner = id(node) not in top and not _type_checking(tree, node)
            where = (f, node.lineno, lines[node.lineno - 1])
            if names[0].split(".")[0] not in PACKAGES:
                yield mod, None, names[0].split(".")[0], inner, where
                continue
            # `from jobs import control, recovery` imports two modules; `from jobs.state import
            # X` one (X resolves to jobs.state)
            targets = {resolve(n) for n in (names[:-1] if isinstance(node, ast.ImportFrom) else names)}
            for target in sorted(t for t in targets if t and t != mod):
                yield mod, target, None, inner, where


def _type_checking(tree, node) -> bool:
    for block in ast.walk(tree):
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test):
            if any(n is node for n in ast.walk(block)):
                return True
    return False


def graph():
    mods = modules()
    edges, third = {m: set() for m in mods}, {m: set() for m in mods}
    rows = list(imports(mods))
    for mod, target, ext, inner, _ in rows:
        if target and not inner:
            edges[mod].add(target)
        if ext and not inner:
            third[mod].add(ext)
    return mods, rows, edges, third


def heavy(mod: str, edges, third, seen=None) -> set[str]:
    """The heavy third-party packages importing `mod` loads (its top-level imports, transitively)."""
    seen = set() if seen is None else seen
    if mod in seen:
        return set()
    seen.add(mod)
    out = third[mod] & HEAVY
    for t in edges[mod]:
        out |= heavy(t, edges, third, seen)
    return out


def test_every_import_goes_down_or_across_a_layer():
    mods, rows, _, _ = graph()
    for m in mods:
        layer_of(m)
    up = [f"{f.relative_to(ROOT)}:{n}: {mod} (layer {layer_of(mod)}) imports {target} (layer "
          f"{layer_of(target)}): {line.strip()}"
          for mod, target, _, _, (f, n, line) in rows if target and layer_of(target) > layer_of(mod)]
    assert not up, "imports that go up a layer:\n" + "\n".join(up)


def test_no_import_cycle_counting_imports_inside_functions():
    mods, rows, _, _ = graph()
    g = {m: set() for m in mods}
    for mod, target, _, _, _ in rows:
        if target:
            g[mod].add(target)
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v, counter=[0]):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while (w := stack.pop()) != v:
                on.discard(w)
                comp.append(w)
            on.discard(v)
            if comp:
                cycles.append(sorted([v, *comp]))

    for v in g:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_imports_inside_functions_only_where_they_save_import_time():
    """Outside the command-line modules, a function-level import of a project module must load
    a heavy package its importer does not already load, and say why on its line."""
    mods, rows, edges, third = graph()
    bad = []
    for mod, target, _, inner, (f, n, line) in rows:
        if not inner or target is None or mod in CLI:
            continue
        saves = heavy(target, edges, third) - heavy(mod, edges, third)
        if not saves:
            bad.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()} (loads nothing heavy that "
                       f"{mod} lacks: import it at the top)")
        elif "#" not in line:
            bad.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()} (saves {sorted(saves)}: say so "
                       f"in a comment on the line)")
    assert not bad, "\n".join(bad)


def test_the_check_catches_an_upward_import_and_a_cycle(tmp_path, monkeypatch):
    """The checks above fail on what they are for: a copy of the tree where jobs.state imports
    jobs.recovery (up a layer, and a cycle, inside a function)."""
    import shutil

    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    bad = tmp_path / "jobs" / "state.py"
    bad.write_text(bad.read_text() + "\n\ndef _oops():\n    from jobs import recovery  # noqa\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    with pytest.raises(AssertionError, match="imports jobs.recovery"):
        test_every_import_goes_down_or_across_a_layer()
    with pytest.raises(AssertionError, match="import cycles"):
        test_no_import_cycle_counting_imports_inside_functions()


# ---------------------------------------------------------------- the happy path


def _spec(tmp_path, n=60, **extra):
    from jobs.spec import parse_spec

    pl.DataFrame({"prompt": [f"item {i} w{i}" for i in range(n)]}).write_parquet(tmp_path / "in.parquet")
    return parse_spec({
        "name": "layers", "input": str(tmp_path / "in.parquet"), "output": str(tmp_path / "job"),
        "shard_rows": 10, "batch_rows": 12,
        "tiers": [{"name": t, "model": "scripted", "engine": "scripted", "cost": {"per_token": 1 + i}}
                  for i, t in enumerate(["small", "large"])],
        "policy": {"rule": {"feature": "first_logprob", "threshold": -0.5}}, **extra})


def _watch_recovery(monkeypatch) -> list[str]:
    """Record every call of a function of jobs.recovery (through the module or a name bound
    from it elsewhere)."""
    import inspect

    from jobs import recovery

    calls: list[str] = []
    for name, fn in inspect.getmembers(recovery, inspect.isfunction):
        if fn.__module__ != recovery.__name__:
            continue

        def spy(*a, _fn=fn, _name=name, **kw):
            calls.append(_name)
            return _fn(*a, **kw)

        monkeypatch.setattr(recovery, name, spy)
        for mod in list(sys.modules.values()):
            if getattr(mod, "__name__", "").startswith(("jobs.", "workers.")) and getattr(mod, name, None) is fn:
                monkeypatch.setattr(mod, name, spy)
    return calls


def test_a_healthy_embedded_job_never_runs_recovery(tmp_path, monkeypatch):
    from jobs.embedded import run_embedded
    from tests.doubles import scripted_factory

    calls = _watch_recovery(monkeypatch)
    job = run_embedded(_spec(tmp_path), engine_factory=scripted_factory())
    out = pl.read_parquet(f"{job.dir}/results/*.parquet")
    assert len(out) == 60 and out["tiers_run"].list.len().max() == 2     # some rows escalated
    assert calls == []


@pytest.mark.redis
def test_healthy_units_on_redis_never_run_recovery_and_a_lost_state_does(tmp_path, monkeypatch):
    """Units of a job on Redis, run as a Celery worker runs them (with recovery.ensure_state as
    the rebuild for a lost state): while the state is there, no function of jobs.recovery runs;
    once the state is deleted (Redis restarted empty), the next unit rebuilds it through
    recovery, and the job still finishes with every row once."""
    from jobs import recovery
    from jobs.job import live_state
    from jobs.submit import submit
    from jobs.units import run_unit
    from tests.services import require_redis

    url = "redis://127.0.0.1:6379/15"
    require_redis(url)
    monkeypatch.setenv("CASCADE_PLUGINS", "tests.doubles")
    queue: list[tuple[str, str]] = []

    def dispatch(job_dir, units):
        queue.extend((job_dir, u["id"]) for u in units)

    job = submit(_spec(tmp_path), broker=url, dispatch=dispatch)
    calls = _watch_recovery(monkeypatch)
    state = live_state(job)
    try:
        for _ in range(3):                                  # three healthy units
            run_unit(*queue.pop(0), dispatch=dispatch, worker="w", job_id=job.id,
                     rebuild=recovery.ensure_state)
        assert calls == []
        state.delete()                                      # the state is lost
        queue.clear()
        verdict = run_unit(job.dir, "t0-s00005", dispatch=dispatch, worker="w", job_id=job.id,
                           rebuild=recovery.ensure_state)
        assert "ensure_state" in calls and "snapshot" in calls
        assert verdict in ("done", "duplicate")
        deadline = time.time() + 60
        while queue and time.time() < deadline:
            run_unit(*queue.pop(0), dispatch=dispatch, worker="w", job_id=job.id,
                     rebuild=recovery.ensure_state)
        out = pl.read_parquet(f"{job.dir}/results/*.parquet")
        assert len(out) == 60 and out["id"].is_unique().all()
    finally:
        state.delete()
        state.unregister()


# ---------------------------------------------------------------- one command root


def _commands(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport json; "
                          "print(json.dumps(sorted(main.commands)))"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


EVERY_COMMAND = sorted(["calibrate", "cancel", "compact", "eval", "export", "gc", "learn", "logs",
                        "replay", "report", "resume", "rollback", "run", "status", "submit", "worker"])


def test_cascade_help_lists_every_command_however_the_package_is_imported():
    assert _commands("from jobs.cli import main") == EVERY_COMMAND
    assert _commands("import cascade.commands, workers.celery_app\nfrom jobs.cli import main") == EVERY_COMMAND
    # the root group is defined once: the policy commands' module has none
    import cascade.commands

    assert not any(isinstance(v, __import__("click").Group) for v in vars(cascade.commands).values())
    # the console script (pyproject's entry point) prints them all
    script = Path(sys.executable).with_name("cascade")
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    listed = [line.split()[0] for line in out.stdout.split("Commands:")[1].splitlines() if line.strip()]
    assert listed == EVERY_COMMAND
