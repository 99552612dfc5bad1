-- latency: per-tier engine time per row (its share of the batched call) and throughput.
-- Columns: tier, name, rows, seconds, rows_per_s, p50_s, p90_s, p99_s, output_tokens_per_row.
-- Run: duckdb -cmd "SET VARIABLE job = 'runs/demo'" < sql/latency.sql
WITH t AS (SELECT unnest(tiers) AS t FROM read_parquet(getvariable('job') || '/results/*.parquet'))
SELECT t.tier AS tier, any_value(t.name) AS name, count(*) AS rows, sum(t.seconds) AS seconds,
       count(*) / nullif(sum(t.seconds), 0) AS rows_per_s,
       quantile_cont(t.seconds, 0.5) AS p50_s, quantile_cont(t.seconds, 0.9) AS p90_s,
       quantile_cont(t.seconds, 0.99) AS p99_s, avg(t.output_tokens) AS output_tokens_per_row
FROM t WHERE t.status = 'ok' GROUP BY ALL ORDER BY tier;
