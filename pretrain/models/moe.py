"""Mixture-of-experts FFN layer: a router picks k of E experts per token (docs/methods.md, mixture of experts).

Routers: top-k softmax (Mixtral), noisy top-k (Shazeer et al. 2017, "Outrageously Large Neural
Networks") and hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models"). Losses: the
Switch/GShard balance loss E * sum_e f_e * P_e, Shazeer's importance + load CV^2 losses for noisy top-k,
and the ST-MoE router z-loss. Capacity c > 0 drops assignments over ceil(c*k*T/E) per expert, first
choices of every token before second choices, earlier tokens first (Switch/GShard); c = 0 is dropless.

Dispatch sorts the T*k (token, expert) assignments by expert. Dense experts are stored stacked, (E, f, d),
and run as one grouped GEMM over the sorted rows (``grouped_mm`` with device-side offsets, so no
host sync) once ``use_grouped_gemm`` found it works on the device; experts from a factory (structured FFNs)
run in a loop over the per-expert segments. The layer is a plain module: expert parallelism wraps it from
``parallel/`` without changing it.

Per-step state lives in a ``MoEContext`` that whoever runs the model (the training engine) owns and passes
to the forward: the gradient scale of the router losses, which are attached to each layer's output so that
backward gives them their share of the total loss without the loss ever reading them (Megatron's
``MoEAuxLossAutoScaler``), the sums over which the balance losses run, and each layer's load statistics.
Without a context (inference) no router loss is attached and nothing is recorded.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pretrain import torch_compat
from pretrain.config import ModelConfig
from pretrain.models.ffn import FFN

Routing = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]

# Added to softplus(x W_noise) as in Shazeer's reference code, so the load estimator never divides by 0.
NOISE_EPS = 1e-2
HASH_SEED = 0x5EED


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: keeps logits small so the fp32 softmax stays well conditioned."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation (population variance), Shazeer's balance measure."""
    return x.var(correction=0) / (x.mean().square() + 1e-10)


def _assignment_counts(idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    # scatter_add rather than bincount: bincount sizes its output from the data, a host sync on CUDA.
    flat = idx.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.long, device=idx.device).scatter_add_(0, flat, torch.ones_like(flat))


SumFn = Callable[[torch.Tensor], torch.Tensor]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass(eq=False)
class MoEContext:
    """What the MoE layers of a model share with the engine that trains it, handed to every forward.

    ``loss_scale`` is d(total loss)/d(router loss): the gradient each layer's router loss receives in backward.
    ``total`` turns a local sum over tokens (assignment counts, router probabilities, ...) into the sum over the
    tokens the balance and z losses cover: this micro-batch by default, or the micro-batches of all
    data-parallel ranks together (``model.moe.balance_scope: global``). ``stats`` holds, per block index, the
    detached load statistics of that layer's latest forward, read at the log interval."""

    loss_scale: float = 1.0
    total: SumFn = _local
    stats: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)


class AttachAux(torch.autograd.Function):
    """A copy of ``output`` whose backward also gives ``aux`` the gradient ``scale``: a loss computed inside the
    model enters the total where it was computed (Megatron's MoEAuxLossAutoScaler), which works the same
    whether the model runs whole, split into pipeline stages or recomputed. A copy rather than ``output`` itself,
    which autograd would make a view of the input."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(aux)
        ctx.scale = scale
        return output.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (aux,) = ctx.saved_tensors
        return grad, torch.full_like(aux, ctx.scale), None


class TopKSoftmaxRouter(nn.Module):
    """Mixtral: softmax over all experts, keep the top k, renormalise over them."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None, total: SumFn = _local) -> Routing:
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        probs = logits.softmax(dim=-1)
        top_logits, idx = logits.topk(self.top_k, dim=-1)
        weight = top_logits.softmax(dim=-1)
        num_experts = logits.shape[-1]
        # f_e counts hard assignments (no gradient); P_e carries the gradient to the router (Switch).
        sums = total(torch.cat([_assignment_counts(idx, num_experts).float(), probs.sum(dim=0),
                                torch.logsumexp(logits, dim=-1).square().sum()[None],
                                torch.tensor([float(idx.shape[0])], device=x.device)]))
        counts, prob_sum, z_sum, tokens = sums[:num_experts], sums[num_experts:-2], sums[-2], sums[-1]
        balance = num_experts * (counts / (tokens * self.top_k) * prob_sum / tokens).sum()
        return idx, weight, {"balance": balance, "z": z_sum / tokens}


class NoisyTopKRouter(nn.Module):
    """Shazeer 2017: H = x W_g + eps * softplus(x W_noise), eps ~ N(0, 1) in training only; softmax over the
    kept top-k of H. Balance = CV^2(importance) + CV^2(load), load from the smooth estimator."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.w_gate = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.w_noise = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None, total: SumFn = _local) -> Routing:
        k, num_experts = self.top_k, self.w_gate.shape[0]
        with torch.autocast(x.device.type, enabled=False):
            xf = x.float()
            clean = F.linear(xf, self.w_gate.float())
            if self.training:
                noise_std = F.softplus(F.linear(xf, self.w_noise.float())) + NOISE_EPS
                logits = clean + torch.randn_like(clean) * noise_std
            else:
                logits = clean
        top_vals, top_idx = logits.topk(min(k + 1, num_experts), dim=-1)
        idx, weight = top_idx[:, :k], top_vals[:, :k].softmax(dim=-1)
        importance = torch.zeros_like(clean).scatter(1, idx, weight).sum(dim=0)
        if self.training and k < num_experts:
            # P(expert e stays in the top k when only its own noise is redrawn): compare its clean logit
            # with the k-th largest noisy logit among the others (Shazeer 2017, appendix A).
            threshold_if_in, threshold_if_out = top_vals[:, k:k + 1], top_vals[:, k - 1:k]
            is_in = logits > threshold_if_in
            prob_if_in = torch.special.ndtr((clean - threshold_if_in) / noise_std)
            prob_if_out = torch.special.ndtr((clean - threshold_if_out) / noise_std)
            load = torch.where(is_in, prob_if_in, prob_if_out).sum(dim=0)
        else:
            load = _assignment_counts(idx, num_experts).float()
        sums = total(torch.cat([importance, load, torch.logsumexp(clean, dim=-1).square().sum()[None],
                                torch.tensor([float(idx.shape[0])], device=x.device)]))
        importance, load = sums[:num_experts], sums[num_experts:-2]
        return idx, weight, {"balance": cv_squared(importance) + cv_squared(load), "z": sums[-2] / sums[-1]}


class HashRouter(nn.Module):
    """Roller et al. 2021: expert = a fixed random function of the token id; no parameters, no losses.
    With k > 1 each token id maps to k distinct experts (a random permutation's first k), weighted 1/k."""

    def __init__(self, num_experts: int, top_k: int, vocab_size: int):
        super().__init__()
        if vocab_size <= 0:
            raise ValueError("hash routing needs ModelConfig.vocab_size resolved (> 0) to build its table")
        self.num_experts, self.top_k, self.vocab_size = num_experts, top_k, vocab_size
        # A plain attribute, not a buffer: buffers are wiped by meta-device to_empty(), and the table is
        # a pure function of the seed, so it needs no checkpointing.
        self._tables: dict[str, torch.Tensor] = {}

    def table(self, device: torch.device) -> torch.Tensor:
        key = str(device)
        if key not in self._tables:
            gen = torch.Generator().manual_seed(HASH_SEED)
            perm = torch.rand(self.vocab_size, self.num_experts, generator=gen).argsort(dim=-1)
            self._tables[key] = perm[:, : self.top_k].contiguous().to(device)
        return self._tables[key]

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None, total: SumFn = _local) -> Routing:
        if token_ids is None:
            raise ValueError("the hash router routes by token id: pass the input token ids to MoE.forward "
                             "(every hashed layer needs the original ids, docs/methods.md, mixture of experts)")
        idx = self.table(token_ids.device)[token_ids]
        weight = torch.full(idx.shape, 1.0 / self.top_k, device=x.device)
        zero = torch.zeros((), device=x.device)
        return idx, weight, {"balance": zero, "z": zero}


def build_router(cfg: ModelConfig) -> nn.Module:
    m = cfg.moe
    if m.router == "topk_softmax":
        return TopKSoftmaxRouter(cfg.hidden_size, m.num_experts, m.top_k)
    if m.router == "noisy_topk":
        return NoisyTopKRouter(cfg.hidden_size, m.num_experts, m.top_k)
    if m.router == "hash":
        return HashRouter(m.num_experts, m.top_k, cfg.vocab_size)
    raise ValueError(f"unknown router {m.router!r}; allowed: topk_softmax, noisy_topk, hash")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # Under autocast the grouped GEMM must be fed the autocast dtype explicitly: it has no autocast rule.
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


@functools.cache
def grouped_mm_works(device_type: str, dtype: torch.dtype, in_features: int, out_features: int) -> bool:
    """Whether the grouped GEMM runs forward and backward here: support differs by torch version, device, dtype
    and (on CUDA) alignment of the widths, so try it once on a tiny problem of these widths."""
    gen = torch.Generator(device_type).manual_seed(0)  # never the global RNG: the probe runs once a process, so
    try:  # drawing from it would make a run's later draws (noisy top-k) depend on what ran before in the process
        with torch.inference_mode(False), torch.enable_grad():
            x = torch.randn(3, in_features, device=device_type, dtype=dtype, generator=gen, requires_grad=True)
            w = torch.randn(2, out_features, in_features, device=device_type, dtype=dtype, generator=gen,
                            requires_grad=True)
            offs = torch.tensor([1, 3], device=device_type, dtype=torch.int32)
            y = torch_compat.grouped_mm(x, w.transpose(-2, -1), offs=offs)
            y.backward(torch.ones_like(y))
        return x.grad is not None and w.grad is not None
    except (RuntimeError, NotImplementedError):
        return False


def use_grouped_gemm(model: nn.Module, device: torch.device, dtype: torch.dtype, compiled: bool = False) -> None:
    """Decide once, when the model is prepared, whether each MoE layer's stacked experts run as one grouped GEMM
    (probed for ``dtype``, the dtype the experts compute in) or the per-expert loop. Compiled, the grouped GEMM
    takes bf16 only (torch 2.13), so fp32 compiled layers loop."""
    for layer in moe_layers(model):
        if layer.experts is None:
            w = layer.w_up  # (experts, out, in); a DTensor's device is its local shard's
            layer.grouped = (dtype == torch.bfloat16 or not compiled) and grouped_mm_works(
                device.type, dtype, w.shape[-1], w.shape[-2])


class MoE(nn.Module):
    """Routed experts (plus optional shared experts) in place of the FFN of block ``layer_idx``.

    In training (a ``MoEContext`` given), the router loss balance_coef * balance + z_coef * z is attached to the
    output with the context's gradient scale and the load statistics go to ``context.stats[layer_idx]``.
    ``grouped`` runs stacked experts as one grouped GEMM instead of the per-expert loop (``use_grouped_gemm``
    sets it where the device supports it).
    """

    def __init__(self, cfg: ModelConfig, expert_factory: Callable[[], nn.Module] | None = None,
                 grouped: bool = False, layer_idx: int = 0):
        super().__init__()
        m = cfg.moe
        if m.num_experts < 1:
            raise ValueError(f"MoE needs model.moe.num_experts >= 1, got {m.num_experts}")
        if not 1 <= m.top_k <= m.num_experts:
            raise ValueError(f"model.moe.top_k must lie in [1, {m.num_experts}], got {m.top_k}")
        d, f, E = cfg.hidden_size, m.expert_ffn_hidden_size or cfg.ffn_size, m.num_experts
        self.num_experts, self.top_k, self.activation = E, m.top_k, cfg.ffn.activation
        self.capacity_factor, self.balance_coef, self.z_coef = m.capacity_factor, m.balance_coef, m.z_coef
        self.grouped, self.layer_idx = grouped, layer_idx
        self.router = build_router(cfg)
        self.experts: nn.ModuleList | None = None
        if expert_factory is None:
            if self.activation == "swiglu":
                self.w_gate = nn.Parameter(torch.empty(E, f, d))
            self.w_up = nn.Parameter(torch.empty(E, f, d))
            self.w_down = nn.Parameter(torch.empty(E, d, f))
        else:
            self.experts = nn.ModuleList([expert_factory() for _ in range(E)])
        make_shared = expert_factory or (lambda: FFN(d, f, self.activation))
        self.shared_experts = nn.ModuleList([make_shared() for _ in range(m.num_shared_experts)])
        # Expert parallelism's hook, set once when the layout is applied: it carries the sorted assignments to
        # the ranks that own their experts and back, calling run_experts there (pretrain.parallel.expert).
        # None = all experts local.
        self.exchange: Callable | None = None

    def expert_weights(self) -> dict[str, torch.Tensor]:
        """The stacked expert weights (E, ...) by name; empty for factory-built experts."""
        return {name: getattr(self, name) for name in ("w_gate", "w_up", "w_down") if hasattr(self, name)}

    def run_experts(self, xs: torch.Tensor, counts: torch.Tensor, kept_counts: torch.Tensor,
                    weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """Expert outputs for assignments sorted by expert, ``counts[e]`` of them for expert e, with
        ``weights`` the stacked weights of exactly those experts."""
        if self.experts is None and self.grouped:
            return self._grouped_experts(xs, counts, weights)
        return self._looped_experts(xs, counts, kept_counts, weights)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator, std: float) -> None:
        """Experts and the top-k softmax router ~ N(0, std), noisy top-k gates zero (Shazeer 2017). Drawn on
        the CPU from one generator in a fixed order, so every device and layout gets the same values."""
        def normal_(param: torch.Tensor) -> None:
            param.copy_(torch.empty(param.shape).normal_(0.0, std, generator=generator))

        def init_subtree(module: nn.Module) -> None:
            # Structured linears (and norms) know their own init; everything else is N(0, std), biases 0.
            if hasattr(module, "init_weights"):
                module.init_weights(generator, std)
                return
            for name, param in module.named_parameters(recurse=False):
                if name == "bias":
                    param.zero_()
                else:
                    normal_(param)
            for child in module.children():
                init_subtree(child)

        for name in ("w_gate", "w_up", "w_down"):
            if hasattr(self, name):
                normal_(getattr(self, name))
        if isinstance(self.router, TopKSoftmaxRouter):
            normal_(self.router.weight)
        elif isinstance(self.router, NoisyTopKRouter):
            self.router.w_gate.zero_()
            self.router.w_noise.zero_()
        for module in [*(self.experts or []), *self.shared_experts]:
            init_subtree(module)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None,
                moe: MoEContext | None = None) -> torch.Tensor:
        B, S, d = x.shape
        T, k, E = B * S, self.top_k, self.num_experts
        x_flat = x.reshape(T, d)
        total = moe.total if moe is not None else _local
        idx, weight, aux = self.router(x_flat, None if token_ids is None else token_ids.reshape(T), total)

        # Choice-major order (every token's first choice, then every second choice, ...) so that a stable
        # sort by expert gives each expert's assignments in capacity priority order.
        flat_expert = idx.t().reshape(-1)
        flat_token = torch.arange(T, device=x.device).repeat(k)
        sorted_expert, order = torch.sort(flat_expert, stable=True)
        sorted_weight = weight.t().reshape(-1)[order]
        counts = _assignment_counts(flat_expert, E)
        kept_counts = counts
        if self.capacity_factor > 0:
            capacity = math.ceil(self.capacity_factor * k * T / E)
            starts = counts.cumsum(0) - counts
            position = torch.arange(T * k, device=x.device) - starts[sorted_expert]
            sorted_weight = sorted_weight * (position < capacity)
            kept_counts = counts.clamp(max=capacity)

        # Dropped assignments stay in their expert's segment with weight zero: no host sync to compact them.
        xs = x_flat[flat_token[order]].to(_compute_dtype(x))
        if self.exchange is not None:
            ys = self.exchange(self, xs, counts, kept_counts)
        else:
            ys = self.run_experts(xs, counts, kept_counts, self.expert_weights())
        weighted = ys.float() * sorted_weight[:, None]
        # Undo the sort and sum each token's k contributions: deterministic, unlike an atomic index_add.
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(T * k, device=x.device)
        out = weighted[inverse].view(k, T, d).sum(dim=0)
        for shared in self.shared_experts:
            out = out + shared(x_flat)

        if moe is not None:
            out = self._account(moe, out, aux, kept_counts, T * k)
        return out.to(x.dtype).view(B, S, d)

    def _activate(self, gate: torch.Tensor | None, up: torch.Tensor) -> torch.Tensor:
        return F.silu(gate) * up if gate is not None else F.gelu(up)

    def _grouped_experts(self, xs: torch.Tensor, counts: torch.Tensor, weights: dict) -> torch.Tensor:
        offs = counts.cumsum(0).to(torch.int32)

        def gmm(inp: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return torch_compat.grouped_mm(inp, w.to(inp.dtype).transpose(-2, -1), offs=offs)

        gate = gmm(xs, weights["w_gate"]) if self.activation == "swiglu" else None
        return gmm(self._activate(gate, gmm(xs, weights["w_up"])), weights["w_down"])

    def _looped_experts(self, xs: torch.Tensor, counts: torch.Tensor, kept_counts: torch.Tensor,
                        weights: dict) -> torch.Tensor:
        # The one host sync of the loop path: segment boundaries must be Python ints to slice.
        counts_host, kept_host = torch.stack([counts, kept_counts]).tolist()
        ys = xs.new_zeros(xs.shape)
        start = 0
        for e, (count, kept) in enumerate(zip(counts_host, kept_host, strict=True)):
            if kept:
                ys[start:start + kept] = self._expert(e, xs[start:start + kept], weights)
            start += count
        return ys

    def _expert(self, e: int, x: torch.Tensor, weights: dict) -> torch.Tensor:
        if self.experts is not None:
            return self.experts[e](x)
        gate = F.linear(x, weights["w_gate"][e]) if self.activation == "swiglu" else None
        return F.linear(self._activate(gate, F.linear(x, weights["w_up"][e])), weights["w_down"][e])

    def _account(self, moe: MoEContext, out: torch.Tensor, aux: dict[str, torch.Tensor], kept_counts: torch.Tensor,
                 assignments: int) -> torch.Tensor:
        """Record this forward's load statistics in the context, and attach the router loss to ``out``."""
        tokens = kept_counts.detach().float()
        router_loss = self.balance_coef * aux["balance"] + self.z_coef * aux["z"]
        moe.stats[self.layer_idx] = {
            "tokens_per_expert": tokens,
            "dropped_fraction": 1.0 - tokens.sum() / assignments,
            "balance_loss": aux["balance"].detach(),
            "z_loss": aux["z"].detach(),
            "router_loss": router_loss.detach(),
            "load_cv": tokens.std(correction=0) / tokens.mean().clamp_min(1e-10),
        }
        if not torch.is_grad_enabled():
            return out
        return AttachAux.apply(out, router_loss, moe.loss_scale)


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]
