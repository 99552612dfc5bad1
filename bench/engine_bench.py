"""Engine speed with and without shared-prefix reuse, in one run: each demo tier answers the same
demo rows in the job's unit size, once with prefix reuse (the default) and once with it off
(every prompt prefilled in full, left padding); rows/s of each, and whether the answers and
log-probabilities are the same.

    .venv/bin/python bench/engine_bench.py [--rows 200] [--unit 50]
"""

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed_generate(engine, prompts, sampling, unit):
    t0 = time.perf_counter()
    gens = [g for i in range(0, len(prompts), unit) for g in engine.generate(prompts[i:i + unit], sampling)]
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


if __name__ == "__main__":
    main()
