"""A sentencepiece tokenizer as a Hugging Face fast tokenizer that encodes text to exactly the same ids.

Hugging Face's Llama tokenizer does not reproduce sentencepiece: it rebuilds a Metaspace pre-tokenizer that adds
no prefix space before text that already starts with one (" x" and "  x" encode differently from sentencepiece).
So the exported ``tokenizer.json`` holds the sentencepiece vocabulary (BPE merges or unigram scores) behind a
normalizer that does what the model's own normalizer spec says, in sentencepiece's order: its precompiled
character map (e.g. NFKC) if any, removal of leading, trailing and repeated spaces if set, the dummy-prefix "▁"
if set (ours and Llama's; Gemma's has none), every " " to "▁". Pieces the model declares user-defined are
matched whole in the normalized text, as sentencepiece does. ``tokenizer_config.json`` names the generic fast
tokenizer class, which loads that file as it is:

- ``tokenizer(text)["input_ids"] == sp.encode(text)``: no bos or eos is added (our training documents are
  ``encode(text) + [eos]``, with no bos);
- special-token strings in the text ("</s>", "<s>") are split like any text (``split_special_tokens``),
  as sentencepiece does; pass ids, not strings, to insert bos/eos;
- ``decode(ids)`` equals ``sp.decode(ids)``.
The special tokens are the model's own (an imported Llama model has no pad). The original ``tokenizer.model`` is
copied along for tools that read sentencepiece directly.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from pretrain.data.tokenizer import check_exportable

# sentencepiece piece types (sentencepiece_model.proto)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4
_BPE = 2


def _normalizer(spec):
    from tokenizers import Regex, normalizers

    steps = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
    if spec.remove_extra_whitespaces:  # (spaces only: sentencepiece leaves other whitespace alone)
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    return normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])


def _backend(model_file: Path):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE, Unigram
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    proto = check_exportable(model_file)
    spec = proto.normalizer_spec
    unk, byte_fallback = proto.trainer_spec.unk_piece, proto.trainer_spec.byte_fallback
    user_defined = [p.piece for p in proto.pieces if p.type == _USER_DEFINED]
    if proto.trainer_spec.model_type == _BPE:
        extracted = SentencePieceExtractor(str(model_file)).extract(None)  # transformers 5: a dict; 4: a tuple
        vocab, merges = (extracted["vocab"], extracted["merges"]) if isinstance(extracted, dict) else extracted
        # (no merges build a user-defined piece: a chunk that is a piece is taken whole)
        model = BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=byte_fallback,
                    dropout=None, ignore_merges=bool(user_defined))
    else:
        # sentencepiece never matches control, unknown or byte pieces in text; the unigram lattice would,
        # so they get a score no segmentation chooses when any other exists.
        floor = min(p.score for p in proto.pieces if p.type == _NORMAL) - 1e4
        model = Unigram([(p.piece, p.score if p.type in (_NORMAL, _USER_DEFINED) else floor) for p in proto.pieces],
                        unk_id=proto.trainer_spec.unk_id, byte_fallback=byte_fallback)
    backend = Tokenizer(model)
    backend.normalizer = _normalizer(spec)
    if user_defined:  # sentencepiece cuts them out of the normalized text first, longest first
        pattern = "|".join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)] if spec.add_dummy_prefix else steps)
    backend.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                                for p in proto.pieces if p.type in (_UNKNOWN, _CONTROL)])
    return backend, proto


def export_tokenizer(model_file: Path, out_dir: Path, max_length: int) -> dict[str, int]:
    """Write tokenizer.json, tokenizer_config.json and tokenizer.model into ``out_dir``; returns the
    model's special token ids (of bos, eos, pad, unk: those it has) for the model config."""
    from pretrain.data.tokenizer import Tokenizer

    backend, proto = _backend(model_file)
    backend.save(str(out_dir / "tokenizer.json"))
    shutil.copyfile(model_file, out_dir / "tokenizer.model")
    special = Tokenizer(model_file).special_ids
    ids = {name: special[name] for name in ("bos", "eos", "pad", "unk")}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        **{f"{name}_token": proto.pieces[i].piece for name, i in ids.items() if i >= 0},
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return {name: i for name, i in ids.items() if i >= 0}
