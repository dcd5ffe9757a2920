"""Deletion requests: parsing and validation of ``--concepts file.txt`` (or ``.yaml``).

Text form, one request per line, ``#`` starts a comment::

    van gogh
    van gogh -> painting | related: monet, cezanne | domain: style
    circle -> empty | related: ellipse, ring | templates: a {} on dots background; a {}

YAML form: a list of mappings with the same fields (``prompts`` may carry explicit forget prompts).
Every request is validated before any training starts; errors name the file, line and field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

from jaxforget.errors import RequestError

FIELDS = ("related", "domain", "templates", "prompts", "anchor")
DOMAINS = ("object", "style", "any")
MAX_TOKENS = 77


@dataclass(frozen=True)
class Request:
    target: str
    anchor: str | None = None  # None: choose automatically
    related: tuple[str, ...] = ()
    domain: str = "any"
    templates: tuple[str, ...] = ()  # "{}" is replaced by target / anchor
    prompts: tuple[str, ...] = ()  # explicit forget prompts (mapped ones replace target by anchor)
    line: int = 0  # where it came from (for messages)

    def forget_prompts(self, default_templates: Iterable[str]) -> list[str]:
        if self.prompts:
            return list(self.prompts)
        return [t.replace("{}", self.target) for t in (self.templates or tuple(default_templates))]

    def mapped_prompts(self, default_templates: Iterable[str], anchor: str | None = None) -> list[str]:
        anchor = self.anchor if anchor is None else anchor
        anchor = anchor or ""
        if self.prompts:
            return [re.sub(re.escape(self.target), anchor, p, flags=re.IGNORECASE) for p in self.prompts]
        return [" ".join(t.replace("{}", anchor).split()) for t in (self.templates or tuple(default_templates))]


def _norm(text: str) -> str:
    return " ".join(text.strip().split())


def _split_list(value: str, sep: str) -> tuple[str, ...]:
    return tuple(v for v in (_norm(x) for x in value.split(sep)) if v)


def parse_line(line: str, where: str, lineno: int) -> Request | None:
    text = line.split("#", 1)[0].strip()
    if not text:
        return None
    head, *parts = text.split("|")
    if "->" in head:
        target, _, anchor = head.partition("->")
        anchor_value: str | None = _norm(anchor)
    else:
        target, anchor_value = head, None
    target = _norm(target)
    if not target:
        raise RequestError(f"{where}:{lineno}: malformed request {line.strip()!r}: no target before '->' or '|'")
    kw: dict[str, Any] = {}
    for part in parts:
        if ":" not in part:
            raise RequestError(f"{where}:{lineno}: malformed field {part.strip()!r} (expected 'name: value')")
        name, _, value = part.partition(":")
        name = _norm(name).lower()
        if name not in FIELDS:
            raise RequestError(f"{where}:{lineno}: unknown field {name!r} (known: {', '.join(FIELDS)})")
        if name in kw:
            raise RequestError(f"{where}:{lineno}: field {name!r} given twice")
        if name == "related":
            kw[name] = _split_list(value, ",")
        elif name in ("templates", "prompts"):
            kw[name] = _split_list(value, ";")
        elif name == "anchor":
            anchor_value = _norm(value)
        else:
            kw[name] = _norm(value)
    return Request(target=target, anchor=anchor_value, line=lineno, **kw)


def _from_mapping(item: Any, where: str, index: int) -> Request:
    loc = f"{where}: request {index + 1}"
    if isinstance(item, str):
        return Request(target=_norm(item), line=index + 1)
    if not isinstance(item, dict):
        raise RequestError(f"{loc}: expected a target string or a mapping, got {item!r}")
    unknown = sorted(set(item) - set(FIELDS) - {"target"})
    if unknown:
        raise RequestError(f"{loc}: unknown field {unknown[0]!r} (known: target, {', '.join(FIELDS)})")
    if not isinstance(item.get("target"), str) or not item["target"].strip():
        raise RequestError(f"{loc}: field 'target' must be a non-empty string")

    def strings(name: str) -> tuple[str, ...]:
        value = item.get(name, ())
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise RequestError(f"{loc}: field {name!r} must be a list of strings")
        return tuple(_norm(v) for v in value if v.strip())

    anchor = item.get("anchor")
    if anchor is not None and not isinstance(anchor, str):
        raise RequestError(f"{loc}: field 'anchor' must be a string")
    domain = item.get("domain", "any")
    return Request(target=_norm(item["target"]), anchor=None if anchor is None else _norm(anchor),
                   related=strings("related"), domain=str(domain), templates=strings("templates"),
                   prompts=strings("prompts"), line=index + 1)


def parse_requests(path: str | Path) -> list[Request]:
    """Parse a requests file (text or YAML) without checking it against a model; see validate_requests."""
    path = Path(path)
    if not path.is_file():
        raise RequestError(f"{path}: requests file not found")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            raise RequestError(f"{path}{f':{mark.line + 1}' if mark else ''}: invalid YAML") from None
        if isinstance(data, dict) and "requests" in data:
            data = data["requests"]
        if data is None:
            data = []
        if not isinstance(data, list):
            raise RequestError(f"{path}: expected a list of requests (or a 'requests:' list)")
        requests = [_from_mapping(item, str(path), i) for i, item in enumerate(data)]
    else:
        requests = [r for i, line in enumerate(text.splitlines(), 1) if (r := parse_line(line, str(path), i))]
    if not requests:
        raise RequestError(f"{path}: no requests (the file is empty or only comments)")
    return requests


def validate_requests(
    requests: list[Request],
    source: str,
    *,
    tokenizer: Any = None,
    removed: Iterable[str] = (),
    default_templates: Iterable[str] = ("{}",),
) -> None:
    """Check every request before any training starts (duplicates, anchors, ledger, token lengths)."""
    seen: dict[str, int] = {}
    removed_set = {r.lower() for r in removed}
    for r in requests:
        loc = f"{source}:{r.line}"
        key = r.target.lower()
        if r.domain not in DOMAINS:
            raise RequestError(f"{loc}: field 'domain' must be one of {', '.join(DOMAINS)}, got {r.domain!r}")
        if key in seen:
            raise RequestError(f"{loc}: duplicate target {r.target!r} (first on line {seen[key]})")
        seen[key] = r.line
        if key in removed_set:
            raise RequestError(f"{loc}: target {r.target!r} was already removed in this run (see the run's ledger)")
        if r.anchor is not None and r.anchor.lower() == key:
            raise RequestError(f"{loc}: anchor equals the target {r.target!r}")
        if key in {x.lower() for x in r.related}:
            raise RequestError(f"{loc}: target {r.target!r} is also listed as related")
        for t in r.templates:
            if "{}" not in t:
                raise RequestError(f"{loc}: template {t!r} has no '{{}}' placeholder")
        if r.prompts and not any(r.target.lower() in p.lower() for p in r.prompts):
            raise RequestError(f"{loc}: no explicit prompt mentions the target {r.target!r}")
        if tokenizer is not None:
            ids = tokenizer(r.target, add_special_tokens=False)["input_ids"]
            if not ids:
                raise RequestError(f"{loc}: target {r.target!r} tokenizes to nothing")
            for prompt in r.forget_prompts(default_templates):
                n = len(tokenizer(prompt)["input_ids"])
                if n > MAX_TOKENS:
                    raise RequestError(f"{loc}: prompt {prompt[:40]!r}... is {n} tokens, beyond {MAX_TOKENS}")


def load_requests(path: str | Path, **validate_kw: Any) -> list[Request]:
    requests = parse_requests(path)
    validate_requests(requests, str(path), **validate_kw)
    return requests


__all__ = ["Request", "parse_requests", "validate_requests", "load_requests", "parse_line"]
