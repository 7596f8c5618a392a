"""Our sentencepiece tokenizer as a Hugging Face fast tokenizer that encodes text to exactly the same ids.

Our models are trained with ``remove_extra_whitespaces=False``, byte fallback, split digits and identity
normalization, and `sentencepiece` adds one dummy-prefix space to every text. Hugging Face's Llama tokenizer
does not reproduce that: it rebuilds a Metaspace pre-tokenizer that adds no prefix space before text that
already starts with one (" x" and "  x" encode differently from sentencepiece). So the exported
``tokenizer.json`` holds the sentencepiece vocabulary (BPE merges or unigram scores) behind a normalizer that
does exactly what sentencepiece does (prepend "▁", every " " to "▁"), and ``tokenizer_config.json`` names the
generic fast tokenizer class, which loads that file as it is:

- ``tokenizer(text)["input_ids"] == sp.encode(text)``: no bos or eos is added (our training documents are
  ``encode(text) + [eos]``, with no bos);
- special-token strings in the text ("</s>", "<s>") are split like any text (``split_special_tokens``),
  as sentencepiece does; pass ids, not strings, to insert bos/eos;
- ``decode(ids)`` equals ``sp.decode(ids)``.
The original ``tokenizer.model`` is copied along for tools that read sentencepiece directly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2

# sentencepiece piece types (sentencepiece_model.proto)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4
_BPE = 2


def _backend(model_file: Path):
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE, Unigram
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    unk = proto.trainer_spec.unk_piece
    if proto.trainer_spec.model_type == _BPE:
        extracted = SentencePieceExtractor(str(model_file)).extract(None)  # transformers 5: a dict; 4: a tuple
        vocab, merges = (extracted["vocab"], extracted["merges"]) if isinstance(extracted, dict) else extracted
        model = BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True, dropout=None)
    else:
        # sentencepiece never matches control, unknown or byte pieces in text; the unigram lattice would,
        # so they get a score no segmentation chooses when any other exists.
        floor = min(p.score for p in proto.pieces if p.type == _NORMAL) - 1e4
        model = Unigram([(p.piece, p.score if p.type in (_NORMAL, _USER_DEFINED) else floor) for p in proto.pieces],
                        unk_id=proto.trainer_spec.unk_id, byte_fallback=True)
    backend = Tokenizer(model)
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                                for p in proto.pieces if p.type in (_UNKNOWN, _CONTROL)])
    return backend, proto


def export_tokenizer(model_file: Path, out_dir: Path, max_length: int) -> dict[str, int]:
    """Write tokenizer.json, tokenizer_config.json and tokenizer.model into ``out_dir``; returns the
    special token ids (bos, eos, pad, unk) for the model config."""
    backend, proto = _backend(model_file)
    backend.save(str(out_dir / "tokenizer.json"))
    shutil.copyfile(model_file, out_dir / "tokenizer.model")
    spec = proto.trainer_spec
    ids = {"bos": spec.bos_id, "eos": spec.eos_id, "pad": spec.pad_id, "unk": spec.unk_id}
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
