"""The private HAProxy of a local deployment, without Ray: the config Serve 2.60 generates
(rendered by Serve's own code, so a change in its template shows here), the wrapper Serve runs
as its HAProxy binary, and the cleanup of the private directory."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mlplatform.serving import ingress


@pytest.fixture
def private_env(tmp_path):
    """``private_haproxy_env`` around a fake HAProxy that reports its pid and the config it got."""
    fake = tmp_path / "fake-haproxy"
    fake.write_text(textwrap.dedent("""\
        #!/bin/sh
        echo "pid $$"
        while [ "$1" != "-f" ]; do shift; done
        cat "$2"
    """))
    fake.chmod(0o700)
    env = ingress.private_haproxy_env(str(fake))
    yield env
    assert ingress.cleanup(timeout_s=5)


def _serve_config(tmp_path, host: str) -> str:
    """The HAProxy config Serve writes for one app with one replica, by Serve's own code."""
    from ray.serve._private.haproxy import BackendConfig, HAProxyApi, HAProxyConfig, ServerConfig
    from ray.serve.config import HTTPOptions

    cfg = HAProxyConfig(
        http_options=HTTPOptions(host=host, port=8123),
        socket_path=str(tmp_path / "admin.sock"),
        server_state_base=str(tmp_path),
        server_state_file=str(tmp_path / "server-state"),
        metrics_socket_path=str(tmp_path / "metrics.sock"),
        stats_port=18404,
        metrics_port=19101,
        is_head=True,
    )
    api = HAProxyApi(cfg, config_file_path=str(tmp_path / "haproxy.cfg"))
    replica = ServerConfig(name="r1", host="127.0.0.1", port=30000)
    api.set_backend_configs({"http-app": BackendConfig(name="http-app", path_prefix="/", app_name="app", servers=[replica])})
    api._generate_config_file_internal()
    return (tmp_path / "haproxy.cfg").read_text()


def _binds(config: str) -> dict[str, list[str]]:
    section, binds = "", {}
    for line in config.splitlines():
        if line.strip() and not line[0].isspace():
            section = line.strip()
        elif line.split()[:1] == ["bind"]:
            binds.setdefault(section, []).append(line.split()[1])
    return binds


@pytest.mark.parametrize(("host", "frontend"), [("127.0.0.1", "127.0.0.1:8123"), ("0.0.0.0", "*:8123")])
def test_private_config_keeps_only_the_ingress_where_configured(tmp_path, host, frontend):
    serve = _serve_config(tmp_path, host)
    # What Serve 2.60 writes, and what this module exists for; if these fail, Serve changed.
    assert " mode 666 level admin" in serve
    assert _binds(serve) == {"frontend prometheus": [":19101"], "frontend http_frontend": [frontend], "listen stats": ["*:18404"]}
    assert '{\\"/\\":\\"app\\"}" if routes' in serve

    private = ingress.private_haproxy_config(serve)

    socket_line = next(line.split() for line in private.splitlines() if line.strip().startswith("stats socket"))
    assert socket_line[2] == str(tmp_path / "admin.sock")
    assert socket_line[socket_line.index("mode") + 1] == "600" and "666" not in socket_line
    assert _binds(private) == {
        "frontend prometheus": ["127.0.0.1:19101"],
        "frontend http_frontend": [frontend],
        "listen stats": ["127.0.0.1:18404"],
    }
    routes = [line.strip() for line in private.splitlines() if line.strip().startswith("http-request return") and line.endswith(" if routes")]
    assert routes == [ingress._ROUTES_OFF]
    assert ingress.private_haproxy_config(private) == private  # a reload re-runs it on its own output
    binary = ingress.haproxy_binary()
    if binary is not None:  # the real HAProxy accepts it
        (tmp_path / "private.cfg").write_text(private)
        check = subprocess.run([binary, "-c", "-f", str(tmp_path / "private.cfg")], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr


def test_private_config_moves_every_other_listener_to_loopback():
    config = textwrap.dedent("""\
        global
            stats socket /x/admin.sock level admin
        frontend http_frontend
            bind 10.0.0.5:8000
        frontend grpc_frontend
            bind *:9000 proto h2
        frontend other
            bind :::9101,[::]:9102 name m
    """)
    private = ingress.private_haproxy_config(config)
    assert "stats socket /x/admin.sock level admin mode 600\n" in private
    assert "bind 10.0.0.5:8000\n" in private and "bind *:9000 proto h2\n" in private
    assert "bind 127.0.0.1:9101,127.0.0.1:9102 name m\n" in private


def test_wrapper_is_haproxy_on_the_private_config_in_the_same_process(tmp_path, private_env):
    directory = os.path.dirname(private_env["RAY_SERVE_HAPROXY_BINARY_PATH"])
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert all(v == directory or v.startswith(directory + os.sep) for v in private_env.values())
    config = tmp_path / "haproxy.cfg"
    config.write_text("global\n    stats socket /s mode 666 level admin\nlisten stats\n  bind *:8404\n")

    wrapper = subprocess.Popen(
        [private_env["RAY_SERVE_HAPROXY_BINARY_PATH"], "-db", "-f", str(config), "-dR"],
        stdout=subprocess.PIPE, text=True,
    )
    out, _ = wrapper.communicate(timeout=30)

    # Serve checks that the pid answering the admin socket is the one it spawned.
    assert out.splitlines()[0] == f"pid {wrapper.pid}"
    expected = "global\n    stats socket /s mode 600 level admin\nlisten stats\n  bind 127.0.0.1:8404\n"
    assert config.read_text() == expected and out.split("\n", 1)[1] == expected


def test_cleanup_waits_until_no_haproxy_runs_from_the_directory(private_env):
    directory = os.path.dirname(private_env["RAY_SERVE_HAPROXY_BINARY_PATH"])
    config = private_env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]
    haproxy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", config])
    try:
        # until the child has exec'd, its command line is still this process's (a loaded
        # machine showed the gap): wait until it names the config, as a running HAProxy does
        deadline = time.monotonic() + 10
        while config.encode() not in Path(f"/proc/{haproxy.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ingress.cleanup(timeout_s=0.3) is False
        assert os.path.isdir(directory)
    finally:
        haproxy.kill()
        haproxy.wait()
    assert ingress.cleanup(timeout_s=5) is True
    assert not os.path.exists(directory)
    assert ingress.cleanup() is True  # nothing left: still fine
