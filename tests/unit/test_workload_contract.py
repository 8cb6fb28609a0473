"""The workload contract (mlplatform.jobs): a workload found by import path from its YAML,
steps that are skipped when up to date, and the console the CLI shows. No Ray starts."""

from __future__ import annotations

import ast
import io
import logging
import textwrap
from pathlib import Path

import pytest

from mlplatform.config import load_config
from mlplatform.errors import ConfigError
from mlplatform.jobs import Done, Step, StepRunner, load_workload
from mlplatform.jobs.console import configure
from mlplatform.storage import Storage

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def storage(tmp_path):
    return Storage(load_config({"storage": {"root": str(tmp_path / "root")}}).storage)


def _counting_step(calls: list[str], inputs: dict, *, still_there: bool = True, target: str = "t") -> Step:
    def run() -> Done:
        calls.append("run")
        return Done(summary="made it", rows=3, where="somewhere", output={"version": len(calls)}, value="fresh")

    def reuse(output):
        return Done(value=f"reused v{output['version']}") if still_there else None

    return Step("make", run, target=target, inputs=lambda: inputs, reuse=reuse)


def test_a_step_runs_once_then_is_up_to_date_until_its_inputs_change(storage, caplog):
    calls: list[str] = []
    runner = StepRunner(storage)
    with caplog.at_level(logging.INFO, logger="mlplatform.jobs"):
        assert runner.run(_counting_step(calls, {"a": 1})).value == "fresh"
        assert runner.run(_counting_step(calls, {"a": 1})).value == "reused v1"
        assert runner.run(_counting_step(calls, {"a": 2})).value == "fresh"
    assert calls == ["run", "run"]
    lines = [r.getMessage() for r in caplog.records if r.name == "mlplatform.jobs"]
    assert lines[0].startswith("[make] t: made it (3 rows, ") and lines[0].endswith("-> somewhere")
    assert lines[1] == "[make] t: up to date: made it -> somewhere"


def test_a_step_whose_output_is_gone_or_forced_runs_again(storage):
    calls: list[str] = []
    StepRunner(storage).run(_counting_step(calls, {"a": 1}))
    StepRunner(storage).run(_counting_step(calls, {"a": 1}, still_there=False))
    StepRunner(storage, force=True).run(_counting_step(calls, {"a": 1}))
    assert calls == ["run", "run", "run"]


def test_a_failed_step_records_nothing(storage):
    def boom() -> Done:
        raise RuntimeError("no")

    step = Step("make", boom, target="t", inputs=lambda: {"a": 1}, reuse=lambda output: Done())
    with pytest.raises(RuntimeError):
        StepRunner(storage).run(step)
    assert not storage.exists(step.key)


def test_steps_without_inputs_always_run_and_inputs_need_reuse(storage):
    calls: list[str] = []
    step = Step("apply", lambda: calls.append("run") or Done())
    StepRunner(storage).run_all([step, step])
    assert calls == ["run", "run"]
    with pytest.raises(ConfigError, match="'inputs' and 'reuse' go together"):
        Step("x", lambda: Done(), inputs=lambda: {})


WORKLOAD = '''
from pydantic import BaseModel, ConfigDict
from mlplatform.jobs import Done, Step

class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int = 1

def steps(platform, config):
    yield Step("first", lambda: Done(summary=f"size {config.size}", rows=config.size),
               inputs=lambda: {"size": config.size}, reuse=lambda output: Done())
    yield Step("second", lambda: Done(summary="always"))
'''


@pytest.fixture()
def workload_file(tmp_path, monkeypatch):
    package = tmp_path / "code" / "myteam"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "job.py").write_text(textwrap.dedent(WORKLOAD))
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    path = tmp_path / "job.yaml"
    path.write_text(f"workload: myteam.job\nplatform: {{storage: {{root: '{tmp_path / 'root'}'}}}}\nsize: 4\n")
    return path


def test_a_workload_is_the_module_its_file_names(workload_file):
    workload = load_workload(workload_file)
    assert workload.name == "job" and workload.config.size == 4
    assert load_workload(workload_file, {"size": 9}).config.size == 9


def test_mlp_run_runs_any_workload_one_line_per_step(workload_file, capsys):
    from mlplatform.cli import main

    assert main(["run", str(workload_file), "--exit"]) == 0
    assert main(["run", str(workload_file), "--exit"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in err] == [
        "[first] size 4", "[second] always", "[first] up to date: size 4", "[second] always",
    ]


def test_a_module_that_is_not_a_workload_is_a_config_error(tmp_path):
    path = tmp_path / "w.yaml"
    path.write_text("workload: email.utils\nplatform: {}\n")
    with pytest.raises(ConfigError, match="module email.utils is not a workload: it has no Config or steps"):
        load_workload(path)
    path.write_text("workload: nosuchworkload\nplatform: {}\n")
    with pytest.raises(ConfigError, match="workload 'nosuchworkload' not found"):
        load_workload(path)


def test_console_shows_step_lines_and_warnings_and_hides_library_details():
    stream = io.StringIO()
    undo = configure(verbose=False, stream=stream)
    try:
        logging.getLogger("mlplatform.jobs").info("[make] t: done")
        logging.getLogger("mlplatform.features.backfill").info("backfilling in 4 buckets")
        logging.getLogger("mlplatform.serving.api").warning("the port is taken")
        logging.getLogger("workloads.underwriting.serve").info("[decide] approve")
    finally:
        undo()
    assert stream.getvalue().splitlines() == ["[make] t: done", "warning: the port is taken", "[decide] approve"]


def test_the_library_imports_no_workload():
    offenders = []
    for path in (ROOT / "mlplatform").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "workloads"]
    assert offenders == []


def test_a_python_warning_is_one_console_line():
    import warnings

    stream = io.StringIO()
    undo = configure(verbose=False, stream=stream)
    try:
        warnings.warn("the read function is\n  large", UserWarning, stacklevel=1)
    finally:
        undo()
    (line,) = stream.getvalue().splitlines()
    assert line.startswith("warning: UserWarning: the read function is large (test_workload_contract.py:")


def test_on_a_terminal_the_running_step_shows_a_bar_and_its_summary_stays(storage):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    undo = configure(verbose=False, stream=stream)
    try:
        StepRunner(storage).run(Step("make", lambda: Done(summary="made it")))
    finally:
        undo()
    out = stream.getvalue()
    assert "[make] " in out.split("[make] made it")[0]  # the bar, drawn before the summary
    assert "[make] made it (" in out


def test_mlp_models_list_shows_each_version(workload_file, tmp_path, capsys):
    import torch

    from mlplatform import Platform
    from mlplatform.cli import main

    platform = Platform.from_config({"storage": {"root": str(tmp_path / "root")}})
    platform.models.register("tiny", flavor="torch", model={"w": torch.zeros(2)}, lineage={}, metrics={"test_auc": 0.5}, params={})
    assert main(["models", "list", str(workload_file)]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.split()[:3] == ["tiny", "v1", "torch"] and "test_auc=0.5000" in line
