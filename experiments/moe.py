"""Mixture of experts against a dense model of the same active parameters, and the routers against each other
(docs/results.md, MoE): dense (FFN width f), 8 experts of width f/2 with top-2 softmax routing, noisy top-2, hash
routing (top-1 over 8 experts of width f), and top-2 without the balance and z losses. Same data, steps and seeds.

Reported per variant and seed: the validation curve against training FLOPs (the MoE FLOPs count the experts a
token visits), the final validation loss, and the load balance over training (coefficient of variation of the
tokens per expert, averaged over the MoE layers). Runs are cached in OUT/runs, so an interrupted experiment resumes.

    python experiments/moe.py                  # CPU: 4 x 128, 300 steps, 3 seeds, about 26 minutes
    python experiments/moe.py --scale gpu      # 12 x 512, 2000 steps, 3 seeds
    python experiments/moe.py --scale toy      # seconds: what the test suite runs
    python experiments/moe.py --steps 1200 --variants dense top2 hash   # longer, some variants (out: moe_1200steps)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runner import device_name, output_dir, save_figure, seed_summary, train, validation, write  # noqa: E402

SCALES = {
    "toy": {"model": ["model.hidden_size=64", "model.num_heads=4", "model.num_kv_heads=0", "tokenizer.vocab_size=600",
                      "data.embedded_docs=120", "train.precision=fp32", "tokenizer.path={out}/cache/tokenizer.model",
                      "data.prefix={out}/cache/corpus"],
            "layers": 2, "ffn": 128, "steps": 8, "seq": 64, "batch": 8, "eval": 4, "seeds": [1],
            "variants": ["dense", "top2", "hash"]},
    "cpu": {"model": ["model.hidden_size=128", "model.num_heads=4", "model.num_kv_heads=0", "train.precision=fp32",
                      "data.prefix={out}/cache/corpus"],
            "layers": 4, "ffn": 352, "steps": 300, "seq": 128, "batch": 16, "eval": 25, "seeds": [1234, 1235, 1236]},
    "gpu": {"model": ["model.hidden_size=512", "model.num_heads=8", "model.num_kv_heads=0", "train.precision=bf16",
                      "data.prefix={out}/cache/corpus"],
            "layers": 12, "ffn": 1408, "steps": 2000, "seq": 512, "batch": 32, "eval": 100, "seeds": [1234, 1235, 1236]},
}


def variants(ffn: int) -> dict[str, list[str]]:
    """Each variant's overrides; every MoE variant has the dense model's active FFN parameters per token."""
    moe = ["model.moe.num_experts=8", f"model.moe.expert_ffn_hidden_size={ffn // 2}", "model.moe.top_k=2"]
    return {
        "dense": [],
        "top2": moe,
        "noisy_top2": [*moe, "model.moe.router=noisy_topk"],
        "hash": ["model.moe.num_experts=8", f"model.moe.expert_ffn_hidden_size={ffn}", "model.moe.top_k=1",
                 "model.moe.router=hash"],
        "top2_no_aux_losses": [*moe, "model.moe.balance_coef=0", "model.moe.z_coef=0"],
    }


COLORS = {"dense": "black", "top2": "tab:blue", "noisy_top2": "tab:green", "hash": "tab:orange",
          "top2_no_aux_losses": "tab:red"}


def load_cv(records: list[dict]) -> list[tuple[int, float]]:
    """(step, mean over MoE layers of the tokens-per-expert coefficient of variation) at every logged step."""
    out = []
    for r in records:
        cvs = [v for k, v in r.items() if k.startswith("moe/") and k.endswith("/load_cv")]
        if cvs:
            out.append((r["step"], statistics.mean(cvs)))
    return out


def run(scale: str, out: Path, log=print, steps: int | None = None, names: list[str] | None = None,
        seeds: list[int] | None = None) -> dict:
    s = {**SCALES[scale], **({"steps": steps} if steps else {}), **({"variants": names} if names else {}),
         **({"seeds": seeds} if seeds else {})}
    common = [*(o.format(out=out) for o in s["model"]), f"model.num_layers={s['layers']}",
              f"model.ffn_hidden_size={s['ffn']}", f"data.seq_len={s['seq']}", f"data.micro_batch_size={s['batch']}",
              f"data.global_batch_size={s['batch']}", "optim.warmup_steps=20", f"train.max_steps={s['steps']}",
              f"train.eval_interval={s['eval']}", "train.eval_iters=4", f"train.log_interval={max(1, s['eval'] // 5)}",
              "checkpoint.interval=0", "checkpoint.keep=1"]
    table = variants(s["ffn"])
    results: dict = {}
    for seed in s["seeds"]:
        for name in s.get("variants", table):
            records = train(out / "runs" / f"{name}_{seed}", [*common, *table[name], f"train.seed={seed}"], log=log)
            curve = validation(records)
            cv = load_cv(records)
            results.setdefault(name, {})[seed] = {"final_val_loss": curve[-1][1], "curve": curve, "load_cv": cv,
                                                  "final_load_cv": cv[-1][1] if cv else None}
            log(f"  {name} seed {seed}: final val loss {curve[-1][1]:.4f}"
                + (f", load CV {cv[-1][1]:.3f}" if cv else ""))
    summary = seed_summary(results)
    result = {"scale": scale, "device": device_name(), "settings": s, "variants": results, "final_val_loss": summary,
              "command": f"python experiments/moe.py --scale {scale}"
              + (f" --steps {steps}" if steps else "") + (f" --variants {' '.join(names)}" if names else "")
              + (f" --seeds {' '.join(map(str, seeds))}" if seeds else "")}
    write(out, "moe", result)
    plot(result, out / "moe.png")
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, cv_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for name, seeds in result["variants"].items():
        for i, r in enumerate(seeds.values()):
            label = name if i == 0 else None
            loss_ax.plot([c[0] for c in r["curve"]], [c[1] for c in r["curve"]], color=COLORS[name], label=label, lw=1)
            if r["load_cv"]:
                cv_ax.plot([c[0] for c in r["load_cv"]], [c[1] for c in r["load_cv"]], color=COLORS[name],
                           label=label, lw=1)
    loss_ax.set(title="validation loss", xlabel="training FLOPs", ylabel="loss")
    cv_ax.set(title="load imbalance (CV of tokens per expert)", xlabel="step", ylabel="CV")
    loss_ax.legend(fontsize=8)
    fig.suptitle(f"MoE vs dense at equal active parameters ({result['scale']}, {len(result['settings']['seeds'])} "
                 "seed(s))", fontsize=11)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=list(SCALES), default="cpu")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the scale's)")
    parser.add_argument("--variants", nargs="+", choices=list(variants(1)), default=None,
                        help="only these variants (default: the scale's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="these seeds instead of the scale's")
    parser.add_argument("--out", default=None,
                        help="default experiments/out/moe (_gpu for --scale gpu; _STEPSsteps with --steps)")
    args = parser.parse_args()
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    name = f"moe_{args.steps}steps" if args.steps else "moe"
    result = run(args.scale, output_dir(args.out, name, args.scale), steps=args.steps, names=args.variants,
                 seeds=args.seeds)
    for name, summary in result["final_val_loss"].items():
        print(f"{name:<19} final validation loss {summary['mean']:.4f} (seeds {summary['min']:.4f}-{summary['max']:.4f})")


if __name__ == "__main__":
    main()
