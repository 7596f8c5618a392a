"""sentencepiece tokenizers (BPE or unigram): the named ones of the repository's ``tokenizers/`` folder, a model
file per run, and models of other projects imported with their own special ids.

A named tokenizer NAME is a recipe, ``tokenizers/NAME.yaml`` (how to make it), and a folder ``tokenizers/NAME/``
with ``tokenizer.model`` and ``manifest.json`` (how it was made: the recipe, a SHA-256 of the lines it was
trained on, the sentencepiece version, the special ids). Our recipes fix unk 0, bos 1, eos 2, pad 3 and train
with identity normalization, byte fallback and split digits; sentencepiece adds one dummy-prefix space. An
imported model keeps its own ids (a Llama model has no pad): the data's end-of-document token, the sample's bos
and the Hugging Face export all read them from the model, and a model without eos is refused, since every
document ends with it.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import random
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm
from rich.progress import Progress, TextColumn, TimeElapsedColumn
from sentencepiece import sentencepiece_model_pb2

from pretrain.config import DataConfig, TokenizerConfig
from pretrain.config.data import TOKENIZER_NAME, TokenizerRecipe
from pretrain.errors import UserError
from pretrain.paths import new_dir, require_writable_dir

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
TOKENIZERS_DIR = Path(__file__).resolve().parents[2] / "tokenizers"
MODEL_FILE, MANIFEST_FILE = "tokenizer.model", "manifest.json"


class Tokenizer:
    """A loaded sentencepiece model; also what megatron-core's GPTDataset reads (eod, pad, vocab_size)."""

    def __init__(self, path: str | Path, not_a_model: str = "tokenizer.path '{path}' is not a sentencepiece model "
                 "({error}); point it at a .model file, or at a path that does not exist yet to train one there."):
        """``not_a_model``: the message for a file sentencepiece cannot read, in the terms of whoever gave it."""
        path = Path(path)
        if path.is_dir():
            if not (path / MODEL_FILE).is_file():
                raise UserError(f"tokenizer '{path}' is a directory without {MODEL_FILE}; give a sentencepiece .model "
                                f"file or a folder holding {MODEL_FILE} (a tokenizer of tokenizers/, a Hugging Face "
                                "directory).")
            path = path / MODEL_FILE
        if not path.is_file():
            raise UserError(f"tokenizer model '{path}' does not exist; run `pretrain tokenizer train CONFIG` "
                            "or `pretrain train CONFIG`, which trains it from the configured corpus.")
        self.path = path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise UserError(not_a_model.format(path=path, error=str(e).strip()[:200])) from None
        if self.eos < 0:
            controls = [f"{self.sp.id_to_piece(i)} ({i})" for i in range(self.vocab_size) if self.sp.is_control(i)]
            raise UserError(f"tokenizer '{path}' has no end-of-sequence piece (its eos id is -1), and pretrain ends "
                            f"every document with one. Its control pieces: {', '.join(controls) or 'none'}. Set the "
                            "model's trainer_spec.eos_piece to one of them (sentencepiece_model_pb2), or use another "
                            "tokenizer.")
        self.digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        self.unique_identifiers = {"class": "pretrain.Tokenizer", "sha256": self.digest}

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos(self) -> int:
        return self.sp.bos_id()

    @property
    def eos(self) -> int:
        return self.sp.eos_id()

    eod = eos

    @property
    def pad(self) -> int:
        return self.sp.pad_id()

    @property
    def special_ids(self) -> dict[str, int]:
        """The model's own special ids; -1 for one it does not have."""
        return {"unk": self.sp.unk_id(), "bos": self.bos, "eos": self.eos, "pad": self.pad}

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


# ---- where tokenizers are ----

def available() -> list[str]:
    """Names of tokenizers/: shipped or trained models, and recipes not trained yet."""
    models = {p.parent.name for p in TOKENIZERS_DIR.glob(f"*/{MODEL_FILE}")}
    return sorted(models | {p.stem for p in TOKENIZERS_DIR.glob("*.yaml")})


def model_path(tok: TokenizerConfig) -> Path:
    """The model file a run config's tokenizer section names (it may not exist yet)."""
    if tok.name:
        return TOKENIZERS_DIR / tok.name / MODEL_FILE
    path = Path(tok.path)
    return path / MODEL_FILE if path.is_dir() else path


def find_tokenizer(spec: str) -> Tokenizer:
    """A tokenizer given on the command line: a name of tokenizers/, a model file, or a folder holding one."""
    if not Path(spec).exists() and TOKENIZER_NAME.fullmatch(spec):
        if (TOKENIZERS_DIR / spec / MODEL_FILE).is_file():
            return Tokenizer(TOKENIZERS_DIR / spec)
        raise UserError(f"'{spec}' is neither a file nor a trained tokenizer of {TOKENIZERS_DIR} (there: "
                        f"{', '.join(available()) or 'none'}); train a recipe with `pretrain tokenizer train NAME` "
                        "or give the path of a .model file or of a folder holding tokenizer.model.")
    return Tokenizer(spec)


def named_tokenizer(name: str, log=print) -> Tokenizer:
    """The tokenizer ``tokenizers/NAME``, trained there from its recipe first when it has no model yet."""
    from pretrain.config import loading

    folder, recipe_file = TOKENIZERS_DIR / name, TOKENIZERS_DIR / f"{name}.yaml"
    if (folder / MODEL_FILE).is_file():
        made_from = read_manifest(folder).get("recipe")
        if recipe_file.is_file() and made_from is not None and \
                loading.build(TokenizerRecipe, made_from) != load_recipe(str(recipe_file))[1]:
            raise UserError(f"tokenizers/{name} was trained from another version of its recipe {recipe_file} (its "
                            f"{MANIFEST_FILE} records which): delete {folder} and run `pretrain tokenizer train "
                            f"{name}` to train it again, or restore the recipe.")
        return Tokenizer(folder)
    if not recipe_file.is_file():
        raise UserError(f"tokenizer.name '{name}': {TOKENIZERS_DIR} has neither {name}/{MODEL_FILE} nor a recipe "
                        f"{name}.yaml (there: {', '.join(available()) or 'none'}). Pick one of those, import a model "
                        f"with `pretrain tokenizer import MODEL {name}`, or write the recipe.")
    log(f"tokenizer '{name}' has no model yet: training it from its recipe {recipe_file}")
    return train_recipe(load_recipe(str(recipe_file))[1], folder, name, log)


def read_manifest(folder: Path) -> dict:
    """What ``folder``'s manifest.json records ({} when it has none)."""
    path = folder / MANIFEST_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def load_recipe(spec: str, overrides: Iterable[str] = ()) -> tuple[Path, TokenizerRecipe]:
    """A recipe (its file and contents) from a YAML file or the name of one in tokenizers/, with ``key=value``
    overrides applied."""
    from pretrain.config import ConfigError, loading

    path = Path(spec)
    if not path.exists() and TOKENIZER_NAME.fullmatch(spec):
        path = TOKENIZERS_DIR / f"{spec}.yaml"
    if not path.is_file():
        raise UserError(f"tokenizer recipe '{spec}' does not exist: give a recipe YAML file or the name of one in "
                        f"{TOKENIZERS_DIR} ({', '.join(p.stem for p in TOKENIZERS_DIR.glob('*.yaml')) or 'none'}).")
    try:
        raw = loading.read_yaml(path)
        for item in overrides:
            loading.apply_override(TokenizerRecipe, raw, item)
        recipe = loading.build(TokenizerRecipe, raw)
        recipe.check()
    except ConfigError as e:
        raise UserError(f"tokenizer recipe '{path}': {e}") from None
    return path, recipe


# ---- training ----

def _lines(docs: Iterable[str], max_lines: int, seen: dict) -> Iterator[str]:
    """The non-empty lines of ``docs`` (at most ``max_lines``; 0 = all), counted and hashed into ``seen``: the
    hash identifies the text a model was trained from (the embedded corpus differs between Python versions)."""
    digest = hashlib.sha256()
    for doc in docs:
        for line in doc.splitlines():
            if not line.strip():
                continue
            if max_lines and seen["lines"] >= max_lines:
                seen["sha256"] = digest.hexdigest()
                return
            data = line.encode()
            digest.update(data + b"\n")
            seen["lines"] += 1
            seen["bytes"] += len(data)
            yield line
    seen["sha256"] = digest.hexdigest()


def _sample(lines: Iterable[str], k: int, seed: int) -> list[str]:
    """A uniform sample of ``k`` lines in corpus order, holding only ``k`` at a time (reservoir sampling). We do not
    use sentencepiece's own sampling (input_sentence_size): in sentencepiece 0.2 it draws another sample in every
    process even with its seed set, so a recipe would not reproduce its model."""
    rng = random.Random(seed)
    kept: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        if i < k:
            kept.append((i, line))
        elif (j := rng.randrange(i + 1)) < k:
            kept[j] = (i, line)
    return [line for _, line in sorted(kept)]


def _keeping_errors(docs: Iterable[str], errors: list[UserError]) -> Iterator[str]:
    try:
        yield from docs
    except UserError as e:
        errors.append(e)
        raise


def _train(docs: Iterable[str], recipe: TokenizerRecipe, vocab_key: str, log) -> tuple[bytes, dict]:
    """The serialized model sentencepiece trains from ``docs`` by ``recipe``, and what it read (``vocab_key``
    names the setting to change in the message when the text is too small)."""
    seen = {"lines": 0, "bytes": 0}
    errors: list[UserError] = []  # sentencepiece turns an error inside the iterator into its own RuntimeError
    columns = [TextColumn("[bold]tokenizer"), TextColumn("{task.fields[stage]}"),
               TextColumn("{task.fields[lines]:,} lines"), TextColumn("{task.fields[mb]:,.1f} MB"), TimeElapsedColumn()]
    t0 = time.perf_counter()
    with Progress(*columns, transient=True) as progress:
        reading = f"reading, sampling {recipe.sample_lines:,} lines" if recipe.sample_lines else "reading"
        task = progress.add_task("tokenizer", stage=reading, lines=0, mb=0.0)

        def shown(lines: Iterable[str]) -> Iterator[str]:
            for i, line in enumerate(lines, 1):
                if i % 4096 == 0:
                    progress.update(task, lines=seen["lines"], mb=seen["bytes"] / 1e6)
                yield line
            progress.update(task, stage=f"training {recipe.vocab_size}-piece {recipe.type} (sentencepiece)",
                            lines=seen["lines"], mb=seen["bytes"] / 1e6, refresh=True)

        lines: Iterable[str] = shown(_lines(_keeping_errors(docs, errors), recipe.max_lines, seen))
        if recipe.sample_lines:
            lines = _sample(lines, recipe.sample_lines, recipe.seed)
        extra = {key: value for key, value in (("control_symbols", recipe.special_tokens),
                                               ("user_defined_symbols", recipe.user_defined_tokens)) if value}
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines), model_writer=model, vocab_size=recipe.vocab_size,
                model_type=recipe.type, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
                byte_fallback=recipe.byte_fallback, split_digits=recipe.split_digits,
                character_coverage=recipe.character_coverage, num_threads=recipe.num_threads,
                remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
                normalization_rule_name="identity", max_sentence_length=1 << 14, minloglevel=2,
                hard_vocab_limit=True, **extra)
        except RuntimeError as e:
            if errors:
                raise errors[0] from None
            if not seen["lines"]:
                raise UserError("the tokenizer's text has no non-empty line; give it text to train on.") from None
            largest = re.search(r"value <= (\d+)", str(e))
            if largest:
                raise UserError(f"the text is too small for a {recipe.vocab_size}-piece {recipe.type} tokenizer: "
                                f"{seen['lines']:,} lines ({seen['bytes'] / 1e6:.2f} MB) support at most "
                                f"{largest[1]} pieces. Set {vocab_key} to {largest[1]} or less, or train on more "
                                "text.") from None
            smallest = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(e))
            if smallest:
                raise UserError(f"a {recipe.vocab_size}-piece tokenizer has too few pieces for the characters of this "
                                f"text, which need {smallest[1]}: set {vocab_key} to {smallest[1]} or more (or, in a "
                                "tokenizer recipe, lower character_coverage).") from None
            raise UserError(f"sentencepiece could not train a {recipe.vocab_size}-piece {recipe.type} tokenizer on "
                            f"this text ({e}); change {vocab_key} as that message says, or train on more text.") from None
    seen["lines_trained"] = min(seen["lines"], recipe.sample_lines or seen["lines"])
    seen["seconds"] = round(time.perf_counter() - t0, 2)
    sampled = f", {seen['lines_trained']:,} of them sampled" if seen["lines_trained"] < seen["lines"] else ""
    log(f"read {seen['lines']:,} lines ({seen['bytes'] / 1e6:.1f} MB){sampled}; trained the {recipe.vocab_size}-piece "
        f"{recipe.type} tokenizer in {seen['seconds']:.1f}s")
    return model.getvalue(), seen


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def train_tokenizer(tok: TokenizerConfig, data: DataConfig, log=print) -> Tokenizer:
    """Train the model file of a run's ``tokenizer.path`` from its data (the first ``train_sentences`` lines)."""
    from pretrain.data.corpus import documents

    path = Path(tok.path)
    if path.is_dir():
        raise UserError(f"tokenizer.path '{path}' is a directory; give the path of the .model file to train.")
    require_writable_dir(path.parent, "the directory of tokenizer.path")
    recipe = TokenizerRecipe(sources=data.sources, embedded_docs=data.embedded_docs, type=tok.type,
                             vocab_size=tok.vocab_size, max_lines=tok.train_sentences)
    model, _ = _train(documents(data), recipe, "tokenizer.vocab_size", log)
    _write_atomically(path, model)
    return Tokenizer(path)


def _text_description(recipe: TokenizerRecipe) -> dict:
    if recipe.sources:
        return {"sources": [s.path for s in recipe.sources]}
    return {"embedded_corpus": "the documentation topics and standard-library docstrings of this Python",
            "python": platform.python_version(), "embedded_docs": recipe.embedded_docs}


def train_recipe(recipe: TokenizerRecipe, out_dir: str | Path, name: str, log=print) -> Tokenizer:
    """Train ``recipe`` into ``out_dir`` (tokenizer.model and manifest.json)."""
    from pretrain.data.corpus import documents

    with new_dir(out_dir, "the tokenizer's folder") as out:  # (removed again if the training fails)
        model, seen = _train(documents(recipe.data()), recipe, "vocab_size", log)
    _write_atomically(out / MODEL_FILE, model)
    tok = Tokenizer(out)
    manifest = {
        "name": name, "made_by": "pretrain tokenizer train", "recipe": recipe.to_dict(),
        "text": {**_text_description(recipe), "sha256": seen["sha256"], "lines_read": seen["lines"],
                 "bytes_read": seen["bytes"], "lines_trained": seen["lines_trained"]},
        "sentencepiece": spm.__version__, "vocab_size": tok.vocab_size, "special_ids": tok.special_ids,
        "model_digest": tok.digest,
    }
    _write_atomically(out / MANIFEST_FILE, (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode())
    return tok


# ---- reuse ----

def check_exportable(model_file: Path):
    """The model's proto, when the export reproduces its encoding exactly (every setting of the sentencepiece models
    of Llama, Mistral, Gemma or T5 and ours); the two settings it does not are refused, naming them."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    if not proto.normalizer_spec.escape_whitespaces or proto.trainer_spec.treat_whitespace_as_suffix:
        raise UserError(f"'{model_file}' sets escape_whitespaces=false or treat_whitespace_as_suffix=true, which the "
                        "Hugging Face export cannot reproduce; pretrain takes sentencepiece models without them.")
    return proto


def import_tokenizer(source: str | Path, out_dir: str | Path, name: str) -> Tokenizer:
    """Copy another project's sentencepiece model (a .model file, or the tokenizer.model of a Hugging Face
    directory) into ``out_dir`` with a manifest of its special ids; a model without eos is refused."""
    source = Path(source)
    model_file = source / MODEL_FILE if source.is_dir() else source
    if source.is_dir() and not model_file.is_file():
        raise UserError(f"'{source}' holds no {MODEL_FILE}: pretrain imports sentencepiece models (Llama 2, Mistral, "
                        "Gemma...); a tokenizer given only as tokenizer.json (byte-level BPE such as GPT-2's) is none.")
    if not model_file.is_file():
        raise UserError(f"'{source}' does not exist: give a sentencepiece .model file, or a Hugging Face model "
                        f"directory holding {MODEL_FILE}.")
    Tokenizer(model_file, not_a_model="'{path}' is not a sentencepiece model ({error}); import the " + MODEL_FILE
              + " of a sentencepiece tokenizer (Llama 2, Mistral, Gemma...).")  # (it must have an eos piece)
    check_exportable(model_file)
    out = Path(out_dir)
    if (out / MODEL_FILE).exists():
        raise UserError(f"'{out}' already holds a tokenizer; import under another name (or --out), or delete it.")
    require_writable_dir(out, "the tokenizer's folder")
    data = model_file.read_bytes()
    _write_atomically(out / MODEL_FILE, data)
    tok = Tokenizer(out)
    manifest = {
        "name": name, "made_by": "pretrain tokenizer import", "source": str(model_file.resolve()),
        "source_sha256": hashlib.sha256(data).hexdigest(), "sentencepiece": spm.__version__,
        "vocab_size": tok.vocab_size, "special_ids": tok.special_ids, "model_digest": tok.digest,
    }
    _write_atomically(out / MANIFEST_FILE, (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode())
    return tok
