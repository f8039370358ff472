"""opsbook: the operations runbook of a web application as Invoke tasks."""

__version__ = "0.1.0"
