"""Jobs: workloads and their steps (``mlp run``), and submitting work to a cluster.

- ``workload``: the workload contract and ``load_workload`` (a YAML file → module + config).
- ``steps``: ``Step``/``Done`` and the ``StepRunner`` that decides what is up to date.
- ``feature_steps``: the library's own steps (apply, backfill, materialize).
- ``console``: what the CLI shows (logging handler, progress, Ray's verbosity).
- ``submit``: Ray job submission.
"""

from mlplatform.jobs.steps import Done, Step, StepRunner
from mlplatform.jobs.workload import Workload, load_workload

__all__ = ["Done", "Step", "StepRunner", "Workload", "load_workload"]
