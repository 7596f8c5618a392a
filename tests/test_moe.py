"""Mixture of experts (docs/methods.md): routers, losses, capacity, grouped GEMM vs loop vs dense reference."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import FFNConfig, ModelConfig, MoEConfig
from pretrain.models.ffn import FFN
from pretrain.models.moe import MoE, MoEContext, moe_layers
from pretrain.models.structured import LowRankLinear, structured_linear

D, FF, E, VOCAB = 16, 24, 4, 50


def make_moe(seed: int = 0, std: float = 0.3, activation: str = "swiglu", factory=None, grouped: bool = False,
             **moe) -> MoE:
    cfg = ModelConfig(hidden_size=D, ffn_hidden_size=FF, vocab_size=VOCAB, ffn=FFNConfig(activation=activation),
                      moe=MoEConfig(**{"num_experts": E, "top_k": 2, **moe}))
    layer = MoE(cfg, factory, grouped=grouped)
    layer.init_weights(torch.Generator().manual_seed(seed), std)
    return layer


def run(layer: MoE, x: torch.Tensor, ids: torch.Tensor | None = None,
        loss_scale: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A training forward: the output (router loss attached) and the statistics it recorded."""
    context = MoEContext(loss_scale=loss_scale)
    out = layer(x, ids, moe=context)
    return out, context.stats[layer.layer_idx]


def expert_on_all_tokens(layer: MoE, e: int, x: torch.Tensor) -> torch.Tensor:
    if layer.experts is not None:
        return layer.experts[e](x)
    up = x @ layer.w_up[e].T
    hidden = F.silu(x @ layer.w_gate[e].T) * up if layer.activation == "swiglu" else F.gelu(up)
    return hidden @ layer.w_down[e].T


def reference_forward(layer: MoE, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Every expert on every token, combined with the routing weights; capacity by a plain counter."""
    B, S, d = x.shape
    T, k = B * S, layer.top_k
    xf = x.reshape(T, d)
    idx, weight, _ = layer.router(xf, None if token_ids is None else token_ids.reshape(T))
    keep = torch.ones(T, k)
    if layer.capacity_factor > 0:
        capacity = math.ceil(layer.capacity_factor * k * T / layer.num_experts)
        seen = [0] * layer.num_experts
        for j in range(k):  # all first choices before any second choice
            for t in range(T):
                e = int(idx[t, j])
                keep[t, j] = float(seen[e] < capacity)
                seen[e] += 1
    dense = torch.stack([expert_on_all_tokens(layer, e, xf) for e in range(layer.num_experts)])
    chosen = dense[idx, torch.arange(T)[:, None]]  # (T, k, d)
    out = (chosen * (weight * keep)[..., None]).sum(dim=1)
    for shared in layer.shared_experts:
        out = out + shared(xf)
    return out.view(B, S, d)


def grads(layer: MoE, x: torch.Tensor, out: torch.Tensor, probe: torch.Tensor) -> list[torch.Tensor]:
    inputs = [x, *layer.parameters()]
    gs = torch.autograd.grad((out * probe).sum(), inputs, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(inputs, gs, strict=True)]


def logits_routed(logits: list[list[float]]) -> tuple[MoE, torch.Tensor]:
    """A top-k softmax MoE whose router logits are exactly ``logits``: router weight = [I 0], the first E
    input features are the logits, the rest random (invisible to the router)."""
    layer = make_moe(top_k=1)
    return layer, _with_logits(layer, logits)


def _with_logits(layer: MoE, logits: list[list[float]]) -> torch.Tensor:
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:, :E] = torch.eye(E)
    x = torch.randn(1, len(logits), D)
    x[0, :, :E] = torch.tensor(logits)
    return x


def test_topk_softmax_weights_are_softmax_over_selected_logits_and_sum_to_one():
    layer = make_moe(top_k=2)
    x = torch.randn(32, D)
    idx, weight, _ = layer.router(x)
    logits = x @ layer.router.weight.T
    assert torch.equal(idx.sort(dim=1).values, logits.topk(2, dim=1).indices.sort(dim=1).values)
    expected = logits.gather(1, idx).softmax(dim=1)
    torch.testing.assert_close(weight, expected)
    torch.testing.assert_close(weight.sum(dim=1), torch.ones(32))
    full = logits.softmax(dim=1).gather(1, idx)
    torch.testing.assert_close(weight, full / full.sum(dim=1, keepdim=True))


def test_balance_and_z_loss_match_hand_computation():
    logits = [[2.0, 0, 0, 0], [2.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 3.0]]
    layer, x = logits_routed(logits)
    _, stats = run(layer, x)
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits]
    frac = [2 / 4, 1 / 4, 0, 1 / 4]  # top-1 experts 0, 0, 1, 3
    mean_prob = [sum(p[e] for p in probs) / 4 for e in range(E)]
    balance = E * sum(f * p for f, p in zip(frac, mean_prob, strict=True))
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits) / 4
    assert stats["balance_loss"].item() == pytest.approx(balance, rel=1e-5)
    assert stats["z_loss"].item() == pytest.approx(z, rel=1e-5)
    assert stats["router_loss"].item() == pytest.approx(0.01 * balance + 0.001 * z, rel=1e-5)


@pytest.mark.parametrize("grouped", [True, False])
def test_capacity_drops_exactly_the_overflow_in_token_order(grouped):
    targets = [0, 0, 1, 0, 0, 1, 0, 0]  # six tokens to expert 0, capacity ceil(2.0 * 1 * 8 / 4) = 4
    layer, x = logits_routed([[5.0 * (e == t) for e in range(E)] for t in targets])
    layer.capacity_factor, layer.grouped = 2.0, grouped
    out, stats = run(layer, x)
    out = out[0]
    expert0 = expert_on_all_tokens(layer, 0, x[0])
    torch.testing.assert_close(out[[0, 1, 3, 4]], expert0[[0, 1, 3, 4]])
    assert torch.equal(out[[6, 7]], torch.zeros(2, D))
    torch.testing.assert_close(out[[2, 5]], expert_on_all_tokens(layer, 1, x[0])[[2, 5]])
    assert torch.equal(stats["tokens_per_expert"], torch.tensor([4.0, 2, 0, 0]))
    assert stats["dropped_fraction"].item() == pytest.approx(2 / 8)


@pytest.mark.parametrize("grouped", [True, False])
def test_capacity_serves_every_first_choice_before_any_second_choice(grouped):
    # Token 0 prefers expert 1 then 0; tokens 1-3 prefer 0 then 1. Capacity ceil(0.75 * 2 * 4 / 2) = 3:
    # expert 0 keeps the first choices of tokens 1-3 and drops token 0's second choice, although token 0
    # comes first; expert 1 keeps token 0 (first choice) and the second choices of tokens 1, 2.
    layer = make_moe(num_experts=2, top_k=2, capacity_factor=0.75)
    layer.grouped = grouped
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:, :2] = torch.eye(2)
    x = torch.randn(1, 4, D)
    x[0, :, :2] = torch.tensor([[0.0, 2.0], [2.0, 0.0], [2.0, 0.0], [2.0, 0.0]])
    out, stats = run(layer, x)
    out = out[0]
    e0, e1 = (expert_on_all_tokens(layer, e, x[0]) for e in range(2))
    w_first, w_second = torch.tensor([2.0, 0.0]).softmax(0)
    torch.testing.assert_close(out[0], w_first * e1[0])
    torch.testing.assert_close(out[1:3], w_first * e0[1:3] + w_second * e1[1:3])
    torch.testing.assert_close(out[3], w_first * e0[3])
    assert torch.equal(stats["tokens_per_expert"], torch.tensor([3.0, 3.0]))


def test_dropless_keeps_every_assignment_however_unbalanced():
    layer, x = logits_routed([[5.0, 0, 0, 0]] * 32)
    out, stats = run(layer, x)
    assert torch.equal(stats["tokens_per_expert"], torch.tensor([32.0, 0, 0, 0]))
    assert stats["dropped_fraction"].item() == 0.0
    torch.testing.assert_close(out, reference_forward(layer, x))


@pytest.mark.parametrize("activation,top_k,capacity", [("swiglu", 2, 0.0), ("gelu", 2, 0.0),
                                                       ("swiglu", 1, 0.0), ("swiglu", 2, 0.75)])
def test_grouped_gemm_and_expert_loop_match_dense_reference_outputs_and_grads(activation, top_k, capacity):
    layer = make_moe(activation=activation, top_k=top_k, capacity_factor=capacity, num_shared_experts=1)
    x = torch.randn(2, 16, D, requires_grad=True)
    probe = torch.randn(2, 16, D)
    expected = reference_forward(layer, x)
    expected_grads = grads(layer, x, expected, probe)
    for grouped in (True, False):
        layer.grouped = grouped
        out = layer(x)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        for got, want in zip(grads(layer, x, out, probe), expected_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if capacity:
        assert run(layer, x)[1]["dropped_fraction"].item() > 0


def test_grouped_gemm_matches_expert_loop_under_bf16_autocast():
    layer = make_moe()
    x = torch.randn(2, 16, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer.grouped = True
        grouped = layer(x)
        layer.grouped = False
        looped = layer(x)
    assert grouped.dtype == torch.float32
    torch.testing.assert_close(grouped, looped, rtol=2e-2, atol=2e-2)


def test_hash_routing_is_deterministic_and_parameter_free():
    ids = torch.randint(VOCAB, (2, 16))
    first, second = make_moe(seed=0, router="hash", top_k=1), make_moe(seed=1, router="hash", top_k=1)
    assert list(first.router.parameters()) == []
    assert {name for name, _ in first.named_parameters()} == {"w_gate", "w_up", "w_down"}
    x = torch.randn(32, D)
    idx, weight, _ = first.router(x, ids.reshape(-1))
    assert torch.equal(idx, first.router(torch.randn(32, D), ids.reshape(-1))[0])
    assert torch.equal(idx, second.router(x, ids.reshape(-1))[0])
    assert torch.equal(weight, torch.ones(32, 1))
    flat_ids, expert = ids.reshape(-1), idx[:, 0]
    same_id = flat_ids[:, None] == flat_ids[None, :]
    assert bool((expert[:, None] == expert[None, :])[same_id].all())
    assert run(first, x.view(2, 16, D), ids)[1]["router_loss"].item() == 0.0
    torch.testing.assert_close(first(x.view(2, 16, D), ids), reference_forward(first, x.view(2, 16, D), ids))


def test_hash_routing_with_top_k_picks_distinct_experts_and_needs_token_ids():
    layer = make_moe(router="hash", top_k=2)
    idx, weight, _ = layer.router(torch.randn(VOCAB, D), torch.arange(VOCAB))
    assert bool((idx[:, 0] != idx[:, 1]).all())
    torch.testing.assert_close(weight, torch.full((VOCAB, 2), 0.5))
    with pytest.raises(ValueError, match="token id"):
        layer(torch.randn(1, 4, D))


def test_hash_table_survives_meta_device_materialisation():
    cfg = ModelConfig(hidden_size=D, ffn_hidden_size=FF, vocab_size=VOCAB,
                      moe=MoEConfig(num_experts=E, top_k=1, router="hash"))
    with torch.device("meta"):
        layer = MoE(cfg)
    layer.to_empty(device="cpu")
    layer.init_weights(torch.Generator().manual_seed(0), 0.3)
    ids = torch.arange(VOCAB)
    assert torch.equal(layer.router(torch.zeros(VOCAB, D), ids)[0], make_moe(router="hash", top_k=1).router(
        torch.zeros(VOCAB, D), ids)[0])


def test_noisy_topk_starts_with_zero_gates_and_is_deterministic_in_eval():
    layer = make_moe(router="noisy_topk")
    assert not layer.router.w_gate.any() and not layer.router.w_noise.any()
    layer.eval()
    x = torch.randn(2, 16, D)
    _, weight, aux = layer.router(x.view(32, D))
    torch.testing.assert_close(weight, torch.full((32, 2), 0.5))
    assert torch.equal(layer(x), layer(x))
    assert aux["z"].item() == pytest.approx(math.log(E) ** 2)


def test_noisy_topk_noise_changes_routing_only_in_training():
    layer = make_moe(router="noisy_topk")
    with torch.no_grad():
        layer.router.w_gate.normal_(0, 0.1)
        layer.router.w_noise.normal_(0, 1.0)
    x = torch.randn(64, D)
    layer.eval()
    assert torch.equal(layer.router(x)[0], layer.router(x)[0])
    layer.train()
    torch.manual_seed(0)
    assert not torch.equal(layer.router(x)[0], layer.router(x)[0])


def cv2(v: torch.Tensor) -> float:
    return (v.var(correction=0) / v.mean() ** 2).item()


def test_noisy_topk_balance_in_eval_is_importance_plus_hard_load_cv_squared():
    layer = make_moe(router="noisy_topk")
    with torch.no_grad():
        layer.router.w_gate.normal_(0, 0.5)
    x = torch.randn(64, D)
    layer.eval()
    idx, weight, aux = layer.router(x)
    gates = torch.zeros(64, E).scatter(1, idx, weight)
    importance, load = gates.sum(0), (gates > 0).float().sum(0)
    assert aux["balance"].item() == pytest.approx(cv2(importance) + cv2(load), rel=1e-4)


def test_noisy_topk_training_load_is_shazeers_smooth_estimator():
    layer = make_moe(router="noisy_topk", top_k=2)
    with torch.no_grad():
        layer.router.w_gate.normal_(0, 0.5)
        layer.router.w_noise.normal_(0, 0.5)
    x = torch.randn(64, D)
    torch.manual_seed(3)
    idx, weight, aux = layer.router(x)
    torch.manual_seed(3)
    clean = x @ layer.router.w_gate.T
    std = F.softplus(x @ layer.router.w_noise.T) + 1e-2
    noisy = (clean + torch.randn(64, E) * std).detach()
    # P(e in top-k) = Phi((clean_e - k-th largest noisy logit among the other experts) / std_e), per token.
    load = torch.zeros(E)
    for t in range(64):
        for e in range(E):
            others = torch.cat([noisy[t, :e], noisy[t, e + 1:]])
            kth = others.topk(2).values[-1]
            load[e] += torch.distributions.Normal(0.0, 1.0).cdf((clean[t, e] - kth) / std[t, e]).item()
    importance = torch.zeros(64, E).scatter(1, idx, weight).sum(0)
    assert aux["balance"].item() == pytest.approx(cv2(importance.detach()) + cv2(load), rel=1e-4)
    aux["balance"].backward()
    assert layer.router.w_noise.grad.abs().sum() > 0


def lowrank_expert() -> FFN:
    return FFN(D, FF, "gelu", partial(structured_linear, "lowrank", rank=8))


def test_structured_experts_from_a_factory_match_dense_reference():
    layer = make_moe(factory=lowrank_expert, num_shared_experts=1)
    assert len(layer.experts) == E and isinstance(layer.shared_experts[0].up_proj, LowRankLinear)
    assert not hasattr(layer, "w_up")
    # The structured linears' own init ran (SVD factors: U has orthogonal columns), not a plain N(0, std).
    gram = layer.experts[0].up_proj.U.T @ layer.experts[0].up_proj.U
    torch.testing.assert_close(gram, torch.diag(gram.diagonal()), atol=1e-5, rtol=0)
    x = torch.randn(2, 16, D, requires_grad=True)
    probe = torch.randn(2, 16, D)
    expected = reference_forward(layer, x)
    out = layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads(layer, x, out, probe), grads(layer, x, expected, probe), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_shared_experts_are_added_for_every_token_even_dropped_ones():
    layer = make_moe(num_shared_experts=2, capacity_factor=0.25)
    with torch.no_grad():
        layer.w_down.zero_()
    x = torch.randn(2, 16, D)
    shared = sum(s(x) for s in layer.shared_experts)
    out, stats = run(layer, x)
    torch.testing.assert_close(out, shared)
    assert stats["dropped_fraction"].item() > 0


def test_stats_count_kept_assignments_and_are_detached():
    layer = make_moe(capacity_factor=0.5)
    _, stats = run(layer, torch.randn(2, 16, D))
    assert set(stats) == {"tokens_per_expert", "dropped_fraction", "balance_loss", "z_loss", "router_loss", "load_cv"}
    assert all(not v.requires_grad for v in stats.values())
    tokens = stats["tokens_per_expert"]
    dropped = stats["dropped_fraction"].item()
    assert tokens.sum().item() == pytest.approx(32 * 2 * (1 - dropped))
    assert tokens.max().item() <= math.ceil(0.5 * 2 * 32 / E) and dropped > 0
    assert stats["load_cv"].item() == pytest.approx((tokens.std(correction=0) / tokens.mean()).item())


@pytest.mark.parametrize("router", ["topk_softmax", "noisy_topk"])
def test_router_loss_gets_the_context_scale_as_its_gradient_through_the_output(router):
    """Backward through the layer's output gives the router loss d(total)/d(router loss) = the context's scale:
    the router's gradient equals that of scale x (balance_coef x balance + z_coef x z) added to the loss."""
    layer = make_moe(router=router, capacity_factor=0.5)
    with torch.no_grad():
        for p in layer.router.parameters():
            p.normal_(0, 0.3)
    layer.eval()  # no routing noise: the same routing twice
    x = torch.randn(2, 16, D)
    probe = torch.randn(2, 16, D)
    out, stats = run(layer, x, loss_scale=0.25)
    (out * probe).sum().backward()
    got = [None if p.grad is None else p.grad.clone() for p in layer.router.parameters()]
    layer.zero_grad(set_to_none=True)
    _, _, aux = layer.router(x.view(32, D))
    expected = layer(x) * probe
    (expected.sum() + 0.25 * (0.01 * aux["balance"] + 0.001 * aux["z"])).backward()
    assert got[0].abs().sum() > 0  # the gate (eval: the noise weights get no gradient either way)
    for g, p in zip(got, layer.router.parameters(), strict=True):
        assert (g is None) == (p.grad is None)
        if g is not None:
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)
    assert stats["router_loss"].item() == pytest.approx((0.01 * aux["balance"] + 0.001 * aux["z"]).item(), rel=1e-6)


def test_inference_records_nothing_and_attaches_no_loss():
    layer = make_moe()
    x = torch.randn(1, 8, D, requires_grad=True)
    out = layer(x)
    assert out.grad_fn is not None and "AttachAux" not in type(out.grad_fn).__name__
    context = MoEContext()
    with torch.no_grad():
        layer(x, moe=context)
    assert set(context.stats) == {0}  # statistics still recorded, nothing to attach without a graph


def test_every_layer_records_under_its_block_index():
    from pretrain.models.transformer import build_model

    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=D, num_layers=4, num_heads=2, ffn_hidden_size=FF,
                      moe=MoEConfig(num_experts=E, top_k=2, every_n=2))
    model = build_model(cfg, 0)
    assert moe_layers(model) == [model.blocks["1"].ffn, model.blocks["3"].ffn]
    context = MoEContext()
    model(torch.randint(0, VOCAB, (2, 8)), moe=context)
    assert set(context.stats) == {1, 3}


@pytest.mark.parametrize("factory", [None, lambda: FFN(D, FF, "swiglu"), lowrank_expert])
def test_init_is_deterministic_for_a_generator_seed(factory):
    def state(seed: int) -> dict[str, torch.Tensor]:
        return make_moe(seed=seed, factory=factory, num_shared_experts=1).state_dict()

    first, again, other = state(7), state(7), state(8)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert all(not torch.equal(first[k], other[k]) for k in first)
    if factory is not lowrank_expert:
        assert all(v.std().item() == pytest.approx(0.3, rel=0.3) for v in first.values())


@pytest.mark.parametrize("selective", [False, True])
def test_checkpointed_forward_runs_no_probe_and_matches(selective):
    """The grouped-GEMM support probe (a tiny forward and backward) runs once when the model is prepared, never
    inside a forward: under activation checkpointing its backward started the layer's recompute, and selective
    checkpointing cached its GEMM and replayed it in place of the layer's own."""
    from pretrain.models.moe import grouped_mm_works, use_grouped_gemm
    from pretrain.parallel.activation_checkpointing import save_matmuls
    from pretrain.torch_compat import composable_checkpoint

    x = torch.randn(2, 5, D, requires_grad=True)
    plain, checkpointed = make_moe(), make_moe()
    grouped_mm_works.cache_clear()
    for layer in (plain, checkpointed):
        use_grouped_gemm(layer, torch.device("cpu"), torch.float32)
    probed = grouped_mm_works.cache_info()
    assert probed.currsize == 1 and checkpointed.grouped  # fp32 grouped GEMM runs on this CPU
    context_fn = partial(torch.utils.checkpoint.create_selective_checkpoint_contexts, save_matmuls)
    composable_checkpoint(checkpointed, context_fn=context_fn if selective else None)
    out, _ = run(checkpointed, x)
    out.square().sum().backward()
    expected, _ = run(plain, x.detach())
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    expected.square().sum().backward()
    for a, b in zip(plain.parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    assert grouped_mm_works.cache_info() == probed


def test_compiled_moe_block_has_no_graph_break_with_the_step_context():
    """Compiled after ``use_grouped_gemm`` decided the kernels: no probe in the graph, and the context the engine
    hands to every forward (statistics written into it, the router loss attached) breaks no graph."""
    from torch._dynamo.utils import counters

    from pretrain.models.moe import grouped_mm_works, use_grouped_gemm
    from pretrain.models.transformer import build_model
    from pretrain.parallel.compile import apply_compile

    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=D, num_layers=2, num_heads=2, ffn_hidden_size=FF,
                      moe=MoEConfig(num_experts=E, top_k=2))
    model = build_model(cfg, 0)
    grouped_mm_works.cache_clear()
    torch._dynamo.reset()
    counters.clear()
    use_grouped_gemm(model, torch.device("cpu"), torch.bfloat16, compiled=True)
    apply_compile(model, True)
    probed = grouped_mm_works.cache_info()
    assert probed.currsize == 1
    assert all(layer.grouped for layer in moe_layers(model))  # bf16 grouped GEMM runs on this CPU
    context = MoEContext(loss_scale=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, VOCAB, (2, 8)), moe=context).float().square().mean().backward()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert grouped_mm_works.cache_info() == probed  # not called again, inside the graph or out
    assert set(context.stats) == {0, 1}
    assert all(p.grad is not None for p in model.blocks["0"].ffn.router.parameters())
