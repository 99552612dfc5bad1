-- replay_logs: the job's rows on which every tier ran, in the replay format that
-- `cascade calibrate` reads: one row per (row_id, tier) with the output, its cost and the
-- run-time confidence features. quality (normalised label match against `reference`) is added
-- by `cascade logs` when the input had references (this file works without them).
-- Columns: row_id, tier, model, prompt, output, cost, first_logprob, mean_logprob, min_logprob,
--          choice_prob, choice_margin (null without choices),
--          output_tokens, stopped.
-- Run: duckdb -cmd "SET VARIABLE job = 'runs/demo'" < sql/replay_logs.sql
WITH r AS (SELECT * FROM read_parquet(getvariable('job') || '/results/*.parquet')),
n AS (SELECT max(t.tier) + 1 AS tiers FROM (SELECT unnest(tiers) AS t FROM r)),
full_rows AS (
  SELECT r.id, r.prompt, r.tiers FROM r, n
  WHERE len(r.tiers) = n.tiers AND len(list_filter(r.tiers, lambda x: x.status = 'ok')) = n.tiers
)
SELECT id AS row_id, t.tier AS tier, t.name AS model, prompt, t.response AS output, t.cost AS cost,
       t.first_logprob, t.mean_logprob, t.min_logprob, t.choice_prob, t.choice_margin, t.output_tokens,
       (t.finish_reason = 'stop')::DOUBLE AS stopped
FROM (SELECT id, prompt, unnest(tiers) AS t FROM full_rows)
ORDER BY row_id, tier;
