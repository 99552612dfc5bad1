-- calibration: a confidence signal that a tier's answer is right against the observed rate
-- (normalised label match), in ten bins per tier, where references exist: `p_quality` (the
-- calibrated policy's prediction) and `choice_prob` (a constrained answer's probability over its
-- choices).
-- Columns: tier, name, bin, rows, predicted (the signal's mean in the bin), observed, signal.
-- Run: duckdb -cmd "SET VARIABLE job = 'runs/demo'" < sql/calibration.sql
CREATE OR REPLACE TEMP MACRO norm_label(s) AS trim(regexp_replace(lower(s), '[^a-z0-9]+', ' ', 'g'));
CREATE OR REPLACE TEMP MACRO label_match(resp, ref) AS
  (norm_label(resp) = norm_label(ref) OR starts_with(norm_label(resp), norm_label(ref) || ' '));
WITH t AS (
  SELECT reference, unnest(tiers) AS t
  FROM read_parquet(getvariable('job') || '/results/*.parquet', union_by_name = true)
  WHERE reference IS NOT NULL
),
s AS (
  SELECT reference, t, 'p_quality' AS signal, t.p_quality AS p FROM t WHERE t.p_quality IS NOT NULL
  UNION ALL
  SELECT reference, t, 'choice_prob', t.choice_prob FROM t WHERE t.choice_prob IS NOT NULL
)
SELECT t.tier AS tier, any_value(t.name) AS name, least(floor(p * 10), 9)::INT AS bin,
       count(*) AS rows, avg(p) AS predicted,
       avg(coalesce(label_match(t.response, reference), false)::INT) AS observed, signal
FROM s WHERE t.status = 'ok'
GROUP BY ALL ORDER BY signal DESC, tier, bin;
