"""Engine speed with and without shared-prefix reuse, in one run: each demo tier answers the same
demo rows in the job's unit size, once with prefix reuse (the default) and once with it off
(every prompt prefilled in full, left padding); rows/s of each, and whether the answers and
log-probabilities are the same. Then the same for the demo's choices (`choose`): the engine
(the shared prefix once per engine, each row's prompt once, its cache scoring every choice)
against full sequences (every prompt + choice prefilled in full, one left-padded forward per
unit: the way to score choices without reuse), and against free generation with full prefill
(the demo job's engine work before any reuse).

    .venv/bin/python bench/engine_bench.py [--rows 200] [--unit 50]
"""

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def timed_generate(engine, prompts, sampling, unit):
    t0 = time.perf_counter()
    gens = [g for i in range(0, len(prompts), unit) for g in engine.generate(prompts[i:i + unit], sampling)]
    return gens, time.perf_counter() - t0


def timed_choose(engine, prompts, choices, unit):
    t0 = time.perf_counter()
    gens = [g for i in range(0, len(prompts), unit)
            for g in engine.choose(prompts[i:i + unit], [choices] * len(prompts[i:i + unit]))]
    return gens, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--unit", type=int, default=50)
    args = ap.parse_args()

    import dataclasses

    import polars as pl
    import torch

    from jobs.spec import load_spec
    from job_bench import plain_choose
    from workers.engines.transformers_engine import TransformersEngine, shared_prefix

    spec = load_spec(ROOT / "examples/demo/job.yaml")
    prompts = pl.read_parquet(ROOT / "examples/demo/prompts.parquet")["prompt"].head(args.rows).to_list()
    print(f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}; {len(prompts)} demo rows "
          f"in units of {args.unit}")
    for tier in spec.tiers:
        off = dataclasses.replace(tier, engine_args={**tier.engine_args, "prefix_reuse": False})
        engines = {"reuse": TransformersEngine(tier), "full prefill": TransformersEngine(off)}
        for e in engines.values():                      # warm both before timing
            e.generate(prompts[:4], tier.sampling)
        ids = engines["reuse"].tokenizer(prompts[:args.unit])["input_ids"]
        runs = {name: timed_generate(e, prompts, tier.sampling, args.unit) for name, e in engines.items()}
        (a, ta), (b, tb) = runs["reuse"], runs["full prefill"]
        same_text = all(x.text == y.text and x.finish_reason == y.finish_reason for x, y in zip(a, b))
        worst = max(abs(p - q) for x, y in zip(a, b) for p, q in zip(x.token_logprobs, y.token_logprobs))
        print(f"{tier.name}: shared prefix {shared_prefix(ids)} of {sum(map(len, ids)) / len(ids):.0f} "
              f"tokens per prompt; full prefill {len(prompts) / tb:.2f} rows/s, prefix reuse "
              f"{len(prompts) / ta:.2f} rows/s: {tb / ta:.2f}x; answers identical: "
              f"{'yes' if same_text else 'NO'}, largest log-probability difference {worst:.1e}")
        choices = list(tier.choices or spec.choices or [])
        if not choices:
            continue
        engines["reuse"].choose(prompts[:4], [choices] * 4)
        c, tc = timed_choose(engines["reuse"], prompts, choices, args.unit)
        # full sequences: every prompt + choice prefilled in full, one forward per unit
        batches = [prompts[i:i + args.unit] for i in range(0, len(prompts), args.unit)]
        answers, lps, tf = plain_choose(engines["reuse"].tokenizer, engines["reuse"].model, batches, choices)
        same = all(x.text == a for x, a in zip(c, answers))
        worst = max(abs(p - q) for x, lp in zip(c, lps) for p, q in zip(x.token_logprobs, lp))
        print(f"{tier.name} choices {choices}: full sequences {len(prompts) / tf:.2f} rows/s, engine "
              f"{len(prompts) / tc:.2f} rows/s: {tf / tc:.2f}x; {tb / tc:.2f}x the rows/s of free generation "
              f"with full prefill; answers identical: {'yes' if same else 'NO'}, largest "
              f"log-probability difference {worst:.1e}")


if __name__ == "__main__":
    main()
