-- errors: rows whose final status is `error`, by tier and reason (first 120 characters).
-- Columns: tier, name, reason, rows.
-- Run: duckdb -cmd "SET VARIABLE job = 'runs/demo'" < sql/errors.sql
WITH t AS (SELECT id, status, tiers[len(tiers)] AS last
           FROM read_parquet(getvariable('job') || '/results/*.parquet'))
SELECT last.tier AS tier, last.name AS name,
       regexp_replace(left(last.error, 120), '[0-9]+', 'N', 'g') AS reason, count(*) AS rows
FROM t WHERE status = 'error' GROUP BY ALL ORDER BY rows DESC, tier;
