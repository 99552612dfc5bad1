"""Batch jobs: spec, input, job state (live coordination and recovery), coalescing, execution, reports."""
