-- errors: rows whose final status is `error`, by tier and reason. Reasons that differ only in
-- their numbers (unit ids, attempt counts, lengths) form one group. `reason` is the group's first
-- message in full, tier names and paths intact, and `messages` how many distinct messages it holds.
-- Columns: tier, name, reason, messages, rows.
-- Run: duckdb -cmd "SET VARIABLE job = 'runs/demo'" < sql/errors.sql
WITH t AS (SELECT id, status, tiers[len(tiers)] AS last
           FROM read_parquet(getvariable('job') || '/results/*.parquet')),
e AS (SELECT last.tier AS tier, last.name AS name, last.error AS error,
             regexp_replace(last.error, '[0-9]+', 'N', 'g') AS kind
      FROM t WHERE status = 'error')
SELECT tier, name, min(error) AS reason, count(DISTINCT error) AS messages, count(*) AS rows
FROM e GROUP BY tier, name, kind ORDER BY rows DESC, tier, reason;
