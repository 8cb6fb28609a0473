"""Fraud / first-payment-default signal from behaviour sequences: a small transformer over
each applicant's recent events, trained data-parallel with Ray Train.

    from workloads.fraud.sequences import SequenceConfig, build_sequences
    from workloads.fraud.train import FraudSpec, train_fraud

    build_sequences(platform, SequenceConfig(max_events=32))   # training_sets/fraud_sequences
    result = train_fraud(platform, FraudSpec(num_workers=2, epochs=3))

Modules import torch and Ray only when a function needs them.
"""
