"""CLIP-style BPE builder: files load with transformers.CLIPTokenizer, encoding matches an
independent implementation of CLIP's reference BPE, SD-style 77-token padding, span positions."""

from __future__ import annotations

import json
import math

import pytest
import regex

from jaxforget.errors import CheckpointFormatError
from jaxforget.tokenizers import (
    BOS,
    CLIP_PATTERN,
    EOS,
    build_clip_tokenizer,
    bytes_to_unicode,
    encode_prompts,
    load_clip_tokenizer,
    token_span_positions,
)

TEXTS = [
    "a red circle on horizontal stripes background",
    "a blue  square in dots style",
    "An Ellipse on vertical stripes background",
    "a picture of a green star",
    "horizontal stripes background with a heart",
    "a photo of a cat, 3 dogs and a van gogh painting!",
] * 4


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return build_clip_tokenizer(TEXTS, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_clip_tokenizer(tok_dir)


def reference_clip_bpe(text: str, vocab: dict[str, int], merges: list[tuple[str, str]]) -> list[int]:
    """CLIP's reference BPE, written independently: regex words -> bytes -> rank-ordered merges."""
    ranks = {m: i for i, m in enumerate(merges)}
    b2u = bytes_to_unicode()
    ids: list[int] = []
    for piece in regex.findall(CLIP_PATTERN, " ".join(text.split()).lower()):
        word = [b2u[b] for b in piece.encode("utf-8")]
        word[-1] += "</w>"
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: ranks.get(p, math.inf))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids += [vocab[w] for w in word]
    return ids


def test_files_and_vocab_layout(tok_dir, tok):
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tok_dir / name).is_file(), name
    vocab = json.loads((tok_dir / "vocab.json").read_text())
    base = list(bytes_to_unicode().values())
    # CLIP layout: 256 byte symbols, the same with </w>, merges, then the two specials last
    assert [t for t, i in sorted(vocab.items(), key=lambda kv: kv[1])[:512]] == base + [b + "</w>" for b in base]
    assert vocab[BOS] == len(vocab) - 2 and vocab[EOS] == len(vocab) - 1
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert (tok_dir / "merges.txt").read_text().startswith("#version: 0.2\n")
    assert type(tok).__name__ == "CLIPTokenizer"
    assert len(tok) == len(vocab)
    assert tok.bos_token_id == vocab[BOS] and tok.eos_token_id == vocab[EOS] and tok.pad_token == EOS
    assert tok.model_max_length == 77


def test_training_words_are_single_tokens(tok):
    for text in TEXTS:
        for word in regex.findall(r"\p{L}+", text.lower()):
            ids = tok(word, add_special_tokens=False)["input_ids"]
            assert len(ids) == 1, (word, tok.convert_ids_to_tokens(ids))


@pytest.mark.parametrize(
    "text",
    TEXTS[:6] + ["zebra crossing", "Café  crème ÉTÉ", "x=3.14; y'all don't", "emoji 🙂 ok", "circles", "  "],
)
def test_matches_reference_bpe_and_round_trips(tok_dir, tok, text):
    vocab = json.loads((tok_dir / "vocab.json").read_text())
    lines = (tok_dir / "merges.txt").read_text().splitlines()[1:]
    merges = [tuple(line.split(" ")) for line in lines if line]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == reference_clip_bpe(text, vocab, merges)
    assert vocab["<|endoftext|>"] not in ids  # no unknown bytes: every byte is in the vocab
    decoded = tok.decode(ids)
    assert decoded.replace(" ", "") == "".join(text.split()).lower()


def test_sd1_style_padding(tok):
    ids = encode_prompts(tok, ["a red circle on horizontal stripes background", "a star"])
    assert ids.shape == (2, 77) and ids.dtype.name == "int32"
    row = ids[0].tolist()
    words = tok("a red circle on horizontal stripes background", add_special_tokens=False)["input_ids"]
    assert row[0] == tok.bos_token_id
    assert row[1:1 + len(words)] == words
    assert row[1 + len(words):] == [tok.eos_token_id] * (76 - len(words))  # eot, then eot padding
    assert tok.decode(row, skip_special_tokens=True) == "a red circle on horizontal stripes background"
    # truncation keeps 77 and ends with end-of-text like SD's tokenizer call
    long = encode_prompts(tok, [" ".join(["circle"] * 100)])
    assert long.shape == (1, 77) and long[0, -1] == tok.eos_token_id


def test_sd2_style_pad_token(tmp_path):
    tok = load_clip_tokenizer(build_clip_tokenizer(TEXTS, tmp_path, pad_token="!"))
    ids = encode_prompts(tok, ["a star"])[0].tolist()
    bang = tok.convert_tokens_to_ids("!")
    assert ids[:4] == [tok.bos_token_id, *tok("a star", add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert ids[4:] == [bang] * 73
    assert token_span_positions(tok, ids, "star", eot="all_padding") == [2, 3]


def test_vocab_size_cap(tmp_path):
    tok = load_clip_tokenizer(build_clip_tokenizer(TEXTS, tmp_path, vocab_size=530))
    assert len(tok) == 530
    ids = tok("horizontal stripes", add_special_tokens=False)["input_ids"]
    assert len(ids) > 2  # not enough merges for whole words, still encodable
    assert tok.decode(ids).replace(" ", "") == "horizontalstripes"
    with pytest.raises(ValueError):
        build_clip_tokenizer(TEXTS, tmp_path / "x", vocab_size=100)


def test_span_positions(tok):
    prompt = "a red circle on horizontal stripes background"
    ids = encode_prompts(tok, [prompt])[0]
    n_words = len(tok(prompt, add_special_tokens=False)["input_ids"])  # 7
    assert token_span_positions(tok, ids, "horizontal stripes") == [5, 6]
    assert token_span_positions(tok, ids, "circle") == [3]
    assert token_span_positions(tok, ids, "Circle") == [3]  # lowercased like the prompt
    assert token_span_positions(tok, ids, "circle", eot="first_eot") == [3, n_words + 1]
    allpad = token_span_positions(tok, ids, "circle", eot="all_padding")
    assert allpad == [3] + list(range(n_words + 1, 77)) and len(allpad) == 1 + 69
    assert token_span_positions(tok, ids, "vertical stripes") == []  # partial overlap is no match
    assert token_span_positions(tok, ids, "square") == []
    assert token_span_positions(tok, ids, "", eot="first_eot") == [n_words + 1]
    twice = encode_prompts(tok, ["a star and a star"])[0]
    assert token_span_positions(tok, twice, "a star") == [1, 2, 4, 5]
    with pytest.raises(ValueError):
        token_span_positions(tok, ids, "circle", eot="all")


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointFormatError) as err:
        load_clip_tokenizer(tmp_path)
    assert "missing vocab.json, merges.txt" in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(CheckpointFormatError, match="merges.txt"):
        load_clip_tokenizer(tmp_path)
