"""The ``assembly:`` section: a target model trained as K modules of consecutive blocks in independent jobs (Deep
Model Assembling; docs/methods.md): a shallow meta model with one block per module, K incubations (each trains
one full module inside the frozen meta model), and the join that assembles the modules and fine-tunes the whole.
``pretrain assemble`` runs the phases; each phase is an ordinary run in a directory of its own under
train.run_dir: meta/, module_K/ and join/ (``pretrain/assembly/phases.py`` derives each phase's config)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pretrain.config.fields import option, require, require_all

if TYPE_CHECKING:
    from pretrain.config.run import RunConfig


@dataclass(frozen=True)
class AssemblyConfig:
    modules: int = option(0, "Modules K the target's blocks are split into; 0 = not assembled.")
    module_blocks: list[int] = option([], "Blocks of each module, in order (K counts summing to model.num_layers); "
                                          "empty = as even as possible.")
    embedding_module: int = option(1, "The module that owns (trains) the token embedding.")
    head_module: int = option(0, "The module that owns the final norm and the LM head; 0 = the last.")
    meta_steps: int = option(0, "Optimizer steps of the meta model; 0 = train.max_steps.")
    incubation_steps: int = option(0, "Optimizer steps of each module's incubation; 0 = train.max_steps.")
    phase: str = option("", "Set by `pretrain assemble`: incubate or join (the run directory's parent holds the "
                            "other phases); empty in the config you write.")
    module: int = option(0, "Set by `pretrain assemble incubate --module k`: the module this run incubates (1..K).")

    def blocks(self, num_layers: int) -> list[int]:
        """Blocks per module."""
        if self.module_blocks:
            return list(self.module_blocks)
        base, extra = divmod(num_layers, self.modules)
        return [base + (1 if k < extra else 0) for k in range(self.modules)]

    def starts(self, num_layers: int) -> list[int]:
        """The first (global, 0-based) block of each module, and num_layers at the end."""
        counts = self.blocks(num_layers)
        return [sum(counts[:k]) for k in range(len(counts) + 1)]

    @property
    def head_owner(self) -> int:
        return self.head_module or self.modules


PHASES = ("", "incubate", "join")


def check_assembly(cfg: RunConfig) -> None:
    a, m = cfg.assembly, cfg.model
    if not a.modules:
        require(not a.phase and not a.module, "assembly.modules",
                "is 0 (not assembled), but assembly.phase/module are set; give the module count.")
        return
    require_all([("assembly.modules", a.modules), ("assembly.embedding_module", a.embedding_module)], 1, "at least 1")
    require(cfg.checkpoint.save_final, "checkpoint.save_final", "must stay true in an assembled run: each phase hands "
            "its last checkpoint to the next.")
    require_all([("assembly.meta_steps", a.meta_steps), ("assembly.incubation_steps", a.incubation_steps),
                 ("assembly.head_module", a.head_module), ("assembly.module", a.module)], 0, "0 or more")
    require(a.modules <= m.num_layers, "assembly.modules",
            f"{a.modules} modules need at least as many blocks; model.num_layers is {m.num_layers}.")
    if a.module_blocks:
        require(len(a.module_blocks) == a.modules and all(n >= 1 for n in a.module_blocks)
                and sum(a.module_blocks) == m.num_layers, "assembly.module_blocks",
                f"got {a.module_blocks}; give {a.modules} block counts (each at least 1) that sum to "
                f"model.num_layers={m.num_layers}, or [] for an even split.")
    for key, value in [("assembly.embedding_module", a.embedding_module), ("assembly.head_module", a.head_owner),
                       ("assembly.module", a.module or 1)]:
        require(value <= a.modules, key, f"{value} is not one of the {a.modules} modules.")
    require(not m.tie_embeddings or a.embedding_module == a.head_owner, "model.tie_embeddings",
            "the tied embedding would be trained by two modules (embedding_module and head_module); untie it or let "
            "one module own both.")
    require(not cfg.growth, "growth", "an assembled run does not grow; grow the assembled model afterwards.")
    require(not m.ffn.self_guided.enabled, "model.ffn.self_guided.enabled",
            "self-guided training spans one run's steps; assemble a structured model without it.")
    require(a.phase in PHASES, "assembly.phase", f"must be one of {', '.join(map(repr, PHASES))}, got {a.phase!r}; "
            "`pretrain assemble` sets it.")
    require((a.phase == "incubate") == bool(a.module), "assembly.module",
            "an incubation names its module (1..K) and only an incubation does: "
            "`pretrain assemble incubate CONFIG --module k`.")
