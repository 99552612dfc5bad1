"""The versioned policy artifact: policy.json (everything but weights) + weights.safetensors.

No pickle: JSON and safetensors only, so a worker can load a policy it did not write safely.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from cascade.encoder import locate
from cascade.errors import PolicyArtifactError
from cascade.features import StateFeaturizer
from cascade.policy import OperatingPoint
from cascade.predictor import ClusterHead, QualityMLP, StatePredictor, TrainConfig, TreeHead
from cascade.runtime import Policy

FORMAT = "cascade-policy"
FORMAT_VERSION = 1


def _key(state) -> str:
    return "s" + "-".join(map(str, state))


def _state(key: str) -> tuple[int, ...]:
    return tuple(int(t) for t in key[1:].split("-") if t)


def save_policy(policy, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    predictors = {}
    clusters: dict[int, int] = {}
    for state, pred in policy.predictors.items():
        for f, model in enumerate(pred.models):
            for name, value in model.state_dict().items():
                tensors[f"{_key(state)}.f{f}.{name}"] = value.contiguous()
        predictors[_key(state)] = {"folds": len(pred.models), "platt": pred.platt.tolist(),
                                   "n_in": pred.models[0].net[0].in_features, "heads": pred.heads}
        if pred.weight is not None:
            tensors[f"{_key(state)}.linear.weight"] = torch.from_numpy(np.ascontiguousarray(pred.weight))
            tensors[f"{_key(state)}.linear.bias"] = torch.from_numpy(np.ascontiguousarray(pred.bias))
        for t, head in (pred.trees or {}).items():             # boosted trees: plain arrays
            for name, arr in head.arrays().items():
                tensors[f"{_key(state)}.gbt{t}.{name}"] = torch.from_numpy(np.ascontiguousarray(arr))
            predictors[_key(state)].setdefault("gbt", {})[str(t)] = {"depth": head.depth,
                                                                    "bias": head.bias}
        if pred.cluster is not None:          # one head serves every state: saved once
            i = clusters.setdefault(id(pred.cluster), len(clusters))
            if f"cluster{i}.centroids" not in tensors:
                tensors[f"cluster{i}.centroids"] = torch.from_numpy(pred.cluster.centroids)
                tensors[f"cluster{i}.table"] = torch.from_numpy(np.ascontiguousarray(pred.cluster.table))
            predictors[_key(state)]["cluster"] = i
        if pred.embedding is not None and pred.reads_embedding():
            predictors[_key(state)]["embedding"] = list(pred.embedding)
    save_file(tensors, str(out / "weights.safetensors"))
    digest = hashlib.sha256((out / "weights.safetensors").read_bytes()).hexdigest()
    doc = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "n_tiers": policy.n_tiers, "models": policy.models, "schema": policy.schema,
        "cost_unit": policy.cost_unit, "quality_offset": policy.quality_offset,
        "quality_span": policy.quality_span, "best_tier": policy.best_tier,
        "train_config": asdict(policy.train_config), "featurizer": policy.featurizer.to_json(),
        "predictors": predictors, "weights_sha256": digest,
        "default_point": policy.default_label,
        "points": [{"label": p.label, "lambda_normalised": _finite(p.lam),
                    "lambda": _finite(p.lam / policy.cost_unit), "cal_cost": p.cal_cost,
                    "cal_quality": p.cal_quality,
                    "mix": None if p.mix is None else list(p.mix), "check": p.check,
                    "betas": {_key(s): {str(j): b.tolist() for j, b in bs.items()}
                              for s, bs in p.betas.items()}} for p in policy.points],
        "calibration": _jsonable(policy.calibration),
        # the sentence encoder the predictors read (cascade.encoder.describe), or null
        "encoder": policy.encoder,
    }
    doc["version"] = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]
    (out / "policy.json").write_text(json.dumps(doc, indent=1))
    return out


def load_policy(path: str | Path):
    path = Path(path)
    meta, weights = path / "policy.json", path / "weights.safetensors"
    if not meta.exists() or not weights.exists():
        raise PolicyArtifactError(f"{path}: not a policy directory (needs policy.json and "
                                  f"weights.safetensors; write one with `cascade calibrate`)")
    try:
        doc = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PolicyArtifactError(f"{meta}: not valid JSON ({exc})") from None
    missing = [k for k in ("weights_sha256", "train_config", "predictors", "points", "n_tiers")
               if not isinstance(doc, dict) or k not in doc]
    if missing:
        raise PolicyArtifactError(f"{meta}: missing field(s) {missing}; write it with `cascade calibrate`")
    if doc.get("format") != FORMAT or doc.get("format_version") != FORMAT_VERSION:
        raise PolicyArtifactError(f"{meta}: format {doc.get('format')!r} version "
                                  f"{doc.get('format_version')!r}; this build reads {FORMAT} v{FORMAT_VERSION}")
    if hashlib.sha256(weights.read_bytes()).hexdigest() != doc["weights_sha256"]:
        raise PolicyArtifactError(f"{weights}: checksum does not match policy.json")
    encoder = doc.get("encoder")
    if encoder:                    # refuse early, naming what to install, not at the first row
        try:
            locate(encoder["name"], encoder.get("version"))
        except PolicyArtifactError as exc:
            raise type(exc)(f"{path}: this policy reads prompt embeddings; {exc}") from None
    tensors = load_file(str(weights))
    cfg = TrainConfig(**doc["train_config"])
    predictors, shared = {}, {}
    for key, info in doc["predictors"].items():
        models = []
        for f in range(info["folds"]):
            model = QualityMLP(info["n_in"], doc["n_tiers"], cfg.hidden)
            prefix = f"{key}.f{f}."
            model.load_state_dict({k[len(prefix):]: v for k, v in tensors.items()
                                   if k.startswith(prefix)})
            model.eval()
            models.append(model)
        lin = f"{key}.linear."
        weight, bias = tensors.get(lin + "weight"), tensors.get(lin + "bias")
        trees = {int(t): TreeHead(**{k[len(f"{key}.gbt{t}."):]: v.numpy() for k, v in tensors.items()
                                     if k.startswith(f"{key}.gbt{t}.")}, depth=int(g["depth"]),
                                  bias=float(g["bias"]))
                 for t, g in info.get("gbt", {}).items()}
        cluster = None
        if info.get("cluster") is not None:
            i = int(info["cluster"])
            cluster = shared.setdefault(i, ClusterHead(tensors[f"cluster{i}.centroids"].numpy(),
                                                       tensors[f"cluster{i}.table"].numpy()))
        predictors[_state(key)] = StatePredictor(
            models, np.asarray(info["platt"]), info.get("heads"),
            None if weight is None else weight.numpy(), None if bias is None else bias.numpy(),
            trees or None, cluster, tuple(info["embedding"]) if info.get("embedding") else None)
    points = [OperatingPoint(lam=float("nan") if p["lambda_normalised"] is None else p["lambda_normalised"],
                             label=p["label"], cal_cost=p["cal_cost"],
                             cal_quality=p["cal_quality"],
                             mix=None if p.get("mix") is None else (int(p["mix"][0]), int(p["mix"][1]),
                                                                    float(p["mix"][2])),
                             check=p.get("check"),
                             betas={_state(s): {int(j): np.asarray(b) for j, b in bs.items()}
                                    for s, bs in p["betas"].items()}) for p in doc["points"]]
    return Policy(n_tiers=doc["n_tiers"], models=doc["models"], schema=doc["schema"],
                  featurizer=StateFeaturizer.from_json(doc["featurizer"]), predictors=predictors,
                  points=points, default_label=doc["default_point"], cost_unit=doc["cost_unit"],
                  quality_offset=doc["quality_offset"], quality_span=doc["quality_span"],
                  best_tier=doc["best_tier"], train_config=cfg, calibration=doc["calibration"],
                  version=doc["version"], encoder=encoder or None)


def _finite(x: float) -> float | None:
    """JSON has no NaN: a fixed-tier point has no lambda."""
    return float(x) if np.isfinite(x) else None


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj
