-- calibration: the policy's predicted probability that a tier's answer is right against the
-- observed rate (normalised label match), in ten bins, where references and predictions exist.
-- Columns: tier, name, bin, rows, predicted, observed.
-- Run: duckdb -cmd "SET VARIABLE job = 'runs/demo'" < sql/calibration.sql
CREATE OR REPLACE TEMP MACRO norm_label(s) AS trim(regexp_replace(lower(s), '[^a-z0-9]+', ' ', 'g'));
CREATE OR REPLACE TEMP MACRO label_match(resp, ref) AS
  (norm_label(resp) = norm_label(ref) OR starts_with(norm_label(resp), norm_label(ref) || ' '));
WITH t AS (
  SELECT reference, unnest(tiers) AS t
  FROM read_parquet(getvariable('job') || '/results/*.parquet', union_by_name = true)
  WHERE reference IS NOT NULL
)
SELECT t.tier AS tier, any_value(t.name) AS name, least(floor(t.p_quality * 10), 9)::INT AS bin,
       count(*) AS rows, avg(t.p_quality) AS predicted,
       avg(coalesce(label_match(t.response, reference), false)::INT) AS observed
FROM t WHERE t.status = 'ok' AND t.p_quality IS NOT NULL
GROUP BY ALL ORDER BY tier, bin;
