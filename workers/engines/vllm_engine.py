"""vLLM engine: every vLLM call lives in this module, and vllm is imported only when a tier uses it.

Install on GPU worker images with the `[vllm]` extra; vLLM pins its own torch and transformers.
The two pure functions (request building and output parsing) carry the logic and are tested
without vLLM; `VLLMEngine` is the thin part that touches the library.
"""

from __future__ import annotations

import math

from workers.engines.base import Engine, Generation, choice_text, chosen_each


def sampling_kwargs(sampling) -> dict:
    """SamplingParams(**kwargs) for a tier's sampling settings: one logprob per generated token
    (the chosen token's), greedy at temperature 0."""
    kw = {"max_tokens": int(sampling.max_tokens), "temperature": float(sampling.temperature),
          "logprobs": 1, "seed": int(sampling.seed)}
    if sampling.stop:
        kw["stop"] = list(sampling.stop)
    if sampling.temperature == 0:
        kw["top_p"] = 1.0
    return kw


def llm_kwargs(tier) -> dict:
    """LLM(**kwargs) for a tier, besides the model: its engine_args, dtype and context, and
    automatic prefix caching on unless the tier turns it off (a unit's prompts share their
    few-shot or system-prompt prefix; vLLM then computes that prefix's KV blocks once)."""
    args = dict(tier.engine_args)
    args.setdefault("enable_prefix_caching", True)
    if tier.dtype != "auto":
        args.setdefault("dtype", tier.dtype)
    if tier.context:
        args.setdefault("max_model_len", tier.context)
    return args


def _token_logprob(entry, token_id) -> float:
    """entry: vLLM's dict token_id -> Logprob (with .logprob) for one position."""
    if entry is None:
        return float("nan")
    lp = entry.get(token_id)
    if lp is None:                       # the sampled token is always included; be defensive
        return float("nan")
    value = getattr(lp, "logprob", lp)
    return float(value)


def parse_request_output(out) -> Generation:
    """A vLLM RequestOutput (first completion) as a Generation."""
    comp = out.outputs[0]
    ids = list(comp.token_ids)
    logprobs = comp.logprobs or [None] * len(ids)
    lps = [_token_logprob(e, t) for e, t in zip(logprobs, ids)]
    reason = "length" if comp.finish_reason == "length" else "stop"
    return Generation(text=comp.text, token_logprobs=[x for x in lps if not math.isnan(x)],
                      finish_reason=reason, prompt_tokens=len(out.prompt_token_ids or []))


def choice_texts(prompts, choices) -> list[str]:
    """The sequences a choice is scored on: each prompt followed by each of its choices."""
    return [p + choice_text(p, c) for p, cs in zip(prompts, choices) for c in cs]


def choice_logprobs(out, n: int) -> list[float]:
    """The log-probabilities of the last `n` prompt tokens of a RequestOutput generated with
    prompt_logprobs=0: the choice's tokens, each scored given everything before it."""
    ids = list(out.prompt_token_ids)
    return [_token_logprob(entry, t) for entry, t in zip(out.prompt_logprobs[-n:], ids[-n:])]


class VLLMEngine(Engine):
    name = "vllm"

    def __init__(self, tier):
        try:
            from vllm import LLM, SamplingParams
        except ImportError as exc:       # pragma: no cover - depends on the install
            raise RuntimeError(f"tier {tier.name}: engine 'vllm' needs the [vllm] extra "
                               f"(pip install 'llm-cascade[vllm]') on a GPU machine") from exc
        from workers.engines.models import resolve

        kind, path = resolve(tier.model) if not tier.model.startswith("hf:") else ("hf", tier.model[3:])
        self._params = SamplingParams
        self.llm = LLM(model=str(path), seed=0, **llm_kwargs(tier))
        self.tokenizer = self.llm.get_tokenizer()
        self.context_length = int(self.llm.llm_engine.model_config.max_model_len)

    def render(self, messages):
        return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True,
                                                  tokenize=False)

    def count_tokens(self, prompts):
        return [len(self.tokenizer.encode(p)) for p in prompts]

    def generate(self, prompts, sampling):
        params = self._params(**sampling_kwargs(sampling))
        outs = self.llm.generate(list(prompts), params, use_tqdm=False)   # one call per unit
        return [parse_request_output(o) for o in outs]

    def choose(self, prompts, choices):
        """Every choice scored by vLLM's prompt log-probabilities (one call per unit; the shared
        prompt is computed once by prefix caching), the most likely answered."""
        texts = choice_texts(prompts, choices)
        base = [len(self.tokenizer.encode(p)) for p in prompts]
        owners = [r for r, cs in enumerate(choices) for _ in cs]
        params = self._params(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outs = self.llm.generate(texts, params, use_tqdm=False)
        scores = [choice_logprobs(o, max(len(o.prompt_token_ids) - base[r], 1)) for o, r in zip(outs, owners)]
        return chosen_each(base, choices, scores)
