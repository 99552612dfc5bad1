-- export_openai: the job's results as OpenAI Batch API output lines, one per input row in input
-- order (`cascade export JOB --format openai`). A row that answered carries the kept tier's
-- answer as a chat.completion (rows that came as `messages`) or a text_completion (rows that came
-- as `prompt`), with that tier's model and token usage; a failed row has "response": null and an
-- "error". The cascade's own lineage is under the extra key "cascade".
-- Reads the view `r` (the results, with `messages` and `request_model` as NULL where the input
-- had none) and the variables job_id, models (tier models, tier 0 first) and created (epoch s).
WITH k AS (
  SELECT *, list_filter(tiers, lambda t: t.tier = final_tier)[1] AS kept,
         md5(getvariable('job_id') || ':' || id) AS h,
         messages IS NOT NULL AND prompt IS NULL AS chat
  FROM r
)
SELECT
  'batch_req_' || h[:24] AS id,
  id AS custom_id,
  CASE WHEN status = 'ok' THEN json_object(
    'status_code', 200,
    'request_id', 'req_' || h[:24],
    'body', json_object(
      'id', CASE WHEN chat THEN 'chatcmpl-' ELSE 'cmpl-' END || h[:24],
      'object', CASE WHEN chat THEN 'chat.completion' ELSE 'text_completion' END,
      'created', getvariable('created'),
      'model', getvariable('models')[final_tier + 1],
      'choices', json_array(CASE WHEN chat
        THEN json_object('index', 0, 'message', json_object('role', 'assistant', 'content', response),
                         'finish_reason', kept.finish_reason, 'logprobs', NULL)
        ELSE json_object('index', 0, 'text', response, 'finish_reason', kept.finish_reason,
                         'logprobs', NULL) END),
      'usage', json_object('prompt_tokens', kept.prompt_tokens,
                           'completion_tokens', kept.output_tokens,
                           'total_tokens', kept.prompt_tokens + kept.output_tokens)))
  END AS response,
  CASE WHEN status <> 'ok' THEN json_object(
    'code', CASE WHEN error LIKE 'empty %' THEN 'empty_prompt'
                 WHEN error LIKE '%context of%' THEN 'context_length_exceeded'
                 ELSE 'cascade_error' END,
    'message', error)
  END AS error,
  json_object(
    'final_tier', final_tier, 'final_tier_name', final_tier_name, 'tiers_run', tiers_run,
    'cost', cost, 'seconds', seconds, 'request_model', request_model,
    'usage_all_tiers', json_object(
      'prompt_tokens', list_sum(list_transform(tiers, lambda t: t.prompt_tokens)),
      'completion_tokens', list_sum(list_transform(tiers, lambda t: t.output_tokens)))) AS cascade
FROM k
ORDER BY file_order, row_order;
