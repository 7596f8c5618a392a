"""Corpus, tokenizer and preprocessing, checked through the real sentencepiece, datasets and megatron-core."""

import json

import numpy as np
import pandas as pd
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from pretrain.config import DataConfig, SourceConfig, TokenizerConfig
from pretrain.data import corpus
from pretrain.data.loader import GlobalBatches, build_datasets
from pretrain.data.preprocess import is_current, preprocess
from pretrain.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, train_tokenizer
from pretrain.errors import UserError

TEXT = ["The quick brown fox jumps over the lazy dog.\n  Indented line with 42 digits.",
        "Attention is all you need; déjà vu and emoji 🚀 survive byte fallback.", "tail document"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "bpe.model"
    return train_tokenizer(TokenizerConfig(path=str(path), vocab_size=400, train_sentences=20000),
                           DataConfig(embedded_docs=60))


def test_embedded_corpus_is_deterministic_and_local():
    first = list(corpus.documents(DataConfig(embedded_docs=50)))
    again = list(corpus.documents(DataConfig(embedded_docs=50)))
    assert len(first) == 50 and first == again
    assert all(isinstance(d, str) and d.strip() for d in first)
    assert sum(map(len, corpus.embedded_documents())) > 1_000_000  # enough text for the demo


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_tokenizer_round_trip_and_special_ids(tmp_path, kind):
    tok = train_tokenizer(TokenizerConfig(path=str(tmp_path / f"{kind}.model"), type=kind, vocab_size=400,
                                          train_sentences=20000), DataConfig(embedded_docs=60))
    assert tok.vocab_size == 400
    assert (tok.sp.unk_id(), tok.bos, tok.eos, tok.pad) == (UNK_ID, BOS_ID, EOS_ID, PAD_ID)
    for text in TEXT:
        ids = tok.encode(text)
        assert UNK_ID not in ids
        assert tok.decode(ids) == text


def test_preprocess_round_trip_through_megatron_core(tmp_path, tokenizer):
    prefix = tmp_path / "docs"
    info = preprocess(TEXT, tokenizer, prefix, workers=2, fingerprint="fp")
    ds = IndexedDataset(str(prefix))
    assert len(ds) == len(TEXT) == info["documents"]
    for text, ids in zip(TEXT, (ds[i] for i in range(len(ds))), strict=True):
        assert ids[-1] == tokenizer.eos  # every document ends with eos
        assert tokenizer.decode(ids[:-1].tolist()) == text
    assert info["tokens"] == int(ds.sequence_lengths.sum())
    assert is_current(prefix, "fp", tokenizer) and not is_current(prefix, "other", tokenizer)
    assert not list(tmp_path.glob("*.tmp*"))


def test_gpt_dataset_packs_seq_len_plus_one_with_seeded_shuffle(tmp_path, tiny_cfg, tokenizer):
    cfg = tiny_cfg("data.seq_len=16", "data.split=100,0,0")
    docs = list(corpus.documents(DataConfig(embedded_docs=20)))
    preprocess(docs, tokenizer, tmp_path / "c", workers=1)
    indexed = IndexedDataset(str(tmp_path / "c"))  # keep it alive: its arrays are views of its mmap
    stream = np.concatenate([indexed[i] for i in range(20)])
    train, valid = build_datasets(cfg, [(str(tmp_path / "c"), 1.0)], tokenizer, tmp_path / "idx", 64, 0)
    assert valid is None or len(valid) == 0
    sample = train[0]
    assert sample["tokens"].shape == (16,) and sample["labels"].shape == (16,)
    assert sample["tokens"][1:].tolist() == sample["labels"][:-1].tolist()  # one read of 17 tokens
    window = sample["tokens"].tolist() + [int(sample["labels"][-1])]
    as_str = ",".join(map(str, stream.tolist()))
    assert ",".join(map(str, window)) in as_str  # a contiguous packed window of the document stream
    again, _ = build_datasets(cfg, [(str(tmp_path / "c"), 1.0)], tokenizer, tmp_path / "idx2", 64, 0)
    assert [train[i]["tokens"].tolist() for i in range(8)] == [again[i]["tokens"].tolist() for i in range(8)]


def test_rebuilt_data_under_the_same_prefix_gets_fresh_indices(tmp_path, tiny_cfg, tokenizer):
    """megatron-core keys its sample-index cache by the config: the data key keeps a corpus rebuilt with fewer
    documents (another machine's embedded corpus) from being read through the old, longer indices."""
    cfg = tiny_cfg("data.seq_len=16", "data.split=90,10,0")
    docs = list(corpus.documents(DataConfig(embedded_docs=40)))
    blend = [(str(tmp_path / "c"), 1.0)]
    preprocess(docs, tokenizer, tmp_path / "c", workers=1)
    first, _ = build_datasets(cfg, blend, tokenizer, tmp_path / "idx", 64, 8)
    preprocess(docs[:10], tokenizer, tmp_path / "c", workers=1)
    train, valid = build_datasets(cfg, blend, tokenizer, tmp_path / "idx", 64, 8)
    assert first.document_index.max() >= 10
    for ds in (train, valid):  # indices over the 10 new documents only, and every sample reads
        assert ds.document_index.max() < 10
        assert all(ds[i]["tokens"].shape == (16,) for i in range(len(ds)))
    assert len(list((tmp_path / "idx").iterdir())) == 2  # one cache folder per version of the data
    assert not (tmp_path / "c").exists()  # nothing is written next to the data
    # A blend in a single process: megatron-core keeps GPTDataset's indices next to the data (its
    # BlendedDataset cannot cache without a process group); preprocess clears them when it rebuilds.
    preprocess(docs[10:30], tokenizer, tmp_path / "d", workers=1)
    blend2 = [(str(tmp_path / "c"), 1.0), (str(tmp_path / "d"), 1.0)]
    build_datasets(cfg, blend2, tokenizer, tmp_path / "idx", 64, 8)
    assert (tmp_path / "d" / "cache").is_dir()
    preprocess(docs[10:15], tokenizer, tmp_path / "d", workers=1)
    assert not (tmp_path / "d" / "cache").exists()
    train, _ = build_datasets(cfg, blend2, tokenizer, tmp_path / "idx", 64, 8)
    assert all(ds.document_index.max() < 5 for ds in train.datasets if ds.dataset.path_prefix.endswith("d"))
    assert all(train[i]["tokens"].shape == (16,) for i in range(len(train)))


def test_global_batches_slice_the_global_position(tmp_path, tiny_cfg, tokenizer):
    cfg = tiny_cfg("data.seq_len=16", "data.split=100,0,0")
    preprocess(list(corpus.documents(DataConfig(embedded_docs=20))), tokenizer, tmp_path / "c", workers=1)
    train, _ = build_datasets(cfg, [(str(tmp_path / "c"), 1.0)], tokenizer, tmp_path / "idx", 64, 0)
    whole = GlobalBatches(train, 8, 2)(position=8)
    rank1 = GlobalBatches(train, 8, 2, dp_rank=1, dp_size=2)(position=8)
    assert len(whole) == 4 and len(rank1) == 2
    assert [mb.tokens.tolist() for mb in whole[2:]] == [mb.tokens.tolist() for mb in rank1]
    with pytest.raises(UserError, match="global_batch_size"):
        GlobalBatches(train, 8, 3)


def test_hf_datasets_sources_text_jsonl_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("first line document\nsecond line document\n")
    with open(tmp_path / "b.jsonl", "w") as f:
        for i in range(3):
            f.write(json.dumps({"content": f"json document {i}", "id": i}) + "\n")
    pd.DataFrame({"text": ["parquet one", "parquet two"]}).to_parquet(tmp_path / "c.parquet")
    data = DataConfig(sources=[SourceConfig(path=str(tmp_path / "a.txt")),
                               SourceConfig(path=str(tmp_path / "b.jsonl"), text_field="content"),
                               SourceConfig(path=str(tmp_path / "*.parquet"))])
    assert list(corpus.documents(data)) == ["first line document", "second line document", "json document 0",
                                            "json document 1", "json document 2", "parquet one", "parquet two"]


def test_source_errors_name_the_fix(tmp_path):
    with pytest.raises(UserError, match="matches no file"):
        list(corpus.documents(DataConfig(sources=[SourceConfig(path=str(tmp_path / "missing.jsonl"))])))
    (tmp_path / "b.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(UserError, match="no column 'text'"):
        list(corpus.documents(DataConfig(sources=[SourceConfig(path=str(tmp_path / "b.jsonl"))])))
