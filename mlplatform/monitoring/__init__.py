"""Monitoring: drift of live decisions against the training snapshot, and what Prometheus sees.

``api`` (``platform.monitoring.report``: PSI per feature and for the score, written as a report),
``drift`` (PSI of one column, with a bin for missing values), ``report`` (assembling and writing
a report), ``markdown`` and ``plots`` (its text and PNGs), ``latest`` (the latest report's
figures, which the serving application exports as ``mlp_psi`` gauges). The live metrics
themselves are the serving application's (``mlplatform.serving.metrics``); the Prometheus
configuration, alert rules and Grafana dashboard are in ``configs/prometheus`` and
``configs/grafana``.
"""

from mlplatform.monitoring.api import Monitoring

__all__ = ["Monitoring"]
