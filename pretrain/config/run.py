"""RunConfig: the one typed, validated, frozen description of a run, and its resolution at start-up.

A run is one YAML file whose top-level sections are the dataclasses of this package. ``load_config`` reads
it, applies dotted ``key=value`` overrides and checks every section's rules and the rules between sections.
Nothing edits a config afterwards: what is only known once the run starts (the vocabulary size from the
tokenizer) gives a new, resolved config (``resolve``), which is what the run directory and its checkpoints
record.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pretrain.config import loading
from pretrain.config.assembly import AssemblyConfig, check_assembly
from pretrain.config.data import DataConfig, TokenizerConfig
from pretrain.config.fields import ConfigError, option, section
from pretrain.config.growth import GrowthStage, check_growth
from pretrain.config.model import ModelConfig
from pretrain.config.parallel import ParallelConfig, check_layout
from pretrain.config.train import CheckpointConfig, LoggingConfig, OptimConfig, TrainConfig
from pretrain.errors import UserError


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = section(ModelConfig, "Model architecture.")
    data: DataConfig = section(DataConfig, "Training data.")
    tokenizer: TokenizerConfig = section(TokenizerConfig, "sentencepiece tokenizer.")
    optim: OptimConfig = section(OptimConfig, "Optimizer and LR schedule.")
    train: TrainConfig = section(TrainConfig, "Training loop.")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "Checkpointing.")
    logging: LoggingConfig = section(LoggingConfig, "Logging.")
    parallel: ParallelConfig = section(ParallelConfig, "Parallel layout.")
    growth: list[GrowthStage] = option([], "Stages that grow the model during the run (see pretrain/config/growth.py).")
    assembly: AssemblyConfig = section(AssemblyConfig, "Training the model as modules in independent jobs.")

    def validate(self) -> RunConfig:
        for part in (self.model, self.data, self.tokenizer, self.optim, self.train, self.checkpoint, self.logging,
                     self.parallel):
            part.check()
        check_layout(self)
        check_growth(self)
        check_assembly(self)
        return self

    @property
    def guided_steps(self) -> int:
        """Optimizer steps of the self-guided phase (0 without self-guided training)."""
        sg = self.model.ffn.self_guided
        if not sg.enabled:
            return 0
        return sg.guided_steps or max(1, round(sg.ratio * self.train.max_steps))

    @property
    def replay_after(self) -> int:
        """Same-FLOPs self-guided training replays the data of the first guided steps after this step; 0 = never."""
        same_flops = self.model.ffn.self_guided.enabled and self.model.ffn.self_guided.mode == "same_flops"
        return self.guided_steps if same_flops else 0

    @property
    def total_steps(self) -> int:
        """Optimizer steps the LR schedule spans: max_steps, plus the replayed steps of same-FLOPs mode."""
        return self.train.max_steps + self.replay_after

    def replace(self, **sections: dict[str, Any]) -> RunConfig:
        """A copy with some keys of some sections changed: ``cfg.replace(train={"max_steps": 5})``."""
        return dataclasses.replace(self, **{name: dataclasses.replace(getattr(self, name), **values)
                                            for name, values in sections.items()}).validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# Two keys that name one thing: an override of either replaces the other (`pretrain train configs/quickstart.yaml
# tokenizer.path=my.model` uses my.model instead of the config's tokenizer.name); one file setting both is refused.
ALTERNATIVES = {"tokenizer.name": "tokenizer.path", "tokenizer.path": "tokenizer.name"}


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML run config, apply ``section.key=value`` overrides, and validate everything."""
    raw: dict = loading.read_yaml(path) if path is not None else {}
    if raw and not set(raw) & {f.name for f in dataclasses.fields(RunConfig)}:
        _refuse_other_kind_of_file(path, raw)
    for item in overrides:
        loading.apply_override(RunConfig, raw, item)
        other = ALTERNATIVES.get(item.partition("=")[0].strip())
        if other:
            section, key = other.split(".")
            if isinstance(raw.get(section), dict):
                raw[section].pop(key, None)
    return from_dict(raw).validate()


def _refuse_other_kind_of_file(path: str | Path, raw: dict) -> None:
    """A tokenizer recipe or a Hugging Face config.json given where a run config goes: say what it is and which verb
    takes it (its keys would otherwise be reported as unknown ones)."""
    from pretrain.config.data import TokenizerRecipe

    if set(raw) <= {f.name for f in dataclasses.fields(TokenizerRecipe)}:
        raise ConfigError("", f"'{path}' is a tokenizer recipe, not a run config: `pretrain tokenizer train {path}` "
                              "trains it; a run uses a recipe of tokenizers/ with tokenizer.name=NAME, or a trained "
                              "model with tokenizer.path=FILE.")
    if "model_type" in raw or "architectures" in raw:
        raise ConfigError("", f"'{path}' is a Hugging Face model config, not a run config: `pretrain import HF_DIR "
                              "OUT` converts that model and writes OUT/config.yaml to train it on.")


def from_dict(raw: dict) -> RunConfig:
    return loading.build(RunConfig, raw)


def describe() -> list[tuple[str, Any, str]]:
    """(dotted key, default, doc) for every key of a run config."""
    return loading.describe(RunConfig)


def resolve(cfg: RunConfig, tokenizer_vocab: int | None) -> RunConfig:
    """The config with the vocabulary size filled in from the tokenizer (rounded up to ``pad_vocab_multiple``),
    or a given one checked against it; ``tokenizer_vocab`` is None when the run has no tokenizer (ids only)."""
    m = cfg.model
    vocab = m.vocab_size
    if tokenizer_vocab is None:
        if vocab == 0:
            raise UserError("data.blend trains on already-tokenized data and tokenizer.path does not exist, so the "
                            "vocabulary size is unknown: set model.vocab_size (at least the largest token id + 1) "
                            "or point tokenizer.path at the tokenizer the data was made with.")
    elif vocab == 0:
        vocab = -(-tokenizer_vocab // m.pad_vocab_multiple) * m.pad_vocab_multiple
    elif vocab < tokenizer_vocab:
        raise UserError(f"model.vocab_size {vocab} is smaller than the tokenizer's {tokenizer_vocab} "
                        "pieces; set it to 0 (automatic) or at least the tokenizer's size.")
    if vocab % cfg.parallel.tp:
        raise UserError(f"model.vocab_size {vocab} is not divisible by parallel.tp "
                        f"{cfg.parallel.tp}; set model.pad_vocab_multiple to a multiple of tp.")
    return cfg.replace(model={"vocab_size": vocab})
