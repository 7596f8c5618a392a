"""Tokenizers as artifacts: the shipped quickstart tokenizer and its recipe, runs naming a tokenizer by name or
path, token files keyed by the tokenizer, imported third-party models with their own special ids, quality
measures and the errors of training, all through the real sentencepiece, megatron-core and transformers."""

import io
import json
from pathlib import Path

import pytest
import sentencepiece as spm
from megatron.core.datasets.indexed_dataset import IndexedDataset

from pretrain.cli import main
from pretrain.config import ConfigError, DataConfig, load_config, loading
from pretrain.config.data import TokenizerRecipe
from pretrain.data import tokenizer as tokenizers
from pretrain.data.prepare import ensure_data, ensure_tokenizer, token_prefix
from pretrain.data.tokenizer import (
    TOKENIZERS_DIR,
    Tokenizer,
    import_tokenizer,
    load_recipe,
    read_manifest,
    train_recipe,
)
from pretrain.errors import UserError
from tests.conftest import REPO, TINY

SHIPPED = "pydoc-bpe-8k"
TEXTS = ["Hello world", " leading space", "  two leading", "trailing  ", "line\nbreak\n", "digits 1234567",
         "unicode: héllo wörld — 日本語 🙂", "tabs\tand  runs   of spaces", "", "</s> and <s> as plain text"]


def quiet(*_a, **_k):
    pass


def embedded_lines(docs: int) -> list[str]:
    from pretrain.data import corpus

    return [line for doc in corpus.documents(DataConfig(embedded_docs=docs)) for line in doc.splitlines() if line.strip()]


def test_shipped_quickstart_tokenizer_is_what_its_recipe_makes_from_the_embedded_corpus(tmp_path):
    folder = TOKENIZERS_DIR / SHIPPED
    shipped, manifest = Tokenizer(folder), read_manifest(folder)
    recipe_file, recipe = load_recipe(SHIPPED)
    assert recipe_file == TOKENIZERS_DIR / f"{SHIPPED}.yaml" and not (TOKENIZERS_DIR / "__init__.py").exists()
    assert loading.build(TokenizerRecipe, manifest["recipe"]) == recipe and not recipe.sources
    assert manifest["model_digest"] == shipped.digest and manifest["vocab_size"] == shipped.vocab_size == 8000
    assert manifest["special_ids"] == shipped.special_ids == {"unk": 0, "bos": 1, "eos": 2, "pad": 3}
    assert (folder / "tokenizer.model").stat().st_size < 1 << 20
    again = train_recipe(recipe, tmp_path / SHIPPED, SHIPPED, log=quiet)
    text, here = manifest["text"], read_manifest(tmp_path / SHIPPED)["text"]
    if here["sha256"] != text["sha256"]:
        pytest.skip(f"the embedded corpus of this Python ({here['python']}: {here['lines_read']} lines, sha256 "
                    f"{here['sha256'][:12]}) is not the one {SHIPPED} was trained on (Python {text['python']}: "
                    f"{text['lines_read']} lines, sha256 {text['sha256'][:12]}), so its model cannot be reproduced here")
    if again.digest != shipped.digest and spm.__version__ != manifest["sentencepiece"]:
        pytest.skip(f"same corpus, but sentencepiece {spm.__version__} trains another model than "
                    f"{manifest['sentencepiece']}, which made the shipped one")
    assert (folder / "tokenizer.model").read_bytes() == again.path.read_bytes()


def test_quickstart_trains_with_the_shipped_tokenizer_and_trains_none(tmp_path):
    from pretrain.train.trainer import run_training

    shipped = TOKENIZERS_DIR / SHIPPED / "tokenizer.model"
    before = (shipped.stat().st_mtime_ns, sorted(p.name for p in TOKENIZERS_DIR.rglob("*")))
    logs: list[str] = []
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [
        "model.hidden_size=64", "model.num_layers=1", "model.num_heads=4", "model.num_kv_heads=2",
        "model.ffn_hidden_size=128", "data.embedded_docs=30", "data.seq_len=32", "data.micro_batch_size=4",
        "data.global_batch_size=4", "data.preprocess_workers=1", "train.max_steps=1", "train.eval_interval=0",
        "train.sample_prompt=", "checkpoint.interval=0", f"data.prefix={tmp_path}/corpus",
        f"train.run_dir={tmp_path}/run", "train.precision=fp32"])
    assert cfg.tokenizer.name == SHIPPED
    run_training(cfg, log=lambda *a, **k: logs.append(" ".join(map(str, a))))
    assert not [line for line in logs if "tokenizer" in line], logs  # nothing trained
    assert (shipped.stat().st_mtime_ns, sorted(p.name for p in TOKENIZERS_DIR.rglob("*"))) == before
    digest = Tokenizer(shipped).digest
    assert sorted(p.name for p in tmp_path.glob("corpus-*")) == [f"corpus-{digest}.{ext}" for ext in ("bin", "idx", "json")]
    assert "vocab_size: 8000" in (tmp_path / "run" / "config.yaml").read_text()


def test_a_run_names_its_tokenizer_by_name_or_by_path(tmp_path):
    both = tmp_path / "both.yaml"
    both.write_text(f"tokenizer:\n  name: {SHIPPED}\n  path: my.model\n")
    with pytest.raises(ConfigError, match="both name the tokenizer"):
        load_config(both)
    quickstart = REPO / "configs" / "quickstart.yaml"
    by_path = load_config(quickstart, ["tokenizer.path=my.model", "tokenizer.vocab_size=600"])  # replaces the name
    assert (by_path.tokenizer.name, by_path.tokenizer.path) == ("", "my.model")
    assert load_config(both, ["tokenizer.name=other"]).tokenizer.name == "other"
    with pytest.raises(ConfigError) as err:
        load_config(quickstart, ["tokenizer.vocab_size=600"])
    assert err.value.key == "tokenizer.vocab_size" and f"tokenizers/{SHIPPED}.yaml" in str(err.value)
    with pytest.raises(UserError, match=f"there: .*{SHIPPED}"):
        ensure_tokenizer(load_config(None, ["tokenizer.name=no-such-tokenizer"]))


def test_a_named_recipe_trains_once_and_a_changed_recipe_is_not_met_by_its_old_model(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizers, "TOKENIZERS_DIR", tmp_path)
    (tmp_path / "mini.yaml").write_text("embedded_docs: 40\nvocab_size: 400\n")
    cfg = load_config(None, ["tokenizer.name=mini"])
    logs: list[str] = []
    first = ensure_tokenizer(cfg, log=logs.append)
    assert first.path == tmp_path / "mini" / "tokenizer.model" and first.vocab_size == 400
    assert "training it from its recipe" in logs[0] and read_manifest(tmp_path / "mini")["recipe"]["vocab_size"] == 400
    logs.clear()
    assert ensure_tokenizer(cfg, log=logs.append).digest == first.digest and not logs
    (tmp_path / "mini.yaml").write_text("embedded_docs: 40\nvocab_size: 420\n")
    with pytest.raises(UserError, match="another version of its recipe"):
        ensure_tokenizer(cfg)


def test_token_files_are_keyed_by_the_tokenizer_content(tmp_path):
    common = ["data.embedded_docs=20", "data.preprocess_workers=1", f"data.prefix={tmp_path}/corpus"]
    toks = []
    for vocab in (400, 420):
        cfg = load_config(None, [*common, f"tokenizer.path={tmp_path}/t{vocab}.model", f"tokenizer.vocab_size={vocab}"])
        tok = ensure_tokenizer(cfg, log=quiet)
        (prefix, _), = ensure_data(cfg, tok, log=quiet)
        assert prefix == token_prefix(cfg.data, tok) == f"{tmp_path}/corpus-{tok.digest}"
        indexed = IndexedDataset(prefix)  # (kept alive: its arrays are views of its mmap)
        assert int(indexed[0].max()) < vocab
        toks.append((cfg, tok, Path(f"{prefix}.bin").stat().st_mtime_ns))
    assert toks[0][1].digest != toks[1][1].digest
    logs: list[str] = []
    cfg, tok, mtime = toks[0]
    ensure_data(cfg, tok, log=logs.append)  # the first tokenizer's files are still there, and current
    assert not logs and Path(f"{token_prefix(cfg.data, tok)}.bin").stat().st_mtime_ns == mtime


def third_party_model(path: Path, **ids) -> Path:
    """A Llama-style sentencepiece model made by another project: byte fallback, dummy prefix, no pad, and special
    ids other than ours (bos 5, eos 6 unless given)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(embedded_lines(120)), model_writer=model, vocab_size=600, model_type="bpe",
        byte_fallback=True, split_digits=True, minloglevel=2, normalization_rule_name="identity",
        remove_extra_whitespaces=False, **{"unk_id": 0, "bos_id": 5, "eos_id": 6, "pad_id": -1, **ids})
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_bytes(model.getvalue())
    return path


def test_imported_model_trains_and_exports_with_its_own_special_ids(tmp_path, shared_cache):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from pretrain.train.trainer import run_training

    hf_dir = third_party_model(tmp_path / "llama-like")  # a Hugging Face directory holding tokenizer.model
    tok = import_tokenizer(hf_dir, tmp_path / "imported", "llama-like")
    manifest = read_manifest(tmp_path / "imported")
    assert manifest["special_ids"] == tok.special_ids == {"unk": 0, "bos": 5, "eos": 6, "pad": -1}
    assert manifest["source"] == str((hf_dir / "tokenizer.model").resolve())
    cfg = load_config(None, [*TINY, f"tokenizer.path={tmp_path}/imported", f"data.prefix={tmp_path}/corpus",
                             f"train.run_dir={tmp_path}/run", "train.max_steps=2", "train.eval_interval=0",
                             "checkpoint.export_hf=true"])
    run_training(cfg, log=quiet)
    data = IndexedDataset(token_prefix(cfg.data, tok))
    assert all(data[i][-1] == 6 for i in range(len(data)))  # every document ends with the model's own eos
    out = tmp_path / "run" / "hf"
    hf_config, generation = AutoConfig.from_pretrained(out), GenerationConfig.from_pretrained(out)
    assert (hf_config.bos_token_id, hf_config.eos_token_id, hf_config.pad_token_id) == (5, 6, None)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (5, 6, None)
    hf = AutoTokenizer.from_pretrained(out)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (5, 6, None, 0)
    for text in TEXTS:
        ids = tok.encode(text)
        assert hf(text)["input_ids"] == ids, text
        assert hf.decode(ids) == tok.decode(ids), text


def test_import_refuses_a_model_without_eos_and_a_folder_without_a_model(tmp_path, capsys):
    no_eos = third_party_model(tmp_path / "no-eos", bos_id=1, eos_id=-1)
    assert main(["tokenizer", "import", str(no_eos), "x", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no end-of-sequence piece" in err and "<s> (1)" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()
    (tmp_path / "tokenizer-json-only").mkdir()
    assert main(["tokenizer", "import", str(tmp_path / "tokenizer-json-only"), "y", "--out", str(tmp_path / "y")]) == 2
    assert "holds no tokenizer.model" in capsys.readouterr().err


def write_recipe(tmp_path: Path, vocab_size: int, byte_fallback: bool = True) -> Path:
    (tmp_path / "train.txt").write_text("hello world\n" * 50)
    recipe = tmp_path / "hello.yaml"
    recipe.write_text(f"sources: [{{path: {tmp_path}/train.txt}}]\nvocab_size: {vocab_size}\n"
                      f"byte_fallback: {str(byte_fallback).lower()}\n")
    return recipe


def test_too_small_corpus_exits_2_naming_the_largest_vocab_it_supports(tmp_path, capsys):
    recipe = write_recipe(tmp_path, 1000)
    assert main(["tokenizer", "train", str(recipe), "--out", str(tmp_path / "big")]) == 2
    err = capsys.readouterr().err
    assert "too small for a 1000-piece bpe tokenizer" in err and "at most 288 pieces" in err, err
    assert "Set vocab_size to 288 or less" in err and "Traceback" not in err
    assert main(["tokenizer", "train", str(recipe), "vocab_size=288", "--out", str(tmp_path / "largest")]) == 0
    assert Tokenizer(tmp_path / "largest").vocab_size == 288
    assert main(["tokenizer", "train", str(recipe), "vocab_size=288", "--out", str(tmp_path / "largest")]) == 2
    assert "already holds a tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize("byte_fallback, vocab_size", [(True, 288), (False, 32)])
def test_stats_match_hand_computed_values(tmp_path, capsys, byte_fallback, vocab_size):
    """Trained on "hello world" only, the model has the pieces ▁hello and ▁world; "é" has none, so it is
    spelled as its two UTF-8 bytes, or is one unk without byte fallback."""
    train_recipe(load_recipe(str(write_recipe(tmp_path, vocab_size, byte_fallback)))[1], tmp_path / "tok", "hello",
                 log=quiet)
    (tmp_path / "held_out.txt").write_text("hello world\nhello é\n")  # ▁hello ▁world | ▁hello ▁ (<0xC3> <0xA9> | unk)
    assert main(["tokenizer", "stats", str(tmp_path / "tok"), str(tmp_path / "held_out.txt"),
                 "--out", str(tmp_path / "stats.json")]) == 0
    stats = json.loads((tmp_path / "stats.json").read_text())
    tokens = 6 if byte_fallback else 5
    expected = {"documents": 2, "bytes": 19, "characters": 18, "words": 4, "tokens": tokens,
                "bytes_per_token": round(19 / tokens, 6), "tokens_per_word": tokens / 4,
                "unknown_tokens": 0 if byte_fallback else 1, "byte_fallback_tokens": 2 if byte_fallback else 0,
                "vocab_used": 5 if byte_fallback else 4, "vocab_size": vocab_size}
    assert {key: stats[key] for key in expected} == expected
    assert stats["byte_fallback_rate"] == round(expected["byte_fallback_tokens"] / tokens, 6)
    assert stats["unknown_rate"] == round(expected["unknown_tokens"] / tokens, 6)
    assert stats["vocab_used_fraction"] == round(expected["vocab_used"] / vocab_size, 6)
    assert f"bytes per token  {19 / tokens:.3f}" in capsys.readouterr().out


def test_sampling_is_seeded_and_bounds_the_lines_trained(tmp_path):
    recipe = TokenizerRecipe(embedded_docs=60, vocab_size=400, sample_lines=1000)
    logs: list[str] = []
    first = train_recipe(recipe, tmp_path / "a", "a", log=logs.append)
    text = read_manifest(tmp_path / "a")["text"]
    assert text["lines_read"] > 4000 and text["lines_trained"] == 1000
    assert f"read {text['lines_read']:,} lines" in logs[0] and "1,000 of them sampled" in logs[0]
    again = train_recipe(recipe, tmp_path / "b", "b", log=quiet)
    other = train_recipe(TokenizerRecipe(embedded_docs=60, vocab_size=400, sample_lines=1000, seed=1), tmp_path / "c",
                         "c", log=quiet)
    assert first.path.read_bytes() == again.path.read_bytes() != other.path.read_bytes()


def test_recipe_special_and_user_defined_tokens_survive_the_export(tmp_path):
    from transformers import AutoTokenizer

    from pretrain.convert.tokenizer import export_tokenizer

    recipe = TokenizerRecipe(embedded_docs=60, vocab_size=400, special_tokens=["<|im_start|>"],
                             user_defined_tokens=["<sep>"])
    tok = train_recipe(recipe, tmp_path / "tok", "tok", log=quiet)
    control, sep = tok.sp.piece_to_id("<|im_start|>"), tok.sp.piece_to_id("<sep>")
    assert tok.sp.is_control(control) and sep not in (0, control)
    assert sep in tok.encode("a<sep>b") and control not in tok.encode("<|im_start|>")
    export_tokenizer(tok.path, tmp_path, max_length=64)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for text in [*TEXTS, "a<sep>b", "<sep>", " <sep> x <sep>", "<|im_start|> user"]:
        assert hf(text)["input_ids"] == tok.encode(text), text
