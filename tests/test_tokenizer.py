import pytest
from hypothesis import given, settings, strategies as st

from nextbit.core.errors import NextbitError
from nextbit.core.tokenizer import EOT, SPECIAL_TOKENS, Tokenizer, train_tokenizer

from conftest import small_corpus_texts


def test_special_tokens_have_stable_ids(tokenizer):
    assert [tokenizer.special[t] for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tokenizer.vocab_size == 384


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
def test_round_trip_any_unicode(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("def class (): \n\t\r  return self._x = [1, 2]  # é 🎉 <|endoftext|> \\\"'")), max_size=300))
def test_round_trip_code_like(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_round_trip_real_code(tokenizer):
    for text in small_corpus_texts(10):
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert len(ids) < len(text.encode())  # BPE actually compresses


def test_special_token_text_is_not_injected(tokenizer):
    ids = tokenizer.encode(f"a {EOT} b")
    assert tokenizer.eot_id not in ids
    assert tokenizer.decode(ids) == f"a {EOT} b"


def test_save_load_keeps_hash(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.hash == tokenizer.hash
    assert again.encode("hello world") == tokenizer.encode("hello world")


def test_hash_differs_between_tokenizers(tokenizer):
    other = train_tokenizer(["completely different text " * 50], 300)
    assert other.hash != tokenizer.hash
    with pytest.raises(NextbitError, match="tokenizer mismatch"):
        other.check_hash(tokenizer.hash, "the data")


def test_bad_vocab_and_files(tmp_path):
    with pytest.raises(NextbitError, match="at least"):
        train_tokenizer(["x"], 100)
    with pytest.raises(NextbitError, match="no tokenizer"):
        Tokenizer.load(tmp_path / "missing.json")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(NextbitError, match="corrupted"):
        Tokenizer.load(tmp_path)
