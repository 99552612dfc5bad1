"""Calibrate and replay through the public API and the CLI, on ladders with known optima."""

import json

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cascade.artifact import load_policy, save_policy
from cascade.calibrate import fit_policy
from jobs.cli import main
from cascade.errors import PolicyArtifactError
from cascade.ladder import load_ladder
from cascade.runtime import replay, spent
from tests.synthetic import three_tier, two_tier


@pytest.fixture(scope="module")
def three():
    cal = load_ladder(three_tier(1500, seed=10), require_quality=True)
    test = load_ladder(three_tier(1500, seed=11), require_quality=True)
    policy, report = fit_policy(cal)
    return policy, report, test


def outcome(decisions, ladder):
    """Per decision: (cost of the tiers it ran, quality of the answer it kept), row by row in
    plain Python (the product computes the same columnar, `cascade.runtime.spent`)."""
    idx = {r: i for i, r in enumerate(ladder.row_ids)}
    rows = np.array([idx[r] for r in decisions["row_id"]])
    cost = np.array([ladder.cost[list(tr), i].sum() for tr, i in zip(decisions["tiers_run"], rows)])
    assert np.allclose(cost, spent(decisions["tiers_run"], rows, ladder.cost))
    return cost, ladder.quality[decisions["final_tier"].to_numpy(), rows]


def by_row(decisions, ids):
    """Decisions reordered to the ladder's row order."""
    return pl.DataFrame({"row_id": list(ids)}).join(decisions, on="row_id", how="left",
                                                   maintain_order="left")


def test_learned_policy_reaches_closed_form_optimum():
    lam, c0, c1 = 0.5, 0.1, 1.0
    cal, _ = two_tier(3000, seed=1)
    test_logs, p = two_tier(3000, seed=2)
    policy, _ = fit_policy(load_ladder(cal, require_quality=True), user_lambdas=[lam])
    test = load_ladder(test_logs, require_quality=True)
    d = replay(policy, test.without_labels())
    cost, quality = outcome(d, test)
    p = p[np.argsort([f"s2-{i}" for i in range(3000)])]           # ladder rows are sorted by id
    optimum = np.mean(np.maximum(p - lam * c0, 1 - lam * c1))
    assert np.mean(quality - lam * cost) == pytest.approx(optimum, abs=0.02)
    start = np.array([tr[0] for tr in d["tiers_run"]])
    clear = np.abs(p - (1 - lam * (c1 - c0))) > 0.1
    assert np.mean(start[clear] == np.where(p[clear] >= 0.55, 0, 1)) > 0.95


def test_sweep_is_ordered_and_skips_the_useless_tier(three):
    policy, report, test = three
    assert len(policy.points) >= 20
    costs = [p.cal_cost for p in policy.points]
    assert costs == sorted(costs)
    d = replay(policy, test.without_labels())
    by_point = {label: outcome(g, test) for (label,), g in d.group_by("point", maintain_order=True)}
    cheap, dear = by_point[policy.points[0].label], by_point[policy.points[-1].label]
    assert cheap[0].mean() < dear[0].mean() and cheap[1].mean() < dear[1].mean()
    default = d.filter(pl.col("point") == policy.default_label)
    assert default["tiers_run"].list.contains(1).mean() < 0.1
    # the default point is chosen to keep 99% of the best tier's quality (at 95% confidence on
    # the calibration rows); on fresh rows it does, for clearly less than the best tier's cost
    c, q = outcome(default, test)
    assert q.mean() >= 0.99 * test.quality[2].mean() and c.mean() < 0.95 * test.cost[2].mean()
    metrics = [m for m in report.predictor_metrics if m["observed"] and m["auc"] is not None]
    assert all(0.5 < m["auc"] <= 1 and 0 <= m["ece"] < 0.1 for m in metrics)


def test_replay_is_causal(three):
    """At every operating point, changing the logs of tiers a row never ran changes none of that
    row's decisions."""
    policy, _, test = three
    for point in policy.points:
        d = by_row(replay(policy, test.without_labels(), [point.label]), test.row_ids)
        tampered = test.without_labels()
        tampered.outputs = tampered.outputs.copy()
        tampered.cost = tampered.cost.copy()
        tampered.output_num = {k: v.copy() for k, v in tampered.output_num.items()}
        for i, tr in enumerate(d["tiers_run"]):
            for t in set(range(3)) - set(tr):
                tampered.outputs[t, i] = "answer is no " * 40
                tampered.cost[t, i] *= 100
                tampered.output_num["mean_logprob"][t, i] = -99.0
        d2 = by_row(replay(policy, tampered, [point.label]), test.row_ids)
        assert d2["final_tier"].to_list() == d["final_tier"].to_list(), point.label
        assert d2["tiers_run"].to_list() == d["tiers_run"].to_list(), point.label


def test_artifact_round_trip_and_tamper(three, tmp_path):
    policy, _, test = three
    save_policy(policy, tmp_path / "p")
    loaded = load_policy(tmp_path / "p")
    a = replay(policy, test.without_labels())
    b = replay(loaded, test.without_labels())
    assert a.equals(b)
    doc = json.loads((tmp_path / "p" / "policy.json").read_text())
    assert doc["format"] == "cascade-policy" and len(doc["version"]) == 12
    raw = bytearray((tmp_path / "p" / "weights.safetensors").read_bytes())
    raw[-1] ^= 1
    (tmp_path / "p" / "weights.safetensors").write_bytes(bytes(raw))
    with pytest.raises(PolicyArtifactError, match="checksum"):
        load_policy(tmp_path / "p")


def test_budget_mode_meets_target_on_new_rows():
    cal = load_ladder(three_tier(2000, seed=20), require_quality=True)
    test = load_ladder(three_tier(3000, seed=21), require_quality=True)
    policy, report = fit_policy(cal, budget=__import__("cascade.calibrate", fromlist=["Budget"]).Budget("cost", 0.5))
    assert report.budget["feasible"]
    d = replay(policy, test.without_labels(), [policy.default_label])
    cost, _ = outcome(d, test)
    assert cost.mean() <= 0.5 * test.cost[2].mean() * 1.03


def test_cli_calibrate_replay(tmp_path):
    logs = tmp_path / "logs.parquet"
    three_tier(600, seed=3).write_parquet(logs)
    runner = CliRunner()
    r = runner.invoke(main, ["calibrate", str(logs), "--out", str(tmp_path / "pol"),
                             "--min-quality", "0.95"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "AUC" in r.output and "budget quality 0.95" in r.output
    replay_logs = tmp_path / "replay.parquet"
    three_tier(200, seed=4).drop("quality").write_parquet(replay_logs)
    out = tmp_path / "decisions.parquet"
    r = runner.invoke(main, ["replay", str(tmp_path / "pol"), str(replay_logs), "--out", str(out)],
                      catch_exceptions=False)
    assert r.exit_code == 0, r.output
    table = pq.read_table(out)
    assert [f.name for f in table.schema] == ["row_id", "point", "final_tier", "tiers_run"]
    kind = table.schema.field("tiers_run").type
    assert pa.types.is_list(kind) and pa.types.is_int64(kind.value_type)
    assert pa.types.is_string(table.schema.field("row_id").type)
    assert pa.types.is_int64(table.schema.field("final_tier").type)
    frame = pl.from_arrow(table)
    points = frame["point"].n_unique()
    assert points >= 20 and len(frame) == 200 * points
    assert all(ft in tr for ft, tr in zip(frame["final_tier"], frame["tiers_run"].to_list()))
    assert all(tr == sorted(set(tr)) for tr in frame["tiers_run"].to_list())


def test_cli_errors_name_the_problem(tmp_path):
    runner = CliRunner()
    logs = tmp_path / "logs.parquet"
    three_tier(50, seed=3).drop("quality").write_parquet(logs)
    r = runner.invoke(main, ["calibrate", str(logs), "--out", str(tmp_path / "p")])
    assert r.exit_code == 2 and "missing column(s) ['quality']" in r.output
    r = runner.invoke(main, ["replay", str(tmp_path / "nope"), str(logs), "--out", str(tmp_path / "d.parquet")])
    assert r.exit_code == 2 and "not a policy directory" in r.output


def test_commands_have_help():
    from jobs.cli import main as cascade_command      # the `cascade` entry point, job commands included

    names = set(cascade_command.commands)
    assert {"calibrate", "replay", "eval", "run", "submit", "worker", "status", "resume", "cancel",
            "report", "logs"} <= names
    for name, cmd in cascade_command.commands.items():
        assert cmd.help and ("Example:" in cmd.help or "Examples:" in cmd.help), name


def test_online_learner_refits_from_audits_and_its_regret_flattens(tmp_path):
    """The learner runs every tier until it has audits, then refits at doubling checkpoints: the
    regret it adds per row after its later fits is a small part of what it paid per row while it
    knew nothing, and the best static policy in hindsight is nearly matched."""
    from cascade.online import online_regret

    pool = load_ladder(three_tier(1200, seed=3))
    policy, _ = fit_policy(pool)
    lam = policy.point().lam / policy.cost_unit
    o = online_regret(pool, lam, max_t=10_000)
    assert [f["after_rows"] for f in o["refits"]] == [200, 400, 800, 1600, 3200, 6400]
    regret = {r["T"]: r["regret"] for r in o["table"]}
    warmup_per_row = regret[100] / 100                  # every tier run: all rows audited
    late_per_row = (regret[10_000] - regret[3_000]) / 7_000
    assert warmup_per_row > 0.02 and late_per_row < 0.2 * warmup_per_row
    assert o["loglog_slope"] < 0.75                      # not linear: it learns
    assert o["best_static_mean_reward"] - o["learner_mean_reward"] < 0.2 * warmup_per_row
    with pytest.raises(ValueError, match="finite lambda"):
        online_regret(pool, float("nan"), max_t=1000)


def test_cli_eval_writes_the_papers_tables_through_the_report_renderer(tmp_path):
    import struct

    three_tier(1200, seed=3).write_parquet(tmp_path / "logs.parquet")
    out = tmp_path / "ev"
    res = CliRunner().invoke(main, ["eval", str(tmp_path / "logs.parquet"), "--out", str(out),
                                    "--max-t", "1000"])
    assert res.exit_code == 0, res.output
    md = (out / "report.md").read_text()
    for heading in ("paper Table 1", "paper Table 2", "paper Table 3", "paper Figure 1"):
        assert heading in md
    # The regret table and its fitted slope are computed: the slope in the text is the log-log
    # least-squares fit of the table's own (T, regret) rows.
    import re

    online = json.loads((out / "summary.json").read_text())["online"]
    table = pl.DataFrame(online["table"])
    assert table["T"].to_list() == sorted(table["T"]) and table["T"][-1] <= 1000
    assert np.allclose(table["mean_regret_per_row"], table["regret"] / table["T"])
    pos = table.filter(pl.col("regret") > 0)
    slope = np.polyfit(np.log(pos["T"].to_numpy()), np.log(pos["regret"].to_numpy()), 1)[0]
    assert online["loglog_slope"] == pytest.approx(slope, abs=1e-9)
    shown = float(re.search(r"regret against T: \*\*([0-9.-]+)\*\*", md).group(1))
    assert shown == pytest.approx(slope, abs=5e-3)
    from cascade.render import fmt

    for t, regret in zip(table["T"], table["regret"]):
        assert f"| {fmt(t)} | {fmt(regret)} |" in md
    assert md == (out / "summary.md").read_text()
    html = (out / "report.html").read_text()
    for png in ("frontier.png", "selection.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == (640, 400)
    assert html.count("data:image/png;base64,") >= 2
    s = json.loads((out / "summary.json").read_text())
    assert np.isfinite(s["gain"]) and s["online"]["table"][-1]["T"] == 1000


def test_nightly_policy_learns_from_a_night_promotes_and_rolls_back(tmp_path, monkeypatch):
    """The learning loop through jobs: night 1 has no champion, so its spec's `policy: {registry}`
    runs the safe default (every row, every tier); `cascade learn` puts its rows in the pool and
    promotes a challenger that beats the safe default on held-out rows (here the cheap tiers are
    always wrong, so running them is waste); night 2 runs that champion, named in its policy
    version; `cascade rollback` returns to the safe default, and the log records each step."""
    import tests.doubles  # noqa: F401  (the scripted engine)

    n = 240
    pl.DataFrame({"id": [f"q{i}" for i in range(n)], "prompt": [f"question {i} w{i}" for i in range(n)],
                  "reference": [f"big w{i}" for i in range(n)]}).write_parquet(tmp_path / "in.parquet")
    reg = tmp_path / "registry"
    spec = {"name": "nightly", "input": str(tmp_path / "in.parquet"),
            "output": str(tmp_path / "nightly" / "{date}"), "shard_rows": 40, "audit_share": 0.2,
            "tiers": [{"name": t, "model": "scripted", "engine": "scripted", "cost": {"per_token": c}}
                      for t, c in (("small", 1), ("mid", 3), ("big", 10))],
            "policy": {"registry": str(reg)}}
    (tmp_path / "nightly.yaml").write_text(json.dumps(spec))
    run = CliRunner()

    def night(day):
        res = run.invoke(main, ["run", str(tmp_path / "nightly.yaml"), "--date", day, "--quiet"])
        assert res.exit_code == 0, res.output
        return tmp_path / "nightly" / day

    one = night("2026-12-01")
    meta = json.loads((one / "job.json").read_text())
    assert meta["policy_version"].startswith("registry:safe-default:rule:")
    out = pl.read_parquet(f"{one}/results/*.parquet")
    assert (out["tiers_run"].list.len() == 3).all() and (out["final_tier"] == 2).all()

    res = run.invoke(main, ["learn", str(one), "--registry", str(reg)])
    assert res.exit_code == 0, res.output
    assert "2026-12-01: promoted v0001" in res.output
    state = json.loads((reg / "current.json").read_text())
    assert state["version"] == "v0001" and state["log"][-1]["against"] == "safe default"
    evidence = json.loads((reg / "versions" / "v0001" / "evidence.json").read_text())
    assert evidence["promote"] and evidence["gain"] > 0 and evidence["holdout_rows"] >= 30
    assert evidence["pool_rows"] == n

    two = night("2026-12-02")
    meta = json.loads((two / "job.json").read_text())
    assert meta["policy_version"].startswith("registry:v0001:artifact:")
    out = pl.read_parquet(f"{two}/results/*.parquet")
    assert out["cost"].mean() < pl.read_parquet(f"{one}/results/*.parquet")["cost"].mean()

    hist = run.invoke(main, ["report", "--history", str(tmp_path / "nightly")])
    assert hist.exit_code == 0, hist.output
    assert "registry:safe-default" in hist.output and "registry:v0001" in hist.output
    assert f"## Policy registry: {reg}" in hist.output and "promoted: better with confidence" in hist.output

    res = run.invoke(main, ["rollback", str(reg)])
    assert res.exit_code == 0 and "champion: none (the safe default)" in res.output
    assert json.loads((reg / "current.json").read_text())["log"][-1]["rollback"]
    three = night("2026-12-03")
    assert json.loads((three / "job.json").read_text())["policy_version"].startswith("registry:safe-default")
    res = run.invoke(main, ["rollback", str(reg), "--to", "v0009"])
    assert res.exit_code == 2 and "no version 'v0009'" in res.output
