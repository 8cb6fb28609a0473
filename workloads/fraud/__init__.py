"""Behaviour-sequence model: a small transformer over each applicant's recent events (prior
checkouts, payments, missed payments, delinquencies), predicting the application's
``default`` label, trained data-parallel with Ray Train.

    from workloads.fraud.sequences import SequenceConfig, build_sequences
    from workloads.fraud.train import FraudSpec, train_fraud

    build_sequences(platform, SequenceConfig(max_events=32))   # training_sets/fraud_sequences
    result = train_fraud(platform, FraudSpec(num_workers=2, epochs=3))

``sequences`` imports neither torch nor Ray; ``model`` and ``train`` import torch (Ray only
when training starts).
"""
