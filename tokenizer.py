"""Emu3's text tokenizer: Qwen's byte-level BPE + 211 specials + 32768 visual tokens, as one `tokenizers.Tokenizer`.

Tracks the original BAAI `emu3/mllm/tokenization_emu3.py` (a tiktoken Encoding: qwen.tiktoken's ranks + the
specials + emu3_vision_tokens.txt). tiktoken is not a dependency: the same ids come from a `tokenizers` BPE built
from the same ranks.

    text -> NFC -> split by the Qwen regex (one digit per piece) -> bytes -> printable chars -> BPE -> ids 0..151642
    special strings ("<|extra_203|>", "<|visual token 000007|>", ...) anywhere in the text -> their ids 151643..184621

`build_tokenizer(ranks)` makes it from the tiktoken ranks (the original's emu3.tiktoken, or the -hf vocabulary read
back into ranks by `ranks_from_vocab`); `load_tokenizer(dir)` reads the tokenizer.json of our checkpoint directory;
`tokenizer_from_original` / `tokenizer_from_hf` read a release's files and check them against the layout above.
"""
import base64
import json
import os
import sys

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

# Qwen's pre-tokenizer regex, verbatim from the original tokenization_emu3.py: one digit per piece,
# and one non-letter may lead a run of letters ("(world" stays one piece).
QWEN_PAT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def special_tokens(n_visual=32768):
    """The specials in id order from the first id after the BPE ranks (151643 for Qwen): the original enumerates
    these three, 205 extras, then the lines of emu3_vision_tokens.txt (three image specials, the visual tokens)."""
    return (["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
            + vision_tokens(n_visual))


def vision_tokens(n_visual=32768):
    """The lines of the original's emu3_vision_tokens.txt, in order."""
    return (["<|image token|>", "<|image start|>", "<|image end|>"]
            + [f"<|visual token {k:06d}|>" for k in range(n_visual)])


def bytes_to_unicode():
    """GPT-2's reversible byte -> printable-char map, in which byte-level BPE vocabularies are written."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:  # the other bytes get chars 256, 257, ...
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def read_ranks(tiktoken_path):
    """A tiktoken file (base64 token, rank per line) -> {token bytes: rank}, ranks 0..n-1."""
    with open(tiktoken_path, "rb") as f:
        ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in f if line.strip())}
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{tiktoken_path}: ranks are not 0..{len(ranks) - 1}")
    return ranks


def ranks_from_vocab(vocab, n_ranks):
    """A byte-level BPE vocabulary {printable string: id} (an -hf tokenizer's) -> {token bytes: rank}, ids < n_ranks.

    The -hf conversion wrote tiktoken rank r as the string of its bytes at id r, so this reads the ranks back."""
    char_byte = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {bytes(char_byte[c] for c in s): i for s, i in vocab.items() if i < n_ranks}
    if sorted(ranks.values()) != list(range(n_ranks)):
        raise ValueError(f"the vocabulary does not hold ids 0..{n_ranks - 1} as byte-level tokens")
    return ranks


def build_tokenizer(ranks, n_visual=32768):
    """tiktoken ranks ({bytes: rank}, or a tiktoken file's path) -> tokenizers.Tokenizer with the original's ids."""
    if not isinstance(ranks, dict):
        ranks = read_ranks(ranks)
    byte_char = bytes_to_unicode()
    to_str = lambda b: "".join(byte_char[x] for x in b)
    # tiktoken merges the adjacent pair whose concatenation has the lowest rank; BPE merges the pair listed first.
    # So list every split (l, r) of every token t (both halves tokens) ordered by rank(t): same choices as tiktoken.
    # (The old HF script kept one split per token, which misses pairs tiktoken would merge in some contexts.)
    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    bpe = models.BPE({to_str(t): r for t, r in ranks.items()}, [(to_str(l), to_str(r)) for *_, l, r in merges],
                     ignore_merges=True)  # like tiktoken: a piece that is itself a token is taken whole
    tokenizer = with_qwen_pipeline(Tokenizer(bpe))
    # normalized=True: specials are matched after NFC, as the original normalizes the whole text before encoding
    n = tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=True) for s in special_tokens(n_visual)])
    if tokenizer.get_vocab_size() != len(ranks) + n:
        raise ValueError("special tokens collide with BPE tokens")
    return tokenizer


def with_qwen_pipeline(tokenizer):
    """The original's text pipeline around a BPE model: NFC, the Qwen regex, bytes as printable chars."""
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PAT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def splits_like_qwen(tokenizer_json):
    """True when a tokenizer.json (as a dict) normalizes and splits text exactly as with_qwen_pipeline does."""
    ours = json.loads(with_qwen_pipeline(Tokenizer(models.BPE())).to_str())
    return all(tokenizer_json.get(k) == ours[k] for k in ("normalizer", "pre_tokenizer"))


def load_tokenizer(path):
    """DIR/tokenizer.json (or a path to the file itself) -> tokenizers.Tokenizer."""
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no tokenizer.json in {path}")
    try:
        return Tokenizer.from_file(file)
    except Exception as e:  # tokenizers raises its own Exception type for a malformed file
        raise ValueError(f"cannot read {file}: {e}") from None


# ---- the tokenizer files of the releases ----

def tokenizer_from_original(path, cfg):
    """emu3.tiktoken -> our tokenizer, after checking emu3_vision_tokens.txt holds the lines we build."""
    if not os.path.isfile(os.path.join(path, "emu3.tiktoken")):
        raise FileNotFoundError(f"no emu3.tiktoken in {path}")
    ranks = read_ranks(os.path.join(path, "emu3.tiktoken"))
    file = os.path.join(path, "emu3_vision_tokens.txt")
    if os.path.isfile(file):
        with open(file, encoding="utf-8") as f:
            lines = [line.rstrip("\r\n") for line in f if line.strip()]
        want = vision_tokens(cfg.codebook_size)
        bad = next((i for i, (a, b) in enumerate(zip(lines, want)) if a != b), None)
        if bad is not None or len(lines) != len(want):
            i = bad if bad is not None else min(len(lines), len(want))
            got = repr(lines[i]) if i < len(lines) else "the end of the file"
            raise ValueError(f"{file} line {i + 1} is {got}, expected {want[i]!r}" if i < len(want) else
                             f"{file} has {len(lines)} lines, expected {len(want)}")
    return build_tokenizer(ranks, n_visual=cfg.codebook_size)


def tokenizer_from_hf(path, cfg, log=lambda *a: print(*a, file=sys.stderr)):
    """-hf tokenizer.json -> our tokenizer. It is used as it is when it splits text as the model was trained (NFC,
    then the Qwen regex); otherwise (e.g. the GPT-2 regex, which splits "90*90" into 90,*,90 instead of 9,0,*,9,0)
    it is rebuilt from its own vocabulary with the Qwen regex, and a line says so."""
    file = os.path.join(path, "tokenizer.json")
    tokenizer = load_tokenizer(file)
    j = json.loads(tokenizer.to_str())
    model = j.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{file}: a {model.get('type')} tokenizer, not the byte-level BPE Emu3 uses")
    n_ranks = cfg.pad_id  # the specials start at <|endoftext|>
    # every special must sit at its reference id; -hf renames <|extra_0|> to <image>, its placeholder
    for i, s in enumerate(special_tokens(cfg.codebook_size)):
        got = tokenizer.id_to_token(n_ranks + i)
        if got != s and not (s == "<|extra_0|>" and got == "<image>"):
            raise ValueError(f"{file}: id {n_ranks + i} is {got!r}, expected {s!r}")
    if tokenizer.get_vocab_size() != cfg.vocab_size:
        raise ValueError(f"{file} has {tokenizer.get_vocab_size()} tokens, the model {cfg.vocab_size}")
    if not splits_like_qwen(j):
        log(f"{file} splits text differently from the Qwen regex the model was trained with: rebuilt from its "
            f"vocabulary")
        tokenizer = build_tokenizer(ranks_from_vocab(model.get("vocab", {}), n_ranks), n_visual=cfg.codebook_size)
    return tokenizer


def check_special_ids(tokenizer, cfg, where):
    """The config's special ids must be the tokenizer's ids of the special strings."""
    names = dict(pad_id="<|endoftext|>", eol_id="<|extra_200|>", eof_id="<|extra_201|>", bos_id="<|extra_203|>",
                 eos_id="<|extra_204|>", wrapper_id="<|image token|>", boi_id="<|image start|>", eoi_id="<|image end|>",
                 visual_offset="<|visual token 000000|>")
    for f, s in names.items():
        if tokenizer.token_to_id(s) != getattr(cfg, f):
            got = tokenizer.token_to_id(s)
            raise ValueError(f"{where}: {f} is {getattr(cfg, f)} but the tokenizer has {s} at {got}")
