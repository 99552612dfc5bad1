-- funnel: rows entering, stopping, escalating and failing at each tier (audits counted apart).
-- Columns: tier, name, entered, stopped, escalated, audited, errors, escalation_rate.
-- Run: duckdb -cmd "SET VARIABLE job = 'runs/demo'" < sql/funnel.sql
WITH t AS (
  SELECT unnest(tiers) AS t FROM read_parquet(getvariable('job') || '/results/*.parquet')
)
SELECT t.tier AS tier, any_value(t.name) AS name, count(*) AS entered,
       count(*) FILTER (WHERE t.decision = 'stop') AS stopped,
       count(*) FILTER (WHERE t.decision LIKE 'escalate%') AS escalated,
       count(*) FILTER (WHERE t.audit) AS audited,
       count(*) FILTER (WHERE t.status = 'error') AS errors,
       count(*) FILTER (WHERE t.decision LIKE 'escalate%') / count(*) AS escalation_rate
FROM t GROUP BY ALL ORDER BY tier;
