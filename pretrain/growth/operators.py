"""Growth operators: a trained model's weights, keyed by global names, mapped to a larger model's.

Depthwise (the block stack; docs/methods.md, model growth):
  stack        the whole stack copied in order, 1..L, 1..L, ... (G_stack), truncated to the target depth
  interpolate  each block repeated in place, 1, 1, 2, 2, ...
  zero         each block followed by new blocks whose output projections are zero: the function is unchanged
               (pre-norm and sandwich blocks; under LayerNorm Scaling the moved blocks' norms are rescaled so
               that each block still computes what it did)
  random       each block followed by freshly initialised blocks (by name and seed)
  layers       an explicit map: for each target block, the source block it copies, or None for a new one
Widthwise, function-preserving (every output of the grown model equals the small model's):
  hidden size and attention heads times an integer g (every hidden feature and every head duplicated g times,
  weights that read them divided by g; head size unchanged, so RoPE and the attention scale hold), the FFN (or
  expert) width to any larger size (neurons duplicated, the down projection divided by each one's copies)
Sparse upcycling: each dense FFN becomes E experts that are copies of it, with a new router; the routing weights
of every router here sum to 1 over a token's experts, so the output is unchanged (dropless routing; shared
experts start with a zero output projection).

Every operator returns the target config, the target state (new tensors initialised by name and seed as a fresh
model of the target config would be), and for each target tensor the source tensor it copies, if any, and the
factor it was scaled by (so that optimizer moments can follow the weights)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import torch

from pretrain.config import ModelConfig, MoEConfig
from pretrain.models.block import is_moe_block, placement
from pretrain.models.transformer import Transformer, build_model

DEPTH_OPS = ("stack", "interpolate", "zero", "random")
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.*)$")


class GrowthError(ValueError):
    """An operator that cannot do what was asked for this model, with the reason (a user-facing refusal)."""


@dataclass
class Grown:
    cfg: ModelConfig
    state: dict[str, torch.Tensor]
    origin: dict[str, tuple[str, float] | None]  # target name -> (source name, scale) or None for a new tensor


def fresh_state(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """What a new model of ``cfg`` starts from (init by global name and seed): the tensors growth does not copy."""
    return {k: v.detach().clone() for k, v in build_model(cfg, seed).state_dict().items()}


# ---- depth ------------------------------------------------------------------------------------------------

def depth_map(op: str, source_layers: int, target_layers: int) -> list[int | None]:
    """For each target block, the source block it copies (None: a new block)."""
    L, T = source_layers, target_layers
    if T < L:
        raise GrowthError(f"the target has {T} blocks, fewer than the {L} of the source; growth only adds blocks.")
    if op == "stack":
        return [j % L for j in range(T)]
    if op == "interpolate":
        return [j * L // T for j in range(T)]
    if op in ("zero", "random"):  # source block i at the first target position that maps to it, new blocks after
        first = {min(j for j in range(T) if j * L // T == i): i for i in range(L)}
        return [first.get(j) for j in range(T)]
    raise GrowthError(f"unknown depth operator {op!r}; use one of {', '.join(DEPTH_OPS)}.")


Plan = dict[str, "tuple[str, float] | str | None"]  # target name -> (source name, scale), "zero", or None (new)


def depth_plan(cfg: ModelConfig, op: str, num_layers: int | None = None, factor: int | None = None,
               layers: list[int | None] | None = None) -> tuple[ModelConfig, Plan]:
    """Where each tensor of the deeper model comes from, by names alone (no weights are touched): a source tensor and
    the factor it is scaled by, ``"zero"`` (an output projection of a new block under ``zero``), or None (a new
    tensor, initialised by its name and the seed). The target depth is ``num_layers``, or ``factor`` x the
    source's, filled by ``op``, or by ``layers`` (a map as ``depth_map`` returns)."""
    L = cfg.num_layers
    if layers is None:
        target = num_layers or L * (factor or 4)
        layers = depth_map(op, L, target)
    bad = [s for s in layers if s is not None and not 0 <= s < L]
    if bad:
        raise GrowthError(f"the layer map names source blocks {bad}; the source has blocks 0..{L - 1}.")
    tcfg = replace(cfg, num_layers=len(layers))
    new_blocks = [j for j, s in enumerate(layers) if s is None]
    if op == "zero" and new_blocks:
        _require_identity_blocks(tcfg, new_blocks)
    with torch.device("meta"):
        source_names, target_names = set(Transformer(cfg).state_dict()), list(Transformer(tcfg).state_dict())
    plan: Plan = {}
    for name in target_names:
        match = _BLOCK.match(name)
        if match is None:  # embedding, final norm, head
            plan[name] = (name, 1.0)
            continue
        j, rest = int(match.group(1)), match.group(2)
        source = layers[j]
        if source is None:
            plan[name] = "zero" if op == "zero" and _is_output_projection(rest) else None
            continue
        key = f"blocks.{source}.{rest}"
        if key not in source_names:
            raise GrowthError(f"target tensor {name} has no counterpart {key} in the source: the block kinds differ at "
                              "that depth (MoE on every n-th block, dense first blocks); pick a map that keeps them.")
        plan[name] = (key, _lns_compensation(cfg, source, j, rest) if op == "zero" else 1.0)
    return tcfg, plan


def grow_depth(state: dict[str, torch.Tensor], cfg: ModelConfig, op: str, num_layers: int | None = None,
               factor: int | None = None, layers: list[int | None] | None = None, seed: int = 0) -> Grown:
    """The source's blocks placed at the target depth (see ``depth_plan``) as tensors in memory: embedding, final
    norm and head copied, new blocks initialised by name and seed."""
    tcfg, plan = depth_plan(cfg, op, num_layers, factor, layers)
    out = fresh_state(tcfg, seed)
    origin: dict[str, tuple[str, float] | None] = dict.fromkeys(out)
    for name, how in plan.items():
        if how == "zero":
            out[name].zero_()
        elif how is not None:
            key, scale = how
            out[name], origin[name] = state[key].clone() * scale if scale != 1.0 else state[key].clone(), (key, scale)
    return Grown(tcfg, out, origin)


def _is_output_projection(rest: str) -> bool:
    """The tensors whose zeros make a new block output nothing: attention's output projection and the last factor
    of the FFN's (dense, structured, self-guided guide, stacked experts, shared experts)."""
    return bool(re.search(r"(attn\.o_proj\.weight|down_proj\.weight|down_proj\.(structured\.)?(U|W2)|down_proj\.guide"
                          r"|ffn\.w_down)$", rest))


def _require_identity_blocks(cfg: ModelConfig, new_blocks: list[int]) -> None:
    post = [j for j in range(cfg.num_layers) if placement(cfg, j) == "post"]
    if post:
        raise GrowthError(f"zero growth keeps the function only where a block with zero output projections is the "
                          f"identity: pre-norm and sandwich blocks. Blocks {post} of the target are post-norm "
                          f"(model.norm_placement {cfg.norm_placement}), where N(x + 0) is not x; use stack, "
                          "interpolate or random.")


def _lns_compensation(cfg: ModelConfig, source: int, target: int, rest: str) -> float:
    """Under LayerNorm Scaling a block's norms are scaled by 1/sqrt(depth); a block moved from depth source+1 to
    target+1 keeps its function when its norm affine parameters are scaled by sqrt(target+1)/sqrt(source+1)."""
    if cfg.norm_scaling != "lns" or not re.match(r"(attn|ffn)_(post_)?norm\.(weight|bias)$", rest):
        return 1.0
    return math.sqrt((target + 1) / (source + 1))


# ---- width ------------------------------------------------------------------------------------------------

def grow_width(state: dict[str, torch.Tensor], cfg: ModelConfig, hidden_factor: int = 1,
               ffn_size: int | None = None, seed: int = 0) -> Grown:
    """Hidden size and heads (and KV heads) times ``hidden_factor``, FFN width to ``ffn_size`` (dense FFNs, shared
    experts, and experts whose width follows the FFN's), every output unchanged."""
    tcfg = width_target(cfg, hidden_factor, ffn_size)
    spaces = width_spaces(cfg, tcfg, seed)
    target = fresh_state(tcfg, seed)
    out = {name: widen(name, tensor, spaces, target[name].shape if name in target else None)
           for name, tensor in state.items()}
    return Grown(tcfg, out, dict.fromkeys(out))


def width_target(cfg: ModelConfig, hidden_factor: int = 1, ffn_size: int | None = None) -> ModelConfig:
    """The config of ``cfg`` grown in width, or the reason it cannot be (a ``GrowthError``)."""
    g = hidden_factor
    f_old = cfg.ffn_size
    f_new = ffn_size or f_old
    if g < 1 or f_new < f_old:
        raise GrowthError(f"width growth only grows: hidden factor {g}, FFN width {f_old} -> {f_new}.")
    if g > 1 and cfg.tie_embeddings:
        raise GrowthError("the tied embedding would have to be both copied (as the embedding) and divided (as the "
                          "head) to keep the function; untie it (model.tie_embeddings=false) before growing the width.")
    kind = cfg.ffn.kind
    if kind == "blockshuffle":
        raise GrowthError("block-shuffle layers pass min(in, out) features between their factors, which changes with "
                          "the widths; grow their depth only.")
    if kind == "blockdense" and f_new % f_old:
        raise GrowthError(f"block-dense layers keep their blocks only when each FFN feature is copied alike: give an "
                          f"FFN width that is a multiple of {f_old}.")
    return replace(cfg, hidden_size=cfg.hidden_size * g, num_heads=cfg.num_heads * g,
                   num_kv_heads=cfg.kv_heads * g if cfg.num_kv_heads else 0, ffn_hidden_size=f_new)


def width_spaces(cfg: ModelConfig, tcfg: ModelConfig, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For each growing space (hidden, q and kv heads, FFN, expert FFN): which old feature each new one copies, and
    how many copies each old one has. A pure function of the configs and the seed, so every rank draws the same."""
    g = tcfg.hidden_size // cfg.hidden_size
    expert_old = cfg.moe.expert_ffn_hidden_size or cfg.ffn_size
    expert_new = expert_old if cfg.moe.expert_ffn_hidden_size else tcfg.ffn_size
    gen = torch.Generator().manual_seed(seed)
    return {"hidden": _interleave(cfg.hidden_size, g), "q": _heads(cfg.num_heads, cfg.head_dim, g),
            "kv": _heads(cfg.kv_heads, cfg.head_dim, g), "ffn": _widen(cfg.ffn_size, tcfg.ffn_size, gen),
            "expert": _widen(expert_old, expert_new, gen)}


def widen(name: str, tensor: torch.Tensor, spaces: dict, target_shape: torch.Size | None) -> torch.Tensor:
    """One tensor grown in width: its features copied along every growing dim, divided by their copies where the
    tensor reads them (``width_spaces``); ``target_shape`` is the grown model's, checked."""
    grown = tensor.clone()
    for dim, space, mode in _width_rules(name, tensor):
        index, copies = spaces[space]
        if mode == "blocked":  # the space cut into blocks along ``dim``: each block widened by the same factor
            factor = len(index) // len(copies)
            index, copies = _interleave(grown.shape[dim], factor)
            mode = "consume"
        grown = grown.index_select(dim, index)
        if mode == "consume":
            shape = [1] * grown.dim()
            shape[dim] = -1
            grown = grown / copies[index].to(grown.dtype).view(shape)
    if target_shape is None or grown.shape != target_shape:
        raise GrowthError(f"cannot grow {name} {tuple(tensor.shape)} to "
                          f"{tuple(target_shape) if target_shape is not None else 'nothing'}: this layer kind has no "
                          "width rule.")
    return grown


def _interleave(n: int, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature j of the grown space copies feature j // g: blocks of features stay blocks."""
    return torch.arange(n * g) // g, torch.full((n,), float(g))


def _heads(heads: int, head_dim: int, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Head h of the grown layer copies head h // g, whole (its head_dim rows)."""
    rows = torch.arange(heads * g * head_dim)
    return (rows // head_dim // g) * head_dim + rows % head_dim, torch.full((heads * head_dim,), float(g))


def _widen(n: int, m: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Neurons 0..n-1 kept; the m - n new ones copy neurons drawn at random (all of them g times when m = g n)."""
    if m % n == 0:
        return torch.arange(m) // (m // n), torch.full((n,), float(m // n))
    extra = torch.randint(0, n, (m - n,), generator=gen)
    index = torch.cat([torch.arange(n), extra])
    return index, torch.bincount(index, minlength=n).float()


def _width_rules(name: str, tensor: torch.Tensor) -> list[tuple[int, str, str]]:
    """(dim, space, produce|consume) for each dim of ``name`` that indexes a growing space."""
    if name == "embed.weight":
        return [(1, "hidden", "produce")]
    if name == "head.weight":
        return [(1, "hidden", "consume")]
    if re.search(r"norm\.(weight|bias)$", name):
        return [(0, "hidden", "produce")]
    if name.endswith("norm.alpha"):
        return []
    if name.endswith("attn.q_proj.weight"):
        return [(0, "q", "produce"), (1, "hidden", "consume")]
    if name.endswith(("attn.k_proj.weight", "attn.v_proj.weight")):
        return [(0, "kv", "produce"), (1, "hidden", "consume")]
    if name.endswith("attn.o_proj.weight"):
        return [(0, "hidden", "produce"), (1, "q", "consume")]
    if re.search(r"ffn\.(w_gate|w_up)$", name):
        return [(1, "expert", "produce"), (2, "hidden", "consume")]
    if name.endswith("ffn.w_down"):
        return [(1, "hidden", "produce"), (2, "expert", "consume")]
    if re.search(r"ffn\.router\.(weight|w_gate|w_noise)$", name):
        return [(1, "hidden", "consume")]
    inner = "expert" if ".experts." in name else "ffn"
    match = re.search(r"(gate_proj|up_proj|down_proj)\.(weight|guide|structured\.V|structured\.U|V|U)$", name)
    if match is None:
        raise GrowthError(f"no width rule for {name}")
    proj, part = match.group(1), match.group(2).replace("structured.", "")
    into, out = ("hidden", inner) if proj != "down_proj" else (inner, "hidden")
    if part in ("weight", "guide"):
        return [(0, out, "produce"), (1, into, "consume")]
    if part == "U":
        return [(0, out, "produce")]
    if tensor.dim() == 3:  # block-dense V (blocks, rank/blocks, in/blocks): interleaved copies stay in their block
        return [(2, into, "blocked")]
    return [(1, into, "consume")]  # low-rank V (rank, in)


# ---- sparse upcycling -------------------------------------------------------------------------------------

def upcycle(state: dict[str, torch.Tensor], cfg: ModelConfig, moe: MoEConfig, seed: int = 0) -> Grown:
    """Each dense FFN of the blocks ``moe`` makes MoE becomes ``moe.num_experts`` copies of itself, with a router
    initialised as a fresh model's; the output is unchanged."""
    tcfg = upcycle_target(cfg, moe)
    out = fresh_state(tcfg, seed)
    origin: dict[str, tuple[str, float] | None] = dict.fromkeys(out)
    for name in out:
        how, key = upcycle_source(tcfg, name)
        if how == "zero":
            out[name].zero_()
        elif how != "fresh":
            out[name] = upcycled(how, state[key], out[name].shape)
            origin[name] = (key, 1.0)
    return Grown(tcfg, out, origin)


def upcycle_target(cfg: ModelConfig, moe: MoEConfig) -> ModelConfig:
    """The config of ``cfg`` upcycled to ``moe``, or the reason it cannot be (a ``GrowthError``)."""
    if cfg.moe.num_experts:
        raise GrowthError("the source is already a mixture of experts; upcycling turns a dense model into one.")
    if moe.num_experts < 1:
        raise GrowthError("give the number of experts (at least 1).")
    if moe.capacity_factor > 0:
        raise GrowthError(f"with capacity_factor {moe.capacity_factor} tokens over capacity fall through to the "
                          "residual, which changes the function; upcycle with capacity_factor 0 (dropless).")
    if moe.expert_ffn_hidden_size not in (0, cfg.ffn_size):
        raise GrowthError(f"experts are copies of the FFN, so their width is its {cfg.ffn_size}; set "
                          "expert_ffn_hidden_size to 0.")
    return replace(cfg, moe=moe)


def upcycle_source(tcfg: ModelConfig, name: str) -> tuple[str, str | None]:
    """Where the upcycled tensor ``name`` comes from: ("copy", source name), ("stack", source name: the E experts'
    weights stacked from one FFN weight), ("zero", None: a shared expert's silent output) or ("fresh", None: the
    router, initialised by name and seed)."""
    match = _BLOCK.match(name)
    i, rest = (int(match.group(1)), match.group(2)) if match else (None, None)
    if i is None or not is_moe_block(tcfg, i) or not rest.startswith("ffn."):
        return "copy", name
    ffn = rest[len("ffn."):]
    stacked = {"w_gate": "gate_proj.weight", "w_up": "up_proj.weight", "w_down": "down_proj.weight"}
    if ffn in stacked:
        return "stack", f"blocks.{i}.ffn.{stacked[ffn]}"
    if ffn.startswith("experts."):
        return "copy", f"blocks.{i}.ffn." + ffn.split(".", 2)[2]
    if ffn.startswith("shared_experts.") and _is_output_projection(ffn):
        return "zero", None
    return "fresh", None


def upcycled(how: str, source: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The upcycled tensor of ``shape`` from its source (``upcycle_source``'s copy or stack)."""
    return source.unsqueeze(0).expand(shape).clone() if how == "stack" else source.clone()
