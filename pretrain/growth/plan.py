"""When to grow: the growth-timing rule fitted for G_stack (Du et al. 2024, "Stacking Your Transformers"),

    log10 d = 0.88 log10 N + 163.27 / log10 C - 5.74

with d the tokens to spend on the small model, N the target model's parameters and C the target's training
budget in FLOPs (6 N D for D tokens). For 7B parameters and 2T tokens it gives about 11B tokens."""

from __future__ import annotations

import math


def growth_tokens(target_params: float, budget_flops: float) -> float:
    """Tokens to train the small model on before growing (the rule above)."""
    if target_params <= 1 or budget_flops <= 10:
        raise ValueError("the rule needs a target of more than one parameter and a budget of more than 10 FLOPs")
    return 10 ** (0.88 * math.log10(target_params) + 163.27 / math.log10(budget_flops) - 5.74)


def growth_plan(target_params: float, tokens: float, tokens_per_step: int | None = None,
                factor: int = 4) -> dict:
    """The rule's answer for a target of ``target_params`` trained on ``tokens``, and with ``tokens_per_step`` what it
    means for a run: the step to grow at, and the share of the budget the small model (``factor`` times smaller
    in depth) costs."""
    budget = 6.0 * target_params * tokens
    d = growth_tokens(target_params, budget)
    plan = {"target_params": target_params, "tokens": tokens, "budget_flops": budget, "growth_tokens": d,
            "growth_share_of_tokens": d / tokens, "small_model_flops": 6.0 * target_params / factor * d,
            "factor": factor}
    if tokens_per_step:
        plan["tokens_per_step"] = tokens_per_step
        plan["grow_at_step"] = max(1, round(d / tokens_per_step))
        plan["steps_after_growth"] = max(0, round((tokens - d) / tokens_per_step))
    return plan


def format_plan(plan: dict) -> str:
    def n(x: float) -> str:
        for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
            if abs(x) >= size:
                return f"{x / size:.3g}{unit}"
        return f"{x:.3g}"

    lines = [f"target: {n(plan['target_params'])} parameters, {n(plan['tokens'])} tokens, {plan['budget_flops']:.3g} FLOPs",
             f"grow after {n(plan['growth_tokens'])} tokens on the small model ({100 * plan['growth_share_of_tokens']:.2g}% "
             f"of the tokens; log10 d = 0.88 log10 N + 163.27 / log10 C - 5.74)",
             f"the small model (1/{plan['factor']} of the depth) costs about {plan['small_model_flops']:.3g} FLOPs "
             f"({100 * plan['small_model_flops'] / plan['budget_flops']:.2g}% of the budget)"]
    if plan["budget_flops"] < 1e20 or plan["growth_share_of_tokens"] >= 1:
        lines.append("caution: the rule was fitted on models of hundreds of millions to billions of parameters and budgets above "
                     "1e20 FLOPs; "
                     "this target is outside that range"
                     + (" and the rule asks for more tokens than the whole run" if plan["growth_share_of_tokens"] >= 1
                        else "") + ": pick the growth point yourself (a tenth to a fifth of the tokens is common).")
    if "grow_at_step" in plan and plan["growth_share_of_tokens"] < 1:
        lines.append(f"with {plan['tokens_per_step']:,} tokens a step: grow at step {plan['grow_at_step']:,}, then "
                     f"{plan['steps_after_growth']:,} steps of the grown model")
    return "\n".join(lines)
