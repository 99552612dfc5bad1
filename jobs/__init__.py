"""Batch jobs: spec, input, manifest, coalescing, execution, reports."""
