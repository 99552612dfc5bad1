-- cost_per_tier: what each tier spent (configured cost units and measured engine seconds),
-- over every row it ran, whether or not its answer was kept, except runs taken from an answer store
-- (reused) cost nothing this time and count as saved.
-- Columns: tier, name, rows_run, cost, cost_per_row, seconds, share_of_cost, saved, rows_reused.
-- Run: duckdb -cmd "SET VARIABLE job = 'runs/demo'" < sql/cost_per_tier.sql
WITH t AS (SELECT unnest(tiers) AS t FROM read_parquet(getvariable('job') || '/results/*.parquet'))
SELECT t.tier AS tier, any_value(t.name) AS name, count(*) FILTER (WHERE t.status = 'ok') AS rows_run,
       coalesce(sum(t.cost) FILTER (WHERE NOT coalesce(t.reused, false)), 0) AS cost,
       avg(t.cost) FILTER (WHERE t.status = 'ok') AS cost_per_row,
       coalesce(sum(t.seconds) FILTER (WHERE NOT coalesce(t.reused, false)), 0) AS seconds,
       coalesce(sum(t.cost) FILTER (WHERE NOT coalesce(t.reused, false)), 0)
         / nullif(sum(coalesce(sum(t.cost) FILTER (WHERE NOT coalesce(t.reused, false)), 0)) OVER (), 0)
         AS share_of_cost,
       coalesce(sum(t.cost) FILTER (WHERE t.reused), 0) AS saved,
       count(*) FILTER (WHERE t.reused) AS rows_reused
FROM t GROUP BY ALL ORDER BY tier;
