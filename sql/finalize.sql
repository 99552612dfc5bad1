-- finalize: a job's final rows, one output part at a time, in input order.
-- Input: the relation `unit_results`: the final row of every input position in [lo, hi) (the
-- row's terminal unit result: the one with no next tier), which jobs/finalize.py picks from the
-- tiers/K/UNIT.arrow files and streams in as Arrow (the duckdb CLI reads no Arrow IPC files),
-- with what it derives from each row's runs: _cost and _seconds (their sums over the runs this
-- job paid for), _saved (the cost of the runs taken from the answer store), _response (the
-- answer of the tier the row keeps, kept_tier), _status and _error (its last run's), and
-- source_file (from the row's input position); and the variables tier_names, policy_version,
-- job_id. The lineage (each tier's run of a row, in that tier's results) is the widest part of
-- a row and does not go through DuckDB: finalize gathers each row's runs, by input position,
-- into the list `tiers` at the place this query gives it.
-- Columns: the result schema in README.md but tiers_run (jobs/finalize.py derives it from
-- tiers without a copy): id, prompt, response, final_tier, final_tier_name, tiers, status,
-- error, cost, saved_cost, seconds, policy_version, job_id, input columns, source_file; and _row (the input
-- position, which finalize checks and drops).
SELECT id, prompt,
       _response AS response,
       kept_tier AS final_tier,
       getvariable('tier_names')[kept_tier + 1] AS final_tier_name,
       NULL AS tiers,         -- finalize puts the row's lineage here (see above)
       _status AS status,
       _error AS error,
       _cost AS cost,
       _saved AS saved_cost,
       _seconds AS seconds,
       getvariable('policy_version') AS policy_version,
       getvariable('job_id') AS job_id,
       * EXCLUDE (id, prompt, next_tier, kept_tier, source_file, _row, _cost, _saved, _seconds,
                  _response, _status, _error),
       source_file,
       _row
FROM unit_results
ORDER BY _row
