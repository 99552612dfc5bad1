-- cost_per_tier: what each tier spent (configured cost units and measured engine seconds),
-- over every row it ran, whether or not its answer was kept.
-- Columns: tier, name, rows_run, cost, cost_per_row, seconds, share_of_cost.
-- Run: duckdb -cmd "SET VARIABLE job = 'runs/demo'" < sql/cost_per_tier.sql
WITH t AS (SELECT unnest(tiers) AS t FROM read_parquet(getvariable('job') || '/results/*.parquet'))
SELECT t.tier AS tier, any_value(t.name) AS name, count(*) FILTER (WHERE t.status = 'ok') AS rows_run,
       sum(t.cost) AS cost, avg(t.cost) FILTER (WHERE t.status = 'ok') AS cost_per_row,
       sum(t.seconds) AS seconds, sum(t.cost) / sum(sum(t.cost)) OVER () AS share_of_cost
FROM t GROUP BY ALL ORDER BY tier;
