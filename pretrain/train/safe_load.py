"""Loading a checkpoint never runs code: every byte a checkpoint holds is read by a loader that admits data only.

A checkpoint directory may come from anywhere (a colleague, a download), and pickle runs whatever a file asks
it to. What a checkpoint of ours holds and how each part is read:

* ``.metadata`` (DCP's index of the shards, a pickle): ``SafeFileSystemReader`` unpickles it with an allowlist of
  the classes DCP writes there (its metadata dataclasses, ``torch.Size``, dtypes, layouts, paths); any other
  name, such as ``os.system``, stops the load with the name.
* non-tensor values inside the shards (optimizer hyper-parameters, parameter names): DCP reads them with
  full unpickling by default; ``SafeLoadPlanner`` reads them with ``weights_only=True`` instead.
* ``rng/rank_R.pt``: tensors and plain numbers only, read with ``weights_only=True`` (older checkpoints hold numpy
  arrays: for those, numpy's array reconstructor alone is admitted).
* ``trainer_state.json``, ``config.yaml``: JSON and YAML (``yaml.safe_load``).
"""

from __future__ import annotations

import io
import pickle
import random
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from pretrain import device as devices
from pretrain.errors import UserError
from pretrain.torch_compat import set_nested_element

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    (_DCP_METADATA, name) for name in ("Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
                                       "BytesStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"), ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise UserError(f"'{self.path}' asks to load '{module}.{name}', which checkpoint metadata never holds: the file "
                        "was not written by pretrain (or has been tampered with), and loading it could run code. "
                        "Refusing it; resume from a checkpoint you wrote yourself.")


def read_dcp_metadata(path: Path) -> Metadata:
    """DCP's metadata file, unpickled through the allowlist."""
    with open(path, "rb") as f:
        return _MetadataUnpickler(f, path).load()


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader, whose metadata is unpickled through the allowlist."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        rank = kwargs.get("rank")
        metadata = read_dcp_metadata(Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata"))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, reading the non-tensor values with ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:
            set_nested_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


# ---- RNG states ---------------------------------------------------------------------------------------------

def rng_state() -> dict:
    """This process's RNG states as tensors and plain numbers (loadable with ``weights_only=True``)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached)},
            "python": {"version": version, "state": torch.tensor(state, dtype=torch.int64), "gauss_next": gauss_next},
            "cuda": devices.accelerator_rng_state()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n, p = state["numpy"], state["python"]
    if isinstance(n, dict):
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
        random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss_next"]))
    else:  # the format before safe loading: numpy's and Python's own state tuples
        np.random.set_state(n)
        random.setstate(p)
    devices.set_accelerator_rng_state(state["cuda"])


def load_rng_file(path: Path) -> dict:
    """An ``rng/rank_R.pt`` file: data only. Files written before the safe format hold numpy arrays, for which
    numpy's array reconstructor (which builds an array from bytes and runs nothing) is admitted."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        pass
    legacy = [np.ndarray, np.dtype, np.dtypes.UInt32DType, _reconstruct()]
    try:
        with torch.serialization.safe_globals(legacy):
            return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"'{path}' holds more than RNG states ({str(e).splitlines()[-1][:200]}); loading it could "
                        "run code. Refusing it; resume from a checkpoint you wrote yourself.") from None


def _reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct
