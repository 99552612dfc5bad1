"""The job spec: a YAML file, validated field by field. Every error names the field it is about."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from cascade.errors import CascadeError


class SpecError(CascadeError):
    """A job spec field is missing or wrong; the message starts with the field's path."""


RULE_FEATURES = ("first_logprob", "mean_logprob", "min_logprob", "sum_logprob")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class Sampling:
    max_tokens: int = 16
    temperature: float = 0.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)


@dataclass
class Cost:
    per_input_token: float = 0.0
    per_output_token: float = 0.0


@dataclass
class TierSpec:
    name: str
    model: str
    engine: str = "transformers"
    sampling: Sampling = field(default_factory=Sampling)
    cost: Cost = field(default_factory=Cost)
    device: str = "auto"                  # transformers: auto | cpu | cuda | cuda:N
    dtype: str = "auto"                   # auto | float32 | bfloat16 | float16
    context: int | None = None            # override the model's context length
    engine_args: dict = field(default_factory=dict)


@dataclass
class PolicySpec:
    """`artifact`: a directory written by `cascade calibrate`; or `rule`: escalate a row while
    the tier's confidence feature is below that tier's threshold."""
    artifact: str | None = None
    point: str | None = None              # artifact operating point label; default: its default
    feature: str = "mean_logprob"
    thresholds: list[float] = field(default_factory=list)   # one per tier except the last

    def version(self) -> str:
        if self.artifact:
            meta = json.loads((Path(self.artifact) / "policy.json").read_text())
            return f"artifact:{meta.get('version', '?')}:{self.point or meta.get('default_point', '')}"
        key = json.dumps({"feature": self.feature, "thresholds": self.thresholds}, sort_keys=True)
        return f"rule:{hashlib.sha256(key.encode()).hexdigest()[:12]}"


@dataclass
class JobSpec:
    name: str
    input: str
    output: str
    tiers: list[TierSpec]
    policy: PolicySpec
    shard_rows: int = 256
    batch_rows: int | None = None         # coalesced batch size for escalated rows; default shard_rows
    audit_share: float = 0.0              # share of rows escalated regardless of the decision
    max_attempts: int = 3                 # engine attempts per unit before its rows become errors
    base_dir: str = "."                   # relative paths in the spec resolve against this

    @property
    def coalesce_rows(self) -> int:
        return self.batch_rows or self.shard_rows

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "JobSpec":
        d = dict(d)
        d["tiers"] = [TierSpec(**{**t, "sampling": Sampling(**t["sampling"]), "cost": Cost(**t["cost"])})
                      for t in d["tiers"]]
        d["policy"] = PolicySpec(**d["policy"])
        return cls(**d)


def _expect(cond: bool, where: str, msg: str):
    if not cond:
        raise SpecError(f"{where}: {msg}")


def _num(v, where, *, lo=None, integer=False, allow_none=False):
    if v is None and allow_none:
        return None
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    _expect(ok and not isinstance(v, bool), where,
            f"must be {'an integer' if integer else 'a number'}, got {v!r}")
    _expect(lo is None or v >= lo, where, f"must be >= {lo}, got {v!r}")
    return v


def _known(d: dict, allowed: set, where: str):
    extra = sorted(set(d) - allowed)
    _expect(not extra, where, f"unknown field(s) {extra}; allowed: {sorted(allowed)}")


def _resolve(path: str, base: Path) -> str:
    if "://" in path or Path(path).is_absolute():
        return path
    return str((base / path).resolve())


def parse_spec(raw, *, where: str = "spec", base_dir: str | Path = ".",
               overrides: dict | None = None) -> JobSpec:
    """Validate a parsed YAML mapping into a JobSpec. Relative paths resolve against base_dir
    (the working directory of the command, like the paths given on its command line)."""
    base = Path(base_dir).resolve()
    _expect(isinstance(raw, dict), where, f"must be a mapping, got {type(raw).__name__}")
    raw = {**raw, **(overrides or {})}
    _known(raw, {"name", "input", "output", "tiers", "policy", "shard_rows", "batch_rows", "max_attempts",
                 "audit_share"}, where)
    for key in ("input", "tiers", "policy"):
        _expect(key in raw, f"{key}", "is required")
    name = raw.get("name") or Path(str(raw["input"])).stem
    _expect(isinstance(name, str) and bool(_NAME.match(name)), "name",
            f"must be letters, digits, '_', '.', '-', got {name!r}")
    _expect(isinstance(raw["input"], str) and raw["input"], "input", "must be a path, directory or glob")
    output = raw.get("output", f"runs/{name}")
    _expect(isinstance(output, str) and output, "output", "must be a path or filesystem URL")

    tiers_raw = raw["tiers"]
    _expect(isinstance(tiers_raw, list) and len(tiers_raw) >= 1, "tiers", "must be a non-empty list")
    tiers, seen = [], set()
    for i, t in enumerate(tiers_raw):
        w = f"tiers[{i}]"
        _expect(isinstance(t, dict), w, "must be a mapping")
        _known(t, {"name", "model", "engine", "sampling", "cost", "device", "dtype", "context",
                   "engine_args"}, w)
        _expect(isinstance(t.get("name"), str) and bool(_NAME.match(t.get("name") or "")),
                f"{w}.name", f"must be letters, digits, '_', '.', '-', got {t.get('name')!r}")
        _expect(t["name"] not in seen, f"{w}.name", f"duplicate tier name {t['name']!r}")
        seen.add(t["name"])
        _expect(isinstance(t.get("model"), str) and t.get("model"), f"{w}.model", "is required")
        engine = t.get("engine", "transformers")
        from workers.engines.base import engine_names

        names = engine_names()
        _expect(engine in names, f"{w}.engine", f"must be one of {names}, got {engine!r}")
        s = t.get("sampling", {}) or {}
        _expect(isinstance(s, dict), f"{w}.sampling", "must be a mapping")
        _known(s, {"max_tokens", "temperature", "seed", "stop"}, f"{w}.sampling")
        stop = s.get("stop", [])
        stop = [stop] if isinstance(stop, str) else stop
        _expect(isinstance(stop, list) and all(isinstance(x, str) and x for x in stop),
                f"{w}.sampling.stop", "must be a string or a list of non-empty strings")
        sampling = Sampling(
            max_tokens=_num(s.get("max_tokens", 16), f"{w}.sampling.max_tokens", lo=1, integer=True),
            temperature=float(_num(s.get("temperature", 0.0), f"{w}.sampling.temperature", lo=0)),
            seed=_num(s.get("seed", 0), f"{w}.sampling.seed", integer=True), stop=stop)
        c = t.get("cost", {}) or {}
        _expect(isinstance(c, dict), f"{w}.cost", "must be a mapping")
        _known(c, {"per_token", "per_input_token", "per_output_token"}, f"{w}.cost")
        if "per_token" in c:
            _expect("per_input_token" not in c and "per_output_token" not in c, f"{w}.cost",
                    "give per_token, or per_input_token and per_output_token, not both")
            pt = float(_num(c["per_token"], f"{w}.cost.per_token", lo=0))
            cost = Cost(pt, pt)
        else:
            cost = Cost(float(_num(c.get("per_input_token", 0.0), f"{w}.cost.per_input_token", lo=0)),
                        float(_num(c.get("per_output_token", 0.0), f"{w}.cost.per_output_token", lo=0)))
        device = t.get("device", "auto")
        _expect(isinstance(device, str) and re.match(r"^(auto|cpu|cuda(:\d+)?)$", device) is not None,
                f"{w}.device", f"must be auto, cpu, cuda or cuda:N, got {device!r}")
        dtype = t.get("dtype", "auto")
        _expect(dtype in ("auto", "float32", "bfloat16", "float16"), f"{w}.dtype",
                f"must be auto, float32, bfloat16 or float16, got {dtype!r}")
        context = _num(t.get("context"), f"{w}.context", lo=1, integer=True, allow_none=True)
        engine_args = t.get("engine_args", {}) or {}
        _expect(isinstance(engine_args, dict), f"{w}.engine_args", "must be a mapping")
        model = t["model"]
        if not model.startswith("package:") and (base / model).exists():
            model = _resolve(model, base)       # a local file or directory
        tiers.append(TierSpec(t["name"], model, engine, sampling, cost, device, dtype, context,
                              engine_args))

    p = raw["policy"]
    _expect(isinstance(p, dict), "policy", "must be a mapping with `artifact` or `rule`")
    _known(p, {"artifact", "point", "rule"}, "policy")
    _expect(("artifact" in p) != ("rule" in p), "policy", "give exactly one of `artifact` or `rule`")
    if "artifact" in p:
        art = _resolve(str(p["artifact"]), base)
        _expect((Path(art) / "policy.json").exists(), "policy.artifact",
                f"no policy.json in {art} (write one with `cascade calibrate`)")
        try:
            meta = json.loads((Path(art) / "policy.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SpecError(f"policy.artifact: {Path(art) / 'policy.json'} is not valid JSON ({exc})") from None
        _expect(isinstance(meta, dict), "policy.artifact", f"{Path(art) / 'policy.json'} is not a JSON object")
        n = int(meta.get("n_tiers", 0))
        _expect(n == len(tiers), "policy.artifact",
                f"policy was calibrated for {n} tiers, the job has {len(tiers)}")
        labels = [pt["label"] for pt in meta.get("points", [])]
        point = p.get("point")
        _expect(point is None or point in labels, "policy.point",
                f"{point!r} is not an operating point of the artifact; have {labels[:5]}...")
        policy = PolicySpec(artifact=art, point=point)
    else:
        r = p["rule"]
        _expect(isinstance(r, dict), "policy.rule", "must be a mapping with feature and threshold(s)")
        _known(r, {"feature", "threshold", "thresholds"}, "policy.rule")
        feature = r.get("feature", "mean_logprob")
        _expect(feature in RULE_FEATURES, "policy.rule.feature",
                f"must be one of {list(RULE_FEATURES)}, got {feature!r}")
        if "thresholds" in r:
            th = r["thresholds"]
            _expect(isinstance(th, list) and len(th) == len(tiers) - 1, "policy.rule.thresholds",
                    f"must list one threshold per tier except the last ({len(tiers) - 1})")
            th = [float(_num(x, f"policy.rule.thresholds[{i}]")) for i, x in enumerate(th)]
        else:
            _expect("threshold" in r, "policy.rule", "give `threshold` or `thresholds`")
            th = [float(_num(r["threshold"], "policy.rule.threshold"))] * (len(tiers) - 1)
        policy = PolicySpec(feature=feature, thresholds=th)

    shard_rows = _num(raw.get("shard_rows", 256), "shard_rows", lo=1, integer=True)
    batch_rows = _num(raw.get("batch_rows"), "batch_rows", lo=1, integer=True, allow_none=True)
    attempts = _num(raw.get("max_attempts", 3), "max_attempts", lo=1, integer=True)
    audit = float(_num(raw.get("audit_share", 0.0), "audit_share", lo=0))
    _expect(audit <= 1, "audit_share", f"must be in [0, 1], got {audit}")
    return JobSpec(name=name, input=_resolve(raw["input"], base), output=_resolve(output, base),
                   tiers=tiers, policy=policy, shard_rows=shard_rows, batch_rows=batch_rows,
                   audit_share=audit, max_attempts=attempts, base_dir=str(base))


def load_spec(path: str | Path, *, overrides: dict | None = None) -> JobSpec:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: no such job spec") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML ({exc})") from None
    return parse_spec(raw, where=str(path), base_dir=Path.cwd(), overrides=overrides)
