"""Training checkpoints that survive a kill at any moment, and resume bit for bit.

A checkpoint is a directory `checkpoints/step-00000100/` holding the adapters in the official layout
(`resampler.safetensors`, `ip_layers.safetensors`, `ref_layers.safetensors`, fp32 master weights, loadable by
`LynxPipeline.from_pretrained(base, adapter=DIR)`), the optimizer state (torch.distributed.checkpoint, sharded
per rank, reloadable on another world size), every rank's RNG state and `trainer_state.json` (the step, from
which the data position and the learning rate follow, and the count of non-finite steps in a row). It is
written under a temporary name and renamed when complete, and only then does `checkpoints/latest` point at it:
a kill during a save leaves the previous checkpoint untouched.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..constants import IP_LAYERS_FILE, REF_LAYERS_FILE, RESAMPLER_FILE
from ..errors import CheckpointError, InputError
from ..io.files import atomic_write
from ..models.loading import ADAPTER_CONFIG_FILE, save_adapters

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
STATE_FILE = "trainer_state.json"
OPTIMIZER_DIR = "optimizer"
RNG_DIR = "rng"
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint writes it last, so a save without it is incomplete
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def checkpoint_dir(output_dir, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR / f"step-{step:08d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def full_adapter_state(model, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor] | None:
    """The adapters' whole state (resampler `resampler.*` and the transformer's `*.processor.*` weights) on CPU,
    gathered from FSDP shards tensor by tensor; None except on rank 0.

    Every rank must call this (each gather is a collective); tensors are gathered one at a time so no rank
    ever holds more than one full tensor on its accelerator.
    """
    from torch.distributed.tensor import DTensor

    out = {}
    for name, value in model.state_dict().items():
        if not (name.startswith("resampler.") or ".processor." in name):
            continue
        if isinstance(value, DTensor):
            value = value.full_tensor()
        if _rank() == 0:
            out[name] = value.detach().to("cpu", dtype or value.dtype).contiguous()
    return out if _rank() == 0 else None


def write_adapters(directory: Path, model, state: dict[str, torch.Tensor]) -> None:
    """Write `state` (from `full_adapter_state`) as the released files, plus our small config file."""
    resampler = {k.removeprefix("resampler."): v for k, v in state.items() if k.startswith("resampler.")}
    layers = {k.removeprefix("transformer."): v for k, v in state.items() if not k.startswith("resampler.")}
    save_adapters(directory, model.transformer, resampler, layers)
    config = model.adapter_config
    extra = {"resampler_heads": config.resampler.heads, "variant": config.variant, "trained_with": "lynx train"}
    atomic_write(Path(directory) / ADAPTER_CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(extra, indent=2)))


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir, step: int, model, optimizer, trainer_state: dict,
                    keep_last: int) -> Path:
    """Write checkpoint `step` completely, then publish it; every rank calls this."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    rank = _rank()
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a save that was killed
        tmp.mkdir(parents=True)
    _barrier()
    state = full_adapter_state(model, torch.float32)
    if rank == 0:
        write_adapters(tmp, model, state)
    del state
    with warnings.catch_warnings():
        # One process without a process group is a supported case here, not a mistake to warn about.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(tmp / OPTIMIZER_DIR))
    (tmp / RNG_DIR).mkdir(exist_ok=True)
    torch.save(rng_state(), tmp / RNG_DIR / f"rank{rank}.pt")
    if rank == 0:
        record = dict(trainer_state, step=step,
                      world_size=dist.get_world_size() if dist.is_initialized() else 1)
        (tmp / STATE_FILE).write_text(json.dumps(record, indent=2))
    _barrier()
    if rank == 0:
        if final.exists():  # the same step saved before a crash and not published as latest
            shutil.rmtree(final)
        tmp.rename(final)
        atomic_write(final.parent / LATEST_FILE, lambda t: t.write_text(final.name + "\n"))
        prune_checkpoints(output_dir, keep_last)
    _barrier()
    return final


def prune_checkpoints(output_dir, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and leftovers of killed saves."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    steps = sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name)) if root.is_dir() else []
    for old in steps[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob(".step-*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)


def find_checkpoint(output_dir, resume) -> Path | None:
    """The checkpoint to resume from: `resume` True/"auto" = the latest in output_dir (None if there is none)."""
    if resume in (None, False):
        return None
    if resume not in (True, "auto", "latest"):
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise InputError(f"--resume {path}: not a complete training checkpoint (no {STATE_FILE})")
        return path
    root = Path(output_dir) / CHECKPOINTS_DIR
    latest = root / LATEST_FILE
    if latest.is_file():
        path = root / latest.read_text().strip()
        if (path / STATE_FILE).is_file():
            return path
    complete = sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()) \
        if root.is_dir() else []
    return complete[-1] if complete else None


def check_checkpoint(path: Path) -> None:
    """The parts a resume reads are all there, found before a model is built (a damaged part is reported when it
    is read); a part lost to a disk or a hand is named, not met as a loader's traceback."""
    try:
        full = json.loads((path / ADAPTER_CONFIG_FILE).read_text()).get("variant") == "full"
    except (OSError, ValueError, AttributeError):
        full = False  # the adapter loader reads the variant from the files themselves
    for part in (RESAMPLER_FILE, IP_LAYERS_FILE) + ((REF_LAYERS_FILE,) if full else ()):
        if not (path / part).is_file():
            raise CheckpointError(f"{path / part} is missing: the checkpoint is incomplete; resume from an earlier "
                                  "checkpoint (--resume DIR)")
    if not (path / OPTIMIZER_DIR / DCP_METADATA).is_file():
        raise CheckpointError(f"{path / OPTIMIZER_DIR} is missing or incomplete (no {DCP_METADATA}): the optimizer "
                              "state cannot be restored; resume from an earlier checkpoint (--resume DIR)")


def _reason(error: BaseException) -> str:
    """One line of what went wrong: DCP wraps each rank's error, with its traceback, in `CheckpointException`."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(error, CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]
    text = " ".join(str(error).split()) or type(error).__name__
    return text.split(". ")[0][:300]


def load_trainer_state(path: Path) -> dict:
    try:
        return json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / STATE_FILE} cannot be read ({e}); resume from an earlier checkpoint") \
            from None


def load_optimizer_and_rng(path: Path, model, optimizer) -> None:
    """Restore the optimizer (resharded to this world size if it changed) and, when it matches, this rank's RNG."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    root = logging.getLogger()
    quiet = lambda record: False  # noqa: E731
    # DCP logs each failed read with its traceback on the root logger before raising; the error below says it.
    root.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(path / OPTIMIZER_DIR))
    # DCP reports damage with several exception types, and wraps them in CheckpointException, a BaseException.
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"the optimizer state in {path / OPTIMIZER_DIR} cannot be loaded ({_reason(e)}); "
                              "resume from an earlier checkpoint (--resume DIR)") from None
    finally:
        root.removeFilter(quiet)
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    rng = path / RNG_DIR / f"rank{_rank()}.pt"
    if rng.is_file():
        try:
            set_rng_state(torch.load(rng, weights_only=False))
        except Exception as e:
            raise CheckpointError(f"{rng} cannot be read ({_reason(e)}); resume from an earlier checkpoint "
                                  "(--resume DIR)") from None
