"""A catalogue of user mistakes across the verbs: each exits with code 2 and one message that names the key, file or
option and the fix, with no traceback, and changes no file that was there before."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.cli import main
from tests.conftest import REPO, TINY


@pytest.fixture
def world(tmp_path, shared_cache, tiny_cfg):
    """A scratch directory with a finished tiny run and every kind of bad input the catalogue points at."""
    from pretrain.train.trainer import run_training

    cfg = tiny_cfg("train.max_steps=2", "train.eval_interval=0")
    run_training(cfg, log=lambda *a, **k: None)
    w = tmp_path / "w"
    w.mkdir()
    (w / "afile").write_text("x")
    (w / "tokdir").mkdir()
    (w / "garbage.model").write_text("not a model")
    (w / "empty.txt").write_text("")
    (w / "latin1.txt").write_bytes("caf\xe9 na\xefve ".encode("latin-1") * 100)
    (w / "data.csv").write_text("a,b\n1,2\n")
    (w / "empty.jsonl").write_text("")
    (w / "content.jsonl").write_text('{"content": "text under another field"}\n')
    (w / "bad.jsonl").write_text('{"text": "a line"}\n{"text": oops}\n')
    (w / "bad.yaml").write_text("train: [max_steps: 3\n")
    (w / "empty.yaml").write_text("\n")
    (w / "list.yaml").write_text("- 1\n- 2\n")
    (w / "dup.yaml").write_text("train:\n  max_steps: 3\n  max_steps: 4\n")
    (w / "hf_nojson").mkdir()
    (w / "hf_badjson").mkdir()
    (w / "hf_badjson" / "config.json").write_text("{not json")
    (w / "hf_gpt2").mkdir()
    (w / "hf_gpt2" / "config.json").write_text('{"model_type": "gpt2"}')
    (w / "hf_remote").mkdir()
    (w / "hf_remote" / "config.json").write_text('{"model_type": "evil", "auto_map": {"AutoConfig": "evil.Cfg"}}')
    (w / "hf_remote" / "evil.py").write_text(f"open('{w}/PWNED', 'w').write('x')\n")
    big_ids = w / "big_ids"
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{big_ids}.bin", dtype=DType.optimal_dtype(70000))
    for _ in range(40):
        builder.add_item(torch.from_numpy(np.random.default_rng(0).integers(0, 70000, 200)))
        builder.end_document()
    builder.finalize(f"{big_ids}.idx")
    (w / "blank.txt").write_text("\n\n\n")
    (w / "five.txt").write_text("one line of text\nanother line\na third\nthe fourth\nfifth and last\n")
    badstate = w / "badstate"  # a copy of the run whose trainer state is garbage
    shutil.copytree(cfg.train.run_dir, badstate)
    (badstate / "checkpoints" / "step_0000002" / "trainer_state.json").write_text("{not json")
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()  # the run's tokenizer with two pieces swapped: same size, other ids
    proto.ParseFromString(Path(cfg.tokenizer.path).read_bytes())
    a, b = proto.pieces[300].piece, proto.pieces[301].piece
    proto.pieces[300].piece, proto.pieces[301].piece = b, a
    (w / "other.model").write_bytes(proto.SerializeToString())
    (w / "busy").mkdir()
    (w / "busy" / ".lock").write_text("process 1 on elsewhere since 2026-01-01 00:00:00\n")
    holder = subprocess.Popen(["flock", str(w / "busy" / ".lock"), "sleep", "600"])  # another run holds it
    yield cfg, w, Path(cfg.train.run_dir)
    holder.kill()
    holder.wait()


def cases(cfg, w: Path, run: Path) -> list[tuple[str, list[str], str]]:
    """(what, argv, a fragment the message must hold)."""
    tiny = [*TINY, f"tokenizer.path={cfg.tokenizer.path}", f"data.prefix={cfg.data.prefix}"]
    train = ["train", "configs/quickstart.yaml", *tiny]
    fresh = [f"train.run_dir={w}/fresh"]
    return [
        ("config file missing", ["train", f"{w}/nope.yaml"], "does not exist"),
        ("config path is a directory", ["train", str(w)], "is a directory"),
        ("malformed YAML", ["train", f"{w}/bad.yaml"], f'not valid YAML: while parsing a flow sequence\n  in "{w}/bad.yaml"'),
        ("empty config file", ["train", f"{w}/empty.yaml"], "is empty"),
        ("YAML that is not a mapping", ["train", f"{w}/list.yaml"], "mapping of sections"),
        ("a tokenizer recipe given as the run config", ["train", "tokenizers/pydoc-bpe-8k.yaml"],
         "`pretrain tokenizer train tokenizers/pydoc-bpe-8k.yaml`"),
        ("a Hugging Face config given as the run config", ["train", f"{w}/hf_gpt2/config.json"], "`pretrain import"),
        ("duplicate key", ["config", f"{w}/dup.yaml"], "appears twice"),
        ("unknown section", [*train, "trian.max_steps=3"], "Did you mean 'train'"),
        ("unknown key", [*train, "optim.lrr=1e-3"], "Did you mean 'lr'"),
        ("override without =", [*train, "train.max_steps"], "section.key=value"),
        ("override below a key", [*train, "train.max_steps.x=1"], "is a value, not a section"),
        ("integer expected", [*train, "train.max_steps=ten"], "must be an integer"),
        ("boolean expected", [*train, "train.compile=maybe"], "true or false"),
        ("choice not allowed", [*train, "train.precision=fp8"], "allowed: auto, fp32, bf16"),
        ("infinite learning rate", [*train, "optim.lr=.inf"], "finite number"),
        ("absurd learning rate", [*train, "optim.lr=1e6"], "typical values"),
        ("stop after the last step", [*train, *fresh, "train.stop_at_step=500"], "would never stop the run"),
        ("negative epsilon", [*train, "optim.eps=-1e-8"], "optim.eps"),
        ("NaN init std", [*train, "model.init_std=.nan"], "model.init_std"),
        ("batch not a multiple", [*train, "data.global_batch_size=10"], "multiple of micro_batch_size"),
        ("heads do not divide width", [*train, "model.num_heads=5"], "not divisible by num_heads"),
        ("kv heads do not divide heads", [*train, "model.num_kv_heads=3"], "multiple of num_kv_heads"),
        ("tp does not divide heads", [*train, "parallel.tp=3", "model.num_kv_heads=0"], "parallel.tp 3"),
        ("expert parallelism without experts", [*train, "parallel.dp_shard=2", "parallel.ep=2"], "needs an MoE"),
        ("ep does not divide experts", [*train, "model.moe.num_experts=3", "parallel.dp_shard=2", "parallel.ep=2"],
         "num_experts (3)"),
        ("more stages than blocks", [*train, "parallel.pp=4"], "at least as many blocks"),
        ("bad pipeline layout", [*train, "parallel.pp=2", "parallel.pp_layout=[1,5]"], "parallel.pp_layout"),
        ("schedule needs more microbatches", [*train, "model.num_layers=4", "parallel.pp=2", "data.global_batch_size=4",
                                              "parallel.pp_schedule=dualpipev", "parallel.pp_virtual=2"],
         "parallel.pp_schedule"),
        ("compile with tensor parallelism", [*train, "parallel.tp=2", "train.compile=true"], "train.compile"),
        ("DeepSpeed with our pipeline schedules", [*train, "parallel.engine=deepspeed", "parallel.pp=2"],
         "parallel.engine=native"),
        ("DeepSpeed with tensor parallelism", [*train, "parallel.engine=deepspeed", "parallel.tp=2"],
         "parallel.tp=1"),
        ("ZeRO stage DeepSpeed does not have", [*train, "parallel.engine=deepspeed", "parallel.zero_stage=4"],
         "must be 1, 2 or 3"),
        ("parameter offload below stage 3", [*train, "parallel.engine=deepspeed", "parallel.offload_params=true"],
         "parallel.zero_stage=3"),
        ("DeepSpeed key the config sets", [*train, "parallel.engine=deepspeed",
                                           "parallel.deepspeed={gradient_clipping: 2.0}"], "optim.grad_clip"),
        ("DeepSpeed key the engine does not pass", [*train, "parallel.engine=deepspeed",
                                                    "parallel.deepspeed={optimiser: {}}"], "allowed: zero_optimization"),
        ("DeepSpeed key DeepSpeed refuses", [*train, "parallel.engine=deepspeed",
                                             "parallel.deepspeed={zero_optimization: {reduce_bucket_size: big}}"],
         "DeepSpeed refuses it"),
        ("source suffix pretrain does not read", [*train, f"data.sources=[{{path: {w}/data.csv}}]"],
         "data.sources[0].type"),
        ("empty JSON Lines file", [*train, *fresh, f"data.sources=[{{path: {w}/empty.jsonl}}]",
                                   f"tokenizer.path={w}/t2.model"], "empty.jsonl' is empty"),
        ("JSON Lines file with a broken line", [*train, *fresh, f"data.sources=[{{path: {w}/bad.jsonl}}]",
                                                f"tokenizer.path={w}/t2.model"], "line 2 of"),
        ("sources and blend together", [*train, "data.sources=[{path: a.txt}]", "data.blend=[{path: b}]"],
         "not both"),
        ("bad split", [*train, "data.split=90,10"], "three weights"),
        ("data prefix that names a folder", [*train, "data.prefix=cache/"], "data.prefix=cache/corpus"),
        ("low-rank without rank", [*train, "model.ffn.kind=lowrank"], "model.ffn.rank"),
        ("self-guided on a dense FFN", [*train, "model.ffn.self_guided.enabled=true"], "guides a structured FFN"),
        ("world size differs from the layout", [*train, *fresh, "parallel.dp_shard=2"],
         "1 process(es) were started but the parallel layout needs 2"),
        ("run directory is a file", [*train, f"train.run_dir={w}/afile"], "train.run_dir"),
        ("run directory full of other files", [*train, f"train.run_dir={w}"], f"train.run_dir={w}/run"),
        ("the launchers' check of a run directory full of other files", ["config", "configs/quickstart.yaml", *tiny,
                                                                        f"train.run_dir={w}", "--world-size", "1"],
         "holds other files"),
        ("the launchers' check of a stop after the last step", ["config", "configs/quickstart.yaml", *tiny,
                                                               "train.stop_at_step=500", "--world-size", "1"],
         "would never stop the run"),
        ("tokenizer path is a directory", [*train, f"tokenizer.path={w}/tokdir", *fresh], "is a directory"),
        ("tokenizer file is garbage", [*train, f"tokenizer.path={w}/garbage.model", *fresh],
         "is not a sentencepiece model"),
        ("empty text file", [*train, f"data.sources=[{{path: {w}/empty.txt}}]", f"tokenizer.path={w}/t1.model",
                             f"data.prefix={w}/c1", *fresh], "is empty"),
        ("text file not UTF-8", [*train, f"data.sources=[{{path: {w}/latin1.txt}}]", f"tokenizer.path={w}/t2.model",
                                 f"data.prefix={w}/c2", *fresh], "not UTF-8"),
        ("glob matching nothing", [*train, f"data.sources=[{{path: '{w}/none*.txt'}}]",
                                   f"tokenizer.path={w}/t3.model", f"data.prefix={w}/c3", *fresh], "matches no file"),
        ("ids beyond the vocabulary", [*train, f"data.blend=[{{path: {w}/big_ids}}]", "model.vocab_size=640",
                                       "data.split=100,0,0", *fresh], "token id"),
        ("sequence too long for memory", [*train, "data.seq_len=2000000", *fresh], "train.preflight=false"),
        ("model too large for memory", [*train, "model.hidden_size=8192", "model.num_layers=48", "model.num_heads=64",
                                        *fresh], "`pretrain plan CONFIG` ranks the layouts that fit"),
        ("new run over an old one", [*train, f"train.run_dir={run}", "train.resume=never"], "train.resume=overwrite"),
        ("resume from a path that is no checkpoint", [*train, *fresh, f"train.resume={w}"],
         "not a complete checkpoint"),
        ("export of no checkpoint", ["export", str(w), f"{w}/hf"], "neither a complete checkpoint"),
        ("export into a file", ["export", str(run), f"{w}/afile"], "is a file"),
        ("import without config.json", ["import", f"{w}/hf_nojson", f"{w}/imp"], "no config.json"),
        ("import of bad JSON", ["import", f"{w}/hf_badjson", f"{w}/imp"], "not a JSON object"),
        ("import of an unsupported model", ["import", f"{w}/hf_gpt2", f"{w}/imp"], "model_type 'gpt2'"),
        ("import of a model with its own code", ["import", f"{w}/hf_remote", f"{w}/imp"], "never runs"),
        ("schedule image format", ["schedule", "--out", f"{w}/x.xyz"], "cannot write '.xyz'"),
        ("schedule with one rank", ["schedule", "--pp", "1"], "--pp 1"),
        ("an option value of the wrong type", ["schedule", "--pp", "two"], "`pretrain schedule --help` lists"),
        ("an argument the verb does not take", ["tokenizer", "stats", "pydoc-bpe-8k", "--bogus"],
         "unrecognized arguments: --bogus (`pretrain tokenizer stats --help`"),
        ("plan with micro-batch sizes that are no numbers", ["plan", "configs/plan/llama3_8b.yaml",
                                                             "--micro-batch-sizes", "a,b"], "positive integers"),
        ("plan with a utilisation above 1", ["plan", "configs/plan/llama3_8b.yaml", "--efficiency", "45"], "(0, 1]"),
        ("plan of a run no layout fits", ["plan", "configs/plan/llama3_405b.yaml", "--gpu", "a100-40gb",
                                          "--micro-batch-sizes", "1"], "no layout of this run fits"),
        ("plan on more GPUs than a step has sequences for", ["plan", "configs/bench_1b.yaml", "--nodes", "32"],
         "It would be possible with data.global_batch_size=32 or --nodes 11"),
        ("export into a checkpoint that retention deletes", ["export", str(run), f"{run}/checkpoints/step_0000002/hf"],
         "lies inside the checkpoint"),
        ("import of a file that is no tokenizer", ["tokenizer", "import", f"{w}/garbage.model", "x", "--out",
                                                   f"{w}/tk"], "is not a sentencepiece model"),
        ("import of a tokenizer that does not exist", ["tokenizer", "import", f"{w}/nope.model", "x", "--out",
                                                       f"{w}/tk"], "does not exist: give a sentencepiece"),
        ("bench of a structured FFN beside transformers' dense one", ["bench", "configs/quickstart.yaml",
                                                                      "model.vocab_size=640", "model.ffn.kind=lowrank",
                                                                      "model.ffn.rank=8", "--against", "hf"],
         "has no lowrank FFN to compare with"),
        ("text of blank lines only", ["preprocess", "configs/quickstart.yaml", *tiny,
                                      f"data.sources=[{{path: {w}/blank.txt}}]", f"data.prefix={w}/blank"],
         "holds no tokens"),
        ("seed outside the RNGs' range", [*train, "train.seed=-5"], "train.seed"),
        ("an end-of-run sample too long to wait for", [*train, "train.sample_tokens=100000"], "pretrain.load_model"),
        ("resume from a run directory, not a checkpoint", [*train, *fresh, f"train.resume={run}"],
         f"train.resume={run}/checkpoints/step_0000002"),
        ("train a run's tokenizer over its existing file", ["tokenizer", "train", "configs/quickstart.yaml",
                                                           "tokenizer.name=", *tiny], "already holds a tokenizer"),
        ("config --get without a config", ["config", "--get", "train.run_dir"], "give it first"),
        ("tokenizer stats of blank text", ["tokenizer", "stats", "pydoc-bpe-8k", f"{w}/blank.txt"], "holds no text"),
        ("tokenizer stats of records without a text field", ["tokenizer", "stats", "pydoc-bpe-8k",
                                                             f"{w}/content.jsonl"], "(columns: content); give it with --text-field"),
        ("tokenizer trained on blank text", ["tokenizer", "train", "pydoc-bpe-8k", f"sources=[{{path: {w}/blank.txt}}]",
                                             "--out", f"{w}/newtok/sub"], "has no non-empty line"),
        ("assembly --module for a phase with no module", ["assemble", "meta", "configs/quickstart.yaml", *tiny,
                                                          "assembly.modules=2", "model.tie_embeddings=false",
                                                          "--module", "2"],
         "`assemble meta` has none"),
        ("bench output unwritable", ["bench", "configs/quickstart.yaml", "--out", f"{w}/afile/x.json"], "--out"),
        ("bench without a vocabulary size", ["bench", "configs/quickstart.yaml"], "set model.vocab_size"),
        ("bench of several processes", ["bench", "configs/quickstart.yaml", "model.vocab_size=640",
                                        "parallel.dp_shard=2"], "runs one process"),
        ("preprocess of a blend", ["preprocess", "configs/quickstart.yaml", "data.blend=[{path: x}]"],
         "already preprocessed"),
        ("validation split without documents", [*train, f"data.sources=[{{path: {w}/five.txt}}]",
                                                f"data.prefix={w}/c5", "data.split=98,2,0", *fresh],
         "gives the validation split none"),
        ("test split without documents", [*train, f"data.sources=[{{path: {w}/five.txt}}]", f"data.prefix={w}/c5",
                                          "data.split=90,5,5", *fresh], "gives the test split none"),
        ("resume under another model shape", [*train, f"train.run_dir={run}", "model.num_layers=3"],
         "holds another model than this config builds (model.num_layers: 2 -> 3"),
        ("trainer state that is no JSON", [*train, *fresh, "checkpoint.verify=none",
                                           f"train.resume={w}/badstate/checkpoints/step_0000002"],
         "unreadable trainer_state.json"),
        ("resume under another tokenizer", [*train, f"train.run_dir={run}", f"tokenizer.path={w}/other.model",
                                            "model.tie_embeddings=false"], "was trained with another tokenizer"),
        ("two runs in one run directory", [*train, f"train.run_dir={w}/busy"], "is in use by another run"),
        ("empty run directory (an unset variable)", [*train, "train.run_dir="], "is empty"),
        ("a directory as a text source", [*train, f"data.sources=[{{path: {w}/tokdir, type: text}}]", *fresh],
         "is a directory; give its files with a glob"),
        ("structured rank above the width", [*train, "model.ffn.kind=lowrank", "model.ffn.rank=128"],
         "model.ffn.rank=32"),
        ("block-shuffle FFN of one block", [*train, "model.ffn.kind=blockshuffle", "model.ffn.blocks=1"],
         "at least 2 blocks"),
        ("override written as an option", [*train, "--train.max_steps=3"], "without dashes"),
        ("config given as an option", ["train", "--config", "configs/quickstart.yaml"], "the first argument"),
        ("key named as another stack names it", [*train, "optim.learning_rate=1e-3"], "Did you mean 'lr'"),
        ("split written as a list", [*train, "data.split=[90,10,0]"], "write data.split=90,10,0"),
        ("source written as a bare path", [*train, "data.sources=[a.txt]"], "such as {path: a.txt}"),
        ("MoE on every n-th block, n beyond the depth", [*train, "model.moe.num_experts=4", "model.moe.every_n=5"],
         "so none would be"),
        ("structured FFN with every block left dense", [*train, "model.ffn.kind=lowrank", "model.ffn.rank=8",
                                                        "model.ffn.dense_blocks=5"], "no block would be lowrank"),
        ("negative watchdog factor", [*train, "train.watchdog_factor=-1"], "train.watchdog_factor"),
        ("negative depth-diagnostics interval", [*train, "logging.depth_interval=-1"], "logging.depth_interval"),
        ("resume past the end of the schedule", [*train, f"train.run_dir={run}", "train.max_steps=1",
                                                 "optim.warmup_steps=0", "model.tie_embeddings=false"],
         "past the end of its schedule"),
        ("growth by a factor below 2", ["grow", str(run), f"{w}/g", "--factor", "0"], "--factor 0"),
        ("growth by a factor of 1", ["grow", str(run), f"{w}/g", "--factor", "1"], "give 2 or more"),
        ("growth to as many blocks", ["grow", str(run), f"{w}/g", "--num-layers", "2"], "depth growth adds blocks"),
        ("width growth that changes nothing", ["grow", str(run), f"{w}/g", "--op", "width"],
         "--hidden-factor 2 or more"),
        ("upcycling with top-k above the experts", ["grow", str(run), f"{w}/g", "--op", "upcycle", "--experts", "1"],
         "--top-k must be between 1 and --experts (1)"),
        ("upcycling with top-k 0", ["grow", str(run), f"{w}/g", "--op", "upcycle", "--experts", "4", "--top-k", "0"],
         "--top-k must be between 1 and --experts (4)"),
        ("another operator's option given 0", ["grow", str(run), f"{w}/g", "--op", "stack", "--experts", "0"],
         "--experts is for --op upcycle"),
        ("another operator's option for growth", ["grow", str(run), f"{w}/g", "--op", "stack", "--experts", "4"],
         "--experts is for --op upcycle, not --op stack"),
        ("a layer map with a factor", ["grow", str(run), f"{w}/g", "--layers", "0,1,0,1", "--factor", "3"],
         "drop --factor"),
        ("growth plan of negative parameters", ["grow", "--plan", "--target-params", "-5", "--tokens", "1e9"],
         "--target-params -5"),
        ("import into a run directory", ["import", f"{w}/hf_gpt2", str(run)], "already holds a run"),
        ("import into a directory with files", ["import", f"{w}/hf_gpt2", f"{w}/hf_badjson"], "already holds files"),
        ("export into a run directory", ["export", str(run), str(run)], "already holds a run"),
        ("export into a directory with files", ["export", str(run), f"{w}/hf_gpt2"], "already holds files"),
        ("bench profile into a file", ["bench", "configs/quickstart.yaml", "model.vocab_size=640", "--profile",
                                       f"{w}/afile"], "point --profile at a directory"),
        ("bench of more steps than memory", ["bench", "configs/quickstart.yaml", "model.vocab_size=640", "--steps",
                                             "1000000000"], "time fewer steps"),
        ("schedule with no stages per rank", ["schedule", "--schedule", "interleaved_1f1b", "--virtual", "0"],
         "--virtual 0"),
        ("schedule with no microbatches", ["schedule", "--microbatches", "0"], "--microbatches 0"),
        ("schedule with a NaN cost", ["schedule", "--costs", "1,nan,1"], "between 1e-6 and 1e6"),
        ("schedule with a cost that overflows", ["schedule", "--costs", "1e308,1,1"], "only on their ratios"),
        ("schedule too large to replay", ["schedule", "--pp", "10000", "--microbatches", "10000"],
         "give fewer ranks or microbatches"),
        ("plan with no rows", ["plan", "configs/plan/llama3_8b.yaml", "--top", "0"], "--top must be at least 1"),
        ("plan with a negative bandwidth", ["plan", "configs/plan/llama3_8b.yaml", "--intra-gbps", "-5"],
         "--intra-gbps"),
        ("growth stage its operator refuses", [*train, "growth=[{at_step: 2, op: upcycle, experts: 1}]"],
         "growth[0].top_k"),
        ("growth stage with another operator's keys", [*train, "growth=[{at_step: 2, op: stack, experts: 4}]"],
         "experts belong to another operator than op=stack"),
        ("growth stage that removes blocks", [*train, "growth=[{at_step: 2, op: stack, num_layers: 1}]"],
         "growth adds blocks"),
    ]


def snapshot(*roots: Path) -> dict[str, tuple]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for root in roots for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}  # (every run start records itself in the run directory's lock)


def test_every_mistake_exits_2_with_the_fix_and_changes_nothing(world, capsys, monkeypatch):
    cfg, w, run = world
    monkeypatch.chdir(REPO)
    catalogue = cases(cfg, w, run)
    assert len(catalogue) >= 40
    before = snapshot(w, run)
    failures = []
    for what, argv, fragment in catalogue:
        code = main(argv)
        err = capsys.readouterr().err
        if code != 2 or fragment not in err or "Traceback" in err or err.count("pretrain: ") != 1:
            failures.append(f"{what}: exit {code}, stderr {err[-600:]!r}")
    assert not failures, "\n".join(failures)
    after = snapshot(w, run)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing that was there changed
    assert not (w / "PWNED").exists()
    assert not (w / "newtok").exists()  # a failed `tokenizer train --out` leaves no empty folders behind
    assert not (w / "user_error").exists()  # a refused run directory gets no marker either (it would pass next time)


def test_stray_rank_variable_is_named(monkeypatch, capsys, tiny_overrides):
    """RANK left over from another launcher: one process would log nothing (rank 1 is quiet) and train alone."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["train", "configs/quickstart.yaml", *tiny_overrides]) == 2
    assert "sets RANK=1 but WORLD_SIZE=unset" in capsys.readouterr().err


def test_leading_tilde_of_a_path_is_the_home_directory():
    from pretrain.config import load_config

    cfg = load_config(None, ["train.run_dir=~/runs/a", "data.prefix=~/cache/c", "data.sources=[{path: ~/t.txt}]"])
    home = os.path.expanduser("~")
    assert (cfg.train.run_dir, cfg.data.prefix, cfg.data.sources[0].path) == (
        f"{home}/runs/a", f"{home}/cache/c", f"{home}/t.txt")


@pytest.mark.slow
def test_layout_mistake_under_torchrun_is_said_once(tiny_overrides, tmp_path):
    """Started by torchrun directly (the launch scripts check before): every rank stops with exit code 2 and only
    rank 0 says why."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "pretrain", "train", "configs/quickstart.yaml", *tiny_overrides,
                             "parallel.dp_shard=2", "model.moe.num_experts=3", "parallel.ep=2"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.count("pretrain: config error: config key 'parallel.ep'") == 1, result.stderr[-3000:]
    assert "exitcode  : 2" in result.stderr
    assert json.dumps  # (the run directory is never created for a config error)
    assert not (tmp_path / "run").exists()
