-- selection: rows and share per final tier (the tier whose answer each row keeps).
-- Columns: final_tier, final_tier_name, rows, share.
-- Run: duckdb -cmd "SET VARIABLE job = 'runs/demo'" < sql/selection.sql
SELECT final_tier, final_tier_name, count(*) AS rows,
       count(*) / sum(count(*)) OVER () AS share
FROM read_parquet(getvariable('job') || '/results/*.parquet')
GROUP BY ALL
ORDER BY final_tier NULLS LAST;
