-- history: every nightly run's figures in one pass over all their results, one row per
-- (run, tier): the run's rows, cost, errors and quality (normalised label match of the kept
-- answers, NULL without references), and per tier the rows it answered, the rows that entered it
-- and escalated from it (funnel), its audited rows and their agreement with the next tier
-- (audit), and its calibration sums over referenced rows with a predicted p_quality: n,
-- observed correct, sum of p, sum of p(1-p).
-- Reads the view `results`: every run's result rows with a `job` column (jobs/report.history
-- builds it over each run's results/*.parquet, `reference` NULL where a run had none).
-- Columns: job, rows, cost_total, errors, quality, tier, name, answered, entered, escalated,
--          audited, agreement, cal_n, cal_observed, cal_predicted, cal_var.
CREATE OR REPLACE TEMP MACRO norm_label(s) AS trim(regexp_replace(lower(s), '[^a-z0-9]+', ' ', 'g'));
CREATE OR REPLACE TEMP MACRO label_match(resp, ref) AS
  (norm_label(resp) = norm_label(ref) OR starts_with(norm_label(resp), norm_label(ref) || ' '));
WITH runs AS (
  SELECT job, count(*) AS rows, coalesce(sum(cost), 0) AS cost_total,
         count(*) FILTER (WHERE status = 'error') AS errors,
         avg(coalesce(label_match(response, reference), false)::INT)
           FILTER (WHERE reference IS NOT NULL) AS quality
  FROM results GROUP BY job
),
entries AS (
  SELECT job, reference, unnest(tiers) AS t FROM results
),
funnel AS (
  SELECT job, t.tier AS tier, any_value(t.name) AS name, count(*) AS entered,
         count(*) FILTER (WHERE t.decision LIKE 'escalate%') AS escalated,
         count(*) FILTER (WHERE t.status = 'ok' AND t.p_quality IS NOT NULL AND reference IS NOT NULL) AS cal_n,
         sum(coalesce(label_match(t.response, reference), false)::INT)
           FILTER (WHERE t.status = 'ok' AND t.p_quality IS NOT NULL AND reference IS NOT NULL) AS cal_observed,
         sum(t.p_quality) FILTER (WHERE t.status = 'ok' AND reference IS NOT NULL) AS cal_predicted,
         sum(t.p_quality * (1 - t.p_quality)) FILTER (WHERE t.status = 'ok' AND reference IS NOT NULL) AS cal_var
  FROM entries GROUP BY job, t.tier
),
answered AS (
  SELECT job, final_tier AS tier, count(*) AS answered FROM results
  WHERE final_tier IS NOT NULL GROUP BY job, final_tier
),
audit AS (
  SELECT job, tiers[i].tier AS tier, count(*) AS audited,
         avg((norm_label(tiers[i].response) = norm_label(tiers[i + 1].response))::INT) AS agreement
  FROM results, range(1, len(tiers)) AS g(i)
  WHERE tiers[i].audit AND tiers[i + 1].status = 'ok'
  GROUP BY job, tiers[i].tier
)
SELECT runs.job, runs.rows, runs.cost_total, runs.errors, runs.quality,
       f.tier, f.name, coalesce(a.answered, 0) AS answered, f.entered, f.escalated,
       coalesce(au.audited, 0) AS audited, au.agreement,
       f.cal_n, f.cal_observed, f.cal_predicted, f.cal_var
FROM runs
LEFT JOIN funnel f USING (job)
LEFT JOIN answered a ON a.job = runs.job AND a.tier = f.tier
LEFT JOIN audit au ON au.job = runs.job AND au.tier = f.tier
ORDER BY runs.job, f.tier;
