"""The toy world's prompt grammar and concept catalogue.

Grammar: an optional colour, an optional object and an optional style, written with a few
templates ("a red circle on dots background", "a circle in waves style", "a star",
"vertical stripes background", "an empty grid background"). Semantics: an attribute the
prompt does not mention is random (drawn from the image seed); "empty" means no object.

The catalogue (concepts, neighbours, evaluation prompts, templates) is data in
``concepts.yaml``; this module loads and validates it into frozen dataclasses, samples
(prompt, labels, render spec) training examples, and parses prompts back into labels.
Each concept name is its prompt text verbatim, so the unlearning code can locate it in a
tokenized prompt by sub-sequence match.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import yaml

from jaxforget.errors import ConfigError
from jaxforget.toyworld.render import (
    COLOUR_NAMES,
    EVAL_SEED_BASE,
    OBJECTS,
    STYLES,
    RenderSpec,
)

CATALOGUE_PATH = Path(__file__).with_name("concepts.yaml")
DOMAINS = ("object", "style")
EMPTY_WORD = "empty"
TEMPLATE_KINDS = ("object_style", "object", "style", "empty")


@dataclass(frozen=True)
class Concept:
    name: str  # exact prompt text, e.g. "circle", "horizontal stripes"
    domain: str  # "object" | "style"
    neighbours: tuple[str, ...]
    eval_prompts: tuple[str, ...]


@dataclass(frozen=True)
class Labels:
    """What a prompt asks for. None = not mentioned (random in the image)."""

    object: str | None = None
    style: str | None = None
    colour: str | None = None
    empty: bool = False  # "empty": explicitly no object

    def get(self, domain: str) -> str | None:
        return {"object": self.object, "style": self.style, "colour": self.colour}[domain]


@dataclass(frozen=True)
class Example:
    prompt: str
    labels: Labels  # what the prompt says
    spec: RenderSpec  # what is drawn (unmentioned attributes filled in)


@dataclass(frozen=True)
class Catalogue:
    concepts: tuple[Concept, ...]
    colours: tuple[str, ...]
    templates: dict[str, tuple[str, ...]]
    image_size: int
    source: str = ""

    @property
    def objects(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.concepts if c.domain == "object")

    @property
    def styles(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.concepts if c.domain == "style")

    def concept(self, name: str) -> Concept:
        for c in self.concepts:
            if c.name == name:
                return c
        raise KeyError(f"unknown toy-world concept {name!r}; known: {', '.join(c.name for c in self.concepts)}")

    def domain_concepts(self, domain: str) -> tuple[Concept, ...]:
        return tuple(c for c in self.concepts if c.domain == domain)


# ----------------------------------------------------------------------------- loading
def _fail(source: str, msg: str) -> ConfigError:
    return ConfigError(f"{source}: {msg}")


def load_catalogue(path: str | Path | None = None) -> Catalogue:
    """Load and validate a catalogue file (default: the packaged ``concepts.yaml``)."""
    path = Path(path) if path is not None else CATALOGUE_PATH
    if path == CATALOGUE_PATH:
        return _default_catalogue()
    return _load(path)


@lru_cache(maxsize=1)
def _default_catalogue() -> Catalogue:
    return _load(CATALOGUE_PATH)


def _load(path: Path) -> Catalogue:
    src = str(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as err:
        raise _fail(src, f"cannot read ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise _fail(src, f"not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict) or "concepts" not in raw:
        raise _fail(src, "expected a mapping with a 'concepts' list")
    colours = tuple(raw.get("colours") or ())
    templates_raw = raw.get("templates") or {}
    templates = {k: tuple(templates_raw.get(k) or ()) for k in TEMPLATE_KINDS}
    concepts = []
    for i, item in enumerate(raw["concepts"]):
        where = f"concepts[{i}]"
        try:
            concepts.append(
                Concept(
                    name=str(item["name"]),
                    domain=str(item["domain"]),
                    neighbours=tuple(str(n) for n in item.get("neighbours") or ()),
                    eval_prompts=tuple(str(p) for p in item["eval_prompts"]),
                )
            )
        except (KeyError, TypeError) as err:
            raise _fail(src, f"{where}: missing or malformed field {err}") from None
    cat = Catalogue(tuple(concepts), colours, templates, int(raw.get("image_size", 32)), src)
    validate_catalogue(cat)
    return cat


def validate_catalogue(cat: Catalogue) -> None:
    """Raise ConfigError on any inconsistency between the data, the renderer and the grammar."""
    src = cat.source or "catalogue"
    names = [c.name for c in cat.concepts]
    if len(set(names)) != len(names):
        raise _fail(src, "duplicate concept names")
    for colour in cat.colours:
        if colour not in COLOUR_NAMES:
            raise _fail(src, f"colour {colour!r} is not rendered (renderer has {', '.join(COLOUR_NAMES)})")
    for kind in TEMPLATE_KINDS:
        if not cat.templates[kind]:
            raise _fail(src, f"templates.{kind}: at least one template required")
    for c in cat.concepts:
        where = f"concept {c.name!r}"
        if c.domain not in DOMAINS:
            raise _fail(src, f"{where}: domain must be object or style, got {c.domain!r}")
        rendered = OBJECTS if c.domain == "object" else STYLES
        if c.name not in rendered:
            raise _fail(src, f"{where}: the renderer has no {c.domain} of that name")
        for n in c.neighbours:
            if n not in names or n == c.name:
                raise _fail(src, f"{where}: neighbour {n!r} is not another concept")
            if cat.concept(n).domain != c.domain:
                raise _fail(src, f"{where}: neighbour {n!r} is in another domain")
        if len(c.eval_prompts) < 4:
            raise _fail(src, f"{where}: needs >= 4 eval_prompts")
        for p in c.eval_prompts:
            try:
                labels = parse_prompt(p, cat)
            except ValueError as err:
                raise _fail(src, f"{where}: eval prompt {p!r}: {err}") from None
            if labels.get(c.domain) != c.name:
                raise _fail(src, f"{where}: eval prompt {p!r} does not ask for {c.name!r}")


# ----------------------------------------------------------------------------- grammar
def _normalize(text: str) -> str:
    # same normalization as the CLIP tokenizer (lowercase, collapsed whitespace)
    return " ".join(text.lower().split())


def _fix_articles(text: str) -> str:
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def parse_prompt(prompt: str, catalogue: Catalogue | None = None) -> Labels:
    """Labels a prompt asks for, by whole-word match of the catalogue's vocabulary.

    Raises ValueError when a prompt names two objects, two styles or two colours, or names
    an object together with "empty".
    """
    cat = catalogue or load_catalogue()
    text = f" {' '.join(re.sub(r'[^a-z0-9]+', ' ', prompt.lower()).split())} "  # punctuation = space
    found: dict[str, list[str]] = {"object": [], "style": [], "colour": []}
    # Longest names first, removing each match, so "horizontal stripes" is one style.
    vocab = [(n, "object") for n in cat.objects] + [(n, "style") for n in cat.styles]
    vocab += [(n, "colour") for n in cat.colours]
    for name, field in sorted(vocab, key=lambda v: -len(v[0])):
        pattern = f" {name} "
        while pattern in text:
            found[field].append(name)
            text = text.replace(pattern, " | ", 1)
    for field, hits in found.items():
        if len(hits) > 1:
            raise ValueError(f"names {len(hits)} {field}s ({', '.join(hits)})")
    empty = f" {EMPTY_WORD} " in text
    if empty and found["object"]:
        raise ValueError(f"names an object and {EMPTY_WORD!r}")
    return Labels(
        object=found["object"][0] if found["object"] else None,
        style=found["style"][0] if found["style"] else None,
        colour=found["colour"][0] if found["colour"] else None,
        empty=empty,
    )


def make_prompt(labels: Labels, template: int | np.random.Generator = 0, catalogue: Catalogue | None = None) -> str:
    """Write labels as a prompt with one of the catalogue's templates (index or random)."""
    cat = catalogue or load_catalogue()
    if labels.empty:
        kind = "empty"
        if labels.object is not None or labels.colour is not None:
            raise ValueError("an empty scene has no object or colour")
    elif labels.object is not None:
        kind = "object_style" if labels.style is not None else "object"
    elif labels.style is not None:
        kind = "style"
        if labels.colour is not None:
            raise ValueError("a colour needs an object")
    else:
        raise ValueError("a prompt needs an object, a style or 'empty'")
    options = cat.templates[kind]
    if kind == "empty" and labels.style is None:
        options = tuple(t for t in options if "{style}" not in t) or options
    elif kind == "empty":
        options = tuple(t for t in options if "{style}" in t) or options
    idx = int(template.integers(len(options))) if isinstance(template, np.random.Generator) else template
    obj = f"{labels.colour} {labels.object}" if labels.colour else (labels.object or "")
    text = options[idx % len(options)].format(object=obj, style=labels.style or "")
    return _fix_articles(_normalize(text))


def labels_to_spec(labels: Labels, seed: int, catalogue: Catalogue | None = None) -> RenderSpec:
    """A full scene for a prompt: unmentioned attributes drawn from the seed."""
    cat = catalogue or load_catalogue()
    rng = np.random.default_rng([int(seed), 5])
    obj = None if labels.empty else labels.object or cat.objects[int(rng.integers(len(cat.objects)))]
    style = labels.style or cat.styles[int(rng.integers(len(cat.styles)))]
    colour = None if obj is None else labels.colour or cat.colours[int(rng.integers(len(cat.colours)))]
    return RenderSpec(obj, style, colour, int(seed))


def sample_example(
    rng: np.random.Generator,
    catalogue: Catalogue | None = None,
    *,
    p_empty: float = 0.04,
    p_object: float = 0.85,
    p_style: float = 0.8,
    p_colour: float = 0.6,
    seed_low: int = 0,
    seed_high: int = EVAL_SEED_BASE,
) -> Example:
    """One training pair: a scene drawn uniformly and a prompt mentioning part of it.

    Each attribute is mentioned with its probability (colour only with an object; at least one
    of object / style always); unmentioned ones stay random in the image, which is what the
    prompt means. Seeds come from [seed_low, seed_high) (evaluation seeds lie above).
    """
    cat = catalogue or load_catalogue()
    seed = int(rng.integers(seed_low, seed_high))
    style = cat.styles[int(rng.integers(len(cat.styles)))]
    if rng.random() < p_empty:
        labels = Labels(style=style if rng.random() < p_style else None, empty=True)
        return Example(make_prompt(labels, rng, cat), labels, RenderSpec(None, style, None, seed))
    obj = cat.objects[int(rng.integers(len(cat.objects)))]
    colour = cat.colours[int(rng.integers(len(cat.colours)))]
    say_obj = rng.random() < p_object
    say_style = rng.random() < p_style or not say_obj
    say_colour = say_obj and rng.random() < p_colour
    labels = Labels(obj if say_obj else None, style if say_style else None, colour if say_colour else None)
    return Example(make_prompt(labels, rng, cat), labels, RenderSpec(obj, style, colour, seed))


def sample_examples(n: int, seed: int, catalogue: Catalogue | None = None, **kwargs) -> list[Example]:
    rng = np.random.default_rng([int(seed), 6])
    return [sample_example(rng, catalogue, **kwargs) for _ in range(n)]


def eval_examples(
    concept: str | Concept,
    n_per_prompt: int,
    catalogue: Catalogue | None = None,
    seed_base: int = EVAL_SEED_BASE,
) -> list[Example]:
    """Fixed held-out scenes for a concept's evaluation prompts (seeds >= EVAL_SEED_BASE)."""
    cat = catalogue or load_catalogue()
    c = cat.concept(concept) if isinstance(concept, str) else concept
    out = []
    for i, prompt in enumerate(c.eval_prompts):
        labels = parse_prompt(prompt, cat)
        for j in range(n_per_prompt):
            seed = seed_base + i * 10_000 + j
            out.append(Example(prompt, labels, labels_to_spec(labels, seed, cat)))
    return out


# ----------------------------------------------------------------------------- tokenizer
def tokenizer_corpus(catalogue: Catalogue | None = None) -> list[str]:
    """Every template filled with every vocabulary word (plus the eval prompts).

    Training the BPE on it to completion makes every word of the world a single token, so
    each concept name is a 1-2 token span.
    """
    cat = catalogue or load_catalogue()
    out: list[str] = []
    objects = list(cat.objects) + [f"{c} {o}" for c in cat.colours for o in cat.objects]
    for obj in objects:
        for style in cat.styles:
            for t in cat.templates["object_style"]:
                out.append(_fix_articles(t.format(object=obj, style=style)))
        for t in cat.templates["object"]:
            out.append(_fix_articles(t.format(object=obj)))
    for style in cat.styles:
        for kind in ("style", "empty"):
            for t in cat.templates[kind]:
                out.append(_fix_articles(t.format(style=style)))
    out += [p for c in cat.concepts for p in c.eval_prompts]
    return out


def build_toyworld_tokenizer(out_dir: str | Path, catalogue: Catalogue | None = None) -> Path:
    """Train and save the world's CLIP-style tokenizer (CLIPTokenizer files) into ``out_dir``."""
    from jaxforget.tokenizers import build_clip_tokenizer  # the generic builder

    return build_clip_tokenizer(tokenizer_corpus(catalogue), out_dir, vocab_size=None)


def iter_words(catalogue: Catalogue | None = None) -> Iterator[str]:
    """All distinct words of the world's vocabulary."""
    seen: set[str] = set()
    for text in tokenizer_corpus(catalogue):
        for w in text.split():
            if w not in seen:
                seen.add(w)
                yield w


__all__: Sequence[str] = (
    "CATALOGUE_PATH", "Catalogue", "Concept", "Example", "Labels", "build_toyworld_tokenizer",
    "eval_examples", "iter_words", "labels_to_spec", "load_catalogue", "make_prompt",
    "parse_prompt", "sample_example", "sample_examples", "tokenizer_corpus", "validate_catalogue",
)
