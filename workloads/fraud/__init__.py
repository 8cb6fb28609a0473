"""Behaviour-sequence model: a small transformer over each applicant's recent events (prior
checkouts, payments, missed payments, delinquencies), predicting the application's
``default`` label, trained data-parallel with Ray Train.

    from workloads.fraud.sequences import SequenceConfig, build_sequences
    from workloads.fraud.train import FraudSpec, train_fraud

    build_sequences(platform, SequenceConfig(max_events=32))   # training_sets/fraud_sequences
    result = train_fraud(platform, FraudSpec(num_workers=2, epochs=3))

As a workload (``mlp run configs/fraud.yaml``; the contract: ``mlplatform.jobs.workload``),
``pipeline`` runs generate → sequences → train → evaluate → register.

Modules: ``pipeline`` (the workload's ``Config`` and ``steps``), ``windows`` (the point-in-time window kernel, Arrow/NumPy), ``sequences`` (its Ray
Data build and ``to_tensors``), ``model``, ``spec`` (``FraudSpec``), ``train`` (the driver),
``worker`` (what each Ray Train worker runs), ``checkpoint`` (the checkpoint files).
``windows`` and ``sequences`` import neither torch nor Ray; ``model``, ``spec``, ``worker``
and ``train`` import torch (Ray only when training starts).
"""

from typing import Any

__all__ = ["Config", "steps"]


def __getattr__(name: str) -> Any:
    # The workload's Config and steps load on first use: the pipeline imports torch, which
    # the Ray Data tasks that only cut windows (``windows``, ``sequences``) should not pay for.
    if name in __all__:
        from workloads.fraud import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
