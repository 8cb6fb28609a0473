"""Checkout underwriting: will this applicant repay this loan?

The workload ``mlp run configs/underwriting.yaml`` runs (the contract:
``mlplatform.jobs.workload``): synthetic BNPL data, feature definitions, backfills, a
point-in-time training set, a LightGBM model trained with Ray Train, registered and
promoted, materialized features, the decision service and sample decisions.
"""

from workloads.underwriting.pipeline import Config, definitions, generate_data, run, steps

__all__ = ["Config", "definitions", "generate_data", "run", "steps"]
