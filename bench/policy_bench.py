"""Policy speed: calibration of a 12,000-row three-tier ladder on two cores, and predictor plus
decision per row in batches (features precomputed), plus the text-feature extraction cost; then
the same with prompt embeddings (calibrate --embeddings): the encoder's cost per prompt, printed
on its own, and calibration and predictor speed with the embeddings given.

    .venv/bin/python bench/policy_bench.py [LOGS.parquet]

Without LOGS it uses ../shared/data/logged/mmlu_pro_llama31_mixtral.parquet when present, else
a synthetic 12,000-row ladder.
"""

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cascade.calibrate import fit_policy
from cascade.features import observe_all
from cascade.ladder import load_ladder
from cascade.policy import decide


def main():
    torch.set_num_threads(2)
    default = Path(__file__).resolve().parents[1].parent / "shared/data/logged/mmlu_pro_llama31_mixtral.parquet"
    path = sys.argv[1] if len(sys.argv) > 1 else (str(default) if default.exists() else None)
    if path:
        ladder = load_ladder(path, require_quality=True)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.synthetic import three_tier
        ladder = load_ladder(three_tier(12_000, seed=0), require_quality=True)
    print(f"ladder: {path or 'synthetic'}: {len(ladder)} rows x {ladder.n_tiers} tiers; "
          f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}")

    t0 = time.perf_counter()
    policy, report = fit_policy(ladder)
    print(f"calibration: {time.perf_counter() - t0:.1f} s wall for {len(ladder)} rows "
          f"({len(policy.predictors)} states x {policy.train_config.folds} folds, "
          f"{len(policy.points)} operating points)")

    t0 = time.perf_counter()
    obs = observe_all(ladder)
    per_row_feat = (time.perf_counter() - t0) / (len(ladder) * (ladder.n_tiers + 1))
    print(f"text features: {per_row_feat * 1e6:.0f} us per text (prompt or output)")

    speed(policy, obs)

    # With prompt embeddings (calibrate --embeddings): the encoding cost on its own, then the
    # calibration and the predictor with the embeddings given.
    from cascade.encoder import DEFAULT_ENCODER, get_encoder
    from cascade.predictor import TrainConfig

    enc = get_encoder(DEFAULT_ENCODER)
    sample = [ladder.prompts[i] for i in np.random.default_rng(0).choice(len(ladder), 256, replace=False)]
    t0 = time.perf_counter()
    enc._encode(sample)
    print(f"\nprompt embedding ({enc.info.model}, CPU, {torch.get_num_threads()} threads): "
          f"{(time.perf_counter() - t0) / len(sample) * 1e3:.1f} ms per prompt (256 of the ladder's "
          f"prompts, batches of {enc.batch}, at most {enc.info.max_tokens} tokens)")
    emb = enc.embed(ladder.prompts, cache_dir=Path(__file__).resolve().parents[1] / "runs/cache/embeddings")
    t0 = time.perf_counter()
    policy, report = fit_policy(ladder, cfg=TrainConfig(encoder=DEFAULT_ENCODER), embedding=emb)
    e = report.embeddings
    print(f"calibration with embeddings (encoding aside): {time.perf_counter() - t0:.1f} s wall; "
          f"{e['heads_reading']} of {e['heads']} heads read the embedding")
    obs = observe_all(ladder, emb if policy.encoder else None)
    speed(policy, obs)


def speed(policy, obs):
    point = policy.point()
    for state in [(), (0,), (0, 2)]:
        x = policy.featurizer(obs, state)
        for batch in (1024, 8192):
            xb = x[:batch]
            basis_len = obs.prompt_dense[:batch]
            reps = max(1, 40_000 // batch)
            t0 = time.perf_counter()
            for _ in range(reps):
                q = policy.predictors[state].predict(xb)
                plen = policy.featurizer.prompt_scaler(basis_len)[:, 0].astype(np.float64)
                from cascade.policy import phi
                decide(state, q, phi(q, plen), point, policy.n_tiers)
            us = (time.perf_counter() - t0) / (reps * batch) * 1e6
            print(f"predictor + decision, state {state}, batch {batch}: {us:.2f} us/row")


if __name__ == "__main__":
    main()
