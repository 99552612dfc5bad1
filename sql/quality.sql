-- quality: share of answers matching `reference`, per tier (over the rows each tier ran) and
-- overall (the kept answers), by exact match and by normalised label match (lower case,
-- punctuation and spacing removed, the label followed by nothing or by more words).
-- Empty when the input has no `reference` column or no row has one.
-- Columns: scope, tier, name, rows, exact, normalised.
-- Run: duckdb -cmd "SET VARIABLE job = 'runs/demo'" < sql/quality.sql
CREATE OR REPLACE TEMP MACRO norm_label(s) AS trim(regexp_replace(lower(s), '[^a-z0-9]+', ' ', 'g'));
CREATE OR REPLACE TEMP MACRO label_match(resp, ref) AS
  (norm_label(resp) = norm_label(ref) OR starts_with(norm_label(resp), norm_label(ref) || ' '));
WITH r AS (
  SELECT * FROM read_parquet(getvariable('job') || '/results/*.parquet', union_by_name = true)
  WHERE reference IS NOT NULL
),
t AS (SELECT reference, unnest(tiers) AS t FROM r)
SELECT 'tier' AS scope, t.tier AS tier, any_value(t.name) AS name, count(*) AS rows,
       avg((coalesce(t.response, '') = reference)::INT) AS exact,
       avg(coalesce(label_match(t.response, reference), false)::INT) AS normalised
FROM t WHERE t.status = 'ok' GROUP BY ALL
UNION ALL
SELECT 'overall', NULL, 'cascade', count(*), avg((coalesce(response, '') = reference)::INT),
       avg(coalesce(label_match(response, reference), false)::INT)
FROM r
ORDER BY scope DESC, tier;
