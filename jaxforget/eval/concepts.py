"""Concept sets for evaluating real models: the concepts a run is scored on, as a YAML file
(``eval.concept_set``), in the same shape as the toy world's catalogue:

    concepts:
      - name: van gogh            # the concept, as a CLIP judge label and in its prompts
        domain: style             # its domain: IRA scores the target's domain, CRA the others
        neighbours: [claude monet] # close concepts that must survive its removal (NRA)
        eval_prompts: [a painting by van gogh, a landscape painted by van gogh]

Every removed target must be in the set (its prompts are what UA measures), and every
neighbour must be another concept of the set (its prompts are what NRA measures). The evaluator
only needs ``.concepts`` (name, domain, neighbours, eval_prompts) and ``.concept(name)``, which
the toy world's ``Catalogue`` also has; a ``ConceptSet`` has no renderer, so its FID proxy and
CMMD compare with the base model's images instead of rendered scenes (see ``eval.hook``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jaxforget.config import read_yaml
from jaxforget.errors import ConfigError


@dataclass(frozen=True)
class EvalConcept:
    name: str
    domain: str
    neighbours: tuple[str, ...]
    eval_prompts: tuple[str, ...]


@dataclass(frozen=True)
class ConceptSet:
    concepts: tuple[EvalConcept, ...]
    source: str = ""

    def concept(self, name: str) -> EvalConcept:
        for c in self.concepts:
            if c.name == name:
                return c
        raise KeyError(f"{self.source or 'concept set'}: unknown concept {name!r}; "
                       f"known: {', '.join(c.name for c in self.concepts)}")

    def domain_concepts(self, domain: str) -> tuple[EvalConcept, ...]:
        return tuple(c for c in self.concepts if c.domain == domain)


def _names(value: object, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list of strings, got {type(value).__name__}")
    out = tuple(" ".join(str(v).split()) for v in value)
    if any(not v for v in out):
        raise ConfigError(f"{where}: empty entry")
    return out


def load_concept_set(path: str | Path) -> ConceptSet:
    """Read and check a concept-set YAML file; every error names the file, line and field."""
    path = Path(path)
    data, lines = read_yaml(path)

    def at(key: str) -> str:
        line = lines.get(key)
        return f"{path}:{line}: {key}" if line else f"{path}: {key}"

    items = data.get("concepts")
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{at('concepts')}: expected a non-empty list of concepts")
    unknown = sorted(set(data) - {"concepts", "version"})
    if unknown:
        raise ConfigError(f"{at(unknown[0])}: unknown key (a concept set has 'concepts')")
    concepts: list[EvalConcept] = []
    for i, item in enumerate(items):
        key = f"concepts.{i}"
        if not isinstance(item, dict):
            raise ConfigError(f"{at(key)}: expected a mapping with name, domain, neighbours, eval_prompts")
        extra = sorted(set(item) - {"name", "domain", "neighbours", "eval_prompts"})
        if extra:
            raise ConfigError(f"{at(f'{key}.{extra[0]}')}: unknown field (use name, domain, neighbours, eval_prompts)")
        for required in ("name", "domain", "eval_prompts"):
            if not item.get(required):
                raise ConfigError(f"{at(key)}: missing field {required!r}")
        name, domain = " ".join(str(item["name"]).split()), str(item["domain"]).strip()
        prompts = _names(item["eval_prompts"], at(f"{key}.eval_prompts"))  # non-empty: checked above
        concepts.append(EvalConcept(name, domain, _names(item.get("neighbours"), at(f"{key}.neighbours")), prompts))
    seen: dict[str, int] = {}
    for i, c in enumerate(concepts):
        if c.name in seen:
            raise ConfigError(f"{at(f'concepts.{i}.name')}: concept {c.name!r} is already concepts.{seen[c.name]}")
        seen[c.name] = i
    for i, c in enumerate(concepts):
        for n in c.neighbours:
            if n not in seen or n == c.name:
                raise ConfigError(f"{at(f'concepts.{i}.neighbours')}: neighbour {n!r} of {c.name!r} is not another "
                                  "concept of the set (NRA scores a neighbour by its own eval_prompts)")
    return ConceptSet(tuple(concepts), str(path))


__all__ = ["ConceptSet", "EvalConcept", "load_concept_set"]
