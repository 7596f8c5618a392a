"""Structured replacements for the FFN's dense linears, and self-guided training (docs/methods.md, structured FFN layers).

Input x in R^N, output R^M, no biases. Every layer computes its output as a chain of small matmuls and
can export the exact equivalent dense (M, N) matrix with ``dense_weight()`` ("pre-merge"):

- ``LowRankLinear``: y = U(Vx), (N+M)*R parameters.
- ``BlockDenseLinear``: y = U blockdiag(V_1..V_B) x, R*(M + N/B) parameters.
- ``BlockShuffleLinear``: Monarch-style Q blockdiag(W2) P blockdiag(W1) x with fixed shuffles P and Q,
  min(N, M)*(N+M)/B parameters.
- ``SelfGuided``: o = a W x + (1-a) structured(x), a dense guide W that fades out by ``alpha_at``.

Parameters are created empty (the model builds on the meta device); ``init_weights(generator, std)``
fills them deterministically from a dense N(0, std) draw made on the CPU. Only ordinary autograd ops are
used, so input and weight gradients stay separable for two-stage backprop (docs/parallelism.md, pipeline parallelism).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("dense", "lowrank", "blockdense", "blockshuffle")


def _check_divisible(name: str, **sizes: int) -> None:
    blocks = sizes.pop("blocks")
    for what, size in sizes.items():
        if size % blocks:
            raise ValueError(f"{name}: {what}={size} must be divisible by blocks={blocks}")


def _dense_draw(generator: torch.Generator, out_features: int, in_features: int, std: float) -> torch.Tensor:
    return torch.empty(out_features, in_features).normal_(0.0, std, generator=generator)


def _interleave(n: int, blocks: int, device: torch.device, inverse: bool = False) -> torch.Tensor:
    """perm with v[perm] = v viewed as (n/blocks, blocks), transposed and flattened (inverse: the reverse)."""
    grid = torch.arange(n, device=device)
    return (grid.view(blocks, -1) if inverse else grid.view(-1, blocks)).t().reshape(-1)


def _polar(blocks: torch.Tensor) -> torch.Tensor:
    """U Vh of each block's SVD: the nearest (semi-)orthogonal matrix, all singular values one."""
    u, _, vh = torch.linalg.svd(blocks, full_matrices=False)
    return u @ vh


class LowRankLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        if not 0 < rank <= min(in_features, out_features):
            raise ValueError(f"lowrank: rank={rank} must be in [1, min({in_features}, {out_features})]")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.V = nn.Parameter(torch.empty(rank, in_features))
        self.U = nn.Parameter(torch.empty(out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.V), self.U)

    def dense_weight(self) -> torch.Tensor:
        return self.U @ self.V

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator, std: float) -> None:
        """Top-R SVD factors of a dense N(0, std) draw, sqrt(S) on each side so both factors share the
        scale: the layer starts as the best rank-R approximation of a dense init (Eckart-Young)."""
        u, s, vh = torch.linalg.svd(_dense_draw(generator, self.out_features, self.in_features, std),
                                    full_matrices=False)
        root = s[: self.rank].sqrt()
        self.V.copy_(root[:, None] * vh[: self.rank])
        self.U.copy_(u[:, : self.rank] * root)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class BlockDenseLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, blocks: int):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"blockdense: rank={rank} must be positive")
        _check_divisible("blockdense", in_features=in_features, rank=rank, blocks=blocks)
        self.in_features, self.out_features, self.rank, self.blocks = in_features, out_features, rank, blocks
        self.V = nn.Parameter(torch.empty(blocks, rank // blocks, in_features // blocks))
        self.U = nn.Parameter(torch.empty(out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("...bn,brn->...br", x.unflatten(-1, (self.blocks, -1)), self.V)
        return F.linear(h.flatten(-2), self.U)

    def dense_weight(self) -> torch.Tensor:
        return self.U @ torch.block_diag(*self.V.unbind(0))

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator, std: float) -> None:
        """From the top-R SVD W ~ U S Vh of a dense N(0, std) draw: V_b is the polar factor of the
        diagonal block b of Vh (rows of block b of R, columns of block b of N) and U = U S.

        The orthogonalised V_b carry no scale, so U carries all of S: with R/B <= N/B blockdiag(V) has
        orthonormal rows and the layer's singular values are exactly the top-R ones of the draw, the
        same spectrum as the ``LowRankLinear`` init."""
        u, s, vh = torch.linalg.svd(_dense_draw(generator, self.out_features, self.in_features, std),
                                    full_matrices=False)
        B, r, n = self.V.shape
        grid = vh[: self.rank].reshape(B, r, B, n)
        self.V.copy_(_polar(torch.stack([grid[b, :, b] for b in range(B)])))
        self.U.copy_(u[:, : self.rank] * s[: self.rank])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"blocks={self.blocks}")


class BlockShuffleLinear(nn.Module):
    """y = Q blockdiag(W2) P blockdiag(W1) x through k = min(N, M) middle features (the Monarch product of
    the block-shuffle authors' op). x is cut into B consecutive chunks, chunk b goes through W1[b]; P views
    the k middle features (block-major) as (k/B, B) and transposes, so block j of W2 reads h[i*B + j] for
    i = 0..k/B-1; Q interleaves the outputs: row s of block j lands at s*B + j. P and Q follow from the
    shapes and are never stored (a buffer would be wiped by the meta-device ``to_empty()``)."""

    def __init__(self, in_features: int, out_features: int, blocks: int):
        super().__init__()
        if blocks < 2:
            raise ValueError(f"blockshuffle: blocks={blocks} must be >= 2 (one block has more parameters "
                             "than the dense layer it replaces)")
        k = min(in_features, out_features)
        _check_divisible("blockshuffle", in_features=in_features, out_features=out_features, blocks=blocks)
        self.in_features, self.out_features, self.blocks, self.inner = in_features, out_features, blocks, k
        self.W1 = nn.Parameter(torch.empty(blocks, k // blocks, in_features // blocks))
        self.W2 = nn.Parameter(torch.empty(blocks, out_features // blocks, k // blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("...bn,bkn->...bk", x.unflatten(-1, (self.blocks, -1)), self.W1)
        h = h.flatten(-2).unflatten(-1, (-1, self.blocks)).transpose(-1, -2)  # P: block j gets h[i*B + j]
        y = torch.einsum("...bk,bmk->...bm", h, self.W2)
        return y.transpose(-1, -2).flatten(-2)  # Q: row s of block j -> output s*B + j

    def permutation(self) -> torch.Tensor:
        """Index perm of the middle shuffle: (P h)[i] = h[perm[i]]."""
        return _interleave(self.inner, self.blocks, self.W1.device)

    def output_permutation(self) -> torch.Tensor:
        """Index perm of the output interleave: y[i] = (blockdiag(W2) P blockdiag(W1) x)[perm[i]]."""
        return _interleave(self.out_features, self.blocks, self.W1.device, inverse=True)

    def dense_weight(self) -> torch.Tensor:
        first = torch.block_diag(*self.W1.unbind(0))[self.permutation()]  # P @ blockdiag(W1)
        return (torch.block_diag(*self.W2.unbind(0)) @ first)[self.output_permutation()]

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator, std: float) -> None:
        """W1 and W2 are consecutive disjoint slices of one flattened dense N(0, std) draw (B >= 2 makes
        k(N+M)/B <= MN), each block replaced by its polar factor and scaled by sqrt(c), c = std*sqrt(max(N, M)).

        With orthogonal blocks the layer is an isometry when it widens (N <= M) and has orthonormal rows
        when it narrows; times c its E|y|^2 equals a dense N(0, std) layer's (M std^2 |x|^2) in both cases."""
        flat = _dense_draw(generator, self.out_features, self.in_features, std).flatten()
        n1 = self.W1.numel()
        scale = math.sqrt(std * math.sqrt(max(self.in_features, self.out_features)))
        self.W1.copy_(scale * _polar(flat[:n1].view(self.W1.shape)))
        self.W2.copy_(scale * _polar(flat[n1 : n1 + self.W2.numel()].view(self.W2.shape)))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, blocks={self.blocks}"


class SelfGuided(nn.Module):
    """o = alpha W x + (1 - alpha) structured(x) with a dense guide W of full shape.

    The guide starts as the structured layer's exact dense matrix, so training begins from a dense
    model's dynamics and hands over to the structured layer as ``alpha`` (set by the trainer from
    ``alpha_at`` once per optimizer step) decays to 0; ``remove_guide`` then frees W. With
    ``reduce_flop`` a training forward runs the dense branch only when a draw from the global torch RNG
    is < alpha (reproducible from the seed) and otherwise returns the pure structured branch."""

    def __init__(self, structured: nn.Module):
        super().__init__()
        self.structured = structured
        self.in_features, self.out_features = structured.in_features, structured.out_features
        self.guide = nn.Parameter(torch.empty(self.out_features, self.in_features))
        self.alpha = 1.0
        self.reduce_flop = False

    @property
    def has_guide(self) -> bool:
        return "guide" in self._parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.has_guide:
            return self.structured(x)
        if self.training and self.reduce_flop and torch.rand(()).item() >= self.alpha:
            return self.structured(x)
        return self.alpha * F.linear(x, self.guide) + (1.0 - self.alpha) * self.structured(x)

    def dense_weight(self) -> torch.Tensor:
        if not self.has_guide:
            return self.structured.dense_weight()
        return self.alpha * self.guide + (1.0 - self.alpha) * self.structured.dense_weight()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator, std: float) -> None:
        self.structured.init_weights(generator, std)
        if self.has_guide:
            self.guide.copy_(self.structured.dense_weight())

    def remove_guide(self) -> None:
        """Drop W from the module (the caller drops it from the optimizer) so its memory is freed."""
        if self.has_guide:
            del self.guide
        self.alpha = 0.0

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:.4f}, reduce_flop={self.reduce_flop}, has_guide={self.has_guide}"


def structured_linear(kind: str, in_features: int, out_features: int, *, rank: int = 0, blocks: int = 1,
                      self_guided: bool = False) -> nn.Module:
    """The ``linear`` factory of ``FFN`` (bind kind/rank/blocks with ``functools.partial``)."""
    if kind == "dense":
        return nn.Linear(in_features, out_features, bias=False)
    if kind == "lowrank":
        layer: nn.Module = LowRankLinear(in_features, out_features, rank)
    elif kind == "blockdense":
        layer = BlockDenseLinear(in_features, out_features, rank, blocks)
    elif kind == "blockshuffle":
        layer = BlockShuffleLinear(in_features, out_features, blocks)
    else:
        raise ValueError(f"unknown structured linear kind {kind!r}; expected one of {KINDS}")
    return SelfGuided(layer) if self_guided else layer


def structured_param_count(kind: str, in_features: int, out_features: int, *, rank: int = 0,
                           blocks: int = 1) -> int:
    """Parameters of one layer from the formulas of docs/methods.md (the guide of self-guided training excluded)."""
    N, M = in_features, out_features
    counts = {"dense": M * N, "lowrank": (N + M) * rank, "blockdense": rank * (M + N // blocks),
              "blockshuffle": min(N, M) * (N + M) // blocks}
    if kind not in counts:
        raise ValueError(f"unknown structured linear kind {kind!r}; expected one of {KINDS}")
    return counts[kind]


def alpha_at(step: int, guided_steps: int) -> float:
    """Guide weight after ``step`` optimizer steps: cosine 1 -> 0 over ``guided_steps``, then 0."""
    if guided_steps <= 0:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * min(step, guided_steps) / guided_steps))


def guided_layers(model: nn.Module) -> list[SelfGuided]:
    return [m for m in model.modules() if isinstance(m, SelfGuided)]


def set_guided_phase(model: nn.Module, step: int, guided_steps: int, reduce_flop: bool = False) -> None:
    """The self-guided layers as they are after ``step`` optimizer steps: past the guided phase the guides are
    gone (a checkpoint of that step holds none); within it alpha is alpha_at(step), the value the authors' code
    holds after its per-step update (and the one the next training step uses)."""
    for layer in guided_layers(model):
        layer.reduce_flop = reduce_flop
        if step >= guided_steps:
            layer.remove_guide()
        else:
            layer.alpha = alpha_at(step, guided_steps)


@torch.no_grad()
def premerge(model: nn.Module) -> nn.Module:
    """Replace every structured (or self-guided) linear in ``model`` by the ``nn.Linear`` holding its exact
    dense matrix, in place: a trained structured model becomes an ordinary dense one (e.g. for export)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if hasattr(child, "dense_weight"):
                weight = child.dense_weight()
                dense = nn.Linear(child.in_features, child.out_features, bias=False,
                                  device=weight.device, dtype=weight.dtype)
                dense.weight.copy_(weight)
                setattr(parent, name, dense)
    return model
