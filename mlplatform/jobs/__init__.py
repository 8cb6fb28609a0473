"""Jobs: running a workload end to end (``mlp run``) and, later, submitting it to a cluster."""

from mlplatform.jobs.workload import Workload, load_workload

__all__ = ["Workload", "load_workload"]
