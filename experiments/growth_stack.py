"""G_stack against training from scratch at the same compute (docs/results.md, growth).

A target model is trained from scratch for ``steps`` steps; that is the budget B in FLOPs. The grown run trains a
model of 1/g the depth for a share of the scratch run's tokens, stacks it g times in the middle of the run
(``growth:``, G_stack), and trains the stacked model until it too has spent B, the small model's FLOPs included.
Reported per seed: the FLOPs and tokens each run needed to reach the scratch run's final validation loss, and the
validation curves against FLOPs (PNG). Runs are cached in OUT/runs, so an interrupted experiment resumes.

    python experiments/growth_stack.py                       # CPU: 8 x 128 target, 3 seeds, about 15 minutes
    python experiments/growth_stack.py --scale gpu           # 12 x 512 target from 3 x 512 on Python sources, 2 seeds
    python experiments/growth_stack.py --scale gpu --prepare # only the data (then train where it was carried)
    python experiments/growth_stack.py --scale toy           # seconds: what the test suite runs
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from code_corpus import write_corpus  # noqa: E402
from runner import (  # noqa: E402
    REPO,
    device_name,
    first_reaching,
    plot_curves,
    run_pretrain,
    train,
    validation,
    wall_seconds,
    write,
)

SCALES = {
    "toy": {"model": ["model.hidden_size=64", "model.num_heads=4", "model.num_kv_heads=0",
                      "model.ffn_hidden_size=128", "tokenizer.vocab_size=600", "data.embedded_docs=120", "train.precision=fp32"],
            "layers": 4, "factor": 2, "steps": 12, "seq": 64, "batch": 8, "eval": 4, "seeds": [1]},
    "cpu": {"model": ["model.hidden_size=128", "model.num_heads=4", "model.num_kv_heads=0",
                      "model.ffn_hidden_size=352", "train.precision=fp32"],
            "layers": 8, "factor": 4, "steps": 600, "seq": 128, "batch": 16, "eval": 25, "seeds": [1234, 1235, 1236]},
    # One H200 in about five minutes: a 12 x 512 target on ~13M tokens of Python sources (no corpus repeats)
    "gpu": {"model": ["model.hidden_size=512", "model.num_heads=8", "model.num_kv_heads=0",
                      "model.ffn_hidden_size=1408", "train.precision=bf16", "tokenizer.vocab_size=8192",
                      "data.preprocess_workers=12"],
            "layers": 12, "factor": 4, "steps": 800, "seq": 512, "batch": 32, "eval": 50, "seeds": [1234, 1235],
            "corpus_mb": 60},
}


def flops_per_token(overrides: list[str], layers: int) -> float:
    from pretrain.config import load_config, resolve
    from pretrain.models.transformer import flops_per_token as fpt

    cfg = load_config(REPO / "configs" / "quickstart.yaml", [*overrides, f"model.num_layers={layers}"])
    return fpt(resolve(cfg, cfg.tokenizer.vocab_size).model, cfg.data.seq_len)


def prepare(out: Path, common: list[str], megabytes: float, log=print) -> Path:
    """Tokenizer and indexed data of a corpus larger than the embedded one, from the machine's Python sources;
    done once (``--prepare`` stops here, e.g. to train on a GPU machine that lacks the text or `datasets`)."""
    cache = out / "cache"
    if not list(cache.glob("corpus*.bin")):  # (the token files are named by the tokenizer's digest)
        corpus = cache / "code.jsonl"
        log(f"corpus: {write_corpus(corpus, megabytes)}")
        run_pretrain(cache, ["preprocess", "configs/quickstart.yaml", *common, f"data.sources=[{{path: {corpus}}}]"],
                     log)
        corpus.unlink()
    return sorted(cache.glob("corpus*.bin"))[0].with_suffix("")


def run(scale: str, out: Path, share: float, log=print, prepare_only: bool = False) -> dict:
    s = SCALES[scale]
    common = [*s["model"], f"data.seq_len={s['seq']}", f"data.micro_batch_size={s['batch']}",
              f"data.global_batch_size={s['batch']}", f"train.eval_interval={s['eval']}", "train.eval_iters=4",
              "train.log_interval=25", "checkpoint.interval=0", "checkpoint.keep=1", "optim.warmup_steps=20",
              f"tokenizer.path={out}/cache/tokenizer.model", f"data.prefix={out}/cache/corpus"]
    if s.get("corpus_mb"):
        common.append(f"data.blend=[{{path: {prepare(out, common, s['corpus_mb'], log)}}}]")
    if prepare_only:
        return {}
    tokens_per_step = s["seq"] * s["batch"]
    small_layers = s["layers"] // s["factor"]
    target_fpt = flops_per_token(common, s["layers"])
    small_fpt = flops_per_token(common, small_layers)
    budget = s["steps"] * tokens_per_step * target_fpt
    grow_at = max(1, round(share * s["steps"]))
    after = round((budget - grow_at * tokens_per_step * small_fpt) / (tokens_per_step * target_fpt))
    log(f"target {s['layers']} blocks ({target_fpt / 1e6:.1f} MFLOP/token), small {small_layers} blocks "
        f"({small_fpt / 1e6:.1f}); budget {budget:.3g} FLOPs = {s['steps']} target steps; grow after {grow_at} "
        f"small steps, then {after} steps of the stacked model")
    seeds, result = {}, {}
    for seed in s["seeds"]:
        runs = {"scratch": out / "runs" / f"scratch_{seed}", "stacked": out / "runs" / f"stacked_{seed}"}
        scratch = validation(train(runs["scratch"], [*common, f"train.seed={seed}", f"model.num_layers={s['layers']}",
                                                     f"train.max_steps={s['steps']}"], log=log))
        grown = validation(train(runs["stacked"], [
            *common, f"train.seed={seed}", f"model.num_layers={small_layers}", f"train.max_steps={grow_at + after}",
            f"growth=[{{at_step: {grow_at}, op: stack, factor: {s['factor']}}}]"], log=log))
        target = scratch[-1][1]
        reached = first_reaching(grown, target)
        seeds[seed] = {"scratch_final_val_loss": target, "stacked_final_val_loss": grown[-1][1],
                       "scratch_flops": scratch[-1][0], "scratch_tokens": scratch[-1][2],
                       "stacked_flops_to_reach": reached[0] if reached else None,
                       "stacked_tokens_to_reach": reached[1] if reached else None,
                       "flops_saved": 1 - reached[0] / scratch[-1][0] if reached else None,
                       "tokens_saved": 1 - reached[1] / scratch[-1][2] if reached else None,
                       "wall_seconds": {name: wall_seconds(d) for name, d in runs.items()},
                       "scratch_curve": scratch, "stacked_curve": grown}
        saved = [v["flops_saved"] for v in seeds.values() if v["flops_saved"] is not None]
        result = {"scale": scale, "device": device_name(), "settings": s, "share_on_small_model": share,
                  "grow_at_step": grow_at, "steps_after_growth": after, "budget_flops": budget,
                  "target_flops_per_token": target_fpt, "small_flops_per_token": small_fpt, "seeds": seeds,
                  "flops_saved": {"mean": statistics.mean(saved), "min": min(saved), "max": max(saved)} if saved else None,
                  "final_val_loss": {name: [v[f"{name}_final_val_loss"] for v in seeds.values()]
                                     for name in ("scratch", "stacked")},
                  "command": f"python experiments/growth_stack.py --scale {scale}"}
        write(out, "growth_stack", result)  # after every seed, so a cut-short experiment keeps what it finished
        plot(result, out / "growth_stack.png")
    return result


def plot(result: dict, path: Path) -> None:
    stacked = f"stacked x{result['settings']['factor']} after {result['grow_at_step']} small steps"
    plot_curves(path, list(result["seeds"].values()),
                [("scratch_curve", "tab:blue", "scratch (target from scratch)"), ("stacked_curve", "tab:orange", stacked)],
                f"G_stack vs scratch at equal compute ({result['scale']}, {len(result['seeds'])} seeds)",
                "training FLOPs (small model's included)", hline=statistics.mean(result["final_val_loss"]["scratch"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=list(SCALES), default="cpu")
    parser.add_argument("--share", type=float, default=0.15, help="share of the scratch run's steps on the small model")
    parser.add_argument("--out", default=None, help="default experiments/out/growth_stack (_gpu for --scale gpu)")
    parser.add_argument("--prepare", action="store_true", help="only build the tokenizer and data (--scale gpu)")
    args = parser.parse_args()
    out = Path(args.out or f"experiments/out/growth_stack{'_gpu' if args.scale == 'gpu' else ''}")
    result = run(args.scale, out if out.is_absolute() else REPO / out, args.share, prepare_only=args.prepare)
    if args.prepare:
        return
    for seed, r in result["seeds"].items():
        saved = (f"reached the scratch final loss with {100 * r['flops_saved']:.0f}% fewer FLOPs" if r["flops_saved"] is not None
                 else "did not reach the scratch final loss within the budget")
        print(f"seed {seed}: scratch {r['scratch_final_val_loss']:.4f}, stacked {r['stacked_final_val_loss']:.4f}; "
              f"stacked {saved}")


if __name__ == "__main__":
    main()
