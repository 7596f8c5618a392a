"""Text sources, tokenizer, preprocessing into megatron-core indexed datasets, and the data loader."""

import importlib
import importlib.util
import sys
import types
import warnings

# megatron-core announces at import that NVIDIA's optional fused kernels are absent; we use only its datasets.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


def _datasets_only_megatron_core() -> None:
    """Make ``megatron.core`` importable without running its package ``__init__``, which imports the model-parallel
    layers, fusions and Transformer Engine glue (2-3 s in every process) when all we use is ``megatron.core.datasets``
    (0.6 s). Its submodules still import on demand, also as attributes (``megatron.core.parallel_state``); a process
    that imported megatron-core before keeps it as it is."""
    if "megatron.core" in sys.modules:
        return
    spec = importlib.util.find_spec("megatron.core")
    if spec is None or not spec.submodule_search_locations:
        return  # (not installed: the import that needs it says so)
    core = types.ModuleType("megatron.core", "megatron-core, its submodules imported on demand (pretrain.data)")
    core.__path__, core.__spec__, core.__file__ = list(spec.submodule_search_locations), spec, spec.origin

    def submodule(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if name == "mpu":
            name = "parallel_state"
        return importlib.import_module(f"megatron.core.{name}")

    core.__getattr__ = submodule
    sys.modules["megatron.core"] = core
    importlib.import_module("megatron")
    sys.modules["megatron"].core = core
    # megatron.core.utils and parallel_state import each other; the package __init__ imports parallel_state first
    importlib.import_module("megatron.core.parallel_state")


_datasets_only_megatron_core()
