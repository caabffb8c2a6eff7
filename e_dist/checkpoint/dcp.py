"""Read an FSDP2 checkpoint written with ``torch.distributed.checkpoint``
into the consolidated form, offline (no process group).

The checkpoint must hold the model's state dict and the optimizer's, as
``get_state_dict`` returns them (optimizer state keyed by parameter name),
under two keys: ``"model"`` and ``"optim"`` (the main job's), or others.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from e_dist.checkpoint import consolidated, io
from e_dist.checkpoint.io import CheckpointError


def is_dcp(directory: str | os.PathLike) -> bool:
    return (Path(directory) / ".metadata").is_file()


def read(
    directory: str | os.PathLike,
    optimizer: dict[str, str] | None = None,
    model_key: str = "model",
    optim_key: str = "optim",
) -> dict[str, Any]:
    """The consolidated checkpoint of a DCP folder. ``optimizer`` describes
    the optimizer (needed for E: its state does not name its base)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    directory = Path(directory)
    if not is_dcp(directory):
        raise CheckpointError(
            f"{directory} is not a torch.distributed.checkpoint folder"
        )
    with tempfile.TemporaryDirectory() as tmp:
        flat = Path(tmp) / "state.pt"
        try:
            dcp_to_torch_save(directory, flat)
        except Exception as err:  # any failure: reported with the folder's name
            raise CheckpointError(
                f"cannot read DCP checkpoint {directory}: {err}"
            ) from err
        sd = io.load(flat, "DCP checkpoint")
    for key in (model_key, optim_key):
        if key not in sd:
            raise CheckpointError(
                f"{directory} has no {key!r} entry (it has {sorted(sd)}); pass "
                "--model-key / --optim-key"
            )
    model = {k: v for k, v in sd[model_key].items() if torch.is_tensor(v)}
    osd = sd[optim_key]
    groups = osd["param_groups"]
    names = {n for g in groups for n in g["params"]}
    model = {k: v.float() for k, v in model.items() if k in names}
    if optimizer is None:
        if groups and "adaptation" in groups[0] and len(groups[0]["betas"]) == 3:
            optimizer = {"type": "ALTO"}
        else:
            raise CheckpointError(
                f"{directory}: the optimizer is not ALTO; name it with --optimizer "
                "(e.g. EAdamW)"
            )
    meta: dict[str, Any] = {"source": f"torch.distributed.checkpoint {directory.name}"}
    manifest = directory / io.MANIFEST
    if manifest.is_file():  # the main job records its step there
        step = json.loads(manifest.read_text()).get("step")
        if step is not None:
            meta["client_state"] = {"step": int(step)}
            meta["global_steps"] = int(step)
    return consolidated.make(optimizer, model, osd, meta)
