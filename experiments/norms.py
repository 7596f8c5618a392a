"""Where the norm sits, on a deep and thin model (docs/results.md, normalization): Pre-LN, Post-LN, Mix-LN, LayerNorm
Scaling, sandwich and DyT at one learning rate high enough for Post-LN to struggle, the same data, seeds and steps.

Reported per variant and seed: the validation curve against FLOPs and the final validation loss; each block's
gradient norm and the angular distance between its input and output late in training (the pictures behind Mix-LN
and LNS: deep Pre-LN blocks barely change the residual stream); and the validation loss with each block removed in
turn (how much the model uses it). Runs are cached in OUT/runs, so an interrupted experiment resumes.

    python experiments/norms.py                  # CPU: 16 x 128, 200 steps, 3 seeds, about 26 minutes
    python experiments/norms.py --lr 1e-3        # the same at the Mix-LN paper's learning rate (out: norms_lr0.001)
    python experiments/norms.py --steps 300      # longer (out: norms_300steps; about 40 minutes)
    python experiments/norms.py --scale gpu      # 24 x 512, 2000 steps, 3 seeds
    python experiments/norms.py --scale toy      # seconds: what the test suite runs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runner import device_name, metrics, output_dir, save_figure, seed_summary, train, validation, write  # noqa: E402

SCALES = {
    "toy": {"model": ["model.hidden_size=64", "model.num_heads=4", "model.num_kv_heads=0", "model.ffn_hidden_size=128",
                      "tokenizer.vocab_size=600", "data.embedded_docs=120", "train.precision=fp32",
                      "tokenizer.path={out}/cache/tokenizer.model", "data.prefix={out}/cache/corpus"],
            "layers": 4, "steps": 8, "seq": 64, "batch": 8, "lr": 2e-3, "eval": 4, "seeds": [1], "held_out": 4,
            "variants": ["pre_ln", "post_ln", "lns"]},  # (the same code path for every variant: three suffice)
    "cpu": {"model": ["model.hidden_size=128", "model.num_heads=4", "model.num_kv_heads=0", "model.ffn_hidden_size=352",
                      "train.precision=fp32", "data.prefix={out}/cache/corpus"],
            "layers": 16, "steps": 200, "seq": 128, "batch": 16, "lr": 2e-3, "eval": 25, "seeds": [1234, 1235, 1236],
            "held_out": 32},
    "gpu": {"model": ["model.hidden_size=512", "model.num_heads=8", "model.num_kv_heads=0", "model.ffn_hidden_size=1408",
                      "train.precision=bf16", "data.prefix={out}/cache/corpus"],
            "layers": 24, "steps": 2000, "seq": 512, "batch": 32, "lr": 2e-3, "eval": 100, "seeds": [1234, 1235, 1236],
            "held_out": 64},
}
VARIANTS = {
    "pre_ln": ["model.norm_placement=pre"],
    "post_ln": ["model.norm_placement=post"],
    "mix_ln": ["model.norm_placement=mix", "model.mix_ln_ratio=0.25"],
    "lns": ["model.norm_placement=pre", "model.norm_scaling=lns"],
    "sandwich": ["model.norm_placement=sandwich"],
    "dyt": ["model.norm_placement=pre", "model.norm=dyt"],
}
COLORS = {"pre_ln": "tab:blue", "post_ln": "tab:red", "mix_ln": "tab:green", "lns": "tab:purple",
          "sandwich": "tab:orange", "dyt": "tab:brown"}


def held_out_tokens(run_dir: Path, seq: int, rows: int) -> torch.Tensor:
    """(rows, seq + 1) token ids from the run's validation split, the same for every variant of a seed."""
    from pretrain.config import load_config
    from pretrain.data.loader import build_datasets
    from pretrain.data.prepare import ensure_data, ensure_tokenizer

    cfg = load_config(run_dir / "config.yaml")
    tokenizer = ensure_tokenizer(cfg, log=lambda *a: None)
    _, valid = build_datasets(cfg, ensure_data(cfg, tokenizer, log=lambda *a: None), tokenizer,
                              run_dir / "data_index", 0, rows)
    samples = [valid[i % len(valid)] for i in range(rows)]
    return torch.stack([torch.cat([s["tokens"], s["labels"][-1:]]) for s in samples]).long()


@torch.no_grad()
def loss_without_each_block(run_dir: Path, tokens: torch.Tensor) -> tuple[float, list[float]]:
    """Validation loss of the trained model, and with each block in turn replaced by the identity."""
    import pretrain

    model = pretrain.load_model(run_dir)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    def loss(skip: int | None) -> float:
        x = model.embed(inputs)
        rope = model.rope(inputs.shape[1], inputs.device)
        for i, block in enumerate(model.blocks.values()):
            if i != skip:
                x = block(x, rope, inputs)
        logits = model.head(model.norm(x))
        return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()))

    return loss(None), [loss(i) for i in range(len(model.blocks))]


def depth_profile(records: list[dict], layers: int) -> dict:
    """The last depth-diagnostics record: per-block gradient norm and angular distance."""
    last = [r for r in records if "depth/grad_norm/0" in r][-1]
    return {"step": last["step"],
            "grad_norm": [last[f"depth/grad_norm/{i}"] for i in range(layers)],
            "angular_distance": [last[f"depth/angular_distance/{i}"] for i in range(layers)]}


def run(scale: str, out: Path, log=print, only_seeds: list[int] | None = None, lr: float | None = None,
        steps: int | None = None) -> dict:
    s = {**SCALES[scale], **({"seeds": only_seeds} if only_seeds else {}), **({"lr": lr} if lr else {}),
         **({"steps": steps} if steps else {})}
    common = [*(o.format(out=out) for o in s["model"]), f"model.num_layers={s['layers']}", f"data.seq_len={s['seq']}",
              f"data.micro_batch_size={s['batch']}", f"data.global_batch_size={s['batch']}", f"optim.lr={s['lr']}",
              "optim.warmup_steps=20", f"train.max_steps={s['steps']}", f"train.eval_interval={s['eval']}",
              "train.eval_iters=4", "train.log_interval=25", f"checkpoint.interval={s['steps']}", "checkpoint.keep=1",
              f"logging.depth_interval={max(1, s['steps'] // 4)}", "train.skip_nonfinite=true",
              "train.max_nonfinite_steps=1000000"]
    results: dict = {}
    for seed in s["seeds"]:
        tokens = None
        for name in s.get("variants", VARIANTS):
            overrides = VARIANTS[name]
            run_dir = out / "runs" / f"{name}_{seed}"
            records = train(run_dir, [*common, *overrides, f"train.seed={seed}"], log=log)
            curve = validation(records)
            if tokens is None:
                tokens = held_out_tokens(run_dir, s["seq"], s["held_out"])
            full, removed = loss_without_each_block(run_dir, tokens)
            results.setdefault(name, {})[seed] = {
                "final_val_loss": curve[-1][1], "curve": curve, **depth_profile(metrics(run_dir), s["layers"]),
                "held_out_loss": full, "loss_without_block": removed,
                "skipped_steps": max((r.get("skipped_steps", 0) for r in records), default=0)}
            log(f"  {name} seed {seed}: final val loss {curve[-1][1]:.4f}")
    summary = seed_summary(results)
    result = {"scale": scale, "device": device_name(), "settings": s, "variants": results, "final_val_loss": summary,
              "command": f"python experiments/norms.py --scale {scale}" + (f" --lr {lr:g}" if lr else "")
                         + (f" --steps {steps}" if steps else "")
                         + (f" --seeds {' '.join(map(str, only_seeds))}" if only_seeds else "")}
    write(out, "norms", result)
    plot(result, out / "norms.png")
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for name, seeds in result["variants"].items():
        color = COLORS[name]
        for i, r in enumerate(seeds.values()):
            label = name if i == 0 else None
            axes[0, 0].plot([c[0] for c in r["curve"]], [c[1] for c in r["curve"]], color=color, label=label, lw=1)
            blocks = range(len(r["grad_norm"]))
            axes[0, 1].plot(blocks, r["grad_norm"], color=color, label=label, lw=1, marker=".")
            axes[1, 0].plot(blocks, r["angular_distance"], color=color, label=label, lw=1, marker=".")
            axes[1, 1].plot(blocks, [x - r["held_out_loss"] for x in r["loss_without_block"]], color=color,
                            label=label, lw=1, marker=".")
    titles = [("validation loss", "training FLOPs", "loss"), ("gradient norm per block (late)", "block", "norm"),
              ("angular distance input -> output (late)", "block", "arccos(cos) / pi"),
              ("loss increase with the block removed", "block", "nats")]
    for ax, (title, xlabel, ylabel) in zip(axes.flat, titles, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    axes[0, 1].set_yscale("log")
    axes[1, 1].set_yscale("symlog", linthresh=0.01)
    axes[0, 0].legend(fontsize=8)
    s = result["settings"]
    fig.suptitle(f"norm placements, {s['layers']} blocks, lr {s['lr']}, {s['steps']} steps, {len(s['seeds'])} seed(s) "
                 f"({result['scale']})",
                 fontsize=11)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=list(SCALES), default="cpu")
    parser.add_argument("--out", default=None,
                        help="default experiments/out/norms (_lrLR with --lr, _STEPSsteps with --steps, _gpu for "
                             "--scale gpu)")
    parser.add_argument("--seeds", type=int, nargs="*", help="these seeds instead of the scale's")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate instead of the scale's (2e-3)")
    parser.add_argument("--steps", type=int, default=None, help="training steps instead of the scale's")
    args = parser.parse_args()
    if args.lr is not None and not 0 < args.lr < 1:
        parser.error(f"--lr {args.lr:g}: a peak learning rate between 0 and 1, e.g. --lr 5e-4")
    if args.steps is not None and args.steps < 4:
        parser.error(f"--steps {args.steps}: at least 4 (the depth diagnostics are read every steps/4), e.g. --steps 300")
    name = "norms" + (f"_lr{args.lr:g}" if args.lr else "") + (f"_{args.steps}steps" if args.steps else "")
    result = run(args.scale, output_dir(args.out, name, args.scale), only_seeds=args.seeds, lr=args.lr,
                 steps=args.steps)
    for name, summary in result["final_val_loss"].items():
        print(f"{name:<9} final validation loss {summary['mean']:.4f} (seeds {summary['min']:.4f}-{summary['max']:.4f})")


if __name__ == "__main__":
    main()
