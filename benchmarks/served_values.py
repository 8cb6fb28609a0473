"""What the monitoring metrics cost, without Ray: ``ServedValues.add`` once per scored
micro-batch on the request path (it queues the batch) and ``take`` on the flush thread (counts
values and nulls per feature, the newest event time per view, the scores), for the underwriting
service's shape (20 features in 4 views, one of them on-demand).

    python benchmarks/served_values.py
"""

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from mlplatform.features.online_lookup import FeatureResult
from mlplatform.serving.metrics import ServedValues


@dataclass(frozen=True)
class Scorer:
    name: str
    version: int
    feature_names: tuple
    refs: tuple


def main() -> None:
    views = {"applicant_history": 14, "merchant_risk": 3, "merchant_activity": 2, "checkout_features": 1}
    refs = tuple(f"{v}:{v}_f{i}" for v, n in views.items() for i in range(n))
    scorer = Scorer("underwriting", 1, tuple(r.split(":")[1] for r in refs), refs)
    now = datetime.now(UTC)
    for batch in (1, 8, 32):
        columns = {}
        for ref in refs:
            view, name = ref.split(":")
            stamps = [None] * batch if view == "checkout_features" else [now - timedelta(minutes=i) for i in range(batch)]
            values = [None if i % 7 == 0 else float(i) for i in range(batch)]
            columns[name] = FeatureResult(values, ["PRESENT"] * batch, stamps)
        scores = [0.1] * batch
        served = ServedValues()
        n = 20_000
        started = time.perf_counter()
        for _ in range(n):
            served.add(scorer, columns, scores)
        add = (time.perf_counter() - started) / n
        started = time.perf_counter()
        served.take()
        take = (time.perf_counter() - started) / n
        print(f"batch {batch:>2}: add {add * 1e6:5.2f} us per micro-batch (request path); "
              f"take {take * 1e6:6.1f} us per micro-batch, {take / batch * 1e6:5.2f} us per decision (flush thread)")


if __name__ == "__main__":
    main()
