"""CLIP-style BPE tokenizers: build one for a small vocabulary, load one, find a concept's tokens.

``build_clip_tokenizer`` trains a byte-level BPE with the ``tokenizers`` library under CLIP's
conventions and writes the ordinary CLIPTokenizer files (vocab.json, merges.txt,
tokenizer_config.json, special_tokens_map.json), laid out like OpenAI's vocabulary:

    256 byte symbols, the same 256 with "</w>", one entry per merge (in rank order),
    "<|startoftext|>", "<|endoftext|>"

so any text stays encodable (no unknown bytes), merges apply by rank exactly as in CLIP's
reference BPE, and the two specials are the last ids as in SD's tokenizer. The files load with
``transformers.CLIPTokenizer`` (in transformers 5 that class is the tokenizers-backed one; in 4.x
the slow Python one reads the same files).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np

from jaxforget.errors import CheckpointFormatError

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MAX_LENGTH = 77
EOW = "</w>"
# CLIP's pre-tokenization: specials, English contractions, letter runs, single digits, other runs.
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
TOKENIZER_FILES = ("vocab.json", "merges.txt")

EotMode = Literal["none", "first_eot", "all_padding"]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode char table (bytes that print as themselves keep it)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _train_merges(texts: Iterable[str], max_merges: int | None) -> list[tuple[str, str]]:
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(continuing_subword_prefix="", end_of_word_suffix=EOW))
    # Same normalizer / pre-tokenizer as transformers' CLIPTokenizer so training sees the same
    # words that encoding will (lowercase, whitespace collapsed, CLIP regex, byte-level chars).
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        # far above what a small corpus can reach: training then stops when every word is one
        # token; the merge list is cut to ``max_merges`` afterwards (a prefix of BPE merges is a
        # valid BPE).
        vocab_size=1_000_000,
        min_frequency=0,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix=EOW,
        continuing_subword_prefix="",
    )
    tok.train_from_iterator(texts, trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    return merges[:max_merges] if max_merges is not None else merges


def clip_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary layout for a merge list (see module docstring)."""
    base = list(bytes_to_unicode().values())
    tokens = base + [b + EOW for b in base]
    seen = set(tokens)
    for a, b in merges:
        merged = a + b
        if merged in seen:  # cannot happen for a trained BPE; keep ids unique regardless
            continue
        seen.add(merged)
        tokens.append(merged)
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


def _write_text(path: Path, text: str) -> None:
    # atomic (temp file + rename) and world-readable like any other file (mkstemp makes 0600)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def save_clip_tokenizer_files(
    out_dir: str | Path,
    merges: Sequence[tuple[str, str]],
    *,
    pad_token: str = EOS,
    model_max_length: int = MAX_LENGTH,
) -> Path:
    """Write vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = clip_vocab(merges)
    if pad_token not in vocab:
        raise ValueError(f"pad token {pad_token!r} is not in the vocabulary")
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        **specials,
    }
    _write_text(out / "vocab.json", json.dumps(vocab, ensure_ascii=False, indent=None))
    _write_text(out / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    _write_text(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    _write_text(out / "special_tokens_map.json", json.dumps(specials, indent=2) + "\n")
    return out


def build_clip_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path,
    vocab_size: int | None = None,
    *,
    pad_token: str = EOS,
) -> Path:
    """Train a CLIP-style BPE on ``texts`` and save CLIPTokenizer files into ``out_dir``.

    ``vocab_size`` caps the total vocabulary (512 byte symbols + merges + 2 specials); None
    trains to completion (every training word a single token). ``pad_token`` is
    "<|endoftext|>" (SD 1.x style) by default; SD 2.x-style tokenizers pad with "!".
    """
    if vocab_size is not None and vocab_size < 514:
        raise ValueError(f"vocab_size must be >= 514 (512 byte symbols + 2 specials), got {vocab_size}")
    max_merges = None if vocab_size is None else vocab_size - 514
    merges = _train_merges(texts, max_merges)
    return save_clip_tokenizer_files(out_dir, merges, pad_token=pad_token)


def load_clip_tokenizer(folder: str | Path, *, model_max_length: int = MAX_LENGTH):
    """``transformers.CLIPTokenizer`` from a folder; CheckpointFormatError if files are missing."""
    folder = Path(folder)
    missing = [name for name in TOKENIZER_FILES if not (folder / name).is_file()]
    if missing:
        raise CheckpointFormatError(f"{folder}: not a CLIP tokenizer folder (missing {', '.join(missing)})")
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(str(folder), model_max_length=model_max_length)
    except (OSError, ValueError, json.JSONDecodeError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointFormatError(f"{folder}: cannot load the CLIP tokenizer ({msg})") from None


def encode_prompts(tokenizer, prompts: Sequence[str], max_length: int = MAX_LENGTH) -> np.ndarray:
    """int32 [N, max_length] ids: <|startoftext|> ... <|endoftext|> then the pad token (SD style)."""
    enc = tokenizer(
        list(prompts), padding="max_length", max_length=max_length, truncation=True, return_attention_mask=False
    )
    return np.asarray(enc["input_ids"], np.int32)


def target_token_ids(tokenizer, target: str) -> list[int]:
    """The target's ids without special tokens (what is searched for inside prompts)."""
    return list(tokenizer(target, add_special_tokens=False)["input_ids"])


def token_span_positions(
    tokenizer,
    prompt_ids: Sequence[int] | np.ndarray,
    target: str,
    eot: EotMode = "none",
) -> list[int]:
    """Positions in ``prompt_ids`` covered by every occurrence of ``target``'s tokens.

    Occurrences are found by sub-sequence match (overlaps allowed). ``eot`` adds end-of-text
    positions: ``first_eot`` the first one; ``all_padding`` every position holding the
    end-of-text id (~70 on SD 1.x, which pads with it; 1 on SD 2.x / SDXL, which pad with "!").
    Returns sorted unique positions; [] when the target does not occur and eot is "none".
    """
    if eot not in ("none", "first_eot", "all_padding"):
        raise ValueError(f"eot must be none, first_eot or all_padding, got {eot!r}")
    ids = np.asarray(prompt_ids).reshape(-1).tolist()
    span = target_token_ids(tokenizer, target) if target.strip() else []
    positions: set[int] = set()
    n = len(span)
    if n:
        for start in range(len(ids) - n + 1):
            if ids[start:start + n] == span:
                positions.update(range(start, start + n))
    eos_id = tokenizer.eos_token_id
    eot_positions = [i for i, t in enumerate(ids) if t == eos_id]
    if eot == "first_eot" and eot_positions:
        positions.add(eot_positions[0])
    elif eot == "all_padding":
        positions.update(eot_positions)
    return sorted(positions)
