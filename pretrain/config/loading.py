"""Reading a run config: YAML, dotted ``key=value`` overrides, type checks and coercion, and the key reference
behind ``pretrain config``. Every mistake raises :class:`ConfigError` naming the key and what is allowed."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from pretrain.config.fields import ConfigError


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(f"key '{key}' appears twice in one section (lines {seen[key]} and "
                                    f"{key_node.start_mark.line + 1}); keep one")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def parse_yaml(text: str):
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ConfigError("", f"'{path}' is a directory; pass the path of a YAML run config, e.g. "
                              "configs/quickstart.yaml.")
    if not path.is_file():
        raise ConfigError("", f"config file '{path}' does not exist; pass the path of a YAML run "
                              "config, e.g. configs/quickstart.yaml.")
    try:
        text = path.read_text()
        if not text.strip():
            raise ConfigError("", f"'{path}' is empty; a run config sets at least the model and the data (see "
                                  "configs/quickstart.yaml).")
        raw = parse_yaml(text) or {}
    except _DuplicateKey as e:
        raise ConfigError("", f"'{path}': {e}.") from None
    except yaml.YAMLError as e:
        raise ConfigError("", f"'{path}' is not valid YAML: {str(e).replace('<unicode string>', str(path))}") from None
    except UnicodeDecodeError:
        raise ConfigError("", f"'{path}' is not a text file; pass the path of a YAML run config.") from None
    if not isinstance(raw, dict):
        raise ConfigError("", f"'{path}' must hold a mapping of sections (model:, data:, ...).")
    return raw


def apply_override(root: type, raw: dict, item: str) -> None:
    """Set ``section.key=value`` in the raw mapping, checking the key against the schema rooted at ``root``."""
    if "=" not in item:
        raise ConfigError(item, "an override must look like section.key=value, e.g. train.max_steps=50.")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    cls: Any = root
    node = raw
    for i, part in enumerate(parts):
        dotted = ".".join(parts[: i + 1])
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(dotted, "is not a section; overrides go to section.key.")
        names = {f.name: f for f in dataclasses.fields(cls)}
        if part not in names:
            raise ConfigError(dotted, _unknown(part, names))
        if i == len(parts) - 1:
            try:
                node[part] = parse_yaml(text) if text.strip() else ""
            except _DuplicateKey as e:
                raise ConfigError(dotted, f"{e}.") from None
            except yaml.YAMLError:
                node[part] = text
        else:
            cls = typing.get_type_hints(cls)[part]
            if not dataclasses.is_dataclass(cls):
                raise ConfigError(dotted, f"is a value, not a section: write {dotted}=VALUE.")
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(dotted, "is not a mapping in the YAML file.")


def build(cls: type, raw: Any, prefix: str = "") -> Any:
    """An instance of the config dataclass ``cls`` from a raw mapping, every value checked and coerced."""
    if raw is None:
        raw = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if not isinstance(raw, dict):
        example = f" such as {{path: {raw}}}" if isinstance(raw, str) and "path" in fields else ""
        raise ConfigError(prefix, f"must be a mapping of keys{example}, got {type(raw).__name__} {raw!r}.")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(dotted, _unknown(str(key), fields))
        kwargs[key] = _coerce(hints[key], value, dotted)
    return cls(**kwargs)


# What other stacks call a key (torchtitan, Megatron-LM, Hugging Face Trainer): the key (or keys) it is here.
ALIASES: dict[str, str | tuple[str, ...]] = {
           "learning_rate": "lr", "lr_warmup_steps": "warmup_steps", "warmup": "warmup_steps", "steps": "max_steps",
           "train_iters": "max_steps", "training_steps": "max_steps", "num_train_steps": "max_steps",
           "batch_size": ("global_batch_size", "micro_batch_size"), "local_batch_size": "micro_batch_size",
           "seq_length": "seq_len",
           "max_seq_len": "seq_len", "sequence_length": "seq_len", "n_layers": "num_layers", "dim": "hidden_size",
           "n_heads": "num_heads", "n_kv_heads": "num_kv_heads", "num_attention_heads": "num_heads",
           "intermediate_size": "ffn_hidden_size", "clip_grad_norm": "grad_clip", "max_norm": "grad_clip",
           "output_dir": "run_dir", "dump_folder": "run_dir", "save_interval": "interval"}


def _unknown(name: str, allowed: dict) -> str:
    ours = ALIASES.get(name, ())
    ours = (ours,) if isinstance(ours, str) else ours
    if ours and all(k in allowed for k in ours):
        return f"unknown key. Did you mean {' or '.join(repr(k) for k in ours)}? Allowed here: {', '.join(allowed)}."
    close = difflib.get_close_matches(name, list(allowed), n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"unknown key.{hint} Allowed here: {', '.join(allowed)}."


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(key, f"got {value!r}; allowed: {', '.join(map(str, allowed))}.")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if value is None:
            return []
        if not isinstance(value, list):
            raise ConfigError(key, f"must be a list, got {type(value).__name__}.")
        return [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"must be a mapping of keys, got {value!r}.")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {value!r}.")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"must be a number, got {value!r}.")
        if not math.isfinite(value):
            raise ConfigError(key, f"must be a finite number, got {value!r}.")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            example = f" (write {key}={','.join(map(str, value))})" if key == "data.split" and isinstance(value, list) else ""
            raise ConfigError(key, f"must be a string, got {value!r}{example}.")
        return _path(str(value), key) if key.rsplit(".", 1)[-1] in PATH_KEYS else str(value)
    return value


PATH_KEYS = {"run_dir", "prefix", "path", "resume"}  # values naming files or directories
REQUIRED_PATHS = {"train.run_dir", "data.prefix", "tokenizer.path"}  # an empty one would mean the current directory


def _path(value: str, key: str) -> str:
    """A path value with a leading ``~`` expanded (neither YAML nor an override's shell does it there); an empty
    one refused where it would silently mean the current directory (an unset shell variable, say)."""
    if not value.strip() and key in REQUIRED_PATHS:
        raise ConfigError(key, "is empty (an unset shell variable?): give a directory or file path.")
    return os.path.expanduser(value) if value.startswith("~") else value


def describe(cls: type, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, doc) for every field: the reference behind `pretrain config`."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe(hints[f.name], key + ".")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((key, default, f.metadata.get("doc", "")))
    return rows
