"""OpenAI Batch API JSONL in and out: a request file through a real job (embedded executor,
scripted engine double) to `cascade export --format openai`, the output parsed by the openai
package's own types; malformed request lines named by file and line; the plain-table formats."""

from __future__ import annotations

import json

import polars as pl
import pytest
from click.testing import CliRunner
from openai.types import Completion
from openai.types.chat import ChatCompletion

from jobs.cli import main
from tests.doubles import FAULT
from jobs.inputs import InputError, InputReader

TIERS = """
tiers:
  - {name: small, model: m0, engine: scripted, cost: {per_token: 1}}
  - {name: big, model: m2, engine: scripted, cost: {per_token: 10}}
policy: {rule: {feature: first_logprob, threshold: -0.5}}
"""


def request(cid, content="What is 2+2?", url="/v1/chat/completions", **body):
    if url == "/v1/chat/completions":
        body.setdefault("messages", [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": content}])
    else:
        body.setdefault("prompt", content)
    return {"custom_id": cid, "method": "POST", "url": url, "body": {"model": "gpt-4o-mini", **body}}


def write_requests(path, reqs, blank_after: int | None = None):
    lines = [json.dumps(r) for r in reqs]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def run_job(tmp_path, inp, monkeypatch):
    monkeypatch.setenv("CASCADE_PLUGINS", "tests.doubles")
    spec = tmp_path / "job.yaml"
    spec.write_text(f"name: oa\ninput: {inp}\noutput: {tmp_path / 'job'}\nshard_rows: 4\nbatch_rows: 4\n{TIERS}")
    res = CliRunner().invoke(main, ["run", str(spec), "--quiet"])
    assert res.exit_code == 0, res.output
    return tmp_path / "job"


def test_request_file_round_trip_through_a_job(tmp_path, monkeypatch):
    reqs = [request(f"chat-{i}", f"question {i} w{i}") for i in range(6)]
    reqs += [request(f"text-{i}", f"complete {i} v{i}", url="/v1/completions") for i in range(5)]
    reqs += [request("empty", ""),                                        # an empty message
             request("capped", "question capped w1", max_tokens=1),      # lowers the tier's 16
             request("raised", "question raised w2", max_tokens=500, temperature=0.0),
             request("parts", messages=[{"role": "user", "content": [{"type": "text", "text": "hello "},
                                                                        {"type": "text", "text": "world"}]}])]
    # 16 rows so far (4 shards of 4); the one after a 64-token context, then one alone in the
    # last shard whose engine call fails every attempt
    reqs[-1:-1] = [request("long", " ".join(f"w{i}" for i in range(100)))]
    reqs.append(request("broken", f"question {FAULT}"))
    inp = write_requests(tmp_path / "req.jsonl", reqs, blank_after=3)
    monkeypatch.setenv("CASCADE_RETRY_BACKOFF", "0.01")
    job = run_job(tmp_path, inp, monkeypatch)
    out = tmp_path / "answers.jsonl"
    res = CliRunner().invoke(main, ["export", str(job), "--format", "openai", "--out", str(out)])
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["custom_id"] for x in lines] == [r["custom_id"] for r in reqs]   # every row, in order
    assert len({x["id"] for x in lines}) == len(lines)
    results = pl.read_parquet(job / "results" / "*.parquet")
    rows = {r["id"]: r for r in results.iter_rows(named=True)}
    by_id = {x["custom_id"]: x for x in lines}
    for cid, x in by_id.items():
        r = rows[cid]
        assert set(x) == {"id", "custom_id", "response", "error", "cascade"}
        if cid in ("empty", "long", "broken"):
            code = {"empty": "empty_prompt", "long": "context_length_exceeded", "broken": "cascade_error"}[cid]
            assert x["response"] is None and x["error"] == {"code": code, "message": r["error"]}
            assert r["status"] == "error"
            continue
        assert x["error"] is None and x["response"]["status_code"] == 200
        body = x["response"]["body"]
        parsed = (ChatCompletion if cid.startswith(("chat", "capped", "raised", "parts")) else Completion
                  ).model_validate(body)
        kept = [t for t in r["tiers"] if t["tier"] == r["final_tier"]][0]
        assert parsed.model == ["m0", "m2"][r["final_tier"]]                # the kept tier's model
        choice = parsed.choices[0]
        text = choice.message.content if isinstance(parsed, ChatCompletion) else choice.text
        assert text == r["response"] and choice.finish_reason == kept["finish_reason"]
        assert parsed.usage.prompt_tokens == kept["prompt_tokens"]
        assert parsed.usage.completion_tokens == kept["output_tokens"]
        assert parsed.usage.total_tokens == kept["prompt_tokens"] + kept["output_tokens"]
        assert x["cascade"]["tiers_run"] == r["tiers_run"] and x["cascade"]["cost"] == pytest.approx(r["cost"])
        assert x["cascade"]["request_model"] == "gpt-4o-mini"
    # body.max_tokens lowers the tier's cap (the double then stops at one token), never raises it
    assert by_id["capped"]["response"]["body"]["usage"]["completion_tokens"] == 1
    assert by_id["capped"]["response"]["body"]["choices"][0]["finish_reason"] == "length"
    assert by_id["raised"]["response"]["body"]["usage"]["completion_tokens"] == 2
    assert by_id["parts"]["response"]["body"]["choices"][0]["message"]["content"].endswith("world<assistant>")
    assert rows["empty"]["error"] == "empty message"
    assert "exceeds tier small's context of 64" in rows["long"]["error"]
    assert rows["broken"]["error"].startswith("tier small failed 3 times: RuntimeError: scripted engine fault")
    # the failing unit took only its own row down; the shard before it answered
    assert [rows[c]["status"] for c in ("raised", "parts")] == ["ok", "ok"]


@pytest.mark.parametrize("line,needle", [
    ("{not json", "not valid JSON"),
    (json.dumps({"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}), "'custom_id'"),
    (json.dumps(request("b", url="/v1/embeddings")), "'url' must be one of"),
    (json.dumps(request("b", messages="hi")), "body.messages must be a non-empty list"),
    (json.dumps(request("b", messages=[{"role": "user", "content": [{"type": "image_url"}]}])),
     "only text content parts"),
    (json.dumps(request("b", max_tokens=0)), "max_tokens must be a positive integer"),
    (json.dumps(request("b", temperature=-1)), "temperature must be a number >= 0"),
    (json.dumps(request("a")), "line 3: duplicate custom_id 'a' \\(first on line 1\\)"),
])
def test_malformed_request_line_is_named_by_file_and_line(tmp_path, monkeypatch, line, needle):
    path = tmp_path / "req.jsonl"
    path.write_text(json.dumps(request("a")) + "\n\n" + line + "\n")
    with pytest.raises(InputError, match=needle) as err:
        InputReader(str(path))
    assert f"{path}: line 3" in str(err.value)
    spec = tmp_path / "job.yaml"
    spec.write_text(f"name: oa\ninput: {path}\noutput: {tmp_path / 'job'}\n{TIERS}")
    monkeypatch.setenv("CASCADE_PLUGINS", "tests.doubles")
    res = CliRunner().invoke(main, ["run", str(spec)])
    assert res.exit_code == 2 and "line 3" in res.output
    assert not (tmp_path / "job").exists()                                 # nothing written


def test_jsonl_and_parquet_files_mix_in_one_input_directory(tmp_path, monkeypatch):
    d = tmp_path / "in"
    d.mkdir()
    write_requests(d / "a.jsonl", [request(f"a{i}", f"question {i} w{i}") for i in range(3)])
    pl.DataFrame({"prompt": [f"plain {i} p{i}" for i in range(2)]}).write_parquet(d / "b.parquet")
    job = run_job(tmp_path, d, monkeypatch)
    out = pl.read_parquet(job / "results" / "*.parquet")
    assert out["id"].to_list() == ["a0", "a1", "a2", "b:0", "b:1"] and (out["status"] == "ok").all()
    lines = tmp_path / "o.jsonl"
    assert CliRunner().invoke(main, ["export", str(job), "--out", str(lines)]).exit_code == 0
    objects = [json.loads(x)["response"]["body"]["object"] for x in lines.read_text().splitlines()]
    assert objects == ["chat.completion"] * 3 + ["text_completion"] * 2


def test_plain_table_exports(tmp_path, monkeypatch):
    inp = write_requests(tmp_path / "req.jsonl", [request(f"r{i}", f"question {i} w{i}") for i in range(7)])
    job = run_job(tmp_path, inp, monkeypatch)
    results = pl.read_parquet(job / "results" / "*.parquet")
    for fmt in ("parquet", "csv", "jsonl"):
        path = tmp_path / f"out.{fmt}"
        res = CliRunner().invoke(main, ["export", str(job), "--format", fmt, "--out", str(path)])
        assert res.exit_code == 0, res.output
        got = {"parquet": pl.read_parquet, "csv": pl.read_csv, "jsonl": pl.read_ndjson}[fmt](path)
        assert got["id"].to_list() == results["id"].to_list() and got.columns == results.columns
    csv = pl.read_csv(tmp_path / "out.csv")
    assert [json.loads(t) for t in csv["tiers_run"]] == results["tiers_run"].to_list()  # nested as JSON
    res = CliRunner().invoke(main, ["export", str(tmp_path / "nope"), "--out", str(tmp_path / "x.jsonl")])
    assert res.exit_code == 2 and "has not finished" in res.output
