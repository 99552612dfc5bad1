-- audit: label-free quality from the audit share. An audited row was escalated although the
-- policy would have stopped, so for those rows both the stopping tier's answer and the next
-- tier's answer exist, their agreement (normalised labels) estimates how often stopping was
-- right, with no reference needed. Also the policy's mean predicted quality on those rows.
-- Columns: tier, name, audited, agreement, predicted.
-- Run: duckdb -cmd "SET VARIABLE job = 'runs/demo'" < sql/audit.sql
CREATE OR REPLACE TEMP MACRO norm_label(s) AS trim(regexp_replace(lower(s), '[^a-z0-9]+', ' ', 'g'));
WITH r AS (SELECT tiers FROM read_parquet(getvariable('job') || '/results/*.parquet')),
pairs AS (
  SELECT tiers[i] AS a, tiers[i + 1] AS b
  FROM r, range(1, len(tiers)) AS g(i)
  WHERE tiers[i].audit AND tiers[i + 1].status = 'ok'
)
SELECT a.tier AS tier, any_value(a.name) AS name, count(*) AS audited,
       avg((norm_label(a.response) = norm_label(b.response))::INT) AS agreement,
       avg(a.p_quality) AS predicted
FROM pairs GROUP BY ALL ORDER BY tier;
