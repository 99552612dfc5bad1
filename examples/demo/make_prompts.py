"""Builds examples/demo/prompts.parquet from ../shared/data/eval/sst2.parquet (SST-2, Apache-2.0
repo github.com/tonyzhaozh/few-shot-learning). 4-shot completion prompts: four training reviews
with their labels, then the test review; the reference is its label. Run from the repo root:
    .venv/bin/python examples/demo/make_prompts.py ../shared/data/eval/sst2.parquet
"""

import sys

import pandas as pd

ROWS = 200


def main(src: str, out: str = "examples/demo/prompts.parquet"):
    d = pd.read_parquet(src)
    train = d[d.split == "train"].sample(200, random_state=0)
    test = d[d.split == "test"].sample(ROWS, random_state=1)
    pos, neg = train[train.label == "positive"], train[train.label == "negative"]
    shots = pd.concat([pos.iloc[[0]], neg.iloc[[0]], pos.iloc[[1]], neg.iloc[[1]]])
    head = "".join(f"Review: {r.text}\nSentiment: {r.label}\n\n" for r in shots.itertuples())
    frame = pd.DataFrame({
        "id": "sst2-" + test.id.astype(str),
        "prompt": [head + f"Review: {t}\nSentiment:" for t in test.text],
        "reference": test.label.to_numpy(),
        "review": test.text.to_numpy(),
    })
    frame.to_parquet(out, index=False)
    print(f"wrote {len(frame)} rows to {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
