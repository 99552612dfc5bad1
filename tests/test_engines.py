"""Engine registry and the vLLM adapter's logic (request building, output parsing), without vLLM:
the vLLM objects here are test doubles shaped like vllm.RequestOutput / CompletionOutput / Logprob."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from jobs.spec import Sampling
from workers.engines import base
from workers.engines.base import shared_prefix
from workers.engines.vllm_engine import (CPU_DEFAULTS, choice_requests, llm_kwargs, parse_request_output,
                                         sampling_kwargs)


@dataclass
class FakeLogprob:
    logprob: float
    rank: int = 1


@dataclass
class FakeCompletion:
    text: str
    token_ids: list
    logprobs: list
    finish_reason: str


@dataclass
class FakeRequestOutput:
    prompt_token_ids: list
    outputs: list


def test_sampling_kwargs():
    kw = sampling_kwargs(Sampling(max_tokens=3, temperature=0.0, seed=7, stop=["\n"]))
    assert kw == {"max_tokens": 3, "temperature": 0.0, "logprobs": 0, "seed": 7, "stop": ["\n"],
                  "top_p": 1.0}
    assert "stop" not in sampling_kwargs(Sampling(temperature=0.7))


def test_parse_request_output_takes_the_chosen_tokens_logprobs():
    comp = FakeCompletion(" positive", [11, 12], [{11: FakeLogprob(-0.2), 99: FakeLogprob(-1.9)},
                                                  {12: FakeLogprob(-0.05)}], "stop")
    g = parse_request_output(FakeRequestOutput([1, 2, 3, 4], [comp]))
    assert g.text == " positive" and g.token_logprobs == [-0.2, -0.05]
    assert g.prompt_tokens == 4 and g.finish_reason == "stop" and g.output_tokens == 2
    assert g.features()["first_logprob"] == -0.2
    assert g.features()["mean_logprob"] == pytest.approx(-0.125)
    g = parse_request_output(FakeRequestOutput([1], [FakeCompletion("abc", [5], None, "length")]))
    assert g.finish_reason == "length" and g.token_logprobs == [] and g.features()["mean_logprob"] == 0.0


def test_registry_and_lazy_vllm_import():
    with pytest.raises(KeyError, match="unknown engine 'nope'"):
        base.engine_class("nope")
    try:
        import vllm  # noqa: F401
    except ImportError:
        from jobs.spec import TierSpec

        with pytest.raises(RuntimeError, match=r"engine 'vllm' is not installed"):
            base.engine_class("vllm")(TierSpec("big", "x", engine="vllm"))


def test_token_features_column_wise_equal_per_generation():
    import math

    import numpy as np

    from workers.engines.base import Generation, token_features

    cases = [[-0.5, -1.0], [], [-2.0], [float("-inf"), -0.25, -3.0], [float("nan")], [-0.1, -0.2, -0.3]]
    for gens in ([Generation("x", lp) for lp in cases], [Generation("y", [-1.0, -2.0]), Generation("z", [-0.5, -0.25])]):
        got = token_features(gens)
        for i, g in enumerate(gens):
            for f, v in g.features().items():
                assert math.isclose(got[f][i], v, abs_tol=1e-12), (f, i, got[f][i], v)
        assert set(got) == set(gens[0].features()) and all(isinstance(a, np.ndarray) for a in got.values())


def test_generations_batch_holds_the_same_rows_as_the_list():
    """An engine may answer column-wise (Generations); the batch built from a list gives back
    the same rows, choice numbers included, and a batch passes through `of` unchanged."""
    import numpy as np

    from workers.engines.base import Generation, Generations, chosen

    gens = [Generation("a", [-0.5, -1.0], "stop", 3), Generation("b", [], "length", 0),
            chosen(4, ["yes", "no"], [[-0.1], [-2.0, -0.3]]), Generation("c", [-2.0], "stop", 1)]
    batch = Generations.of(gens)
    assert len(batch) == 4 and list(batch) == gens and batch[2] == gens[2]
    assert batch.output_tokens.tolist() == [2, 0, 1, 1] and batch.prompt_tokens.tolist() == [3, 0, 4, 1]
    assert np.isnan(batch.choice_prob[[0, 1, 3]]).all() and batch.choice_prob[2] == gens[2].choice_prob
    assert Generations.of(batch) is batch
    plain = Generations.of([Generation("x", [-1.0])])
    assert plain.choice_prob is None and plain[0] == Generation("x", [-1.0])
    assert len(Generations.of([])) == 0 and Generations.of([]).features()["mean_logprob"].shape == (0,)


def test_vllm_arguments_from_the_tier_spec():
    """Prefix caching on unless turned off; on a CPU, memory from the spec (kv_cache_gib, the
    project's name for vLLM's kv_cache_memory_bytes), float32 unless the tier says otherwise."""
    from jobs.spec import TierSpec

    assert llm_kwargs(TierSpec("big", "x", engine="vllm")) == {"enable_prefix_caching": True}
    tier = TierSpec("big", "x", engine="vllm", dtype="bfloat16", context=4096,
                    engine_args={"enable_prefix_caching": False, "gpu_memory_utilization": 0.8})
    assert llm_kwargs(tier) == {"enable_prefix_caching": False, "gpu_memory_utilization": 0.8,
                                "dtype": "bfloat16", "max_model_len": 4096}
    cpu = llm_kwargs(TierSpec("big", "x", engine="vllm"), cpu=True)
    assert cpu["kv_cache_memory_bytes"] == CPU_DEFAULTS["kv_cache_gib"] << 30 and "kv_cache_gib" not in cpu
    assert cpu["dtype"] == "float32" and cpu["max_num_seqs"] == 64 and cpu["enable_prefix_caching"]
    small = llm_kwargs(TierSpec("big", "x", engine="vllm", dtype="bfloat16",
                                engine_args={"kv_cache_gib": 0.5, "max_num_seqs": 8}), cpu=True)
    assert (small["kv_cache_memory_bytes"], small["max_num_seqs"], small["dtype"]) == (1 << 29, 8, "bfloat16")


def test_vllm_choice_requests_score_each_token_once():
    """A row's prompt is one request for every choice's first token; each later token of a longer
    choice is one request on the prompt and the choice's tokens before it."""
    firsts, more, where = choice_requests([[1, 2], [1, 3]], [[[7], [8, 9, 10]], [[7], [8]]])
    assert firsts == [([1, 2], [7, 8]), ([1, 3], [7, 8])]
    assert more == [([1, 2, 8], 9), ([1, 2, 8, 9], 10)]
    assert where == [[[("first", 0, 7)], [("first", 0, 8), ("more", 0, 9), ("more", 1, 10)]],
                     [[("first", 1, 7)], [("first", 1, 8)]]]
    assert shared_prefix([[1, 2, 3], [1, 2, 4], [1, 2, 5]]) == 2 and shared_prefix([[1, 2, 3], [1, 2]]) == 1


def test_chosen_renormalises_over_the_choices():
    g = base.chosen(2, ["pos", "neg"], [[-0.5, -0.25], [-2.0]])
    assert g.text == "pos" and g.token_logprobs == [-0.5, -0.25]
    assert g.choice_prob == pytest.approx(1 / (1 + math.exp(-2.0 + 0.75)))
    assert g.choice_margin == pytest.approx(2 * g.choice_prob - 1)
