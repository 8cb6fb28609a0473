"""The public surface: what ``import mlplatform`` exports, what it costs, and the CLI's help."""

from __future__ import annotations

import subprocess
import sys

import pytest

import mlplatform
from mlplatform.cli import build_parser, main


def test_all_matches_exports():
    public = {name for name in dir(mlplatform) if not name.startswith("_")}
    modules = {name for name in public if type(getattr(mlplatform, name)).__name__ == "module"}
    assert set(mlplatform.__all__) == public - modules


def test_every_error_derives_from_platform_error():
    for name in mlplatform.__all__:
        obj = getattr(mlplatform, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, mlplatform.PlatformError), name


def test_import_starts_nothing_heavy():
    code = (
        "import sys, mlplatform; "
        "heavy = [m for m in ('ray', 'torch', 'lightgbm', 'ray.serve', 'pandas', 'pyarrow', 's3fs') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def _commands(parser=None, prefix=""):
    parser = parser or build_parser()
    found = {}
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, command in action.choices.items():
                found[f"{prefix}{name}"] = command
                found.update(_commands(command, f"{prefix}{name} "))
    return found


def test_every_command_has_help():
    commands = _commands()
    expected = {
        "run", "generate", "apply", "features", "backfill", "materialize", "train", "tune",
        "models", "models list", "models promote", "models history", "deploy", "decide", "score", "submit", "status",
    }
    assert expected <= set(commands)
    for name, command in commands.items():
        assert command.description, f"mlp {name} has no help text"
        for action in command._actions:
            if action.dest != "help":
                assert action.help, f"mlp {name}: argument {action.dest} has no help"


@pytest.mark.parametrize("name", sorted(_commands()))
def test_help_exits_cleanly(name, capsys):
    with pytest.raises(SystemExit) as info:
        main([*name.split(), "--help"])
    assert info.value.code == 0
    assert "usage: mlp" in capsys.readouterr().out


def test_platform_error_is_one_line_with_exit_code_1(tmp_path, capsys):
    bad = tmp_path / "w.yaml"
    bad.write_text("workload: underwriting\nplatform: {storage: {root: 's3://'}}\n")
    assert main(["apply", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("error: invalid config mapping: storage.root: missing bucket")


def test_unknown_workload_key_is_a_config_error(tmp_path, capsys):
    bad = tmp_path / "w.yaml"
    bad.write_text("workload: underwriting\nplatform: {}\ndata: {applications: 10, sead: 3}\n")
    assert main(["apply", str(bad)]) == 1
    assert "data.sead: unknown key" in capsys.readouterr().err
