"""The job spec: a YAML file, validated by a declarative pydantic schema (RawJob). Every error
names the field it is about."""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cascade.encoder import locate
from cascade.errors import CascadeError
from workers.engines.base import engine_names


class SpecError(CascadeError):
    """A job spec field is missing or wrong; the message starts with the field's path."""


RULE_FEATURES = ("first_logprob", "mean_logprob", "min_logprob", "sum_logprob", "choice_prob",
                 "choice_margin")
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
    choices: list[str] | None = None      # the valid answers on this tier (else the job's)


@dataclass
class PolicySpec:
    """`artifact`: a directory written by `cascade calibrate`; or `rule`: escalate a row while
    the tier's confidence feature is below that tier's threshold."""
    artifact: str | None = None
    point: str | None = None              # artifact operating point label; default: its default
    feature: str = "mean_logprob"
    thresholds: list[float] = field(default_factory=list)   # one per tier except the last
    registry: str | None = None           # the registry the policy came from (cascade/registry.py)
    registry_version: str | None = None   # its champion then; None: the registry's safe default

    def version(self) -> str:
        if self.registry:
            inner = PolicySpec(self.artifact, self.point, self.feature, self.thresholds).version()
            return f"registry:{self.registry_version or 'safe-default'}:{inner}"
        if self.artifact:
            meta = json.loads((Path(self.artifact) / "policy.json").read_text())
            return f"artifact:{meta.get('version', '?')}:{self.point or meta.get('default_point', '')}"
        key = json.dumps({"feature": self.feature, "thresholds": self.thresholds}, sort_keys=True)
        return f"rule:{hashlib.sha256(key.encode()).hexdigest()[:12]}"


@dataclass
class AnswersSpec:
    """A store of answers shared by runs (jobs/answers.py): a tier's answer to a row is looked up
    by content and not computed again."""
    path: str
    reuse_sampled: bool = False           # also reuse answers sampled at temperature > 0
    keep_days: float | None = None        # answers older than this are neither reused nor kept


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
    choices: list[str] | None = None      # the valid answers (a row's `choices` column overrides)
    base_dir: str = "."                   # relative paths in the spec resolve against this
    date: str | None = None               # the run's date (YYYY-MM-DD): fills {date}; orders history
    answers: AnswersSpec | None = None    # the answer store this job reuses and adds to

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
        if d.get("answers"):
            d["answers"] = AnswersSpec(**d["answers"])
        return cls(**d)


# ---------------------------------------------------------------- the spec's declarative schema
# pydantic models of the YAML as written; parse_spec turns a valid one into the dataclasses
# above (resolving paths and reading the artifact) and a ValidationError into a SpecError whose
# message starts with the field's path, e.g. "tiers[0].sampling.max_tokens: must be >= 1, got 0".

Int = Annotated[int, Field(strict=True)]
PosInt = Annotated[int, Field(strict=True, ge=1)]
Num = Annotated[float, Field(strict=True)]
NonNeg = Annotated[float, Field(strict=True, ge=0)]
Name = Annotated[str, Field(strict=True, pattern=_NAME.pattern)]


class _Raw(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _choices(v):
    if v is not None and (len(v) < 2 or len(set(v)) != len(v) or not all(c.strip() for c in v)):
        raise ValueError("must list at least two different, non-empty answers")
    return v


class RawSampling(_Raw):
    max_tokens: PosInt = 16
    temperature: NonNeg = 0.0
    seed: Int = 0
    stop: str | list[str] = []

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        v = [v] if isinstance(v, str) else v
        if not all(v):
            raise ValueError("must be a string or a list of non-empty strings")
        return v


class RawCost(_Raw):
    per_token: NonNeg | None = None
    per_input_token: NonNeg | None = None
    per_output_token: NonNeg | None = None

    @model_validator(mode="after")
    def _one_way(self):
        if self.per_token is not None and (self.per_input_token is not None or self.per_output_token is not None):
            raise ValueError("give per_token, or per_input_token and per_output_token, not both")
        return self


class RawTier(_Raw):
    name: Name
    model: Annotated[str, Field(strict=True, min_length=1)]
    engine: str = "transformers"
    sampling: RawSampling = RawSampling()
    cost: RawCost = RawCost()
    device: Annotated[str, Field(strict=True, pattern=r"^(auto|cpu|cuda(:\d+)?)$")] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    context: PosInt | None = None
    engine_args: dict = {}
    choices: list[str] | None = None

    _valid_choices = field_validator("choices")(classmethod(lambda cls, v: _choices(v)))

    @field_validator("engine")
    @classmethod
    def _engine(cls, v):
        if v not in (names := engine_names()):
            raise ValueError(f"must be one of {names}, got {v!r}")
        return v

    @field_validator("sampling", "cost", "engine_args", mode="before")
    @classmethod
    def _null_is_default(cls, v, info):
        return {} if v is None else v


class RawRule(_Raw):
    feature: Literal[RULE_FEATURES] = "mean_logprob"
    threshold: Num | None = None
    thresholds: list[Num] | None = None

    @model_validator(mode="after")
    def _some(self):
        if self.threshold is None and self.thresholds is None:
            raise ValueError("give `threshold` or `thresholds`")
        return self


class RawPolicy(_Raw):
    artifact: Annotated[str, Field(strict=True, min_length=1)] | None = None
    point: str | None = None
    rule: RawRule | None = None
    registry: Annotated[str, Field(strict=True, min_length=1)] | None = None
    default: RawRule | None = None          # with registry: the rule of a night with no champion

    @model_validator(mode="after")
    def _one(self):
        if sum(x is not None for x in (self.artifact, self.rule, self.registry)) != 1:
            raise ValueError("give exactly one of `artifact`, `rule` or `registry`")
        if self.default is not None and self.registry is None:
            raise ValueError("`default` goes with `registry` (the rule of a night with no policy yet)")
        return self


class RawAnswers(_Raw):
    path: Annotated[str, Field(strict=True, min_length=1)]
    reuse_sampled: bool = False
    keep_days: Annotated[float, Field(gt=0)] | None = None


class RawJob(_Raw):
    name: Name | None = None
    input: Annotated[str, Field(strict=True, min_length=1)]
    output: Annotated[str, Field(strict=True, min_length=1)] | None = None
    tiers: Annotated[list[RawTier], Field(min_length=1)]
    policy: RawPolicy
    shard_rows: PosInt = 256
    batch_rows: PosInt | None = None
    max_attempts: PosInt = 3
    audit_share: Annotated[float, Field(strict=True, ge=0, le=1)] = 0.0
    choices: list[str] | None = None
    answers: Annotated[str, Field(strict=True, min_length=1)] | RawAnswers | None = None

    _valid_choices = field_validator("choices")(classmethod(lambda cls, v: _choices(v)))

    @field_validator("tiers")
    @classmethod
    def _unique(cls, tiers):
        seen = {}
        for i, t in enumerate(tiers):
            if t.name in seen:
                raise _Below(f"[{i}].name", f"duplicate tier name {t.name!r} (tiers[{seen[t.name]}] "
                                            f"has it too)")
            seen[t.name] = i
        return tiers


# What each kind of pydantic error says in this spec's words.
def _got(what: str):
    return lambda e: f"must be {what}, got {e['input']!r}"


def _kind(what: str):
    return lambda e: f"must be {what}, got {type(e['input']).__name__}"


_SAYS = {
    "missing": lambda e: "is required",
    **dict.fromkeys(("int_type", "int_parsing", "int_from_float"), _got("an integer")),
    **dict.fromkeys(("float_type", "float_parsing"), _got("a number")),
    "string_type": _got("a string"),
    "greater_than_equal": lambda e: f"must be >= {e['ctx']['ge']}, got {e['input']!r}",
    "less_than_equal": lambda e: f"must be <= {e['ctx']['le']}, got {e['input']!r}",
    "string_too_short": lambda e: "must not be empty",
    "too_short": lambda e: "must be a non-empty list",
    "list_type": _kind("a list"),
    **dict.fromkeys(("model_type", "model_attributes_type", "dict_type"), _kind("a mapping")),
    "literal_error": lambda e: f"must be one of {e['ctx']['expected']}, got {e['input']!r}",
    "string_pattern_mismatch": lambda e: (
        f"must be auto, cpu, cuda or cuda:N, got {e['input']!r}" if "cuda" in e["ctx"]["pattern"]
        else f"must be letters, digits, '_', '.', '-', got {e['input']!r}"),
}


def _path(loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not part.startswith(("function-", "union[", "str", "list[", "float", "int")):
            out += f".{part}" if out else part
    return out


class _Below(ValueError):
    """A validator's error about a field below the one it validates: `sub` extends the path."""

    def __init__(self, sub: str, msg: str):
        super().__init__(msg)
        self.sub = sub


def _spec_error(exc: ValidationError, raw: dict, where: str) -> SpecError:
    errors = exc.errors(include_url=False)
    extra = [e for e in errors if e["type"] == "extra_forbidden"]
    e = extra[0] if extra else min(errors, key=lambda e: e["type"] in ("missing",))
    if e["type"] == "extra_forbidden":
        parent = e["loc"][:-1]
        model = _model_at(parent)
        unknown = sorted(x["loc"][-1] for x in extra if x["loc"][:-1] == parent)
        return SpecError(f"{_path(parent) or where}: unknown field(s) {unknown}; "
                         f"allowed: {sorted(model.model_fields)}")
    msg = e["msg"].removeprefix("Value error, ") if e["type"] == "value_error" else \
        _SAYS.get(e["type"], lambda e: e["msg"])(e)
    below = (e.get("ctx") or {}).get("error")
    sub = below.sub if isinstance(below, _Below) else ""
    return SpecError(f"{(_path(e['loc']) + sub) or where}: {msg}")


def _model_at(loc) -> type[BaseModel]:
    model = RawJob
    for part in loc:
        if isinstance(part, int):
            continue
        ann = model.model_fields[part].annotation
        for cand in (RawTier, RawSampling, RawCost, RawPolicy, RawRule, RawAnswers):
            if cand is ann or cand in getattr(ann, "__args__", ()) or any(
                    cand in getattr(a, "__args__", ()) for a in getattr(ann, "__args__", ())):
                model = cand
                break
    return model


def _resolve(path: str, base: Path) -> str:
    if "://" in path or Path(path).is_absolute():
        return path
    return str((base / path).resolve())


PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def run_date(date: str | datetime.date | None) -> str:
    """A run's date as YYYY-MM-DD (default: today, local time)."""
    if date is None:
        return datetime.date.today().isoformat()
    if isinstance(date, datetime.date):
        return date.isoformat()
    try:
        return datetime.date.fromisoformat(date).isoformat()
    except ValueError:
        raise SpecError(f"date: must be YYYY-MM-DD, got {date!r}") from None


def fill(field: str, value: str, date: str, run: str) -> str:
    """A path with its placeholders filled: {date} (the run's date) and {run} (unique per run:
    the moment it was started and a random suffix)."""
    def one(m):
        if m.group(1) not in ("date", "run"):
            raise SpecError(f"{field}: unknown placeholder {{{m.group(1)}}} in {value!r}; use "
                            f"{{date}} (the run's date, --date) or {{run}} (unique per run)")
        return date if m.group(1) == "date" else run
    return PLACEHOLDER.sub(one, value)


def parse_spec(raw, *, where: str = "spec", base_dir: str | Path = ".",
               overrides: dict | None = None, date: str | datetime.date | None = None) -> JobSpec:
    """Validate a parsed YAML mapping into a JobSpec. Relative paths resolve against base_dir
    (the working directory of the command, like the paths given on its command line); {date}
    and {run} in `input` and `output` are filled for a run on `date` (default today)."""
    base = Path(base_dir).resolve()
    day = run_date(date)
    run = f"{datetime.datetime.now():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: must be a mapping, got {type(raw).__name__}")
    overrides = dict(overrides or {})
    engine = overrides.pop("engine", None)      # `--engine NAME`: every tier on that engine
    raw = {**raw, **overrides}
    if engine and isinstance(raw.get("tiers"), list):
        raw["tiers"] = [{**t, "engine": engine} if isinstance(t, dict) else t for t in raw["tiers"]]
    try:
        spec = RawJob.model_validate(raw)
    except ValidationError as exc:
        raise _spec_error(exc, raw, where) from None
    name = spec.name or Path(fill("input", spec.input, day, run)).stem
    if not _NAME.match(name):
        raise SpecError(f"name: must be letters, digits, '_', '.', '-', got {name!r}")

    tiers = []
    for t in spec.tiers:
        c = t.cost
        cost = (Cost(c.per_token, c.per_token) if c.per_token is not None
                else Cost(c.per_input_token or 0.0, c.per_output_token or 0.0))
        s = t.sampling
        model = t.model
        if not model.startswith("package:") and (base / model).exists():
            model = _resolve(model, base)       # a local file or directory
        tiers.append(TierSpec(t.name, model, t.engine,
                              Sampling(s.max_tokens, float(s.temperature), s.seed, list(s.stop)),
                              cost, t.device, t.dtype, t.context, dict(t.engine_args), t.choices))

    p = spec.policy
    registry = registry_version = None
    if p.registry is not None:
        registry = _resolve(p.registry, base)
        registry_version = _champion(registry)
        if registry_version is not None:
            p = RawPolicy(artifact=str(Path(registry) / "versions" / registry_version))
        else:           # the safe default: every row to the last tier (its rows feed the pool)
            p = RawPolicy(rule=p.default or RawRule(feature="mean_logprob", threshold=1.0))
    if p.artifact is not None:
        art = _resolve(p.artifact, base)
        if not (Path(art) / "policy.json").exists():
            raise SpecError(f"policy.artifact: no policy.json in {art} (write one with `cascade calibrate`)")
        try:
            meta = json.loads((Path(art) / "policy.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SpecError(f"policy.artifact: {Path(art) / 'policy.json'} is not valid JSON ({exc})") from None
        if not isinstance(meta, dict):
            raise SpecError(f"policy.artifact: {Path(art) / 'policy.json'} is not a JSON object")
        n = int(meta.get("n_tiers", 0))
        if n != len(tiers):
            raise SpecError(f"policy.artifact: policy was calibrated for {n} tiers, the job has {len(tiers)}")
        if isinstance(meta.get("encoder"), dict):      # it reads prompt embeddings
            try:
                locate(str(meta["encoder"].get("name")), meta["encoder"].get("version"))
            except CascadeError as exc:
                raise SpecError(f"policy.artifact: {art} reads prompt embeddings, and {exc}") from None
        labels = [pt["label"] for pt in meta.get("points", [])]
        if p.point is not None and p.point not in labels:
            raise SpecError(f"policy.point: {p.point!r} is not an operating point of the artifact; "
                            f"have {labels[:5]}...")
        policy = PolicySpec(artifact=art, point=p.point)
    else:
        r = p.rule
        if r.thresholds is not None:
            if len(r.thresholds) != len(tiers) - 1:
                raise SpecError(f"policy.rule.thresholds: must list one threshold per tier except "
                                f"the last ({len(tiers) - 1})")
            th = [float(x) for x in r.thresholds]
        else:
            th = [float(r.threshold)] * (len(tiers) - 1)
        policy = PolicySpec(feature=r.feature, thresholds=th)
    policy.registry, policy.registry_version = registry, registry_version

    answers = None
    if spec.answers is not None:
        a = spec.answers if isinstance(spec.answers, RawAnswers) else RawAnswers(path=spec.answers)
        answers = AnswersSpec(_resolve(fill("answers", a.path, day, run), base), a.reuse_sampled,
                              a.keep_days)
    return JobSpec(name=name, input=_resolve(fill("input", spec.input, day, run), base),
                   output=_resolve(fill("output", spec.output or f"runs/{name}", day, run), base),
                   tiers=tiers, policy=policy,
                   shard_rows=spec.shard_rows, batch_rows=spec.batch_rows,
                   audit_share=float(spec.audit_share), max_attempts=spec.max_attempts,
                   base_dir=str(base), choices=spec.choices, date=day, answers=answers)


def _champion(registry: str) -> str | None:
    """The version a policy registry's current.json names (cascade/registry.py), or None."""
    f = Path(registry) / "current.json"
    if not f.exists():
        return None
    try:
        return json.loads(f.read_text())["version"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise SpecError(f"policy.registry: {f} is not a registry's current.json ({exc})") from None


def load_spec(path: str | Path, *, overrides: dict | None = None,
              date: str | datetime.date | None = None) -> JobSpec:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: no such job spec") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML ({exc})") from None
    return parse_spec(raw, where=str(path), base_dir=Path.cwd(), overrides=overrides, date=date)
