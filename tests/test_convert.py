"""Hugging Face export and import, checked by the real transformers library (nothing is downloaded).

Every architecture kind exports to the class that represents it exactly and the exported model's logits equal
ours; Llama and Mixtral models made by transformers import with equal logits and export back to the same
tensors; the tokenizer encodes like sentencepiece; the trainer and the CLI export and import.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)

import pretrain
from pretrain.config import DataConfig, TokenizerConfig, load_config, resolve
from pretrain.convert import export_checkpoint, import_checkpoint
from pretrain.convert.custom import MODELING_FILE
from pretrain.convert.tokenizer import export_tokenizer
from pretrain.data.prepare import ensure_tokenizer
from pretrain.data.tokenizer import Tokenizer, train_tokenizer
from pretrain.errors import UserError
from pretrain.models.transformer import build_model
from pretrain.train import checkpoint
from pretrain.train.optim import build_optimizer
from pretrain.train.trainer import Trainer, run_training
from tests.conftest import REPO, run_cli

CUSTOM = "PretrainForCausalLM"
MOE = ["model.moe.num_experts=4"]
# (name, overrides, keep_structured, the transformers class the export must load as)
CASES = [
    ("dense_gqa", [], False, "LlamaForCausalLM"),
    ("tied_embeddings", ["model.tie_embeddings=true"], False, "LlamaForCausalLM"),
    ("lns", ["model.norm_scaling=lns"], False, "LlamaForCausalLM"),
    ("lowrank_premerged", ["model.ffn.kind=lowrank", "model.ffn.rank=16"], False, "LlamaForCausalLM"),
    ("blockdense_self_guided_premerged", ["model.ffn.kind=blockdense", "model.ffn.rank=32",
                                          "model.ffn.self_guided.enabled=true"], False, "LlamaForCausalLM"),
    ("blockshuffle_premerged", ["model.ffn.kind=blockshuffle", "model.ffn.blocks=4", "model.ffn.dense_blocks=0"],
     False, "LlamaForCausalLM"),
    ("moe_topk_softmax", MOE, False, "MixtralForCausalLM"),
    ("moe_shared_experts_lns", [*MOE, "model.moe.num_shared_experts=2", "model.norm_scaling=lns"], False,
     "Qwen2MoeForCausalLM"),
    ("moe_every_second_block", [*MOE, "model.moe.every_n=2"], False, "Qwen2MoeForCausalLM"),
    ("post", ["model.norm_placement=post"], False, CUSTOM),
    ("mix", ["model.norm_placement=mix", "model.mix_ln_ratio=0.5"], False, CUSTOM),
    ("sandwich_layernorm_lns", ["model.norm_placement=sandwich", "model.norm=layernorm", "model.norm_scaling=lns"],
     False, CUSTOM),
    ("dyt_gelu_tied", ["model.norm=dyt", "model.ffn.activation=gelu", "model.tie_embeddings=true"], False, CUSTOM),
    ("moe_hash", [*MOE, "model.moe.router=hash"], False, CUSTOM),
    ("moe_noisy_topk", [*MOE, "model.moe.router=noisy_topk"], False, CUSTOM),
    ("moe_capacity_shared", [*MOE, "model.moe.capacity_factor=0.5", "model.moe.num_shared_experts=1"], False, CUSTOM),
    ("kept_lowrank", ["model.ffn.kind=lowrank", "model.ffn.rank=16"], True, CUSTOM),
    ("kept_blockshuffle_moe", ["model.ffn.kind=blockshuffle", "model.ffn.blocks=4", "model.ffn.dense_blocks=0",
                               *MOE, "model.moe.num_shared_experts=1"], True, CUSTOM),
    ("post_premerged_structured_experts", ["model.norm_placement=post", "model.ffn.kind=blockdense",
                                           "model.ffn.rank=32", "model.ffn.dense_blocks=0", *MOE], False, CUSTOM),
]
TEXTS = ["Hello world", " leading space", "  two leading spaces", "trailing  ", "line\nbreak\n\n", "\n",
         "digits 1234567 and 3.14", "unicode: héllo wörld — ñ 日本語 🙂", "tabs\tand  runs   of spaces", "",
         "def f(x):\n    return x + 1\n", "</s> and <s> as plain text", "<0x41> is not a byte here"]


def quiet(*_a, **_k):
    pass


@pytest.fixture
def make_cfg(tiny_cfg):
    """A tiny run config (hidden 64, 2 layers, 4 heads, 2 KV heads) with its tokenizer trained and vocab resolved."""
    def make(*extra: str):
        cfg = tiny_cfg(*extra)
        return resolve(cfg, ensure_tokenizer(cfg, log=quiet).vocab_size)
    return make


def save_perturbed(cfg, root: Path) -> Path:
    """A real checkpoint of a model whose every parameter is moved off its init (norm gains != 1, non-zero
    noisy-router gates, DyT alpha != 0.5), so no mapping can be right by accident."""
    model = build_model(cfg.model, cfg.train.seed)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    state = {"step": 1, "consumed_samples": 0, "tokens": 0}
    return save_weights(root, 1, model, cfg, state)


def save_weights(root: Path, step: int, model, cfg, state: dict) -> Path:
    """A checkpoint of ``model`` with a fresh optimizer, as a run would write it."""
    optimizer = build_optimizer(model, cfg.optim)
    return checkpoint.save(root, step, lambda directory: checkpoint.save_dcp(directory, model, optimizer), state,
                           cfg.to_yaml(), keep=1)


def random_tokens(vocab_size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 32), generator=torch.Generator().manual_seed(seed))


def max_logit_diff(ours, theirs, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        return (ours(tokens) - theirs(tokens).logits).abs().max().item()


def greedy(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    return ids


def assert_generates_our_greedy_continuation(hf, ours, prompt: torch.Tensor) -> None:
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False)
    assert prompt.shape[1] < out.shape[1] <= prompt.shape[1] + 4  # stops early only at eos
    assert torch.equal(out, greedy(ours, prompt, out.shape[1] - prompt.shape[1]))


@pytest.mark.parametrize("name,overrides,keep_structured,hf_class", CASES, ids=[c[0] for c in CASES])
def test_export_loads_as_exact_class_with_equal_logits_and_generates(make_cfg, tmp_path, name, overrides,
                                                                      keep_structured, hf_class):
    cfg = make_cfg(*overrides)
    step_dir = save_perturbed(cfg, tmp_path / "checkpoints")
    out = export_checkpoint(step_dir, tmp_path / "hf", keep_structured=keep_structured)
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=hf_class == CUSTOM)
    ours = pretrain.load_model(step_dir)
    assert type(hf).__name__ == hf_class
    assert max_logit_diff(ours, hf, random_tokens(cfg.model.vocab_size)) <= 1e-4
    assert_generates_our_greedy_continuation(hf, ours, random_tokens(cfg.model.vocab_size, seed=1)[:1, :6])


def test_keep_structured_export_refuses_a_checkpoint_still_in_its_guided_phase(make_cfg, tmp_path):
    cfg = make_cfg("model.ffn.kind=lowrank", "model.ffn.rank=16", "model.ffn.self_guided.enabled=true")
    step_dir = save_perturbed(cfg, tmp_path / "checkpoints")  # step 1 of 8 guided steps: guides present
    with pytest.raises(UserError, match="self-guided phase"):
        export_checkpoint(step_dir, tmp_path / "hf", keep_structured=True)


def test_custom_modeling_file_needs_only_torch_and_transformers(make_cfg, tmp_path, monkeypatch):
    imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(MODELING_FILE.read_text()))
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(ast.parse(MODELING_FILE.read_text()))
                 if isinstance(node, ast.ImportFrom)}
    assert imported == {"__future__", "math", "torch", "transformers"}
    cfg = make_cfg("model.norm_placement=post", *MOE, "model.moe.router=hash")
    step_dir = save_perturbed(cfg, tmp_path / "checkpoints")
    out = export_checkpoint(step_dir, tmp_path / "standalone")
    tokens = random_tokens(cfg.model.vocab_size)
    left_padded = torch.ones_like(tokens)
    left_padded[1, :5] = 0
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "pretrain", None)  # any `import pretrain...` now fails
        hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
        tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
        with torch.no_grad():
            logits = hf(tokens).logits
            padded = hf(tokens, attention_mask=left_padded).logits
        hf.generate(tokens[:1, :4], max_new_tokens=2, do_sample=False)
    ours = pretrain.load_model(step_dir)
    with torch.no_grad():
        assert (ours(tokens) - logits).abs().max().item() <= 1e-4
        # RoPE is relative: a left-padded row computes what its unpadded tokens alone compute
        assert (ours(tokens[1:, 5:])[0] - padded[1, 5:]).abs().max().item() <= 1e-4
    assert tok(" Return x")["input_ids"] == Tokenizer(cfg.tokenizer.path).encode(" Return x")


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_exported_tokenizer_encodes_and_decodes_exactly_like_sentencepiece(make_cfg, tmp_path, kind):
    if kind == "bpe":
        model_file = Path(make_cfg().tokenizer.path)
    else:
        model_file = tmp_path / "unigram.model"
        train_tokenizer(TokenizerConfig(path=str(model_file), type="unigram", vocab_size=600, train_sentences=20000),
                        DataConfig(embedded_docs=120))
    ids = export_tokenizer(model_file, tmp_path, max_length=64)
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert ids == {"bos": 1, "eos": 2, "pad": 3, "unk": 0}
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 3, 0)
    for text in TEXTS:
        expected = sp.encode(text)
        assert tok(text)["input_ids"] == expected, text  # no bos/eos added: our documents carry none before eos
        assert tok(text, add_special_tokens=False)["input_ids"] == expected, text
        assert tok.decode(expected) == sp.decode(expected), text
    assert tok.decode([1, *sp.encode("Hello"), 2], skip_special_tokens=True) == "Hello"


def random_hf_model(kind: str, directory: Path):
    """A random Llama (GQA, tied embeddings) or Mixtral made by transformers and saved with save_pretrained."""
    torch.manual_seed(0)
    common = dict(vocab_size=640, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=5e4)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **common))
    else:
        model = MixtralForCausalLM(MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **common))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # norm weights off 1 too
    model.save_pretrained(directory)
    return model.eval()


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_random_hf_model_imports_with_equal_logits(tmp_path, kind):
    hf = random_hf_model(kind, tmp_path / "hf")
    step_dir = import_checkpoint(tmp_path / "hf", tmp_path / "imported")
    assert step_dir == tmp_path / "imported" / "step_0000000" and checkpoint.is_complete(step_dir)
    m = load_config(step_dir / "config.yaml").model
    assert (m.num_kv_heads, m.rope_theta, m.norm_eps, m.tie_embeddings, m.moe.num_experts) == (
        2, 5e4, 1e-6, kind == "llama", 4 if kind == "mixtral" else 0)
    assert max_logit_diff(pretrain.load_model(tmp_path / "imported"), hf, random_tokens(640)) <= 1e-4


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_import_then_export_reproduces_original_tensors(tmp_path, kind):
    random_hf_model(kind, tmp_path / "hf")
    step_dir = import_checkpoint(tmp_path / "hf", tmp_path / "imported")
    with pytest.warns(UserWarning, match="without tokenizer files"):  # the Hugging Face directory had none
        out = export_checkpoint(step_dir, tmp_path / "again")
    original, again = load_file(tmp_path / "hf" / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(again) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(again[name], tensor), name


def test_training_resumes_from_imported_checkpoint(make_cfg, tiny_overrides, tmp_path):
    hf_dir = tmp_path / "hf"
    random_hf_model("llama", hf_dir)
    tokenizer_file = Path(make_cfg().tokenizer.path)
    (hf_dir / "tokenizer.model").write_bytes(tokenizer_file.read_bytes())
    step_dir = import_checkpoint(hf_dir, tmp_path / "imported")
    run = [o for o in tiny_overrides if not o.startswith(("model.", "tokenizer.path"))]
    cfg = load_config(tmp_path / "imported" / "config.yaml",
                      [*run, f"train.resume={step_dir}", "train.max_steps=1", f"train.run_dir={tmp_path}/run"])
    assert Path(cfg.tokenizer.path) == (tmp_path / "imported" / "tokenizer.model").resolve()
    trainer = Trainer(cfg, log=quiet)
    imported = pretrain.load_model(step_dir).state_dict()
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor, imported[name]), name
    assert torch.isfinite(torch.tensor(trainer.fit()["val_loss"]))


def test_export_hf_at_end_of_training_writes_a_model_and_tokenizer_transformers_load(tiny_cfg):
    cfg = tiny_cfg("train.max_steps=2", "checkpoint.export_hf=true")
    run_training(cfg, log=quiet)
    out = Path(cfg.train.run_dir) / "hf"
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert max_logit_diff(pretrain.load_model(cfg.train.run_dir), hf, random_tokens(hf.config.vocab_size)) <= 1e-4
    assert (hf.config.bos_token_id, hf.config.eos_token_id, hf.config.pad_token_id) == (1, 2, 3)
    assert (hf.generation_config.eos_token_id, hf.generation_config.pad_token_id) == (2, 3)
    text = " Return the list.\n  Two spaces, 42 digits."
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == Tokenizer(cfg.tokenizer.path).encode(text)


@pytest.mark.slow
def test_export_of_tp2_checkpoint_equals_export_of_the_same_weights_at_tp1(tiny_cfg, tmp_path):
    """A tp2 run (torchrun, the launch script) exports at its end on rank 0 alone; its weights saved again
    by one process export to the same tensors, and a tp1 run of the same step to the same up to float noise."""
    steps = ["train.max_steps=1", "train.eval_interval=0", "checkpoint.export_hf=true"]
    config_file = tmp_path / "run.yaml"
    config_file.write_text(tiny_cfg(*steps).to_yaml())
    result = subprocess.run(["launch/single_node.sh", str(config_file), f"train.run_dir={tmp_path}/tp2", "parallel.tp=2"],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHON": sys.executable, "NPROC": "2", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    tp2_step = tmp_path / "tp2" / "checkpoints" / "step_0000001"
    cfg = load_config(tp2_step / "config.yaml", ["parallel.tp=1"])
    model = pretrain.load_model(tp2_step)  # resharded from the two tensor-parallel halves
    tp1_step = save_weights(tmp_path / "tp1" / "checkpoints", 1, model, cfg, checkpoint.read_state(tp2_step))
    tp2 = load_file(tmp_path / "tp2" / "hf" / "model.safetensors")
    tp1 = load_file(export_checkpoint(tp1_step, tmp_path / "tp1_hf") / "model.safetensors")
    assert sorted(tp1) == sorted(tp2)
    for name, tensor in tp2.items():
        assert torch.equal(tp1[name], tensor), name
    single = tiny_cfg(*steps, f"train.run_dir={tmp_path}/single")
    run_training(single, log=quiet)
    trained = load_file(Path(single.train.run_dir) / "hf" / "model.safetensors")
    for name, tensor in tp2.items():
        assert torch.allclose(trained[name], tensor, atol=1e-4), name


def test_cli_export_then_import_round_trips_our_weights(make_cfg, tmp_path):
    step_dir = save_perturbed(make_cfg(), tmp_path / "run" / "checkpoints")
    exported = run_cli("export", str(tmp_path / "run"), str(tmp_path / "hf"))
    assert exported.returncode == 0, exported.stderr
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
            "tokenizer_config.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    imported = run_cli("import", str(tmp_path / "hf"), str(tmp_path / "back"))
    assert imported.returncode == 0, imported.stderr
    original, back = pretrain.load_model(step_dir).state_dict(), pretrain.load_model(tmp_path / "back").state_dict()
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name
    missing = run_cli("import", str(tmp_path / "nowhere"), str(tmp_path / "x"))
    assert missing.returncode == 2 and "config.json" in missing.stderr and "Traceback" not in missing.stderr
    # a config.json that claims fewer layers than the weights hold: refused, not a silently truncated model
    import json
    import shutil

    shutil.copytree(tmp_path / "hf", tmp_path / "hf_short")
    config = json.loads((tmp_path / "hf_short" / "config.json").read_text())
    config["num_hidden_layers"] -= 1
    (tmp_path / "hf_short" / "config.json").write_text(json.dumps(config))
    short = run_cli("import", str(tmp_path / "hf_short"), str(tmp_path / "short"))
    assert short.returncode == 2 and f"config.json says num_hidden_layers={config['num_hidden_layers']}" in short.stderr


def test_export_again_replaces_the_earlier_export_and_nothing_else(make_cfg, tmp_path, capsys):
    """A re-export into a directory holding an earlier export alone replaces it whole (no stale modeling code stays
    beside a Llama export); a directory holding anything else is refused, and left as it was."""
    from pretrain.cli import main

    save_perturbed(make_cfg(), tmp_path / "run" / "checkpoints")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "modeling_pretrain.py").write_text("# an earlier custom export")
    (out / "model.safetensors").write_text("an earlier export")
    assert main(["export", str(tmp_path / "run"), str(out)]) == 0
    assert not (out / "modeling_pretrain.py").exists() and load_file(out / "model.safetensors")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # the staging folder is gone
    (out / "notes.txt").write_text("mine")
    assert main(["export", str(tmp_path / "run"), str(out)]) == 2
    assert "already holds files" in capsys.readouterr().err and (out / "notes.txt").read_text() == "mine"
