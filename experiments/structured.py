"""Structured FFNs against the dense FFN at equal training FLOPs (docs/results.md, structured FFN layers): low-rank,
block-dense and block-shuffle at about 63% and 32% of the dense FFN's parameters, and the 32% low-rank layer with
self-guided training (fixed steps, and the same-FLOPs mode that replays the guided steps' data).

Equal compute (the Languini protocol): every variant trains until it has spent the dense run's training FLOPs, so
a cheaper FFN trains for more steps; the self-guided runs count the dense guide's FLOPs while it is active (the
trainer's FLOP count does not include it, so the curves here add it). Reported per variant and seed: the
validation curve against FLOPs and the final validation loss. Runs are cached in OUT/runs, so an interrupted
experiment resumes.

    python experiments/structured.py                  # CPU: 4 x 128, dense 300 steps, 3 seeds, about 28 minutes
    python experiments/structured.py --self-guided-all   # also every structured FFN self-guided: 15 runs more,
                                                         # about 17 minutes (out: structured_self_guided.json)
    python experiments/structured.py --scale gpu      # 12 x 768, dense 2000 steps, 3 seeds
    python experiments/structured.py --scale toy      # seconds: what the test suite runs
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runner import REPO, device_name, output_dir, save_figure, seed_summary, train, validation, write  # noqa: E402

SCALES = {
    "toy": {"model": ["model.num_heads=4", "model.num_kv_heads=0", "tokenizer.vocab_size=600",
                      "data.embedded_docs=120", "train.precision=fp32", "tokenizer.path={out}/cache/tokenizer.model",
                      "data.prefix={out}/cache/corpus"],
            "d": 64, "f": 192, "layers": 2, "steps": 6, "seq": 64, "batch": 8, "eval": 3, "seeds": [1],
            "variants": ["dense", "lowrank_32", "blockshuffle_32", "lowrank_32_sgt_same_flops"]},
    "cpu": {"model": ["model.num_heads=4", "model.num_kv_heads=0", "train.precision=fp32",
                      "data.prefix={out}/cache/corpus"],
            "d": 128, "f": 384, "layers": 4, "steps": 300, "seq": 128, "batch": 16, "eval": 25,
            "seeds": [1234, 1235, 1236]},  # (variants: DEFAULT)
    "gpu": {"model": ["model.num_heads=12", "model.num_kv_heads=0", "train.precision=bf16",
                      "data.prefix={out}/cache/corpus"],
            "d": 768, "f": 2304, "layers": 12, "steps": 2000, "seq": 512, "batch": 32, "eval": 100,
            "seeds": [1234, 1235, 1236]},
}
# Every structured kind at both sizes, and the 32% low-rank layer self-guided in both modes; --self-guided-all adds
# every other structured FFN self-guided (fixed mode).
DEFAULT = ["dense", "lowrank_63", "blockdense_63", "blockshuffle_63", "lowrank_32", "blockdense_32", "blockshuffle_32",
           "lowrank_32_sgt", "lowrank_32_sgt_same_flops"]
COLORS = {"dense": "black", "lowrank_63": "tab:blue", "blockdense_63": "tab:green", "blockshuffle_63": "tab:orange",
          "lowrank_32": "tab:cyan", "blockdense_32": "tab:olive", "blockshuffle_32": "tab:red",
          "lowrank_32_sgt": "tab:purple", "lowrank_32_sgt_same_flops": "tab:pink"}


def variants(d: int, f: int) -> dict[str, list[str]]:
    """Overrides per variant; the ranks and block counts put each structured FFN at about 63% or 32% of the dense
    SwiGLU FFN's 3 d f parameters (exact fractions in the JSON)."""
    def lowrank(share: float) -> int:  # (d + f) R per projection
        return max(1, round(share * d * f / (d + f)))

    def blockdense(share: float) -> int:  # R (f + d/2) twice and R (d + f/2) once, B = 2; R even
        return max(2, 2 * round(share * 3 * d * f / (2 * (f + d // 2) + d + f // 2) / 2))

    structured = ["model.ffn.dense_blocks=0"]
    out = {"dense": []}
    for share, tag, blocks in ((0.63, "63", 2), (0.32, "32", 4)):
        out[f"lowrank_{tag}"] = [*structured, "model.ffn.kind=lowrank", f"model.ffn.rank={lowrank(share)}"]
        out[f"blockdense_{tag}"] = [*structured, "model.ffn.kind=blockdense", "model.ffn.blocks=2",
                                    f"model.ffn.rank={blockdense(share)}"]
        out[f"blockshuffle_{tag}"] = [*structured, "model.ffn.kind=blockshuffle", f"model.ffn.blocks={blocks}"]
    guide = ["model.ffn.self_guided.enabled=true", "model.ffn.self_guided.ratio=0.4"]
    for name in [n for n in out if n != "dense"]:
        out[f"{name}_sgt"] = [*out[name], *guide]
    out["lowrank_32_sgt_same_flops"] = [*out["lowrank_32_sgt"], "model.ffn.self_guided.mode=same_flops"]
    return out


def costs(common: list[str], overrides: list[str], out: Path) -> tuple[float, float, float]:
    """(training FLOPs per token, the dense guide's FLOPs per token while active, FFN parameters / dense's)."""
    from pretrain.config import load_config
    from pretrain.config.run import resolve
    from pretrain.data.tokenizer import Tokenizer, model_path
    from pretrain.models.transformer import _ffn_params, flops_per_token

    cfg = load_config(REPO / "configs/quickstart.yaml", [*common, *overrides])
    path = model_path(cfg.tokenizer)  # (not trained yet before the first run: the size it will be trained to)
    cfg = resolve(cfg, Tokenizer(path).vocab_size if path.is_file() else cfg.tokenizer.vocab_size)
    m = cfg.model
    dense = replace(m, ffn=replace(m.ffn, kind="dense", self_guided=replace(m.ffn.self_guided, enabled=False)))
    ffn = sum(_ffn_params(m, i, m.ffn_size) for i in range(m.num_layers))
    dense_ffn = sum(_ffn_params(dense, i, dense.ffn_size) for i in range(dense.num_layers))
    guide = 6.0 * dense_ffn if m.ffn.self_guided.enabled else 0.0
    return flops_per_token(m, cfg.data.seq_len), guide, ffn / dense_ffn


def run(scale: str, out: Path, log=print, self_guided_all: bool = False) -> dict:
    s = SCALES[scale]
    common = [*(o.format(out=out) for o in s["model"]), f"model.hidden_size={s['d']}", f"model.num_layers={s['layers']}",
              f"model.ffn_hidden_size={s['f']}", f"data.seq_len={s['seq']}", f"data.micro_batch_size={s['batch']}",
              f"data.global_batch_size={s['batch']}", "optim.warmup_steps=20", "train.eval_iters=4",
              "checkpoint.interval=0", "checkpoint.keep=1", "train.sample_prompt="]
    table = variants(s["d"], s["f"])
    tokens_per_step = s["seq"] * s["batch"]
    dense_fpt = None
    results: dict = {}
    shares: dict = {}
    for seed in s["seeds"]:
        for name in table if self_guided_all else s.get("variants", DEFAULT):
            if dense_fpt is None:  # the dense run sets the budget: s["steps"] steps of the dense model
                dense_fpt = costs(common, table["dense"], out)[0]
            fpt, guide, share = costs(common, table[name], out)
            shares[name] = share
            budget = dense_fpt * tokens_per_step * s["steps"]
            # Steps that spend the budget, the guide's FLOPs counted at every guided step (its matmuls run whatever
            # alpha is): fixed mode guides 40% of max_steps; same_flops runs max_steps + those 40%.
            total = budget / (tokens_per_step * (fpt + 0.4 * guide / (1.4 if "same_flops" in name else 1.0)))
            steps = max(1, round(total / 1.4 if "same_flops" in name else total))
            guided = max(1, round(0.4 * steps)) if guide else 0
            eval_every = max(1, round(s["eval"] * steps / s["steps"]))
            overrides = [*common, *table[name], f"train.max_steps={steps}", f"train.eval_interval={eval_every}",
                         f"train.log_interval={max(1, eval_every // 5)}", f"train.seed={seed}"]
            records = train(out / "runs" / f"{name}_{seed}", overrides, log=log)
            curve = validation(records)
            if guide:  # add the guide's FLOPs of the guided steps done by each validation
                curve = [(flops + guide * min(tokens, guided * tokens_per_step), loss, tokens)
                         for flops, loss, tokens in curve]
            results.setdefault(name, {})[seed] = {"final_val_loss": curve[-1][1], "curve": curve, "steps": steps,
                                                  "flops": curve[-1][0]}
            log(f"  {name} seed {seed}: {steps} steps, final val loss {curve[-1][1]:.4f}")
    summary = {name: {**v, "ffn_param_share": shares[name]} for name, v in seed_summary(results).items()}
    result = {"scale": scale, "device": device_name(), "settings": s, "variants": results, "final_val_loss": summary,
              "command": f"python experiments/structured.py --scale {scale}"
                         + (" --self-guided-all" if self_guided_all else "")}
    name = "structured_self_guided" if self_guided_all else "structured"
    write(out, name, result)
    plot(result, out / f"{name}.png")
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, seeds in result["variants"].items():
        for i, r in enumerate(seeds.values()):
            base = name.removesuffix("_same_flops").removesuffix("_sgt")
            style = ":" if name.endswith("_sgt") else "-." if name.endswith("_same_flops") else "--" if "_32" in name else "-"
            ax.plot([c[0] for c in r["curve"]], [c[1] for c in r["curve"]], color=COLORS.get(name, COLORS[base]),
                    label=name if i == 0 else None, lw=1, ls=style)
    ax.set(title=f"structured FFNs at equal training FLOPs ({result['scale']}, {len(result['settings']['seeds'])} "
                 "seed(s))", xlabel="training FLOPs", ylabel="validation loss")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=list(SCALES), default="cpu")
    parser.add_argument("--out", default=None, help="default experiments/out/structured (_gpu for --scale gpu)")
    parser.add_argument("--self-guided-all", action="store_true",
                        help="also train every structured FFN with self-guided training (the default: the 32%% "
                             "low-rank one); writes structured_self_guided.json and .png beside the default's")
    args = parser.parse_args()
    result = run(args.scale, output_dir(args.out, "structured", args.scale), self_guided_all=args.self_guided_all)
    for name, summary in result["final_val_loss"].items():
        print(f"{name:<26} FFN params {summary['ffn_param_share']:.0%}  final validation loss {summary['mean']:.4f} "
              f"(seeds {summary['min']:.4f}-{summary['max']:.4f})")


if __name__ == "__main__":
    main()
