"""transformers engine: CPU or CUDA, HF directories and GGUF files (via the safetensors cache),
batched greedy or sampled generation with per-token log-probabilities.

Shared-prefix reuse: the prompts of a unit usually share a long token prefix (few-shot examples,
a system prompt, a chat template's header). The engine prefills that prefix once, copies its KV
cache to every row, and generates from there; the rows are padded between the prefix and their
own suffix (masked out, positions counted over real tokens only), so every row computes what it
would alone. Generation stops as soon as every row has stopped (EOS or a stop string).
`engine_args: {prefix_reuse: false}` turns reuse off; prefixes shorter than `min_prefix` tokens
(default 16) are not worth it and use plain left padding; rows run in length-sorted groups of
about `prefix_batch` (default 24), which keeps the padding between prefix and suffix small. The
last prefix's cache is kept for the next call (a job's units usually share it).

Choices (`choose`) reuse at two levels: the shared prefix once per call, then each row's prompt
once however many choices it has (its cache scores every choice's first token; only the later
tokens of longer choices run again, from that cache)."""

from __future__ import annotations

import copy
import inspect
import logging
import time

import torch

from workers.engines.base import Engine, Generation, choice_text, chosen_each, shared_prefix
from workers.engines.models import local_dir

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(path):
    """The fast tokenizer straight from tokenizer.json (1.1 s instead of 2.6 s for gemma-3's
    262k-token vocabulary, whose JSON AutoTokenizer also parses in Python); AutoTokenizer when
    there is no tokenizer.json. Token ids are the same (tests/test_e2e_models.py checks)."""
    import json
    from pathlib import Path

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    if not (path / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(path)
    cfg = json.loads((path / "tokenizer_config.json").read_text()) if (path / "tokenizer_config.json").exists() else {}
    special = {k: v for k, v in cfg.items() if k.endswith("_token") and isinstance(v, str)}
    tok = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), **special)
    template = path / "chat_template.jinja"
    if template.exists():
        tok.chat_template = template.read_text()
    elif isinstance(cfg.get("chat_template"), str):
        tok.chat_template = cfg["chat_template"]
    return tok


class TransformersEngine(Engine):
    name = "transformers"

    def __init__(self, tier):
        from concurrent.futures import ThreadPoolExecutor

        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        t0 = time.perf_counter()
        path, self.convert_seconds = local_dir(tier.model)
        device = tier.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = _DTYPES.get(tier.dtype) or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        self.device = torch.device(device)
        with ThreadPoolExecutor(1) as pool:          # the tokenizer parses while weights load
            tok = pool.submit(load_tokenizer, path)
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
            self.tokenizer = tok.result()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        cfg = self.model.config
        limit = getattr(cfg, "max_position_embeddings", None) or 2048
        self.context_length = int(tier.context or limit)
        self.micro_batch = int(tier.engine_args.get("batch_size", 0)) or None
        self.prefix_reuse = bool(tier.engine_args.get("prefix_reuse", True))
        self.min_prefix = int(tier.engine_args.get("min_prefix", 16))
        self.reuse_rows = int(tier.engine_args.get("prefix_batch", 24))
        self._stops: dict = {}
        self._prefix: tuple | None = None              # (prefix token ids, its KV cache)
        forward = inspect.signature(self.model.forward).parameters
        self.cache_kw = "cache" if "cache" in forward else "past_key_values"   # transformers 5 renamed it
        self.load_seconds = time.perf_counter() - t0
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        self.eos_ids = set(eos) | {self.tokenizer.eos_token_id}
        log.info("loaded %s on %s in %.2fs", path, self.device, self.load_seconds)

    def render(self, messages):
        if not self.tokenizer.chat_template:
            raise ValueError("this model has no chat template; give a `prompt` instead of `messages`")
        return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True,
                                                  tokenize=False)

    def count_tokens(self, prompts):
        return [len(ids) for ids in self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]

    @torch.inference_mode()
    def generate(self, prompts, sampling):
        prompts = list(prompts)
        step = self.micro_batch or max(1, len(prompts))
        out: list[Generation] = []
        for i in range(0, len(prompts), step):
            out.extend(self._generate(prompts[i:i + step], sampling))
        return out

    def _generate(self, prompts, sampling):
        """One micro-batch. With a shared prefix worth reusing, the prefix is prefilled once and
        the rows run in groups of about `prefix_batch`, sorted by suffix length so that little
        padding sits between prefix and suffix; otherwise one left-padded generate call."""
        if not prompts:
            return []
        ids = self.tokenizer(prompts, add_special_tokens=True)["input_ids"]
        shared = shared_prefix(ids) if self.prefix_reuse and len(ids) > 1 else 0
        if shared < self.min_prefix:
            enc = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt", padding=True).to(self.device)
            return self._run(enc, [len(x) for x in ids], sampling)
        cache = self._prefix_cache(ids[0][:shared])
        order = sorted(range(len(ids)), key=lambda b: len(ids[b]))
        groups = max(1, round(len(ids) / self.reuse_rows))
        out: list = [None] * len(ids)
        for g in range(groups):
            rows = order[g * len(ids) // groups:(g + 1) * len(ids) // groups]
            enc = self._with_prefix_cache([ids[b] for b in rows], shared, cache)
            for b, gen in zip(rows, self._run(enc, [len(ids[b]) for b in rows], sampling)):
                out[b] = gen
        return out

    def _run(self, enc: dict, prompt_lens: list[int], sampling) -> list[Generation]:
        tok = self.tokenizer
        kwargs = dict(max_new_tokens=sampling.max_tokens, return_dict_in_generate=True,
                      output_logits=True, pad_token_id=tok.pad_token_id)
        if sampling.temperature > 0:
            torch.manual_seed(sampling.seed)
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=1.0, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if sampling.stop:
            kwargs.update(stopping_criteria=self._stop_criteria(tuple(sampling.stop)))
        res = self.model.generate(**enc, **kwargs)
        return self._parse(res, enc["input_ids"].shape[1], prompt_lens, sampling)

    @torch.inference_mode()
    def choose(self, prompts, choices):
        """Score every choice's full token sequence after its prompt and answer the most likely.
        A choice follows the prompt after one space unless the prompt ends in whitespace.

        Each prompt runs once, however many choices it has: the rows' shared prefix once (as in
        generate, kept for the next call), each row's own suffix once in groups of rows, keeping its KV
        cache and the logits of its last token, which score every choice's first token. Only
        choices of two or more tokens run further: their tokens but the last, from a copy of
        their row's cache, one batch for the group. Positions count real tokens only, so every
        score is what the row would get alone."""
        tok = self.tokenizer
        prompt_ids = tok(list(prompts), add_special_tokens=True)["input_ids"]
        cids = [[tok(choice_text(p, c), add_special_tokens=False)["input_ids"] for c in cs]
                for p, cs in zip(prompts, choices)]
        shared = shared_prefix(prompt_ids) if self.prefix_reuse and len(prompt_ids) > 1 else 0
        shared = shared if shared >= self.min_prefix else 0
        cache = self._prefix_cache(prompt_ids[0][:shared]) if shared else None
        order = sorted(range(len(prompt_ids)), key=lambda b: len(prompt_ids[b]))
        step = self.micro_batch or (self.reuse_rows if shared else 32)
        scores: list = [None] * len(prompt_ids)
        for k in range(0, len(order), step):
            part = order[k:k + step]
            ids = [prompt_ids[b] for b in part]
            if shared:
                enc = self._with_prefix_cache(ids, shared, cache)
            else:
                enc = tok.pad({"input_ids": ids}, return_tensors="pt", padding=True).to(self.device)
                enc[self.cache_kw] = None
            mask = enc["attention_mask"]
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = self.model(input_ids=enc["input_ids"][:, shared:], attention_mask=mask,
                             position_ids=positions[:, shared:], logits_to_keep=1, use_cache=True,
                             **{self.cache_kw: enc[self.cache_kw]})
            # log-probability of a token = its logit - logsumexp over the vocabulary: no
            # (rows, vocabulary) log_softmax tensor is materialised
            last = out.logits[:, -1].float()
            first = last - torch.logsumexp(last, dim=-1, keepdim=True)
            at = [(j, c[0]) for j, b in enumerate(part) for c in cids[b]]     # one gather
            got = iter(first[[j for j, _ in at], [t for _, t in at]].tolist())
            for b in part:
                scores[b] = [[next(got)] for _ in cids[b]]
            longer = [(j, b, i) for j, b in enumerate(part) for i, c in enumerate(cids[b]) if len(c) > 1]
            if longer:
                self._score_rest(out, mask, [len(x) for x in ids], longer, cids, scores)
        flat = [lp for row in scores for lp in row]
        return chosen_each([len(x) for x in prompt_ids], choices, flat)

    def _score_rest(self, out, mask, lengths: list[int], longer: list[tuple], cids, scores):
        """The second and later tokens of the choices in `longer` ((row in group, row, choice)):
        each choice's tokens but its last run from its row's cache (rows repeated as needed,
        the choices right-padded: padding after a token never changes that token's logits)."""
        cache = getattr(out, self.cache_kw)
        cache.batch_select_indices(torch.tensor([j for j, _, _ in longer], device=self.device))
        width = max(len(cids[b][i]) for _, b, i in longer) - 1
        pad = self.tokenizer.pad_token_id
        inp = torch.full((len(longer), width), pad, dtype=torch.long)
        more = torch.zeros((len(longer), width), dtype=torch.long)
        for p, (_, b, i) in enumerate(longer):
            c = cids[b][i][:-1]
            inp[p, :len(c)], more[p, :len(c)] = torch.tensor(c), 1
        rows = torch.tensor([j for j, _, _ in longer])
        start = torch.tensor([lengths[j] for j, _, _ in longer]).unsqueeze(-1)
        logits = self.model(input_ids=inp.to(self.device),
                            attention_mask=torch.cat([mask[rows], more.to(self.device)], dim=1),
                            position_ids=(start + torch.arange(width)).to(self.device),
                            **{self.cache_kw: cache}).logits.float()
        norm = torch.logsumexp(logits, dim=-1)
        for p, (_, b, i) in enumerate(longer):
            c = cids[b][i]
            target = torch.tensor(c[1:], device=self.device).unsqueeze(-1)
            n = len(c) - 1
            scores[b][i].extend((logits[p, :n].gather(-1, target).squeeze(-1) - norm[p, :n]).tolist())

    def _prefix_cache(self, prefix: list[int]):
        """The KV cache of a token prefix (logits only for its last token), kept for the next
        call: the units of a job usually share one prefix, which then runs once per engine."""
        key = tuple(prefix)
        if self._prefix is None or self._prefix[0] != key:
            out = self.model(torch.tensor([prefix], device=self.device), use_cache=True, logits_to_keep=1)
            self._prefix = (key, getattr(out, self.cache_kw))
        return self._prefix[1]

    def _stop_criteria(self, stop: tuple[str, ...]):
        """The stop-string criterion, built once per engine and stop list: building it walks the
        whole vocabulary (0.7 s for gemma-3's 262k tokens), which generate(stop_strings=...)
        would do on every call."""
        from transformers import StoppingCriteriaList, StopStringCriteria

        if stop not in self._stops:
            self._stops[stop] = StoppingCriteriaList([StopStringCriteria(self.tokenizer, list(stop))])
        return self._stops[stop]

    def _with_prefix_cache(self, ids: list[list[int]], shared: int, cache) -> dict:
        """generate() inputs for rows that share their first `shared` tokens: a copy of the
        prefix's KV cache repeated per row, and each row as prefix, padding, suffix."""
        pad = self.tokenizer.pad_token_id
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for b, x in enumerate(ids):
            input_ids[b, :shared], mask[b, :shared] = torch.tensor(x[:shared]), 1
            rest = x[shared:]
            input_ids[b, width - len(rest):], mask[b, width - len(rest):] = torch.tensor(rest), 1
        cache = copy.deepcopy(cache)
        cache.batch_repeat_interleave(len(ids))
        return {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device),
                self.cache_kw: cache}

    def _parse(self, res, width: int, prompt_lens: list[int], sampling) -> list[Generation]:
        tok = self.tokenizer
        new = res.sequences[:, width:]                                   # (B, T)
        logits = torch.stack(res.logits, dim=1).float()                  # (B, T, V)
        logp = torch.log_softmax(logits, dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        gens = []
        pad = tok.pad_token_id
        for b in range(len(prompt_lens)):
            ids = new[b].tolist()
            n, reason = len(ids), "length"
            for j, t in enumerate(ids):
                if t == pad and pad not in self.eos_ids:       # padding after a stop string
                    n, reason = j, "stop"
                    break
                if t in self.eos_ids:
                    # Either the model ended the sequence (count the token: its probability is
                    # part of the answer) or this is padding after a stop string (pad == eos).
                    head = tok.decode(ids[:j], skip_special_tokens=True)
                    n = j if any(s in head for s in sampling.stop) else j + 1
                    reason = "stop"
                    break
            text = tok.decode(ids[:n], skip_special_tokens=True)
            for s in sampling.stop:
                k = text.find(s)
                if k >= 0:
                    text, reason = text[:k], "stop"
            gens.append(Generation(text=text, token_logprobs=[float(x) for x in logp[b, :n].tolist()],
                                   finish_reason=reason, prompt_tokens=int(prompt_lens[b])))
        return gens
