"""Concept sets for real-model evaluation (``eval.concept_set``): the file format and its errors
(one line naming file, line and field), and the checks a run makes before any training: the
judge must know every concept, and every request target must be a concept of the set, in its
domain. The end-to-end run on a tiny SD pipeline is in test_shipped_configs.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from jaxforget.cli import main
from jaxforget.errors import ConfigError
from jaxforget.eval.concepts import load_concept_set

GOOD = """\
version: 1
concepts:
  - name: star
    domain: object
    neighbours: [square]
    eval_prompts: [a star, a red star]
  - name: square
    domain: object
    eval_prompts: [a square]
  - name:  dots
    domain: style
    eval_prompts: [dots background, a star on dots background]
  - name: waves
    domain: style
    neighbours: [dots]
    eval_prompts: [waves background]
"""


def write(tmp_path: Path, text: str, name: str = "concepts.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_load_concept_set(tmp_path):
    cs = load_concept_set(write(tmp_path, GOOD))
    assert [c.name for c in cs.concepts] == ["star", "square", "dots", "waves"]
    assert cs.concept("star").neighbours == ("square",) and cs.concept("square").neighbours == ()
    assert cs.concept("dots").eval_prompts == ("dots background", "a star on dots background")
    assert [c.name for c in cs.domain_concepts("style")] == ["dots", "waves"]
    with pytest.raises(KeyError, match="unknown concept 'circle'"):
        cs.concept("circle")


@pytest.mark.parametrize("edit, line, message", [
    # (replace this text, expected line, expected message)
    (("    eval_prompts: [a square]\n", ""), 7, r"concepts\.1: missing field 'eval_prompts'"),
    (("neighbours: [square]", "neighbours: [circle]"), 5, r"concepts\.0\.neighbours: neighbour 'circle' of 'star'"),
    (("neighbours: [dots]", "neighbours: waves"), 15, r"concepts\.3\.neighbours: expected a list"),
    (("name: square", "name: star"), 7, r"concepts\.1\.name: concept 'star' is already concepts\.0"),
    (("    domain: style\n    neighbours", "    domain: style\n    colour: red\n    neighbours"), 15,
     r"concepts\.3\.colour: unknown field"),
    (("version: 1", "verison: 1"), 1, r"verison: unknown key"),
])
def test_errors_name_file_line_and_field(tmp_path, edit, line, message):
    path = write(tmp_path, GOOD.replace(*edit))
    with pytest.raises(ConfigError) as err:
        load_concept_set(path)
    text = str(err.value)
    assert text.startswith(f"{path}:{line}: "), text
    assert re.search(message, text), text
    assert "\n" not in text


def test_empty_or_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="concepts: expected a non-empty list"):
        load_concept_set(write(tmp_path, "version: 1\n"))
    with pytest.raises(ConfigError, match=r":2: invalid YAML"):
        load_concept_set(write(tmp_path, "concepts:\n  - name: star: [x]\n    domain: object\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_concept_set(tmp_path / "missing.yaml")


# ----------------------------------------------------------------------------- checks before training
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from tiny_pipelines import build_clip_folder

    return build_clip_folder(tmp_path_factory.mktemp("clip"))[1]


def unlearn(tmp_path: Path, requests: str, *overrides: str) -> int:
    path = tmp_path / "requests.txt"
    path.write_text(requests)
    return main(["--concepts", str(path), "--run-dir", str(tmp_path / "run"), "steps=1", *overrides],
                command="unlearn")


def test_a_concept_set_needs_a_clip_judge(tmp_path, capsys):
    concepts = write(tmp_path, GOOD)
    assert unlearn(tmp_path, "star\n", f"eval.concept_set={concepts}") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: eval.concept_set ({concepts}) needs a CLIP judge") and "\n" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("requests, message", [
    ("star\ncircle\n", r"requests\.txt:2: target 'circle' is not a concept of .*concepts\.yaml"),
    ("star | domain: style\n", r"requests\.txt:1: target 'star' has domain 'style', but 'object'"),
])
def test_targets_outside_the_concept_set_fail_before_training(tmp_path, capsys, tiny_clip, requests, message):
    concepts = write(tmp_path, GOOD)
    rc = unlearn(tmp_path, requests, f"eval.concept_set={concepts}", f"eval.judge=clip:{tiny_clip}")
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert re.search(message, err) and "\n" not in err, err
    assert not (tmp_path / "run" / "run.json").exists()  # nothing written: no run was created


def test_a_domain_with_one_concept_is_refused_for_the_argmax_judge(tmp_path, capsys, tiny_clip):
    one_style = GOOD[:GOOD.index("  - name: waves")].replace("\n    neighbours: [square]", "")
    concepts = write(tmp_path, one_style)
    assert unlearn(tmp_path, "star\n", f"eval.concept_set={concepts}", f"eval.judge=clip:{tiny_clip}") == 2
    assert "domain 'style' has one concept" in capsys.readouterr().err


# ----------------------------------------------------------------------------- data.catalogue
def test_a_concept_set_as_catalogue_completes_requests(tmp_path, capsys):
    # data.catalogue=<concept set>: a request without domain / related gets them from the set
    # (the replay set then holds the neighbours); what the request file states wins
    from jaxforget.engine import DataConfig, complete_request
    from jaxforget.requests import Request

    cfg = DataConfig(catalogue=str(write(tmp_path, GOOD)))
    assert complete_request(Request(target="star"), cfg) == Request(target="star", domain="object",
                                                                  related=("square",))
    stated = Request(target="waves", related=("plain",), domain="style")
    assert complete_request(stated, cfg) == stated
    assert complete_request(Request(target="circle"), cfg) == Request(target="circle")  # not in the set
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match=rf"^data\.catalogue: {re.escape(str(missing))}: config file not found"):
        complete_request(Request(target="star"), DataConfig(catalogue=str(missing)))
    # through the command line: exit 2, one line, no run directory
    assert unlearn(tmp_path, "star\n", f"data.catalogue={missing}") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data.catalogue:") and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_check_judge_names_a_domain_the_judge_lacks(tmp_path):
    # the toy-world judge raises ValueError for a domain it has no head for; the check turns
    # that into the one-line config error, like an unknown concept
    from jaxforget.eval.hook import _check_judge
    from jaxforget.eval.judges import load_judge

    judge = load_judge("toyworld")
    _check_judge(judge, load_concept_set(write(tmp_path, GOOD.replace("  - name:  dots", "  - name: dots"))))
    texture = write(tmp_path, GOOD.replace("domain: style", "domain: texture"), "texture.yaml")
    with pytest.raises(ConfigError, match=r"texture\.yaml: concept 'dots' \(texture\) is unknown to the judge"):
        _check_judge(judge, load_concept_set(texture))
