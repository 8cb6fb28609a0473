"""Input builders for the test application's fraud model, imported by the replicas as
``tests.integration._fraud_builders`` (the working directory is on their path).

``slow_for_one_applicant`` is the workload's own builder, except that a batch holding
``SLOW_APPLICANT`` takes ``SLOW_S`` seconds first: the test of a rule model past its deadline
needs one that is slow on demand, and the builder is the served model's configured seam.
"""

from __future__ import annotations

import time

from workloads.fraud.online import serving_inputs

SLOW_APPLICANT = 900_003
SLOW_S = 2.5


def slow_for_one_applicant(features, requests, signature):  # noqa: ANN001, ANN201 - the builder contract
    requests = list(requests)
    if any(r.get("applicant_id") == SLOW_APPLICANT for r in requests):
        time.sleep(SLOW_S)
    return serving_inputs(features, requests, signature)
