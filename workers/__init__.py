"""Tier workers: model engines and the Celery app that runs job units on them."""
