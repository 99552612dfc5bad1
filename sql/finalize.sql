-- finalize: a job's final rows from its units' results: the terminal row of every input row (the
-- one with no next tier), with its lineage, in input order.
-- Input: the relation `unit_results` (every tiers/K/UNIT.arrow file of the job; jobs/finalize.py
-- registers them as one Arrow dataset, since the duckdb CLI reads no Arrow IPC files) and the
-- variables tier_names, policy_version, job_id.
-- Columns: the result schema in README.md (id, prompt, response, final_tier, final_tier_name,
-- tiers_run, tiers, status, error, cost, seconds, policy_version, job_id, input columns,
-- source_file).
SELECT id, prompt,
       list_filter(trace, lambda x: x.tier = kept_tier)[1].response AS response,
       kept_tier AS final_tier,
       getvariable('tier_names')[kept_tier + 1] AS final_tier_name,
       list_transform(trace, lambda x: x.tier) AS tiers_run,
       trace AS tiers,
       CASE WHEN trace[-1].status = 'ok' THEN 'ok' ELSE 'error' END AS status,
       trace[-1].error AS error,
       list_sum(list_transform(trace, lambda x: x.cost))::DOUBLE AS cost,
       list_sum(list_transform(trace, lambda x: x.seconds))::DOUBLE AS seconds,
       getvariable('policy_version') AS policy_version,
       getvariable('job_id') AS job_id,
       * EXCLUDE (id, prompt, trace, next_tier, kept_tier, source_file, _row),
       source_file
FROM unit_results
WHERE next_tier IS NULL
ORDER BY _row
