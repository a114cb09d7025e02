"""Celery workers: ``celery -A worker worker`` or ``mnistq worker``."""

from worker.app import app

__all__ = ["app"]
