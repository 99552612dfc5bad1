"""Builds examples/demo/prompts.parquet from ../shared/data/eval/sst2.parquet (SST-2, Apache-2.0
repo github.com/tonyzhaozh/few-shot-learning). 4-shot completion prompts: four training reviews
(the first two positive and two negative of a seeded draw, each under 120 characters) with
their labels, then the test review; the reference is its label. Also writes
examples/demo/calibration.parquet: 200 other training rows in the same format, on which
examples/demo/calibrate.yaml runs both tiers for every row to choose the demo's threshold. Run from the repo root:
    .venv/bin/python examples/demo/make_prompts.py ../shared/data/eval/sst2.parquet
"""

import sys

import pandas as pd

ROWS = 200


def main(src: str, out: str = "examples/demo/prompts.parquet"):
    d = pd.read_parquet(src)
    train = d[d.split == "train"].sample(200, random_state=0)
    train = train[train.text.str.len() < 120]          # short shots keep prompts short (speed)
    test = d[d.split == "test"].sample(ROWS, random_state=1)
    # Calibration rows for the threshold: training rows that are not shots (calibration.parquet).
    calib = d[(d.split == "train") & ~d.id.isin(train.id)].sample(ROWS, random_state=2)
    pos, neg = train[train.label == "positive"], train[train.label == "negative"]
    shots = pd.concat([pos.iloc[[0]], neg.iloc[[0]], pos.iloc[[1]], neg.iloc[[1]]])
    head = "".join(f"Review: {r.text}\nSentiment: {r.label}\n\n" for r in shots.itertuples())
    for rows, path in ((test, out), (calib, out.replace("prompts", "calibration"))):
        frame = pd.DataFrame({
            "id": "sst2-" + rows.id.astype(str),
            "prompt": [head + f"Review: {t}\nSentiment:" for t in rows.text],
            "reference": rows.label.to_numpy(),
            "review": rows.text.to_numpy(),
        })
        frame.to_parquet(path, index=False)
        print(f"wrote {len(frame)} rows to {path}")


if __name__ == "__main__":
    main(*sys.argv[1:])
