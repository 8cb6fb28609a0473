"""Checkout underwriting: will this applicant repay this loan?

The workload package ``mlp run configs/underwriting.yaml`` runs: synthetic BNPL data,
feature definitions, and the steps later issues add (backfill, training, serving).
"""

from workloads.underwriting.pipeline import Config, definitions, generate_data, run

__all__ = ["Config", "definitions", "generate_data", "run"]
