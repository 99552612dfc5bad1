"""Job-system benchmark on the demo: rows/s per tier and end to end through `cascade run`
(embedded executor), the same rows through plain transformers at the same batch size (overhead
ratio: `model.generate`, or for the demo's choices one full forward scoring every choice), cold and cached model loads, and the demo's quality and cost against running
every row on the last tier (measured here by running every row on it with plain generate).

    .venv/bin/python bench/job_bench.py [--rows 200] [--cold] [--before]

--cold also measures the first load of each GGUF model (de-quantization into a fresh cache).
--before also runs the same rows as the demo job was before the engine work: free generation
(no choices; a first_logprob rule) with every prompt prefilled in full (prefix_reuse: false),
and prints each tier's rows/s in both jobs, in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def plain_model(model_ref: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.engines.models import local_dir

    path, _ = local_dir(model_ref)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok, AutoModelForCausalLM.from_pretrained(path).eval()


def plain_generate(tok, model, batches: list[list[str]], max_tokens: int):
    """Plain `model.generate`, greedy, one call per batch; returns (first lines, seconds)."""
    import torch

    texts, t0 = [], time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            enc = tok(batch, return_tensors="pt", padding=True)
            out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            texts += [t.split("\n")[0] for t in tok.batch_decode(out[:, enc["input_ids"].shape[1]:],
                                                                 skip_special_tokens=True)]
    return texts, time.perf_counter() - t0


def plain_choose(tok, model, batches: list[list[str]], choices: list[str]):
    """Plain transformers scoring of every choice after every prompt: one left-padded full forward
    per batch of (prompt, choice) sequences, no prefix reuse; the answer is the choice with the
    highest summed token log-probability. Returns (answers, each answer's token log-probabilities,
    seconds)."""
    import torch

    from workers.engines.base import choice_text

    answers, lps, t0 = [], [], time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            seqs, widths = [], []
            for prompt in batch:
                ids = tok(prompt)["input_ids"]
                for c in choices:
                    c_ids = tok(choice_text(prompt, c), add_special_tokens=False)["input_ids"]
                    seqs.append(ids + c_ids)
                    widths.append(len(c_ids))
            enc = tok.pad({"input_ids": seqs}, return_tensors="pt", padding=True)
            pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            keep = max(widths) + 1                # logits of the choice positions only
            logits = model(**enc, position_ids=pos, logits_to_keep=keep).logits.float()
            logp = logits - torch.logsumexp(logits, -1, keepdim=True)
            each = [logp[i, keep - 1 - w:keep - 1].gather(-1, enc["input_ids"][i, -w:, None]).squeeze(-1).tolist()
                    for i, w in enumerate(widths)]
            for r in range(len(batch)):
                row = each[r * len(choices):(r + 1) * len(choices)]
                best = max(range(len(choices)), key=lambda k: sum(row[k]))
                answers.append(choices[best])
                lps.append(row[best])
    return answers, lps, time.perf_counter() - t0


def before_job(work: Path, now: list[dict]) -> list[dict]:
    """The demo as it ran before the engine work, on the same rows: free generation (the spec
    without choices, a first_logprob rule), every prompt prefilled in full. Per tier: its
    rows/s, and the demo's rows/s now as a multiple of it."""
    import yaml

    from jobs.embedded import LocalExecutor
    from jobs.submit import submit
    from jobs.spec import parse_spec

    raw = yaml.safe_load((ROOT / "examples/demo/job.yaml").read_text())
    raw.pop("choices", None)
    raw.update(input=str(work / "in.parquet"), output=str(work / "job-before"),
               policy={"rule": {"feature": "first_logprob", "threshold": -0.5}})
    for t in raw["tiers"]:
        t["engine_args"] = {**t.get("engine_args", {}), "prefix_reuse": False}
    spec = parse_spec(raw, base_dir=ROOT)
    ex = LocalExecutor()
    submit(spec, state=ex.state, dispatch=ex.dispatch, overwrite=True)
    ex.drain()
    wall = {t["unit"]: t["seconds"] for t in ex.timings if t["state"] == "done"}
    out = []
    for i, t in enumerate(spec.tiers):
        us = [u for u in ex.state.units.values() if u["tier"] == i]
        rows, secs = sum(u["rows"] for u in us), sum(wall[u["id"]] for u in us)
        rps = rows / secs if secs else None
        out.append({"tier": t.name, "rows": rows, "rows_per_s": rps,
                    "now_over_before": now[i]["rows_per_s"] / rps if rps and now[i]["rows_per_s"] else None})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--before", action="store_true",
                    help="also run the demo as it was before the engine work, same rows")
    args = ap.parse_args()

    import polars as pl
    import torch

    from jobs import report
    from jobs.embedded import LocalExecutor
    from jobs.submit import submit
    from jobs.spec import load_spec
    from workers.engines import base
    from workers.engines.transformers_engine import TransformersEngine

    print(f"torch threads: {torch.get_num_threads()}, cpu count: {os.cpu_count()}")
    spec = load_spec(ROOT / "examples/demo/job.yaml")
    work = Path(tempfile.mkdtemp(prefix="job-bench-"))
    frame = pl.read_parquet(spec.input).head(args.rows)
    frame.write_parquet(work / "in.parquet")
    spec.input, spec.output = str(work / "in.parquet"), str(work / "job")

    loads = {}
    if args.cold:
        old = os.environ.get("CASCADE_MODEL_CACHE")
        os.environ["CASCADE_MODEL_CACHE"] = str(work / "cold-cache")
        for t in spec.tiers:
            t0 = time.perf_counter()
            TransformersEngine(t)
            loads[t.name] = {"cold_s": time.perf_counter() - t0}
        if old is None:
            del os.environ["CASCADE_MODEL_CACHE"]
        else:
            os.environ["CASCADE_MODEL_CACHE"] = old
    for t in spec.tiers:
        TransformersEngine(t)                 # make sure the normal cache exists
        t0 = time.perf_counter()
        TransformersEngine(t)
        loads.setdefault(t.name, {})["cached_s"] = time.perf_counter() - t0

    # Both sides warm: the job's engines (kept loaded by the registry) and the plain models each
    # generate once for 8 prompts before anything is timed; model loads are timed above.
    warm = frame["prompt"].head(8).to_list()
    plain_models = {}
    for t in spec.tiers:
        base.get_engine(t).generate(warm, t.sampling)
        plain_models[t.name] = plain_model(t.model)
        plain_generate(*plain_models[t.name], [warm], t.sampling.max_tokens)
    t0 = time.perf_counter()
    ex = LocalExecutor()
    job = submit(spec, state=ex.state, dispatch=ex.dispatch, overwrite=True)
    ex.drain()
    e2e = time.perf_counter() - t0
    wall = {t["unit"]: t["seconds"] for t in ex.timings if t["state"] == "done"}
    units = [{**u, "seconds": wall[u["id"]]} for u in ex.state.units.values()]
    res = report.run_all(job.dir)
    per_tier = []
    for i, t in enumerate(spec.tiers):
        us = [u for u in units if u["tier"] == i]
        rows, secs = sum(u["rows"] for u in us), sum(u["seconds"] for u in us)
        per_tier.append({"tier": t.name, "units": len(us), "rows": rows, "unit_seconds": secs,
                         "rows_per_s": rows / secs if secs else None})
    out = pl.read_parquet(Path(job.dir) / "results" / "*.parquet")

    # The same rows through plain model.generate, in the same batches as the job's units.
    plain = {}
    for i, t in enumerate(spec.tiers):
        batches = []
        for u in sorted((u for u in units if u["tier"] == i), key=lambda u: u["id"]):
            tab = pl.from_arrow(job.store.read_arrow(u["file"]))
            batches.append(tab.filter(pl.col("next_tier") == i)["prompt"].to_list())
        n = sum(map(len, batches))
        if t.choices or spec.choices:            # the demo answers from its choices
            _, _, secs = plain_choose(*plain_models[t.name], batches, t.choices or spec.choices)
        else:
            _, secs = plain_generate(*plain_models[t.name], batches, t.sampling.max_tokens)
        plain[t.name] = {"rows": n, "batches": [len(b) for b in batches], "seconds": secs,
                         "rows_per_s": n / secs if secs else None}
    for p in per_tier:
        base_rps = plain[p["tier"]]["rows_per_s"]
        p["overhead_ratio"] = base_rps / p["rows_per_s"] if p["rows_per_s"] else None
    # Every row on the last tier: the job's own engine on every prompt, in batches of shard_rows,
    # charged as the job charges (measured prompt and output tokens), scored with the reports'
    # label scorer: the all-last-tier baseline, comparable with the job's own figures.
    import duckdb

    last = spec.tiers[-1]
    engine = base.get_engine(last)
    prompts = out["prompt"].to_list()
    t0 = time.perf_counter()
    labels = last.choices or spec.choices
    gens = [g for i in range(0, len(prompts), spec.shard_rows)
            for g in (engine.choose(prompts[i:i + spec.shard_rows],
                                    [labels] * len(prompts[i:i + spec.shard_rows])) if labels
                      else engine.generate(prompts[i:i + spec.shard_rows], last.sampling))]
    secs = time.perf_counter() - t0
    con = duckdb.connect()
    con.execute(report.SCORER_MACROS)
    scored = pl.DataFrame({"response": [g.text for g in gens], "reference": out["reference"].to_list()})
    con.register("scored", scored.to_arrow())
    quality = con.execute("SELECT avg(label_match(response, reference)::DOUBLE) FROM scored").fetchone()[0]
    all_last = {"tier": last.name, "rows": len(prompts), "seconds": secs, "quality": float(quality),
                "cost_measured": sum(last.cost.per_input_token * g.prompt_tokens
                                     + last.cost.per_output_token * g.output_tokens for g in gens)}

    before = None
    if args.before:
        before = before_job(work, per_tier)

    q = {r[2] if r[0] == "overall" else f"tier{r[1]}": r[5] for r in res["quality"][1]}
    cost = dict(zip(*[res["cost"][0], res["cost"][1][0]]))
    summary = {"rows": len(out), "end_to_end_s": e2e, "end_to_end_rows_per_s": len(out) / e2e,
               "per_tier": per_tier, "plain_generate": plain, "model_load": loads,
               "every_row_on_last_tier": all_last,
               "quality": q, "cost": cost,
               "selection": {r[1]: r[2] for r in res["selection"][1]}}
    if before is not None:
        summary["before_engine_work"] = before
    print(json.dumps(summary, indent=1, default=float))


if __name__ == "__main__":
    main()
