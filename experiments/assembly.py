"""Model assembly against end-to-end training at the same total compute (docs/results.md, assembly).

The target model trained end to end for ``steps`` steps sets the budget B in FLOPs. The assembled run spends the
same B: the meta model (one block per module) a share of it, the K incubations a share split evenly among them
(each counted with the FLOPs it computes: forward everywhere, backward through module k and the meta blocks after
it, weight gradients of module k only), and the join's fine-tuning the rest. Reported per seed: both final
validation losses, the curves against FLOPs (PNG), and the wall times: end to end, and assembled with the
incubations one after another (as run here) and as if the K of them ran at once on K machines (meta + the slowest
incubation + join). Runs are cached in OUT/runs, so an interrupted experiment resumes.

    python experiments/assembly.py                  # CPU: 8 x 128 target in 4 modules, 3 seeds, about 24 minutes
    python experiments/assembly.py --scale gpu      # 24 x 1024 target in 4 modules, 2 seeds
    python experiments/assembly.py --scale toy      # seconds: what the test suite runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runner import REPO, metrics, plot_curves, run_pretrain, train, validation, wall_seconds, write  # noqa: E402

CONFIG = "configs/quickstart.yaml"
SCALES = {
    "toy": {"model": ["model.hidden_size=64", "model.num_heads=4", "model.num_kv_heads=0",
                      "model.ffn_hidden_size=128", "tokenizer.vocab_size=600", "data.embedded_docs=120", "train.precision=fp32"],
            "layers": 4, "modules": 2, "steps": 16, "seq": 64, "batch": 8, "eval": 4, "seeds": [1]},
    "cpu": {"model": ["model.hidden_size=128", "model.num_heads=4", "model.num_kv_heads=0",
                      "model.ffn_hidden_size=352", "train.precision=fp32"],
            "layers": 8, "modules": 4, "steps": 600, "seq": 128, "batch": 16, "eval": 25, "seeds": [1234, 1235, 1236]},
    "gpu": {"model": ["model.hidden_size=1024", "model.num_heads=16", "model.num_kv_heads=0",
                      "model.ffn_hidden_size=2816", "train.precision=bf16", "train.compile=true",
                      "tokenizer.vocab_size=32000"],
            "layers": 24, "modules": 4, "steps": 4000, "seq": 1024, "batch": 32, "eval": 100, "seeds": [1234, 1235]},
}


def phase_flops(overrides: list[str]) -> dict:
    """FLOPs per token of the target, the meta model and each incubation."""
    from pretrain.assembly.hybrid import incubation_flops_per_token
    from pretrain.assembly.phases import phase_config
    from pretrain.config import load_config, resolve
    from pretrain.models.transformer import flops_per_token

    cfg = load_config(REPO / CONFIG, overrides)
    cfg = resolve(cfg, cfg.tokenizer.vocab_size)
    meta = phase_config(cfg, "meta")
    return {"target": flops_per_token(cfg.model, cfg.data.seq_len),
            "meta": flops_per_token(meta.model, cfg.data.seq_len),
            "incubations": [incubation_flops_per_token(phase_config(cfg, "incubate", k))
                            for k in range(1, cfg.assembly.modules + 1)]}


def assemble(run_dir: Path, overrides: list[str], log=print) -> tuple[list[dict], dict]:
    """`pretrain assemble run` (the incubations one after another) unless finished; the join's metrics and the wall
    times (ROOT/assembly.json)."""
    run_pretrain(run_dir, ["assemble", "run", CONFIG, *overrides, f"train.run_dir={run_dir}",
                           "logging.tensorboard=false"], log)
    return metrics(run_dir / "join"), json.loads((run_dir / "assembly.json").read_text())


def join_start(records: list[dict]) -> float:
    """The FLOPs spent before the join's first step (the meta model's and the incubations')."""
    steps = [r for r in records if "loss" in r]
    per_step = steps[1]["flops"] - steps[0]["flops"] if len(steps) > 1 else 0.0
    return steps[0]["flops"] - per_step


def run(scale: str, out: Path, meta_share: float, incubation_share: float, log=print) -> dict:
    s = SCALES[scale]
    k = s["modules"]
    common = [*s["model"], "model.tie_embeddings=false", f"model.num_layers={s['layers']}", f"data.seq_len={s['seq']}",
              f"data.micro_batch_size={s['batch']}", f"data.global_batch_size={s['batch']}",
              f"train.eval_interval={s['eval']}", "train.eval_iters=4", "train.log_interval=25", "checkpoint.interval=0",
              "checkpoint.keep=1", "optim.warmup_steps=20", f"tokenizer.path={out}/cache/tokenizer.model",
              f"data.prefix={out}/cache/corpus"]
    tokens_per_step = s["seq"] * s["batch"]
    fpt = phase_flops([*common, f"assembly.modules={k}"])
    budget = s["steps"] * tokens_per_step * fpt["target"]
    meta_steps = max(1, round(meta_share * budget / (tokens_per_step * fpt["meta"])))
    incubation_steps = max(1, round(incubation_share * budget / (tokens_per_step * sum(fpt["incubations"]))))
    spent = tokens_per_step * (meta_steps * fpt["meta"] + incubation_steps * sum(fpt["incubations"]))
    join_steps = round((budget - spent) / (tokens_per_step * fpt["target"]))
    steps = {"meta": meta_steps, "incubation": incubation_steps, "join": join_steps}
    log(f"target {s['layers']} blocks in {k} modules ({fpt['target'] / 1e6:.1f} MFLOP/token); budget {budget:.3g} "
        f"FLOPs = {s['steps']} end-to-end steps; assembled: meta {meta_steps} steps ({fpt['meta'] / 1e6:.1f} "
        f"MFLOP/token), {k} incubations of {incubation_steps} steps "
        f"({', '.join(f'{f / 1e6:.1f}' for f in fpt['incubations'])} MFLOP/token), join {join_steps} steps")
    assembly = [f"assembly.modules={k}", f"assembly.meta_steps={meta_steps}",
                f"assembly.incubation_steps={incubation_steps}", f"train.max_steps={join_steps}"]
    seeds = {}
    for seed in s["seeds"]:
        e2e_dir = out / "runs" / f"end_to_end_{seed}"
        # A process of its own, as `assemble run` starts for each phase, so that the wall times compare (unless
        # PRETRAIN_EXPERIMENTS_IN_PROCESS=1 asks otherwise: the test suite's toy size).
        e2e = validation(train(e2e_dir, [*common, f"train.seed={seed}", f"train.max_steps={s['steps']}"],
                               config=CONFIG, log=log,
                               in_process=os.environ.get("PRETRAIN_EXPERIMENTS_IN_PROCESS") == "1"))
        join, times = assemble(out / "runs" / f"assembled_{seed}", [*common, *assembly, f"train.seed={seed}"], log=log)
        joined = validation(join)
        per = times["per_phase_s"]
        incubations = [per[f"module {m}"] for m in range(1, k + 1) if f"module {m}" in per]
        seeds[seed] = {"end_to_end_final_val_loss": e2e[-1][1], "assembled_final_val_loss": joined[-1][1],
                       "end_to_end_flops": e2e[-1][0], "assembled_flops": joined[-1][0],
                       "end_to_end_wall_s": wall_seconds(e2e_dir),
                       "assembled_wall_s": times["total_s"],
                       "assembled_wall_s_incubations_at_once": times.get("meta_s", 0.0)
                       + (max(incubations) if incubations else 0.0) + times["join_s"],
                       "phase_wall_s": per, "join_start_flops": join_start(join),
                       "end_to_end_curve": e2e, "assembled_curve": joined}
    finals = {name: [v[f"{name}_final_val_loss"] for v in seeds.values()] for name in ("end_to_end", "assembled")}
    result = {"scale": scale, "settings": s, "meta_share": meta_share, "incubation_share": incubation_share,
              "steps": steps, "budget_flops": budget, "flops_per_token": fpt, "seeds": seeds, "final_val_loss": finals,
              "mean_difference": statistics.mean(a - b for a, b in zip(finals["assembled"], finals["end_to_end"],
                                                                        strict=True)),
              "command": f"python experiments/assembly.py --scale {scale}"
              + (f" --meta-share {meta_share} --incubation-share {incubation_share}"
                 if (meta_share, incubation_share) != (0.1, 0.5) else "")}
    write(out, "assembly", result)
    plot(result, out / "assembly.png")
    return result


def plot(result: dict, path: Path) -> None:
    seeds = list(result["seeds"].values())
    s = result["settings"]
    plot_curves(path, seeds, [("end_to_end_curve", "tab:blue", "end to end"),
                              ("assembled_curve", "tab:orange", "assembled: the join's fine-tuning")],
                f"assembled ({s['modules']} modules) vs end to end, equal compute ({result['scale']}, "
                f"{len(seeds)} seeds)", "training FLOPs (meta model and incubations included)",
                marks=[(r["join_start_flops"], "meta + incubations spent") for r in seeds])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=list(SCALES), default="cpu")
    parser.add_argument("--meta-share", type=float, default=0.1, help="share of the budget for the meta model")
    parser.add_argument("--incubation-share", type=float, default=0.5,
                        help="share of the budget for the incubations (all K together)")
    parser.add_argument("--out", default="experiments/out/assembly")
    args = parser.parse_args()
    out = REPO / args.out if not Path(args.out).is_absolute() else Path(args.out)
    result = run(args.scale, out, args.meta_share, args.incubation_share)
    for seed, r in result["seeds"].items():
        print(f"seed {seed}: end to end {r['end_to_end_final_val_loss']:.4f} ({r['end_to_end_wall_s']:.0f} s), "
              f"assembled {r['assembled_final_val_loss']:.4f} ({r['assembled_wall_s']:.0f} s here, "
              f"{r['assembled_wall_s_incubations_at_once']:.0f} s with the incubations at once)")


if __name__ == "__main__":
    main()
