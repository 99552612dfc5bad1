"""Decision quality: model choice per state, numeric confidence used monotonically, and do no
harm (points that do not beat the fixed-tier mix out of sample become that mix)."""

import numpy as np
import polars as pl
import pytest

from cascade.calibrate import fit_policy
from cascade.evaluate import evaluate
from cascade.features import Observations
from cascade.ladder import load_ladder
from cascade.policy import row_hash
from cascade.runtime import replay
from tests.synthetic import band_ladder, confidence_ladder, noise_ladder, three_tier


@pytest.fixture(scope="module")
def confident():
    cal = load_ladder(confidence_ladder(400, seed=1), require_quality=True)
    policy, report = fit_policy(cal)
    return policy, report, cal


def test_small_set_uses_the_confidence_column_not_the_mlp(confident):
    policy, report, _ = confident
    chosen = {(tuple(m["state"]), m["tier"]): m["model"] for m in report.model_choice}
    # tier 0's answer, once seen: 400 rows, one informative number -> a simple model of it
    assert chosen[((0,), 0)] in ("monotone:logprob@tier0", "linear"), chosen
    assert set(chosen.values()) <= {"prior", "linear", "gbt", "mlp"} | {f"monotone:logprob@tier{t}" for t in (0, 1)}
    # every choice is the lowest out-of-fold log-loss among the candidates, and the predictor the
    # policy runs for that state and tier is the one the report names
    for m in report.model_choice:
        assert m["log_loss"][m["model"]] == min(m["log_loss"].values())
        assert policy.predictors[tuple(m["state"])].heads[m["tier"]] == m["model"], m


def log_loss(p, y):
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def test_the_reported_log_losses_hold_on_rows_the_fit_never_saw(confident):
    """The report's numbers are checked against quantities computed here: the prior's loss is
    the entropy of the tier's success rate, and on 3000 fresh rows the chosen predictors score
    what the report said out of fold, far better than the base rate where tier 0's logprob is
    known, and never clearly worse than it anywhere."""
    policy, report, cal = confident
    fresh = load_ladder(confidence_ladder(3000, seed=5), require_quality=True)
    for m in report.model_choice:
        q = cal.quality[m["tier"]].mean()
        assert m["log_loss"]["prior"] == pytest.approx(-(q * np.log(q) + (1 - q) * np.log(1 - q)), abs=0.005)
        obs = Observations(fresh.prompts, fresh.prompt_text, fresh.prompt_num)
        for t in m["state"]:
            obs.reveal(t, list(fresh.outputs[t]), fresh.cost[t], {k: v[t] for k, v in fresh.output_num.items()})
        y = fresh.quality[m["tier"]]
        held_out = log_loss(policy.predict(obs, tuple(m["state"]))[:, m["tier"]], y)
        base = log_loss(np.full(len(y), q), y)
        assert held_out < base + 0.01, m
        assert held_out == pytest.approx(m["log_loss"][m["model"]], abs=0.04), (held_out, m)
        if m["tier"] == 0 and 0 in m["state"]:
            assert held_out < base - 0.2, (held_out, base)


def test_confidence_is_used_monotonically_and_non_finite_values_are_placed(confident):
    policy, _, cal = confident
    grid = [-np.inf, -8.0, -4.0, -2.0, -1.0, -0.5, -0.1, 0.0]
    obs = Observations(np.array([cal.prompts[0]] * (len(grid) + 1), dtype=object), {}, {})
    values = np.array(grid + [np.nan])
    obs.reveal(0, [cal.outputs[0, 0]] * len(values), np.full(len(values), 0.1), {"logprob": values})
    p = policy.predict(obs, (0,))[:, 0]
    assert np.isfinite(p).all()
    assert np.all(np.diff(p[:len(grid)]) >= -1e-9), p       # never less sure as logprob rises
    assert p[len(grid) - 1] - p[0] > 0.3                     # and it matters
    assert p[0] <= p[-1] <= p[len(grid) - 1]                 # missing: in between


def test_boosted_trees_win_where_the_signal_is_not_monotone_and_survive_the_artifact(tmp_path):
    """Tier 0 is right only inside a band of a prompt-level number: the boosted-tree candidate
    beats every monotone and linear map of it out of fold, is chosen, predicts as scikit-learn's
    own trees do, and the saved artifact predicts the same."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    from cascade.artifact import load_policy, save_policy
    from cascade.predictor import CANDIDATES, GBT_PARAMS, TrainConfig, TreeHead

    cal = load_ladder(band_ladder(1500, seed=3), require_quality=True)
    policy, report = fit_policy(cal, cfg=TrainConfig(models=CANDIDATES))     # trees are opt-in
    seen = next(m for m in report.model_choice if tuple(m["state"]) == (0,) and m["tier"] == 0)
    assert "monotone:difficulty" in seen["log_loss"]
    losses = seen["log_loss"]
    simple = [v for k, v in losses.items() if k in ("prior", "linear") or k.startswith("monotone")]
    assert losses["gbt"] < min(simple) - 0.05, losses
    assert seen["model"] in ("gbt", "mlp") and losses[seen["model"]] == min(losses.values())
    # the tree arrays evaluate as scikit-learn does (NaN included): two fits averaged, Platt-scaled
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 4))
    y = (np.abs(x[:, 0]) < 0.7).astype(float)
    est = HistGradientBoostingRegressor(**GBT_PARAMS, random_state=0).fit(x, y)
    x[::7, 0] = np.nan
    other = HistGradientBoostingRegressor(**GBT_PARAMS, random_state=1).fit(x[::2], y[::2])
    head = TreeHead.from_sklearn([est, other], 2.0, -0.5)
    assert np.allclose(head.score(x), 2.0 * (est.predict(x) + other.predict(x)) / 2 - 0.5, atol=1e-5)
    # through the artifact (JSON + safetensors): same predictions wherever trees were chosen
    assert any(p.trees for p in policy.predictors.values())
    back = load_policy(save_policy(policy, tmp_path / "policy"))
    obs = Observations(np.array(cal.prompts[:50], dtype=object), {}, {"difficulty": cal.prompt_num["difficulty"][:50]})
    obs.reveal(0, list(cal.outputs[0, :50]), np.full(50, 0.1), {})
    assert np.allclose(policy.predict(obs, (0,)), back.predict(obs, (0,)))


def test_noise_ladder_falls_back_to_fixed_tiers_and_does_no_harm():
    res = evaluate(load_ladder(noise_ladder(1500, seed=2), require_quality=True), online=False)
    s = res.summary
    assert s["gain"] >= -0.01, s["gain"]
    points = s["no_harm"]["points"]
    kept = [p for p in points if p["kind"] == "cascade"]
    assert any(p["kind"] == "fixed-tier mix" for p in points)
    assert all(p["confidence_better"] >= s["no_harm"]["confidence"] for p in kept)
    # the default runs unasked: a fixed tier, a mix, or a point that clears the bound for all
    default = next(p for p in points if p["label"] == s["default_point"])
    assert default["kind"] != "cascade" or default["t"] > default["default_threshold"] >= 0.67
    # The bootstrap resamples: a real interval around the estimate, and with no signal to use it
    # excludes any large gain (a ladder with signal is checked below).
    lo, hi = s["bootstrap"]["gain"]
    assert lo < s["gain"] < hi and 0.02 < hi - lo < 0.3 and hi < 0.15, (lo, s["gain"], hi)
    c_lo, c_hi = s["bootstrap"]["policy_cost_at_99pct"]
    assert c_lo < s["cost_at_99pct_of_best_quality"]["policy"] < c_hi


def test_bootstrap_interval_excludes_zero_where_the_policy_has_signal():
    s = evaluate(load_ladder(three_tier(1500, seed=2), require_quality=True), online=False).summary
    lo, hi = s["bootstrap"]["gain"]
    assert 0.2 < lo < s["gain"] < hi and hi - lo < 0.3, (lo, s["gain"], hi)
    c_lo, c_hi = s["bootstrap"]["policy_cost_at_99pct"]
    assert c_lo < s["cost_at_99pct_of_best_quality"]["policy"] < c_hi < 0.95     # a real saving


def test_fixed_tier_mix_points_assign_rows_by_hash():
    cal = load_ladder(noise_ladder(600, seed=3), require_quality=True)
    test = load_ladder(noise_ladder(2000, seed=4), require_quality=True)
    policy, _ = fit_policy(cal)
    mixes = [p for p in policy.points if p.mix is not None and p.mix[0] != p.mix[1]]
    fixed = [p for p in policy.points if p.mix is not None and p.check is None]
    assert mixes and sorted(p.mix[0] for p in fixed) == [0, 1, 2]      # every tier is a point
    assert {p.mix[0] for p in mixes} | {p.mix[1] for p in mixes} == {0, 2}   # mixes: the hull's tiers
    d = replay(policy, test.without_labels())
    u = row_hash(test.row_ids)
    for p in mixes + fixed:
        g = d.filter(pl.col("point") == p.label)
        a, b, w = p.mix
        assert g["tiers_run"].list.len().max() == 1                  # one tier, then stop
        expect = np.where(u < w, b, a)
        assert g["final_tier"].to_list() == expect.tolist()
        assert abs(np.mean(expect == b) - w) < 0.05 or a == b
    # the same row goes to the same tier whatever else is in the batch
    half = test.subset(np.arange(0, len(test), 2)).without_labels()
    d2 = replay(policy, half, [mixes[0].label]).sort("row_id")
    d1 = d.filter(pl.col("point") == mixes[0].label).filter(pl.col("row_id").is_in(d2["row_id"].to_list())).sort("row_id")
    assert d1["final_tier"].to_list() == d2["final_tier"].to_list()


def test_simultaneous_threshold_grows_with_independent_points_not_with_copies():
    """The max-t bound (cascade.calibrate.simultaneous_threshold): one point, the single test's
    75% normal quantile; 24 independent points, about the 75% quantile of the largest of 24
    normals (2.26); 24 near-copies of one point, about the single test's."""
    from cascade.calibrate import simultaneous_threshold

    rng = np.random.default_rng(1)
    one = simultaneous_threshold([rng.normal(0, 1, 400)], 0.75)
    independent = simultaneous_threshold([rng.normal(0, 1, 400) for _ in range(24)], 0.75)
    base = rng.normal(0, 1, 400)
    copies = simultaneous_threshold([base + rng.normal(0, 0.05, 400) for _ in range(24)], 0.75)
    assert 0.67 <= one < 0.8
    assert 2.0 < independent < 2.5
    assert 0.67 <= copies < 1.0
