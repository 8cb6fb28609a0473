"""Integrations with tools platform teams already run. Each module imports its tool only when
used: :mod:`mlplatform.integrations.airflow` (a pipeline as an Airflow DAG)."""
