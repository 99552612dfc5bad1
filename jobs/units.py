"""A unit: a batch of rows run on one tier. `run_units` is the task code that both the Celery
tier workers (one unit per task: `run_unit`) and the embedded executor (several units of a tier
at a time) call.

Running a unit: take it in the state store (a lease, renewed by a heartbeat while it runs), run
its rows on the tier's engine in one batched call, decide per row (stop, or which tier next),
and commit the result: a write-once file at a path fixed by (tier, unit). Then one atomic state
transition records it, puts its escalated rows in the waiting lists of their tiers and cuts the
units that are now full; the caller writes their inputs and sends them. Running a unit twice
leaves one result (the first commit wins) and enqueues its escalations once. Run several at a
time, each unit is still its own engine call, attempt and commit; only the bookkeeping between
the engine and the commit (`decide_units`: features, decisions, result tables) is one pass over
all their rows.

An engine error is retried with exponential backoff up to the spec's `max_attempts`; a unit
whose worker dies holding it is run again when its lease expires, and that counts as an
attempt too. After the last attempt the unit's rows become per-row errors with the reason, and
the job goes on.

A tier's run of a row is one struct (jobs.layout.TIER_STRUCT), kept in the unit's result as the column
`_t<tier>`; finalize gathers each row's runs from every tier's results into the output's `tiers`
list. Rows go on to the next tier without their earlier runs unless the policy judges on them
(a calibrated artifact: `needs_lineage`), so a tier neither copies nor rewrites what earlier
tiers recorded. No row becomes a Python object on this path unless the policy is a calibrated
artifact.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import socket
import time
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs import failpoints, scheduling
from jobs.answers import AnswerStore, deterministic, row_keys, tier_fingerprint
from jobs.job import live_state, open_job
from jobs.layout import CHOICE_FEATURES, FEATURES, INTERNAL, TIER_STRUCT, result_file, targets_counted, tier_column
from jobs.state import backoff, heartbeat
from workers.engines.base import Generations, get_engine

log = logging.getLogger(__name__)

def _audited(row_id: str, share: float) -> bool:
    """Whether a row is audited: a fixed share of rows, by a hash of the row's id, so an audited
    row is audited on every tier and runs them all (its outcome on every tier becomes known:
    what `cascade logs` exports and a policy learns from)."""
    return (zlib.crc32(f"{row_id}|audit".encode()) % 1_000_000) < share * 1_000_000


def _prompts(table: pa.Table, engine, tier_name: str) -> tuple[list, list]:
    """The prompt of each row (None where it has none) and the per-row error for those."""
    col = table.column("prompt")
    prompts = col.to_pylist()
    errors: list[str | None] = [None] * len(prompts)
    if col.null_count == 0 and all(map(str.strip, prompts)):   # the common case: all have text
        return prompts, errors
    blank = np.array([p is None or not p.strip() for p in prompts], dtype=bool)
    messages = table.column("messages").to_pylist() if "messages" in table.column_names else None
    for i in np.flatnonzero(blank):
        p = None
        if messages is not None and prompts[i] is None and messages[i]:
            if not (messages[i][-1].get("content") or "").strip():
                errors[i] = "empty message"       # nothing to answer: the last message is blank
            else:
                try:
                    p = engine.render(messages[i])
                except Exception as exc:  # a chat the template rejects: that row only
                    errors[i] = f"cannot render messages on tier {tier_name}: {exc}"
        if p is None or not p.strip():
            prompts[i] = None
            errors[i] = errors[i] or "empty prompt"
        else:
            prompts[i] = p
    return prompts, errors


def _samplings(table: pa.Table, base, rows: list[int]) -> tuple[list, list[str | None]]:
    """Each row's sampling: the tier's, with the row's own `max_tokens` / `temperature` input
    columns (where present and not null) lowering it, never raising it; and an error for a row
    whose cap is not usable."""
    out, errors = [base] * len(rows), [None] * len(rows)
    if "max_tokens" not in table.column_names and "temperature" not in table.column_names:
        return out, errors
    none = [None] * table.num_rows
    mts, temps = (table.column(c).to_pylist() if c in table.column_names else none
                  for c in ("max_tokens", "temperature"))
    for j, i in enumerate(rows):
        mt, temp = mts[i], temps[i]
        if mt is not None and mt < 1:
            errors[j] = f"max_tokens must be at least 1, found {mt}"
        elif temp is not None and not temp >= 0:
            errors[j] = f"temperature must be >= 0, found {temp}"
        else:
            cap_mt = base.max_tokens if mt is None else min(mt, base.max_tokens)
            cap_temp = base.temperature if temp is None else min(temp, base.temperature)
            if (cap_mt, cap_temp) != (base.max_tokens, base.temperature):
                out[j] = dataclasses.replace(base, max_tokens=cap_mt, temperature=cap_temp)
    return out, errors


def _generate(engine, prompts: list[str], samplings: list, choices: list | None) -> Generations:
    """Rows with choices in one engine.choose call; the others one engine call per distinct
    sampling (one call when no row caps it); answers in order, column-wise. `choices` None:
    no row has any."""
    if not prompts:
        return Generations.of([])
    if choices is None and samplings.count(samplings[0]) == len(samplings):    # one sampling
        return Generations.of(engine.generate(prompts, samplings[0]))
    choices = choices or [None] * len(prompts)
    groups: dict = {}
    for j, (s, c) in enumerate(zip(samplings, choices)):
        groups.setdefault("choose" if c is not None else (s.max_tokens, s.temperature), []).append(j)
    if len(groups) == 1 and "choose" in groups:
        return Generations.of(engine.choose(prompts, choices))
    out = [None] * len(prompts)
    for key, members in groups.items():
        rows = [prompts[j] for j in members]
        gens = (engine.choose(rows, [choices[j] for j in members]) if key == "choose"
                else engine.generate(rows, samplings[members[0]]))
        for j, g in zip(members, gens):
            out[j] = g
    return Generations.of(out)


def _choices(table: pa.Table, default: list[str] | None) -> list | None:
    """Each row's valid answers: its own non-empty `choices` list, else the tier's or job's;
    None when no row has any."""
    if "choices" not in table.column_names:
        return None if default is None else [default] * table.num_rows
    rows = [c if c else default for c in table.column("choices").to_pylist()]
    return rows if any(c is not None for c in rows) else None


@functools.lru_cache(maxsize=64)
def _vocabulary(words: tuple[str, ...]) -> pa.StringArray:
    return pa.array(words, pa.string())


@functools.lru_cache(maxsize=64)
def _constant(word: str) -> pa.StringArray:
    return pa.repeat(word, 4096).cast(pa.string())


def _repeated(word: str, n: int) -> pa.StringArray:
    """`word` n times: a slice of a cached array (one unit's worth of rows at most)."""
    return _constant(word).slice(0, n) if n <= 4096 else pa.repeat(word, n).cast(pa.string())


@functools.lru_cache(maxsize=1)
def _false() -> pa.BooleanArray:
    return pa.array(np.zeros(4096, dtype=bool))


def _falses(n: int) -> pa.BooleanArray:
    """False n times: a slice of a cached array (the common case: no answer store)."""
    return _false().slice(0, n) if n <= 4096 else pa.array(np.zeros(n, dtype=bool))


def _floats(values: np.ndarray) -> pa.Array:
    """Floats with NaN as null."""
    missing = np.isnan(values)
    return pa.nulls(len(values), pa.float64()) if missing.all() else pa.array(values, mask=missing)


def _words(words: tuple[str, ...], codes: np.ndarray) -> pa.StringArray:
    """The string array of words[codes[i]]: one word repeated (the common case: every row's
    status) is a slice of a cached array, others a take."""
    if len(codes) and (codes == codes[0]).all():
        return _repeated(words[codes[0]], len(codes))
    return _vocabulary(words).take(pa.array(codes))


@dataclasses.dataclass
class Answers:
    """One unit's rows after its engine call: what the decisions and the result table need."""
    table: pa.Table                  # the unit's rows
    ok: list[int]                    # the rows that ran, in order
    errors: list[str | None]         # per row: why it did not run
    gens: Generations                # the answers of the rows in `ok`
    per_row: float | np.ndarray      # engine seconds per row that ran (or per row of `table`)
    reused: np.ndarray | None = None  # per row of `table`: its answer came from the answer store


def answer(job, unit: dict, engine, fail_reason: str | None = None) -> Answers:
    """Run one unit's rows on its tier's engine in one batched call (per distinct sampling; rows
    with choices in one choose call). `engine()` gives the tier's engine, called only if a row
    needs it (with an answer store, rows answered before are looked up instead). With
    `fail_reason`, no engine runs: every row gets that error (a unit out of attempts)."""
    tier = unit["tier"]
    table = job.store.read_arrow(unit["file"])
    if table.num_rows != unit["rows"]:        # a routed shard holding rows that start elsewhere
        table = table.filter(pc.equal(table.column("next_tier"), tier))
    if fail_reason is None and job.spec.answers is not None:
        return _answer_reusing(job, tier, table, engine)
    return _answer_rows(job, tier, table, engine, fail_reason)


_FINGERPRINTS: dict[tuple[str, int], str] = {}


def _answer_reusing(job, tier: int, table: pa.Table, engine) -> Answers:
    """`_answer_rows` for the rows the answer store lacks; the others from the store, marked
    reused. The deterministic rows computed here are added to the store."""
    ts = job.spec.tiers[tier]
    store = AnswerStore(job.spec.answers)
    fp = _FINGERPRINTS.get((job.id, tier))
    if fp is None:
        fp = _FINGERPRINTS[(job.id, tier)] = tier_fingerprint(ts)
    keys = row_keys(fp, table, _choices(table, ts.choices or job.spec.choices))
    may = deterministic(table, ts, job.spec.answers.reuse_sampled)
    candidates = np.flatnonzero(may)
    hit, stored, stored_seconds = store.lookup(fp, [keys[i] for i in candidates])
    found = candidates[hit]
    n = table.num_rows
    reused = np.zeros(n, dtype=bool)
    reused[found] = True
    rest = np.flatnonzero(~reused)
    gens: dict[int, object] = {int(i): g for i, g in zip(found, stored)}
    seconds = np.zeros(n)
    seconds[found] = stored_seconds
    errors: list[str | None] = [None] * n
    if len(rest):
        a = _answer_rows(job, tier, table.take(pa.array(rest)), engine, None)
        ran = rest[a.ok]
        for j, e in enumerate(a.errors):
            errors[rest[j]] = e
        for i, g in zip(ran, a.gens):
            gens[int(i)] = g
        seconds[ran] = a.per_row
        new = [j for j, i in enumerate(ran) if may[i]]
        if new:
            store.add(fp, [keys[ran[j]] for j in new], Generations.of([a.gens[j] for j in new]),
                      np.full(len(new), a.per_row), job.id)
    ok = sorted(gens)
    return Answers(table, ok, errors, Generations.of([gens[i] for i in ok]), seconds, reused)


def _answer_rows(job, tier: int, table: pa.Table, engine, fail_reason: str | None) -> Answers:
    """`answer` on the rows of `table`, all through the engine."""
    spec = job.spec
    ts = spec.tiers[tier]
    n = table.num_rows
    if fail_reason is not None:
        prompts, errors = [None] * n, [fail_reason] * n
    else:
        engine = engine()
        prompts, errors = _prompts(table, engine, ts.name)
    every_prompt = errors.count(None) == n
    live = list(range(n)) if every_prompt else [i for i, p in enumerate(prompts) if p is not None]
    samplings, bad = _samplings(table, ts.sampling, live)
    if any(bad):
        for i, e in zip(live, bad):
            errors[i] = e or errors[i]
        samplings = [s for s, e in zip(samplings, bad) if e is None]
        live = [i for i, e in zip(live, bad) if e is None]
    ok = []
    if live:
        live_prompts = prompts if len(live) == n else [prompts[i] for i in live]
        counts = np.asarray(engine.count_tokens(live_prompts))
        caps = (samplings[0].max_tokens if samplings.count(samplings[0]) == len(samplings)
                else np.array([s.max_tokens for s in samplings]))
        long = counts > engine.context_length - caps
        if long.any():
            caps = np.broadcast_to(caps, long.shape)
            for i, c, cap in zip(np.asarray(live)[long], counts[long], caps[long]):
                errors[i] = (f"prompt has {c} tokens; with max_tokens {cap} it "
                             f"exceeds tier {ts.name}'s context of {engine.context_length}")
            ok = [i for i, too in zip(live, long) if not too]
            samplings = [s for s, too in zip(samplings, long) if not too]
        else:
            ok = live
    t0 = time.perf_counter()
    every = len(ok) == n                      # the common case: every row runs
    row_choices = _choices(table, ts.choices or spec.choices)
    gens = _generate(engine, live_prompts if ok is live else [prompts[i] for i in ok], samplings,
                     row_choices if every or row_choices is None else [row_choices[i] for i in ok])
    return Answers(table, ok, errors, gens, (time.perf_counter() - t0) / max(len(ok), 1))


def execute(job, unit: dict, engine, fail_reason: str | None = None) -> "Result":
    """Run one unit's rows on its tier's `engine` (`answer`) and decide: the unit's Result."""
    return decide_units(job, unit["tier"], [answer(job, unit, lambda: engine, fail_reason)])[0]


@dataclasses.dataclass
class Result:
    """A unit's result table, with what its file's metadata records."""
    table: pa.Table
    targets: dict[int, int]          # rows escalated per next tier
    span: list[int] | None           # its rows' smallest and largest input position


def decide_units(job, tier: int, units: list[Answers]) -> list[Result]:
    """Features and policy decisions for the answered rows of one or more units of a tier, in
    one pass over all their rows; returns each unit's result table: its rows with this tier's
    run added (_t<tier>), next_tier (null: the row stops) and kept_tier (whose answer is the
    row's if it stops), with its escalation targets and span. The units' tables must have the
    same columns."""
    spec = job.spec
    ts = spec.tiers[tier]
    if len(units) == 1:
        a = units[0]
        table, ok, errors, gens = a.table, a.ok, a.errors, a.gens
        per_row = a.per_row
    else:
        table = pa.concat_tables([a.table for a in units])
        ok = [i + s for a, s in zip(units, _bounds(units)[0]) for i in a.ok]
        errors = [e for a in units for e in a.errors]
        gens = Generations.concat([a.gens for a in units])
        per_row = np.concatenate([np.broadcast_to(a.per_row, a.table.num_rows) for a in units])
    n = table.num_rows
    every = len(ok) == n

    # This tier's answers, column-wise; rows that did not run keep zeros and nulls.
    idx = np.asarray(ok, dtype=np.int64)
    is_ok = np.ones(n, dtype=bool) if every else np.zeros(n, dtype=bool)
    is_ok[idx] = True
    texts = gens.text
    response = pa.array(texts, pa.string())
    reasons = gens.finish_reason
    finish = (_repeated(reasons[0], len(reasons)) if reasons and reasons.count(reasons[0]) == len(reasons)
              else pa.array(reasons, pa.string()))
    if not every:                             # spread over all rows, nulls where none ran
        spread = pa.array(np.where(is_ok, np.cumsum(is_ok) - 1, -1), pa.int64(), mask=~is_ok)
        response, finish = response.take(spread), finish.take(spread)
    ptok, otok = np.zeros(n, np.int32), np.zeros(n, np.int32)
    ptok[idx] = gens.prompt_tokens
    otok[idx] = gens.output_tokens
    feats = {f: np.zeros(n) for f in FEATURES}
    choice = {f: np.full(n, np.nan) for f in CHOICE_FEATURES}
    with_choices = gens.choice_prob is not None
    if ok:
        for f, v in gens.features().items():
            feats[f][idx] = v
        if with_choices:
            choice["choice_prob"][idx] = gens.choice_prob
            choice["choice_margin"][idx] = gens.choice_margin
    cost = np.where(is_ok, ts.cost.per_input_token * ptok + ts.cost.per_output_token * otok, 0.0)
    seconds = np.where(is_ok, per_row, 0.0)
    reused = (np.concatenate([np.zeros(a.table.num_rows, bool) if a.reused is None else a.reused
                              for a in units]) if any(a.reused is not None for a in units) else None)

    # Decisions on the rows that answered; an error on this tier ends the row, keeping the
    # answer of the tier it came from, if any. Decision codes: -1 error, 0 stop, k escalate:k.
    next_tier = np.full(n, -1, dtype=np.int64)
    kept_col = table.column("kept_tier")
    if kept_col.null_count == n:
        kept = np.full(n, -1, np.int64)
    elif kept_col.null_count == 0:
        kept = kept_col.to_numpy().astype(np.int64)
    else:
        kept = kept_col.fill_null(-1).to_numpy().astype(np.int64)
    p_quality = np.full(n, np.nan)
    audit = np.zeros(n, dtype=bool)
    if ok:
        current = {f: feats[f][idx] for f in FEATURES}
        current.update({f: np.nan_to_num(choice[f][idx]) if with_choices else np.zeros(len(idx))
                        for f in CHOICE_FEATURES})                                   # absent: 0
        current.update(response=texts, cost=cost[idx])
        rows = table if every else table.take(pa.array(idx))
        nxt, keep, q = job.policy.decide(tier, rows, current)
        if spec.audit_share > 0 and tier < len(spec.tiers) - 1:
            ids = table.column("id").to_pylist()
            for j, i in enumerate(ok):
                if nxt[j] != tier + 1 and _audited(ids[i], spec.audit_share):
                    nxt[j], audit[i] = tier + 1, True      # stopped or skipped: run the next tier
        next_tier[idx], kept[idx] = nxt, np.where(nxt < 0, keep, tier)
        if q is not None:
            p_quality[idx] = q
    code = np.where(is_ok, np.maximum(next_tier, 0), -1)
    decisions = ("error", "stop", *(f"escalate:{k}" for k in range(1, len(spec.tiers))))
    no_error = errors.count(None) == n
    rec = pa.StructArray.from_arrays([
        pa.array(np.full(n, tier, np.int32)), _repeated(ts.name, n),
        _words(("error", "ok"), is_ok.astype(np.intp)),
        pa.nulls(n, pa.string()) if no_error else pa.array(errors, pa.string()), response,
        finish, pa.array(ptok), pa.array(otok),
        pa.array(feats["first_logprob"]), pa.array(feats["mean_logprob"]),
        pa.array(feats["min_logprob"]), _floats(p_quality),
        _words(decisions, code + 1), pa.array(audit),
        pa.array(seconds), pa.array(cost),
        *(_floats(choice[f]) for f in CHOICE_FEATURES),
        _falses(n) if reused is None else pa.array(reused)], fields=list(TIER_STRUCT))
    cols = {c: col for c, col in zip(table.column_names, table.columns) if c not in INTERNAL}
    cols[tier_column(tier)] = rec
    cols["next_tier"] = pa.array(next_tier.astype(np.int32), mask=next_tier < 0)
    cols["kept_tier"] = pa.array(kept.astype(np.int32), mask=kept < 0)
    result = pa.table(cols)
    pos = table.column("_row").to_numpy()
    out = []
    for s, e in zip(*_bounds(units)):
        out.append(Result(result if len(units) == 1 else result.slice(s, e - s),
                          targets_counted(next_tier[s:e]),
                          [int(pos[s:e].min()), int(pos[s:e].max())] if e > s else None))
    return out


def _bounds(units: list[Answers]) -> tuple[list[int], list[int]]:
    """Where each unit's rows start and end in the rows of all."""
    ends = np.cumsum([a.table.num_rows for a in units]).tolist()
    return [0, *ends[:-1]], ends


# ---------------------------------------------------------------- the task function

def run_unit(job_dir: str, unit_id: str, *, state=None, engine_factory=None, dispatch=None,
             worker: str | None = None, job_id: str | None = None, rebuild=None) -> str:
    """Run one unit (idempotent) and commit it. Returns what happened: 'done', 'duplicate',
    'retry' (the engine failed; due again later), or why it did not run: 'busy' (another worker
    holds it, or the job's state is missing and is being rebuilt), 'cancelled', 'stale' (the
    message is for a job no longer in that directory), 'unknown'."""
    return run_units(job_dir, [unit_id], state=state, engine_factory=engine_factory,
                     dispatch=dispatch, worker=worker, job_id=job_id, rebuild=rebuild)[0]


def run_units(job_dir: str, unit_ids: list[str], *, state=None, engine_factory=None,
              dispatch=None, worker: str | None = None, job_id: str | None = None,
              rebuild=None) -> list[str]:
    """`run_unit` for several units of one tier: each is taken, run on the engine (its own
    call: a unit is the engine's batch) and committed on its own, as if run alone; their
    features, decisions and result tables are computed in one pass over all their rows (the
    embedded executor runs units this way: per unit, that bookkeeping costs more than the
    scripted engine double's answers). Returns each unit's verdict, in order.

    Only a job whose state is missing (Redis restarted empty) leaves this path: `rebuild(job,
    state, dispatch)` (the executor's; a Celery worker passes recovery.ensure_state) may rebuild
    it and returns whether the state is there now; without it, the units wait for the
    reconciler, which rebuilds the state and sends them again."""
    job = open_job(job_dir, job_id)
    if job_id and job.id != job_id:
        return ["stale"] * len(unit_ids)
    state = state if state is not None else live_state(job)
    if not state.exists() and not (rebuild is not None and rebuild(job, state, dispatch)):
        return ["busy"] * len(unit_ids)   # its state is being rebuilt; the rebuild sends them
    verdicts: dict[str, str] = {}
    taken = []
    for uid in unit_ids:
        verdict, unit = state.start(uid, worker or socket.gethostname(), time.time())
        if verdict != "run":
            verdicts[uid] = "duplicate" if verdict == "done" else verdict
        else:
            taken.append(unit)
    if not taken:
        return [verdicts[u] for u in unit_ids]
    committed: list[tuple[dict, dict | None]] = []     # (unit, targets or None: read them)
    with heartbeat(state, [u["id"] for u in taken]):
        answered = []
        for unit in taken:
            if job.store.exists(result_file(unit["id"], unit["tier"])):
                committed.append((unit, None))             # committed earlier, or by another
            elif (a := _answer_or_retry(job, unit, state, engine_factory or get_engine)) is None:
                verdicts[unit["id"]] = "retry"
            else:
                answered.append((unit, a))
        for unit, result in _decide_each(job, answered, state):
            if result is None:
                verdicts[unit["id"]] = "retry"
                continue
            failpoints.hit("before_result_write")
            if not job.current():
                verdicts[unit["id"]] = "stale"    # the directory was overwritten with a new job
                continue
            committed.append((unit, write_result(job, unit["id"], unit["tier"], result)))
            failpoints.hit("after_result_write")
    for unit, targets in committed:
        if targets is None:
            meta = job.store.arrow_meta(result_file(unit["id"], unit["tier"]))
            targets = {int(k): v for k, v in meta["targets"].items()}
        verdicts[unit["id"]] = commit(job, state, unit["id"], targets, dispatch)
    return [verdicts[u] for u in unit_ids]


def _answer_or_retry(job, unit: dict, state, get_engine) -> Answers | None:
    """A taken unit's answers. An engine that raises is retried with backoff (None: the unit
    is due again later) until the unit is out of attempts; then, as for a unit whose workers
    kept dying, its rows get the error."""
    tier = unit["tier"]
    if unit["attempts"] > job.spec.max_attempts:
        return answer(job, unit, None, fail_reason=(
            f"unit {unit['id']} failed {unit['attempts'] - 1} times (its worker stopped while "
            f"running it; last error: {unit.get('error')})"))
    try:
        return answer(job, unit, lambda: get_engine(job.spec.tiers[tier]))
    except Exception as exc:
        return _failed(job, unit, state, exc)


def _failed(job, unit: dict, state, exc: Exception) -> Answers | None:
    err = f"{type(exc).__name__}: {exc}"
    log.exception("unit %s of job %s failed (attempt %d)", unit["id"], job.id, unit["attempts"])
    if unit["attempts"] < job.spec.max_attempts:
        state.fail(unit["id"], err, time.time() + backoff(unit["attempts"]))
        return None
    return answer(job, unit, None, fail_reason=(
        f"tier {job.spec.tiers[unit['tier']].name} failed {unit['attempts']} times: {err}"))


def _decide_each(job, answered: list[tuple[dict, Answers]], state):
    """(unit, result table) for answered units of one tier: decided together when their rows
    have the same columns, else one by one; a unit whose decision raised is handled as an
    engine failure (result None: due again later)."""
    if not answered:
        return []
    tier = answered[0][0]["tier"]
    schema = answered[0][1].table.schema
    if len(answered) > 1 and all(a.table.schema.equals(schema) for _, a in answered):
        try:
            return list(zip([u for u, _ in answered], decide_units(job, tier, [a for _, a in answered])))
        except Exception as exc:              # judged again one by one, so only its unit fails
            log.warning("deciding %d units of tier %d together failed (%s: %s); deciding them one "
                        "by one", len(answered), tier, type(exc).__name__, exc)
    out = []
    for unit, a in answered:
        try:
            out.append((unit, decide_units(job, tier, [a])[0]))
        except Exception as exc:
            again = _failed(job, unit, state, exc)
            out.append((unit, None if again is None else decide_units(job, tier, [again])[0]))
    return out


def write_result(job, unit_id: str, tier: int, result: Result) -> dict[int, int] | None:
    """Commit a unit's result, write-once. Returns its escalation targets, or None if a result
    was committed first by someone else."""
    ok = job.store.write_arrow(result_file(unit_id, tier), result.table,
                               {"unit": unit_id, "rows": result.table.num_rows,
                                "targets": result.targets, "span": result.span}, once=True)
    return result.targets if ok else None


def commit(job, state, unit_id: str, targets: dict[int, int], dispatch) -> str:
    """Record a committed unit; cut, write and send the units it completes; finalize the job
    when nothing is left."""
    adv = state.done(unit_id, targets, time.time())
    failpoints.hit("after_state_update")
    if adv.cuts:
        failpoints.hit("between_commit_and_cut")
    scheduling.follow(job, state, adv, dispatch)
    return adv.status
