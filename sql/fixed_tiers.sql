-- fixed_tiers: what running every row on one tier would cost, per tier, estimated from the rows
-- that tier did run: its measured cost (and seconds) per prompt character times the prompt
-- length of every row. Exact for a tier that ran every row. NULL for a tier that ran none.
-- Columns: tier, name, rows_run, cost_per_row_if_all, seconds_per_row_if_all.
-- Run: duckdb -cmd "SET VARIABLE job = 'runs/demo'" < sql/fixed_tiers.sql
WITH r AS (
  SELECT tiers, coalesce(length(prompt), tiers[1].prompt_tokens * 4) AS chars
  FROM read_parquet(getvariable('job') || '/results/*.parquet')
),
t AS (SELECT chars, unnest(tiers) AS t FROM r),
rate AS (
  SELECT t.tier AS tier, any_value(t.name) AS name, count(*) AS rows_run,
         sum(t.cost) / nullif(sum(chars), 0) AS cost_per_char,
         sum(t.seconds) / nullif(sum(chars), 0) AS seconds_per_char
  FROM t WHERE t.status = 'ok' GROUP BY ALL
)
SELECT tier, name, rows_run,
       cost_per_char * (SELECT avg(chars) FROM r) AS cost_per_row_if_all,
       seconds_per_char * (SELECT avg(chars) FROM r) AS seconds_per_row_if_all
FROM rate ORDER BY tier;
