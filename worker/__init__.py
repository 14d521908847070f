"""Prefect worker types of the chain, registered through the `prefect.collections` entry point.

Importing this package registers the `wis2-warm` worker type (`worker.warm.WarmWorker`); it
is imported by every Prefect process (server, CLI, flows), so it must stay light: nothing here
imports the flows themselves.
"""

from worker.warm import WarmWorker

__all__ = ["WarmWorker"]
