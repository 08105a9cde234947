import json

import numpy as np
import pytest

from nextbit.core.errors import NextbitError
from nextbit.core.shards import BatchSampler, Dataset, dtype_for, eval_windows
from nextbit.core.tokenizer import Tokenizer
from nextbit.data.prepare import PrepareConfig, prepare
from nextbit.data.sources import Skipped, iter_stdlib, stdlib_files, stdlib_generated


def test_manifest_and_shards(dataset):
    ds = Dataset(dataset)
    m = ds.manifest
    assert m["dtype"] == "uint16" and m["vocab_size"] == 384
    tr, va = ds.split("train"), ds.split("val")
    assert tr.tokens == sum(len(s) for s in tr.shards) > 1000
    assert va.documents == m["splits"]["val"]["documents"] > 0
    assert tr.bytes > tr.tokens  # BPE: more than one byte per token
    # documents are separated (preceded) by <|endoftext|>
    assert int(tr.shards[0][0]) == ds.tokenizer.eot_id
    assert int((tr.shards[0] == ds.tokenizer.eot_id).sum()) == tr.documents


def test_tokens_decode_back_to_the_documents(corpus_dir, dataset):
    ds = Dataset(dataset)
    ids = np.concatenate([np.asarray(s) for s in ds.split("train").shards])
    text = ds.tokenizer.decode(ids.tolist())
    docs = text.split("<|endoftext|>")[1:]
    originals = [p.read_text() for p in sorted(corpus_dir.iterdir())]
    train_docs = [t for i, t in enumerate(originals) if i % 10 != 9]
    assert docs == train_docs


def test_documents_and_plain_prompts_start_after_endoftext_alike(corpus_dir, dataset):
    """One rule for where a document starts: the shards hold each document as Tokenizer.encode_document encodes it,
    and `nextbit sample` conditions a plain-text prompt on that same encoding (the start of a training document)."""
    from nextbit.infer.sample import SampleConfig, prompt_ids

    ds = Dataset(dataset)
    tok = ds.tokenizer
    ids = np.concatenate([np.asarray(s) for s in ds.split("train").shards]).tolist()
    docs = [p.read_text() for i, p in enumerate(sorted(corpus_dir.iterdir())) if i % 10 != 9]
    assert ids == [t for d in docs for t in tok.encode_document(d)]
    assert tok.encode_documents(docs[:3]) == [tok.encode_document(d) for d in docs[:3]]
    assert tok.encode_document(docs[0]) == [tok.eot_id] + tok.encode(docs[0])
    first = tok.encode_document(docs[0])
    assert prompt_ids(SampleConfig(prompt=docs[0]), tok) == first == ids[: len(first)]
    assert prompt_ids(SampleConfig(prompt=""), tok) == [tok.eot_id]  # "" starts a new document


def test_prepare_refuses_to_overwrite_and_force_replaces(corpus_dir, tmp_path):
    out = tmp_path / "d"
    prepare(PrepareConfig(sources=[str(corpus_dir)], out=str(out), vocab_size=300, quiet=True))
    with pytest.raises(NextbitError, match="already exists"):
        prepare(PrepareConfig(sources=[str(corpus_dir)], out=str(out), vocab_size=300, quiet=True))
    prepare(PrepareConfig(sources=[str(corpus_dir)], out=str(out), vocab_size=300, quiet=True, force=True))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_skips_binary_and_non_utf8_files_with_a_count(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.txt").write_text("hello world, this is text. " * 200)
    (src / "bin.dat").write_bytes(b"\x00\x01\x02binary" * 50)
    (src / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1") * 20)
    m = prepare(PrepareConfig(sources=[str(src)], out=str(tmp_path / "d"), vocab_size=300, quiet=True))
    assert m["skipped"] == {"binary": 1, "not UTF-8": 1}
    assert m["splits"]["train"]["documents"] == 1
    # a single document: the held-out split is carved from the tail
    assert m["val_from_tail"] and m["splits"]["val"]["tokens"] > 0


def test_empty_corpus_and_missing_paths(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("   \n")
    with pytest.raises(NextbitError, match="empty corpus"):
        prepare(PrepareConfig(sources=[str(tmp_path / "empty")], out=str(tmp_path / "d"), quiet=True))
    with pytest.raises(NextbitError, match="source not found"):
        prepare(PrepareConfig(sources=[str(tmp_path / "nope")], out=str(tmp_path / "d"), quiet=True))
    assert not (tmp_path / "d").exists()


def test_jsonl_and_globs(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text("\n".join(json.dumps({"body": f"document number {i} " * 30}) for i in range(30)) + "\n")
    (tmp_path / "a.md").write_text("# title\n" + "markdown text " * 100)
    m = prepare(PrepareConfig(sources=[str(f), str(tmp_path / "*.md")], out=str(tmp_path / "d"), vocab_size=300,
                              text_field="body", val_every=10, quiet=True))
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 31
    assert m["splits"]["val"]["documents"] == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(NextbitError, match="bad.jsonl:2"):
        prepare(PrepareConfig(sources=[str(bad)], out=str(tmp_path / "d2"), vocab_size=300, quiet=True))


def test_reuse_tokenizer_and_detect_mismatch(dataset, corpus_dir, tmp_path):
    m = prepare(PrepareConfig(sources=[str(corpus_dir)], out=str(tmp_path / "d"), tokenizer=str(dataset), quiet=True))
    assert m["tokenizer_hash"] == Dataset(dataset).manifest["tokenizer_hash"]
    # a dataset whose tokenizer was swapped is rejected
    other = tmp_path / "d"
    Tokenizer.load(dataset).save(other)  # same: fine
    Dataset(other)
    from nextbit.core.tokenizer import train_tokenizer

    train_tokenizer(["other words entirely " * 40], 300).save(other)
    with pytest.raises(NextbitError, match="tokenizer mismatch"):
        Dataset(other)


def test_truncated_shard_is_detected(dataset, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    shard = copy / "train_0000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(NextbitError, match="corrupted"):
        Dataset(copy)


def test_uint32_for_large_vocab():
    assert dtype_for(65536) == np.uint16 and dtype_for(65537) == np.uint32


def test_sampler_is_deterministic_and_reads_windows(dataset):
    split = Dataset(dataset).split("train")
    s = BatchSampler(split, 32, seed=1)
    x1, y1 = s.batch(5, 0, 8)
    x2, y2 = s.batch(5, 0, 8)
    assert (x1 == x2).all() and x1.shape == (8, 32)
    assert (x1[:, 1:] == y1[:, :-1]).all()  # targets are inputs shifted by one
    x3, _ = s.batch(6, 0, 8)
    assert not (x1 == x3).all()
    # ranks take disjoint slices of the same global draw
    g, _ = s.batch(5, 0, 4, rank=0, world=2)
    h, _ = s.batch(5, 0, 4, rank=1, world=2)
    assert (g == x1[:4]).all() and (h == x1[4:]).all()


def test_eval_windows_cover_the_split_once(dataset):
    split = Dataset(dataset).split("val")
    n = sum(y.numel() for _, y in eval_windows(split, 16))
    assert n == split.tokens - 1


def test_stdlib_source_split_is_deterministic():
    files = stdlib_files()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts or "test" in f.parts for f in files)
    sk = Skipped()
    first = [d.name for d in iter_stdlib(50, sk) if d.split == "val"]
    assert first == [d.name for d in iter_stdlib(50, Skipped()) if d.split == "val"]
    assert 5 <= len(first) <= len(files) // 50 + 1


def test_stdlib_corpus_leaves_out_generated_tables_and_keeps_the_code():
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [f.relative_to(root).as_posix() for f in stdlib_files()]
    assert not [r for r in rel if r.startswith("encodings/")]
    assert not [r for r in rel if r.startswith("pydoc_data/") or r == "html/entities.py" or "_sysconfigdata_" in r]
    # by content, whatever the interpreter's layout: no gencodec character table, no Sphinx-written text
    markers = ("Python Character Mapping Codec", "### Decoding Table", "Autogenerated by Sphinx")
    docs = list(iter_stdlib(50, Skipped()))
    assert not [d.name for d in docs if any(m in d.text for m in markers)]
    assert (root / "encodings" / "cp1252.py").is_file() and stdlib_generated("encodings/cp1252.py")  # it exists, left out
    # handwritten modules stay, including ones that carry a big table inside (locale.py) or sit beside the
    # left-out ones (html/__init__.py)
    assert {"os.py", "locale.py", "html/__init__.py", "re/__init__.py", "email/_header_value_parser.py"} <= set(rel)
    # still a corpus worth training on
    n_bytes = sum(len(d.text.encode("utf-8")) for d in docs)
    assert len(docs) >= 400 and n_bytes >= 6_000_000, (len(docs), n_bytes)
    assert len([d for d in docs if d.split == "val"]) >= 8
