"""transformers engine: CPU or CUDA, HF directories and GGUF files (via the safetensors cache),
batched greedy or sampled generation with left padding and per-token log-probabilities."""

from __future__ import annotations

import logging
import time

import torch

from workers.engines.base import Engine, Generation
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
        if not prompts:
            return []
        tok = self.tokenizer
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=True).to(self.device)
        kwargs = dict(max_new_tokens=sampling.max_tokens, return_dict_in_generate=True,
                      output_logits=True, pad_token_id=tok.pad_token_id)
        if sampling.temperature > 0:
            torch.manual_seed(sampling.seed)
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=1.0, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if sampling.stop:
            kwargs.update(stop_strings=list(sampling.stop), tokenizer=tok)
        res = self.model.generate(**enc, **kwargs)
        width = enc["input_ids"].shape[1]
        new = res.sequences[:, width:]                                   # (B, T)
        logits = torch.stack(res.logits, dim=1).float()                  # (B, T, V)
        logp = torch.log_softmax(logits, dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        prompt_lens = enc["attention_mask"].sum(dim=1).tolist()
        gens = []
        pad = tok.pad_token_id
        for b in range(len(prompts)):
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
