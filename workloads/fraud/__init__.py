"""Behaviour-sequence model: a small transformer over each applicant's recent events (prior
checkouts, payments, missed payments, delinquencies), predicting the application's
``default`` label, trained data-parallel with Ray Train.

    from workloads.fraud.sequences import SequenceConfig, build_sequences
    from workloads.fraud.train import FraudSpec, train_fraud

    build_sequences(platform, SequenceConfig(max_events=32))   # training_sets/fraud_sequences
    result = train_fraud(platform, FraudSpec(num_workers=2, epochs=3))

Modules: ``windows`` (the point-in-time window kernel, Arrow/NumPy), ``sequences`` (its Ray
Data build and ``to_tensors``), ``model``, ``spec`` (``FraudSpec``), ``train`` (the driver),
``worker`` (what each Ray Train worker runs), ``checkpoint`` (the checkpoint files).
``windows`` and ``sequences`` import neither torch nor Ray; ``model``, ``spec``, ``worker``
and ``train`` import torch (Ray only when training starts).
"""
