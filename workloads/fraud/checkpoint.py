"""The checkpoint files of a fraud training run: plain data, nothing pickled.

    write_checkpoint(folder, model, optimizer, history, step_losses, spec)   # rank 0, every epoch
    model.load_state_dict(read_weights(folder), strict=True)
    optimizer.load_state_dict(read_optimizer(folder))   # after the model is on its device
    read_state(folder)["history"]

After every epoch rank 0 writes a checkpoint under ``<storage root>/training/fraud/<run>/``:
``model.safetensors`` (the unwrapped state dict), ``optimizer.safetensors`` + ``state.json``
(optimizer tensors, its hyper-parameters, the epoch and the history). Nothing is pickled; a
restarted worker group resumes from the last checkpoint at the next epoch.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workloads.fraud.spec import FraudSpec

__all__ = ["STATE_FILE", "WEIGHTS_FILE", "read_optimizer", "read_state", "read_weights", "write_checkpoint"]

WEIGHTS_FILE = "model.safetensors"
_OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"


def write_checkpoint(
    folder: str, model: Any, optimizer: Any, history: list, step_losses: list, spec: FraudSpec
) -> None:
    from safetensors.torch import save_file

    from mlplatform.models.artifacts import serialize

    with open(os.path.join(folder, WEIGHTS_FILE), "wb") as f:
        f.write(serialize("torch", model))
    # The optimizer as plain data: its tensors in safetensors, its hyper-parameters in JSON.
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in opt["state"].items():
        for name, value in values.items():
            if hasattr(value, "detach"):
                tensors[f"{index}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    save_file(tensors, os.path.join(folder, _OPTIMIZER_FILE))
    state = {
        "epoch": len(history),
        "history": history,
        "step_losses": step_losses,
        "model": spec.model.to_json(),
        "spec": spec.model_dump(mode="json"),
        "optimizer": {"param_groups": opt["param_groups"], "scalars": scalars},
    }
    with open(os.path.join(folder, STATE_FILE), "w") as f:
        json.dump(state, f, allow_nan=True)


def read_weights(folder: str) -> dict[str, Any]:
    from mlplatform.models.artifacts import deserialize

    with open(os.path.join(folder, WEIGHTS_FILE), "rb") as f:
        return deserialize("torch", f.read())


def read_state(folder: str) -> dict[str, Any]:
    with open(os.path.join(folder, STATE_FILE)) as f:
        return json.load(f)


def read_optimizer(folder: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    saved = read_state(folder)["optimizer"]
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*load_file(os.path.join(folder, _OPTIMIZER_FILE)).items(), *saved["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": saved["param_groups"]}
