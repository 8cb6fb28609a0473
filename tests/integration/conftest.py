"""Integration tests share one local Ray for the whole session (2-core machine). Every test in
this folder carries the ``integration`` marker (added here), so ``pytest -m "not integration"``
runs the unit tests only."""

from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # never a cluster some `ray start` left in /tmp/ray/ray_current_cluster
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            # Metrics reach the agent every 2 s instead of 10 s, so test_prometheus's waits for
            # exported values are short and have slack on a loaded machine.
            _system_config={"metrics_report_interval_ms": 2000},
        )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def served(tmp_path_factory, ray_session):
    """The serving application deployed once for the session (see ``_serving_app``); the last
    test of test_serving.py closes it early so its replicas' CPUs are free for later modules."""
    from _serving_app import deploy_served

    app = deploy_served(tmp_path_factory)
    try:
        yield app
    finally:
        app.close()
