-- choice_calibration: a constrained answer's choice_prob (its probability renormalised over the
-- row's choices) against the observed rate of right answers (normalised label match), in ten
-- bins per tier, where references exist and the tier answered from choices.
-- Columns: tier, name, bin, rows, choice_prob, observed.
-- Run: duckdb -cmd "SET VARIABLE job = 'runs/demo'" < sql/choice_calibration.sql
CREATE OR REPLACE TEMP MACRO norm_label(s) AS trim(regexp_replace(lower(s), '[^a-z0-9]+', ' ', 'g'));
CREATE OR REPLACE TEMP MACRO label_match(resp, ref) AS
  (norm_label(resp) = norm_label(ref) OR starts_with(norm_label(resp), norm_label(ref) || ' '));
WITH t AS (
  SELECT reference, unnest(tiers) AS t
  FROM read_parquet(getvariable('job') || '/results/*.parquet', union_by_name = true)
  WHERE reference IS NOT NULL
)
SELECT t.tier AS tier, any_value(t.name) AS name, least(floor(t.choice_prob * 10), 9)::INT AS bin,
       count(*) AS rows, avg(t.choice_prob) AS choice_prob,
       avg(coalesce(label_match(t.response, reference), false)::INT) AS observed
FROM t WHERE t.status = 'ok' AND t.choice_prob IS NOT NULL
GROUP BY ALL ORDER BY tier, bin;
