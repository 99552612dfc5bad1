-- cost: total and per-row cost of the job (configured cost units, measured seconds), against
-- running every row on the last tier. Rows the last tier did not run are charged its measured
-- cost per prompt character (from the rows it did run) times their prompt length: an estimate,
-- NULL when the last tier ran no row.
-- Columns: rows, cost_total, cost_per_row, seconds_total, cost_if_last_tier,
--          cost_ratio_to_last_tier, last_tier_rows_measured.
-- Run: duckdb -cmd "SET VARIABLE job = 'runs/demo'" < sql/cost.sql
WITH r AS (
  SELECT *, coalesce(length(prompt), tiers[1].prompt_tokens * 4) AS chars
  FROM read_parquet(getvariable('job') || '/results/*.parquet')
),
last AS (SELECT max(t.tier) AS tier FROM (SELECT unnest(tiers) AS t FROM r)),
per AS (
  SELECT r.chars, list_filter(r.tiers, lambda x: x.tier = last.tier AND x.status = 'ok') AS l
  FROM r, last
),
rate AS (SELECT sum(l[1].cost) / nullif(sum(chars), 0) AS per_char, count(*) FILTER (WHERE len(l) > 0) AS n
         FROM per WHERE len(l) > 0),
tot AS (
  SELECT count(*) AS rows, sum(cost) AS cost_total, avg(cost) AS cost_per_row,
         sum(seconds) AS seconds_total FROM r
),
est AS (
  SELECT sum(CASE WHEN len(l) > 0 THEN l[1].cost ELSE chars * (SELECT per_char FROM rate) END)
           AS cost_if_last_tier
  FROM per
)
SELECT tot.*, est.cost_if_last_tier, tot.cost_total / nullif(est.cost_if_last_tier, 0)
         AS cost_ratio_to_last_tier,
       coalesce((SELECT n FROM rate), 0) AS last_tier_rows_measured
FROM tot, est;
