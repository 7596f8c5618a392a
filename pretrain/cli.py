"""`pretrain <verb>`: the command line. A mistake a user can fix (config, data, paths, checkpoints, layout) prints
one paragraph naming the cause and the fix, once (rank 0 of a multi-process run), no traceback, and exits with
code 2; a bug keeps its traceback, says it is one, and exits with code 1."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from pathlib import Path

from pretrain.config import ConfigError, describe, load_config
from pretrain.errors import RankFailure, UserError
from pretrain.torch_compat import check_torch_version

EXIT_USER_ERROR = 2
USER_ERROR_MARKER = "user_error"  # RUN_DIR/user_error: the message of a run that stopped on a user mistake


def _user_config(args):
    """The run config a user gives to a verb that trains or measures it, with the checks of what it asks for."""
    return _check_user_config(load_config(args.config, args.overrides))


def _check_user_config(cfg):
    """What the config a user wrote asks for, beyond its keys' own checks; not checked on the configs derived from it
    (an assembly's meta model has one block per module, its phases their own step counts)."""
    from pretrain.config.model import check_placement

    check_placement(cfg.model)
    if cfg.train.stop_at_step > cfg.total_steps and not cfg.assembly.modules:
        raise UserError(f"train.stop_at_step={cfg.train.stop_at_step} lies after the run's last step "
                        f"({cfg.total_steps}: train.max_steps), so it would never stop the run: give a step before "
                        "it, or 0 (off).")
    return cfg


def _train(args) -> int:
    return _run(_user_config(args))


def _run(cfg) -> int:
    """Train ``cfg``: exit 0, or 75 when stopped by a signal with a checkpoint (preempted)."""
    from pretrain.paths import ForeignRunDir
    from pretrain.train.preemption import EXIT_PREEMPTED
    from pretrain.train.trainer import run_training

    marker = Path(cfg.train.run_dir) / USER_ERROR_MARKER
    with contextlib.suppress(OSError):  # (a run directory that is no directory is named by the trainer)
        marker.unlink(missing_ok=True)
    try:
        result = run_training(cfg)
    except UserError as e:
        # The launch scripts read the marker: torchrun itself reports any failed worker with exit code 1. (Not in a
        # directory that is not a run's: nothing may be written there.)
        if int(os.environ.get("RANK", "0")) == 0 and marker.parent.is_dir() and not isinstance(e, ForeignRunDir):
            with contextlib.suppress(OSError):
                marker.write_text(f"{e}\n")
        raise
    return EXIT_PREEMPTED if result.get("preempted") else 0


def _plan(args) -> int:
    from pretrain.plan.report import run

    return run(args)


def _preprocess(args) -> int:
    from pretrain.data import corpus
    from pretrain.data.prepare import ensure_tokenizer, token_prefix
    from pretrain.data.preprocess import preprocess

    cfg = load_config(args.config, args.overrides)
    if cfg.data.blend:
        raise UserError("data.blend names datasets that are already preprocessed; `pretrain preprocess` "
                        "tokenizes data.sources (or the embedded corpus when none are set).")
    tokenizer = ensure_tokenizer(cfg)
    preprocess(corpus.documents(cfg.data), tokenizer, token_prefix(cfg.data, tokenizer),
               workers=cfg.data.preprocess_workers, fingerprint=corpus.fingerprint(cfg.data))
    return 0


def _tokenizer_train(args) -> int:
    """A recipe (a name of tokenizers/ or a YAML file) into tokenizers/NAME/ or --out; or, given a run config, the
    tokenizer it names (its recipe) or the model file at its tokenizer.path."""
    import dataclasses

    from pretrain.config import RunConfig, loading
    from pretrain.data import tokenizer as tokenizers

    spec, overrides = args.config, args.overrides
    path = Path(spec)
    if path.is_file() and set(loading.read_yaml(path)) & {f.name for f in dataclasses.fields(RunConfig)}:
        cfg = load_config(path, overrides)
        if not cfg.tokenizer.name:
            if args.out:
                raise UserError("--out is for recipes: a run config's tokenizer is trained at its tokenizer.path.")
            if Path(cfg.tokenizer.path).exists():  # the runs made with it could no longer resume or be read
                raise UserError(f"tokenizer.path '{cfg.tokenizer.path}' already holds a tokenizer; point tokenizer.path "
                                "at a new file to train another, or delete that one to train it again.")
            tok = tokenizers.train_tokenizer(cfg.tokenizer, cfg.data)
            print(f"trained {tok.vocab_size}-piece {cfg.tokenizer.type} tokenizer -> {tok.path}")
            return 0
        spec, overrides = cfg.tokenizer.name, []
    recipe_file, recipe = tokenizers.load_recipe(spec, overrides)
    name = recipe_file.stem
    out = Path(args.out) if args.out else tokenizers.TOKENIZERS_DIR / name
    if (out / tokenizers.MODEL_FILE).exists():
        raise UserError(f"'{out}' already holds a tokenizer; train into another folder with --out DIR, or delete "
                        f"'{out}' to train it again.")
    tok = tokenizers.train_recipe(recipe, out, name)
    use = f"tokenizer.path={out}" if args.out else f"tokenizer.name={name}"
    print(f"tokenizer '{name}' ({tok.vocab_size:,}-piece {recipe.type}) -> {out}/ ({tokenizers.MODEL_FILE}, "
          f"{tokenizers.MANIFEST_FILE}); use it with {use}")
    return 0


def _tokenizer_import(args) -> int:
    from pretrain.config.data import TOKENIZER_NAME
    from pretrain.data import tokenizer as tokenizers

    if not TOKENIZER_NAME.fullmatch(args.name):
        raise UserError(f"'{args.name}' is not a tokenizer name: use letters, digits, '.', '_' and '-'.")
    out = Path(args.out) if args.out else tokenizers.TOKENIZERS_DIR / args.name
    tok = tokenizers.import_tokenizer(args.source, out, args.name)
    ids = ", ".join(f"{role} {i}" for role, i in tok.special_ids.items() if i >= 0)
    missing = [role for role, i in tok.special_ids.items() if i < 0]
    use = f"tokenizer.path={out}" if args.out else f"tokenizer.name={args.name}"
    print(f"imported {args.source} -> {out}/ ({tok.vocab_size:,} pieces; {ids}"
          f"{'; no ' + ', '.join(missing) if missing else ''}); use it with {use}")
    return 0


def _tokenizer_stats(args) -> int:
    import glob
    import json

    from pretrain.config import DataConfig, SourceConfig
    from pretrain.config.data import suffix_type
    from pretrain.data import corpus
    from pretrain.data.tokenizer import find_tokenizer
    from pretrain.data.tokenizer_stats import format_stats, tokenizer_stats
    from pretrain.paths import require_writable_file

    if args.out:
        require_writable_file(args.out, "--out")
    tok = find_tokenizer(args.tokenizer)
    for text in args.text:
        if not glob.glob(text):
            raise UserError(f"TEXT '{text}' matches no file; give text files (or globs) to measure the tokenizer on.")
    # (a file whose suffix says nothing is read as text)
    data = DataConfig(sources=[SourceConfig(path=t, type="auto" if suffix_type(t) else "text",
                                            text_field=args.text_field) for t in args.text])
    stats = tokenizer_stats(tok, corpus.documents(data, text_field_fix="give it with --text-field"))
    if not stats["tokens"]:
        raise UserError(f"{' '.join(args.text)} holds no text (only blank lines or empty records); give text files "
                        "to measure the tokenizer on.")
    text = f"{len(args.text)} file(s)" if args.text else "the embedded corpus (not held out: pass TEXT files)"
    stats["text"] = list(args.text) or "embedded corpus"
    print(format_stats(stats, text))
    if args.out:
        Path(args.out).write_text(json.dumps(stats, indent=2) + "\n")
        print(f"-> {args.out}")
    return 0


def _export(args) -> int:
    import warnings

    from pretrain.convert import hf

    def write(out_dir: Path) -> Path:
        return hf.export_checkpoint(args.checkpoint, out_dir, keep_structured=args.keep_structured)

    inside = next((p for p in [Path(args.out).resolve(), *Path(args.out).resolve().parents]
                   if p.name.startswith("step_") and (p / "trainer_state.json").is_file()), None)
    if inside is not None:  # retention deletes old checkpoints, and the export with them
        raise UserError(f"--out '{args.out}' lies inside the checkpoint {inside}, which checkpoint.keep will delete "
                        "(with the export) as newer ones are written; export next to the run instead, e.g. "
                        f"{inside.parent.parent / 'hf'}.")
    again = hf.is_export(Path(args.out))  # an earlier export there is replaced; any other files refuse the directory
    if not again:
        hf.require_new_dir(args.out, "export")  # (here, not in export_checkpoint: export_hf rewrites RUN_DIR/hf)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", hf.ExportWarning)
        out = hf.replace_export(Path(args.out), write) if again else write(Path(args.out))
    for w in caught:  # ours as one line, without the source line; others as usual
        if issubclass(w.category, hf.ExportWarning):
            print(f"pretrain: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    print(f"exported {args.checkpoint} -> {out} (Hugging Face format)")
    return 0


def _import(args) -> int:
    from pretrain.convert.hf import import_checkpoint

    step_dir = import_checkpoint(args.hf_dir, args.out)
    print(f"imported {args.hf_dir} -> {step_dir}; train from it with "
          f"`pretrain train {args.out}/config.yaml train.resume={step_dir}`")
    return 0


def _bench(args) -> int:
    from pretrain.bench import run_bench, write_json
    from pretrain.paths import require_writable_dir, require_writable_file

    if args.out:  # before the benchmark runs, not after
        require_writable_file(args.out, "--out")
    if args.profile:
        require_writable_dir(args.profile, "--profile")

    result = run_bench(_user_config(args), against=args.against, steps=args.steps,
                       warmup=args.warmup, hf_precision=args.hf_precision, profile_dir=args.profile)
    if args.out:
        write_json(result, args.out)
        print(f"results -> {args.out}")
    return 0


def _grow(args) -> int:
    if args.plan:
        return _grow_plan(args)
    from pretrain.config import MoEConfig
    from pretrain.config.growth import GrowthStage
    from pretrain.growth.offline import GrowthSpec, grow_checkpoint

    if not (args.source and args.destination):
        raise UserError("pretrain grow needs SRC (a checkpoint or run directory) and DST (a new run directory), or "
                        "--plan.")
    _check_grow_flags(args)
    defaults = GrowthStage()  # what a flag not given stands for: the stage key's default
    args.hidden_factor, args.top_k, args.router = (
        getattr(defaults, key) if getattr(args, key) is None else getattr(args, key)
        for key in ("hidden_factor", "top_k", "router"))
    _check_grow_numbers(args)
    layers = None
    if args.layers:
        try:
            layers = [None if x.strip() in ("new", "-") else int(x) for x in args.layers.split(",")]
        except ValueError:
            raise UserError(f"--layers {args.layers}: give one source block index (or 'new') per target block, "
                            "comma separated, e.g. 0,1,new,2.") from None
    moe = None
    if args.op == "upcycle":
        if not args.experts:
            raise UserError("--op upcycle needs --experts E (and optionally --top-k, --router).")
        moe = MoEConfig(num_experts=args.experts, top_k=args.top_k, router=args.router)
    spec = GrowthSpec(args.op, factor=args.factor, num_layers=args.num_layers, layers=layers,
                      hidden_factor=args.hidden_factor, ffn_size=args.ffn_size, moe=moe)
    path = grow_checkpoint(args.source, args.destination, spec, target_config=args.config,
                           carry_optimizer=args.carry_optimizer)
    print(f"continue with: pretrain train {Path(args.destination) / 'config.yaml'}   (resumes from {path.name})")
    return 0


def _check_grow_flags(args) -> None:
    """Every option given belongs to the chosen operator (another operator's option would be ignored)."""
    from pretrain.config.growth import OPERATOR_OF, operator_kind

    owner = {**OPERATOR_OF, "layers": "depth"}
    foreign = [key for key, kind in owner.items()
               if kind != operator_kind(args.op) and getattr(args, key) not in (None, "")]  # (None: not given)
    if foreign:
        ops = {"depth": "--op stack, interpolate, zero or random", "width": "--op width", "upcycle": "--op upcycle"}
        flags = ", ".join("--" + key.replace("_", "-") for key in foreign)
        raise UserError(f"{flags} {'is' if len(foreign) == 1 else 'are'} for "
                        f"{' / '.join(sorted({ops[owner[k]] for k in foreign}))}, not --op {args.op}, which would "
                        f"ignore {'it: drop it' if len(foreign) == 1 else 'them: drop them'}, or choose that operator.")
    if args.layers and (args.factor is not None or args.num_layers is not None):
        raise UserError("--layers gives every target block's source itself; drop --factor / --num-layers.")


def _check_grow_numbers(args) -> None:
    """The numeric options of `pretrain grow` in their ranges (0 would otherwise read as "not given")."""
    if args.factor is not None and args.factor < 2:
        raise UserError(f"--factor {args.factor}: the grown model has factor x the source's blocks; give 2 or more "
                        "(default 4).")
    if args.num_layers is not None and args.num_layers < 1:
        raise UserError(f"--num-layers {args.num_layers}: give the grown model's blocks, more than the source's.")
    if args.hidden_factor < 1:
        raise UserError(f"--hidden-factor {args.hidden_factor}: give 1 (width unchanged) or more.")
    if args.ffn_size is not None and args.ffn_size < 1:
        raise UserError(f"--ffn-size {args.ffn_size}: give the FFN's new inner width, at least its present one.")
    if args.op == "upcycle" and args.experts is not None and args.experts < 1:
        raise UserError(f"--experts {args.experts}: give the experts per MoE layer, 1 or more.")
    if args.op == "upcycle" and args.experts and not 1 <= args.top_k <= args.experts:
        raise UserError(f"--top-k must be between 1 and --experts ({args.experts}); it is {args.top_k} (default 2).")


def _grow_plan(args) -> int:
    import math

    from pretrain.growth.plan import format_plan, growth_plan

    for option, value, example in (("--target-params", args.target_params, "7e9"), ("--tokens", args.tokens, "2e12")):
        if value is not None and not 1 < value < math.inf:  # (NaN fails too)
            raise UserError(f"{option} {value:g}: give a finite number above 1, such as {example}.")
    if args.factor is not None and args.factor < 2:
        raise UserError(f"--factor {args.factor}: the small model has 1/factor of the depth; give 2 or more "
                        "(default 4).")
    params, tokens, per_step = args.target_params, args.tokens, None
    if args.config:
        from pretrain.models.transformer import num_params

        cfg = load_config(args.config)
        if cfg.model.vocab_size == 0:
            cfg = cfg.replace(model={"vocab_size": cfg.tokenizer.vocab_size})  # the tokenizer's size, unpadded
        params = params or num_params(cfg.model)
        per_step = cfg.data.tokens_per_step
        tokens = tokens or cfg.train.max_steps * per_step
    if not params or not tokens:
        raise UserError("--plan needs --target-params and --tokens, or --config CONFIG (the target run's config) to "
                        "take them from.")
    print(format_plan(growth_plan(params, tokens, per_step, args.factor or 4)))
    return 0


def _assemble(args) -> int:
    from pretrain.assembly import phases

    cfg = _user_config(args)
    if args.phase == "check":  # every phase's config valid; print K (slurm/assemble.sh, before it queues anything)
        for phase, k in [("meta", 0), ("join", 0), *(("incubate", k) for k in range(1, cfg.assembly.modules + 1))]:
            phases.phase_config(cfg, phase, k)
        print(cfg.assembly.modules)
        return 0
    if args.phase == "run":
        if args.module is not None:
            raise UserError("--module chooses one incubation; `assemble run` runs all of them. Drop it, or run "
                            "`pretrain assemble incubate CONFIG --module K`.")
        if args.get or args.world_size is not None:
            raise UserError("--get and --world-size show one phase's config: give meta, incubate or join.")
        phases.run_all(cfg, args.config, args.overrides, parallel=args.parallel)
        return 0
    module = args.module
    if module is not None and args.phase != "incubate":
        raise UserError(f"--module chooses the module an incubation trains; `assemble {args.phase}` has none. Drop "
                        "it, or run `pretrain assemble incubate CONFIG --module K`.")
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    if args.phase == "incubate" and module is None and task:  # one incubation per task of a SLURM job array
        if not task.isdigit():
            raise UserError(f"SLURM_ARRAY_TASK_ID is {task!r}, not a module number: submit the incubations as an "
                            f"array numbered 1..K (sbatch --array=1-{cfg.assembly.modules}), or give --module K.")
        module = int(task)
    phase_cfg = phases.phase_config(cfg, args.phase, module or 0)
    if args.get or args.world_size is not None:
        return _show(phase_cfg, args)
    return _run(phase_cfg)


def _schedule(args) -> int:
    from pretrain.schedule_tool import run_schedule_tool

    run_schedule_tool(args.schedule, args.pp, args.microbatches, args.virtual, args.costs, args.from_run, args.out)
    return 0


def _config(args) -> int:
    if args.config is None and (args.get or args.world_size is not None):
        raise UserError("--get and --world-size read a run's config: give it first, e.g. `pretrain config "
                        "configs/quickstart.yaml --get train.run_dir`.")
    if args.get == "":
        raise UserError("--get needs a key, e.g. --get train.run_dir (`pretrain config` lists them).")
    if args.config is None:
        for key, default, doc in describe():
            print(f"{key:<32} {default!r:<24} {doc}")
        return 0
    return _show(load_config(args.config, args.overrides), args)


def _show(cfg, args) -> int:
    """Print the config, or one key of it (``--get``), after checking its layout against ``--world-size`` (the
    launch scripts' check before they start processes: with the checks `pretrain train` makes at its start)."""
    if args.world_size is not None:
        from pretrain.paths import require_run_dir

        _check_user_config(cfg)
        if not cfg.assembly.modules:
            require_run_dir(cfg)
    if args.world_size is not None and args.world_size != cfg.parallel.world_size:
        p = cfg.parallel
        raise ConfigError("parallel", f"{args.world_size} process(es) would start, but the layout needs "
                          f"{p.world_size} (dp_replicate {p.dp_replicate} x dp_shard {p.dp_shard} x tp {p.tp} x pp "
                          f"{p.pp}); start {p.world_size} or change parallel.*.")
    if args.get:  # one value, for scripts (slurm/train.sbatch reads train.run_dir this way)
        value = cfg.to_dict()
        for part in args.get.split("."):
            if not isinstance(value, dict) or part not in value:
                raise ConfigError(args.get, "is not a config key; `pretrain config` lists them.")
            value = value[part]
        print(value)
        return 0
    print(cfg.to_yaml(), end="")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (a missing argument, an unknown option) as one line with exit code 2, like every other
    error of pretrain, pointing at the verb's --help instead of printing the usage."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"pretrain: error: {message} (`{self.prog} --help` lists what it takes).\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pretrain", description="LLM pretraining from one YAML run config.")
    verbs = parser.add_subparsers(dest="verb", required=True)

    def with_config(p: argparse.ArgumentParser, optional: bool = False) -> argparse.ArgumentParser:
        p.add_argument("config", nargs="?" if optional else None, help="YAML run config")
        p.add_argument("overrides", nargs="*", help="dotted overrides such as train.max_steps=50 optim.lr=1e-3")
        return p

    with_config(verbs.add_parser("train", help="train a model from a run config")).set_defaults(fn=_train)
    with_config(verbs.add_parser("preprocess", help="tokenize the configured text into a megatron-core dataset")
                ).set_defaults(fn=_preprocess)
    tok = verbs.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="action", required=True)
    train = tok.add_parser("train", help="train a tokenizer recipe into tokenizers/NAME/ (or --out), or a run "
                           "config's tokenizer")
    train.add_argument("config", metavar="RECIPE", help="a recipe: NAME of tokenizers/NAME.yaml or a YAML file; or a "
                       "run config")
    train.add_argument("overrides", nargs="*", help="key=value overrides of the recipe (vocab_size=4000) or config")
    train.add_argument("--out", help="folder for tokenizer.model and manifest.json (default tokenizers/NAME)")
    train.set_defaults(fn=_tokenizer_train)
    imp_tok = tok.add_parser("import", help="copy another project's sentencepiece model into tokenizers/NAME/")
    imp_tok.add_argument("source", help="a sentencepiece .model file, or a folder holding tokenizer.model (e.g. a "
                         "Hugging Face model directory)")
    imp_tok.add_argument("name", help="the tokenizer's name (tokenizer.name in run configs)")
    imp_tok.add_argument("--out", help="folder to write instead of tokenizers/NAME")
    imp_tok.set_defaults(fn=_tokenizer_import)
    stats = tok.add_parser("stats", help="bytes per token, tokens per word, unk and byte-fallback rates, vocabulary "
                           "use of a tokenizer on some text")
    stats.add_argument("tokenizer", help="a name of tokenizers/, a .model file, or a folder holding tokenizer.model")
    stats.add_argument("text", nargs="*", help="text files (a document per line; .jsonl/.parquet read their text "
                       "field) held out from the tokenizer's training; default: the embedded corpus")
    stats.add_argument("--text-field", default="text", help="the field of .jsonl/.parquet records that holds the text "
                       "(default text)")
    stats.add_argument("--out", help="also write the measures as JSON to this file")
    stats.set_defaults(fn=_tokenizer_stats)
    export = verbs.add_parser("export", help="write a checkpoint in Hugging Face format (transformers loads it)")
    export.add_argument("checkpoint", help="checkpoint directory (step_NNNNNNN) or run directory (its newest one)")
    export.add_argument("out", help="output directory: model.safetensors, config.json, tokenizer files")
    export.add_argument("--keep-structured", action="store_true",
                        help="keep structured FFN layers (custom modeling code) instead of pre-merging them to dense")
    export.set_defaults(fn=_export)
    imp = verbs.add_parser("import", help="turn a Hugging Face Llama or Mixtral directory into a checkpoint")
    imp.add_argument("hf_dir", help="Hugging Face model directory (config.json + *.safetensors)")
    imp.add_argument("out", help="output directory: OUT/step_0000000 and OUT/config.yaml")
    imp.set_defaults(fn=_import)
    bench = with_config(verbs.add_parser("bench", help="training throughput and MFU, optionally beside transformers"))
    bench.add_argument("--against", choices=["hf"], help="also time the Hugging Face model of the same shape, interleaved")
    bench.add_argument("--hf-precision", choices=["same", "fp32", "bf16"], default="same",
                       help="precision of the Hugging Face model (default: train.precision)")
    bench.add_argument("--steps", type=int, default=10, help="timed optimizer steps per variant")
    bench.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    bench.add_argument("--out", help="write the results as JSON to this file")
    bench.add_argument("--profile", metavar="DIR", help="after timing, profile 2 more steps of each variant: "
                       "a trace per variant in DIR and where the time went (GPU kernels, CPU operators)")
    bench.set_defaults(fn=_bench)
    grow = verbs.add_parser("grow", help="grow a checkpoint into a larger model (depth, width, experts), or plan when")
    grow.add_argument("source", nargs="?", help="checkpoint (step_NNNNNNN) or run directory to grow")
    grow.add_argument("destination", nargs="?", help="new run directory for the grown model")
    from pretrain.growth.offline import OPS

    grow.add_argument("--op", choices=OPS, default="stack", help="stack (G_stack), interpolate, zero, random, width, "
                      "upcycle (default stack)")
    grow.add_argument("--factor", type=int, help="depth operators: times the source's blocks (default 4)")
    grow.add_argument("--num-layers", type=int, help="depth operators: the target's blocks (instead of --factor)")
    grow.add_argument("--layers", help="depth: the source block of each target block, or 'new', e.g. 0,1,new,2")
    grow.add_argument("--hidden-factor", type=int, help="width: hidden size and heads times this (default 1)")
    grow.add_argument("--ffn-size", type=int, help="width: the FFN's new inner width")
    grow.add_argument("--experts", type=int, help="upcycle: experts per MoE layer")
    grow.add_argument("--top-k", type=int, help="upcycle: experts per token (default 2)")
    grow.add_argument("--router", choices=["topk_softmax", "noisy_topk", "hash"],
                      help="upcycle: router (default topk_softmax)")
    grow.add_argument("--config", help="the grown run's config (layout, steps, LR...); default: the source's")
    grow.add_argument("--carry-optimizer", action="store_true",
                      help="copied tensors keep their AdamW moments (default: a fresh optimizer)")
    grow.add_argument("--plan", action="store_true", help="print when to grow (the growth-timing rule) instead")
    grow.add_argument("--target-params", type=float, help="--plan: the target model's parameters")
    grow.add_argument("--tokens", type=float, help="--plan: the target run's training tokens")
    grow.set_defaults(fn=_grow)
    assemble = verbs.add_parser("assemble", help="train the model as modules in independent runs (assembly: section): "
                                "the meta model, one module's incubation, the join, or all of them")
    assemble.add_argument("phase", choices=["meta", "incubate", "join", "run", "check"],
                          help="meta: the shallow meta model; incubate: module k inside it; join: assemble the modules "
                          "and fine-tune; run: every phase here, the incubations as separate processes; check: "
                          "validate every phase's config and print the module count")
    with_config(assemble)
    assemble.add_argument("--module", type=int, help="incubate: the module k (1..K); default: the SLURM array index")
    assemble.add_argument("--parallel", type=int, default=1, help="run: incubations running at once (default 1)")
    assemble.add_argument("--get", metavar="KEY", help="print this key of the phase's config instead of running it")
    assemble.add_argument("--world-size", type=int, metavar="N",
                          help="with --get: also check that the phase's layout needs exactly N processes")
    assemble.set_defaults(fn=_assemble)
    from pretrain.parallel.schedules import SCHEDULES

    sched = verbs.add_parser("schedule", help="draw a pipeline schedule's timeline; print its bubble and peak activations")
    sched.add_argument("--schedule", choices=SCHEDULES, default="1f1b", help="pipeline schedule (parallel.pp_schedule)")
    sched.add_argument("--pp", type=int, default=4, help="pipeline ranks")
    sched.add_argument("--microbatches", type=int, default=8, help="microbatches per step")
    sched.add_argument("--virtual", type=int, help="stages per rank (default 2 for interleaved and V schedules, else 1)")
    sched.add_argument("--costs", help="assumed durations F,I,W of one stage-microbatch (default 1,1,1; B = I + W)")
    sched.add_argument("--from-run", help="take measured F/I/W durations from this run directory's metrics.jsonl")
    sched.add_argument("--out", help="write the timeline image here (.png, .svg, .pdf)")
    sched.set_defaults(fn=_schedule)
    plan = with_config(verbs.add_parser("plan", help="memory and step time of a run's layouts on a cluster, the "
                                        "fastest that fit, and the overrides for it"))
    from pretrain.plan.report import add_arguments as plan_arguments

    plan_arguments(plan)
    plan.set_defaults(fn=_plan)
    config = with_config(verbs.add_parser("config", help="print the resolved config, or every key with its doc"),
                         optional=True)
    config.add_argument("--get", metavar="KEY", help="print only this key's value (e.g. train.run_dir)")
    config.add_argument("--world-size", type=int, metavar="N",
                        help="also check that the layout needs exactly N processes (the launch scripts do)")
    config.set_defaults(fn=_config)
    return parser


def _dashed_override_hint(rest: list[str]) -> str | None:
    """The fix for torchtitan / Megatron habits: ``--train.max_steps=3`` or ``--config FILE``."""
    if any(a == "--config" or a.startswith("--config=") for a in rest):
        return "the config file is the first argument, without an option: `pretrain VERB CONFIG [section.key=value ...]`."
    dashed = [a for a in rest if a.startswith("-") and "." in a.split("=")[0]]
    if not dashed:
        return None
    fixed = [a.lstrip("-") if "=" in a else f"{a.lstrip('-')}=VALUE" for a in dashed]
    return (f"overrides are written without dashes, as section.key=value: {' '.join(fixed)} "
            f"(not {' '.join(dashed)}).")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may also follow the options (`pretrain bench CONFIG --against hf train.compile=false`):
    # argparse stops the positional list at the first option, so the rest arrive as unknown arguments.
    try:  # (argparse exits: 0 after --help, 2 after its one-line error)
        args, rest = parser.parse_known_args(argv)
        if rest and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in rest):
            args.overrides += rest
        elif rest:
            hint = _dashed_override_hint(rest) if hasattr(args, "overrides") else None
            if hint:
                print(f"pretrain: error: {hint}", file=sys.stderr)
                return EXIT_USER_ERROR
            verb = " ".join(v for v in (getattr(args, "verb", None), getattr(args, "action", None)) if v)
            print(f"pretrain: error: unrecognized arguments: {' '.join(rest)} (`pretrain {verb} --help` lists what it "
                  "takes).", file=sys.stderr)
            return EXIT_USER_ERROR
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_USER_ERROR
    try:
        check_torch_version()
        return args.fn(args)
    except UserError as e:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        if rank == 0 or rank >= world:  # every rank meets the same mistake: say it once (a stray RANK: say it)
            kind = "config error" if isinstance(e, ConfigError) else "error"
            print(f"pretrain: {kind}: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except RankFailure as e:
        print(f"pretrain: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into `head` and friends
        return 0
    except KeyboardInterrupt:
        print("pretrain: interrupted; the newest complete checkpoint is kept.", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print("pretrain: internal error: this is a bug in pretrain, not something in your config or data; please "
              "report it with the traceback above.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
