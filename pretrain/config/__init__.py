"""The run config: one frozen, typed section per component, loaded from YAML with overrides, validated at load
(unknown keys, wrong types and impossible combinations name the key and the fix) and resolved once at start-up.

``option(default, doc)`` declares a key and ``section(cls, doc)`` a nested section; every section checks its
own rules (``check``) and ``RunConfig.validate`` the rules between sections."""

from pretrain.config.assembly import AssemblyConfig
from pretrain.config.data import BlendEntry, DataConfig, SourceConfig, TokenizerConfig
from pretrain.config.fields import ConfigError, option, section
from pretrain.config.growth import GrowthStage
from pretrain.config.model import FFNConfig, ModelConfig, MoEConfig, SelfGuidedConfig
from pretrain.config.parallel import ParallelConfig
from pretrain.config.run import RunConfig, describe, from_dict, load_config, resolve
from pretrain.config.train import CheckpointConfig, LoggingConfig, OptimConfig, TrainConfig

__all__ = ["AssemblyConfig", "BlendEntry", "CheckpointConfig", "ConfigError", "DataConfig", "FFNConfig", "GrowthStage", "LoggingConfig",
           "ModelConfig",
           "MoEConfig", "OptimConfig", "ParallelConfig", "RunConfig", "SelfGuidedConfig", "SourceConfig",
           "TokenizerConfig", "TrainConfig", "describe", "from_dict", "load_config", "option", "resolve", "section"]
