"""The model and optimizer state of DDP and FSDP2 in a checkpoint, through ``torch.distributed.checkpoint``.

Every rank writes its own part into ``step_<N>/dcp/`` (DCP's ``.metadata`` and one ``__<rank>_0.distcp``
file per rank that holds data): an FSDP2 rank its shards, DDP's replicas each a share of the tensors (DCP
writes a replicated tensor once). Loading reshards: the state saved on any number of ranks loads on any
other, since DCP's ``.metadata`` maps every tensor's global shape to the pieces that hold it.

The state is ``{"model": ..., "optim": ...}`` as torch's ``get_state_dict`` gives it (fully qualified
parameter names, the optimizer's state keyed by them), so it does not depend on how parameters are
sharded or wrapped. Source: torch 2.13's ``torch.distributed.checkpoint`` and its ``state_dict``
module, the pattern of torchtitan's ``CheckpointManager``.

The asynchronous save (``train.ckpt_async=true``) copies the state to host memory (DCP's default
stager) and writes it in a background thread: :func:`save` then returns a future, which the checkpoint
protocol waits on before the checkpoint counts (:mod:`trainer.checkpoint`).
"""

from __future__ import annotations

import contextlib
import io
import pickle
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from trainer.distributed import DistInfo
from trainer.errors import ConfigError

FOLDER = "dcp"
"""The sub-folder of a checkpoint that DCP writes into."""
# DCP warns that no process group exists when told to run without one (no_dist), which ramp means; an
# asynchronous save warns from its own thread, after any local filter is gone, so the filter is global.
warnings.filterwarnings("ignore", message="torch.distributed is .*(unavailable|uninitialized)")
LEGACY_MODEL = "model.pt"
"""Where checkpoints written before DCP (format 1, DDP) kept the weights: rank 0's full state dict."""


class BackgroundSaves:
    """What every background save of one backend reuses (``train.ckpt_async``).

    - A process group of its own, gloo: DCP's collectives run in the save's thread and must not interleave
      with training's on the default group, and an asynchronous save needs a CPU backend (the pattern of
      torchtitan's asynchronous checkpointing). None for a DDP process alone, which has no group.
    - One stager, so the host copy of the state reuses its buffers from one save to the next (pinned on a
      GPU) instead of allocating them anew: measured on the CPU with gpt2-124m, a save then blocks for
      about a third of the time. It holds one host copy of the model and optimizer state for the run.
    """

    def __init__(self, info: DistInfo) -> None:
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        cuda = info.device.type == "cuda"
        options = StagingOptions(
            use_pinned_memory=cuda,
            use_shared_memory=False,
            use_async_staging=False,
            use_non_blocking_copy=False,
        )
        self.stager = DefaultStager(options)


@contextlib.contextmanager
def _alone() -> Iterator[None]:
    """DCP in one process (``no_dist``): without its warning that no process group exists, which is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*(unavailable|uninitialized)")
        yield


def state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The model and optimizer state as DCP saves and loads it (in place).

    The parameter groups' hyperparameters are plain numbers: the loop writes each step's LR as a tensor,
    which DCP would store as a tensor where a fresh optimizer's float expects plain data (and a resume
    takes them from its config anyway, see :func:`trainer.resume.apply_hyperparameters`).
    """
    model_state, optim_state = get_state_dict(module, optimizer)
    groups: list[dict[str, Any]] = list(optim_state.get("param_groups", []))  # type: ignore[arg-type]
    optim_state["param_groups"] = [
        {key: value.item() if isinstance(value, torch.Tensor) else value for key, value in group.items()}
        for group in groups
    ]
    return {"model": model_state, "optim": optim_state}


def save(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    folder: Path,
    info: DistInfo,
    background: BackgroundSaves | None = None,
) -> Future[Any] | None:
    """Write the state into ``folder/dcp`` collectively (every rank calls this).

    Args:
        background: copy the state to host memory with its stager, then write it in a background thread
            coordinated on its group; None: write it now, on the default group.

    Returns:
        The background write's future (its result is DCP's metadata; it raises what the write raised),
        or None when the state is written already.
    """
    target = folder / FOLDER
    alone = not dist.is_initialized()  # a DDP run of one process has no group
    with _alone() if alone else contextlib.nullcontext():
        if background is not None:
            future = dcp.async_save(
                state(module, optimizer),
                checkpoint_id=target,
                process_group=background.group,
                async_stager=background.stager,
                no_dist=alone,
            )
            assert isinstance(future, Future)
            return future
        dcp.save(state(module, optimizer), checkpoint_id=target, no_dist=alone)
    return None


def load(module: nn.Module, optimizer: torch.optim.Optimizer, folder: Path, info: DistInfo) -> None:
    """Restore what :func:`save` wrote, resharded for this job's ranks, or a format-1 DDP checkpoint.

    Raises:
        ConfigError: the checkpoint holds neither (another backend's files).
    """
    if not (folder / FOLDER).is_dir():
        if (folder / LEGACY_MODEL).is_file():
            _load_legacy(module, optimizer, folder, info)
            return
        raise ConfigError(
            f"checkpoint {folder} holds no {FOLDER}/ folder of model and optimizer state; resume it with the "
            "backend that wrote it (its meta.json's backend)"
        )
    loaded = state(module, optimizer)
    alone = not dist.is_initialized()
    with _alone() if alone else contextlib.nullcontext():
        reader = SafeReader(folder / FOLDER)
        reader.read_metadata()  # refused here, in one line, when it is not DCP's plain metadata
        dcp.load(loaded, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=alone)
    set_state_dict(module, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])


def _load_legacy(module: nn.Module, optimizer: torch.optim.Optimizer, folder: Path, info: DistInfo) -> None:
    """A checkpoint of ramp's format 1: ``model.pt`` and ``optimizer.pt``, full state dicts from rank 0.

    Raises:
        ConfigError: the model is sharded (FSDP2), which format 1 never was.
    """
    if any(hasattr(p, "device_mesh") for p in module.parameters()):
        raise ConfigError(
            f"checkpoint {folder} is a DDP checkpoint of ramp's first format (model.pt); resume it with "
            "backend=ddp, which then saves in the new format"
        )
    module.load_state_dict(torch.load(folder / LEGACY_MODEL, weights_only=True, map_location=info.device))
    optimizer.load_state_dict(
        torch.load(folder / "optimizer.pt", weights_only=True, map_location=info.device)
    )


def full_model_state(folder: Path) -> dict[str, torch.Tensor]:
    """The full (unsharded) weights of a checkpoint in one process, on the CPU, by parameter name.

    Reads ``dcp/`` whatever number of ranks wrote it (each tensor allocated at its global shape from
    DCP's metadata, then loaded), or a format-1 ``model.pt``.

    Raises:
        FileNotFoundError: neither is there.
        pickle.UnpicklingError: a file holds anything but tensors and plain data (never executed).
    """
    if (folder / FOLDER).is_dir():
        reader = SafeReader(folder / FOLDER)
        weights: dict[str, torch.Tensor] = {}
        for key, item in reader.read_metadata().state_dict_metadata.items():
            if key.startswith("model.") and isinstance(item, TensorStorageMetadata):
                weights[key[len("model.") :]] = torch.empty(item.size, dtype=item.properties.dtype)
        with _alone():
            dcp.load({"model": weights}, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)
        return weights
    legacy = folder / LEGACY_MODEL
    if not legacy.is_file():
        raise FileNotFoundError(f"{folder} holds neither {FOLDER}/ nor {LEGACY_MODEL}")
    state_dict: dict[str, torch.Tensor] = torch.load(legacy, weights_only=True, map_location="cpu")
    return state_dict


def metadata_problem(folder: Path) -> str | None:
    """Why a checkpoint's ``dcp/.metadata`` cannot be loaded (it references anything but DCP's plain
    metadata, or is unreadable), or None; it is never executed either way."""
    try:
        SafeReader(folder / FOLDER).read_metadata()
    except pickle.UnpicklingError as err:
        return f"{FOLDER}/.metadata is refused, never loaded ({err})"
    except (OSError, EOFError, ValueError, TypeError, AttributeError) as err:
        return f"{FOLDER}/.metadata is unreadable ({type(err).__name__}: {err})"
    return None


_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` and nothing else: its own classes, ``torch.Size``, dtypes, paths."""

    def find_class(self, module: str, name: str) -> Any:
        """Raises pickle.UnpicklingError: a global that DCP's metadata never holds (it is not loaded)."""
        found = (
            super().find_class(module, name)
            if module.startswith(("torch", "pathlib", "collections"))
            else None
        )
        allowed = (module, name) in _METADATA_GLOBALS or isinstance(found, torch.dtype)
        if module == "torch.distributed.checkpoint.metadata" and isinstance(found, type):
            allowed = True
        if not allowed:
            raise pickle.UnpicklingError(
                f"DCP metadata may not reference {module}.{name}; refused, not loaded"
            )
        return found


class SafeReader(FileSystemReader):
    """DCP's file reader whose ``.metadata`` can never execute code.

    torch 2.13's ``FileSystemReader.read_metadata`` calls ``pickle.load``; ramp's checkpoints promise
    that loading one never runs code (``torch.load(weights_only=True)`` everywhere), so this reader
    unpickles the metadata with an allow-list of DCP's own classes.
    """

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """DCP's metadata, unpickled with the allow-list.

        Raises:
            pickle.UnpicklingError: it references anything else.
        """
        locate = getattr(self, "_get_metadata_path", None)  # torch 2.13; older ones name one file
        path = locate(kwargs.get("rank")) if locate else self.fs.concat_path(self.path, ".metadata")
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _MetadataUnpickler(stream).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"{path} holds no DCP metadata")
        storage_meta = metadata.storage_meta or StorageMeta()
        storage_meta.load_id = self.load_id
        metadata.storage_meta = storage_meta
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner with non-tensor entries (e.g. the optimizer's hyperparameters) read by
    ``torch.load(weights_only=True)``; torch 2.13's reads them with ``weights_only=False``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        """One non-tensor entry, as plain data only.

        Raises:
            pickle.UnpicklingError: it holds anything but tensors and plain data (never executed).
        """
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded
