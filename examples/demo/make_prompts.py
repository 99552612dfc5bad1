"""Builds examples/demo/prompts.parquet from ../shared/data/eval/sst2.parquet (SST-2, Apache-2.0
repo github.com/tonyzhaozh/few-shot-learning). 4-shot completion prompts: four training reviews
(the first two positive and two negative of a seeded draw, each under 120 characters) with
their labels, then the test review; the reference is its label. Also writes
examples/demo/calibration.parquet: 200 other training rows in the same format, on which
examples/demo/calibrate.yaml runs both tiers for every row to choose the demo's threshold. Run from the repo root:
    .venv/bin/python examples/demo/make_prompts.py ../shared/data/eval/sst2.parquet
"""

import sys

import numpy as np
import polars as pl

ROWS = 200


def sample(frame: pl.DataFrame, n: int, seed: int) -> pl.DataFrame:
    """n rows drawn without replacement by numpy's legacy RandomState(seed), in draw order (the
    draw the committed prompt files were made with)."""
    return frame[np.random.RandomState(seed).choice(len(frame), n, replace=False)]


def main(src: str, out: str = "examples/demo/prompts.parquet"):
    d = pl.read_parquet(src)
    split = pl.col("split")
    train = sample(d.filter(split == "train"), 200, 0)
    train = train.filter(pl.col("text").str.len_chars() < 120)   # short shots keep prompts short (speed)
    test = sample(d.filter(split == "test"), ROWS, 1)
    # Calibration rows for the threshold: training rows that are not shots (calibration.parquet).
    calib = sample(d.filter((split == "train") & ~pl.col("id").is_in(train["id"].implode())), ROWS, 2)
    pos, neg = (train.filter(pl.col("label") == lab) for lab in ("positive", "negative"))
    shots = pl.concat([pos[0], neg[0], pos[1], neg[1]])
    head = "".join(f"Review: {r['text']}\nSentiment: {r['label']}\n\n" for r in shots.iter_rows(named=True))
    for rows, path in ((test, out), (calib, out.replace("prompts", "calibration"))):
        frame = rows.select(
            ("sst2-" + pl.col("id").cast(pl.String)).alias("id"),
            (head + "Review: " + pl.col("text") + "\nSentiment:").alias("prompt"),
            pl.col("label").alias("reference"),
            pl.col("text").alias("review"),
        )
        frame.write_parquet(path)
        print(f"wrote {len(frame)} rows to {path}")


if __name__ == "__main__":
    main(*sys.argv[1:])
