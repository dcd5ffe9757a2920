"""Requests files: the plain and extended text forms, YAML, and one-line errors naming file and line."""

import pytest

from jaxforget.errors import RequestError
from jaxforget.requests import Request, load_requests, parse_requests
from jaxforget.tokenizers import build_clip_tokenizer, load_clip_tokenizer
from jaxforget.toyworld.catalogue import tokenizer_corpus


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = build_clip_tokenizer(tokenizer_corpus(), tmp_path_factory.mktemp("tok"))
    return load_clip_tokenizer(folder)


def write(tmp_path, text, name="req.txt"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_text_form(tmp_path, tokenizer):
    p = write(tmp_path, "# requests\ncircle\n\nstar -> empty | related: heart, cross | domain: object\n"
                        "dots | templates: a {} background; an image in {} style  # trailing comment\n")
    reqs = load_requests(p, tokenizer=tokenizer)
    assert reqs[0] == Request("circle", line=2)
    assert reqs[1] == Request("star", anchor="empty", related=("heart", "cross"), domain="object", line=4)
    assert reqs[2].templates == ("a {} background", "an image in {} style")
    assert reqs[2].forget_prompts(["{}"]) == ["a dots background", "an image in dots style"]
    assert reqs[1].mapped_prompts(["a {} on grid background"]) == ["a empty on grid background"]


def test_yaml_form(tmp_path, tokenizer):
    p = write(tmp_path, "requests:\n  - circle\n  - target: star\n    anchor: heart\n"
                        "    prompts: [a red star, a star on dots background]\n", "req.yaml")
    reqs = load_requests(p, tokenizer=tokenizer)
    assert reqs[1].prompts == ("a red star", "a star on dots background")
    assert reqs[1].mapped_prompts([]) == ["a red heart", "a heart on dots background"]


@pytest.mark.parametrize("text, message", [
    ("", r"req.txt: no requests"),
    ("# only a comment\n", r"no requests"),
    ("circle\n-> ring\n", r"req.txt:2: malformed request"),
    ("circle | related ring\n", r"req.txt:1: malformed field 'related ring'"),
    ("circle | colour: red\n", r"req.txt:1: unknown field 'colour'"),
    ("circle\nstar\nCircle\n", r"req.txt:3: duplicate target 'Circle' \(first on line 1\)"),
    ("circle -> circle\n", r"req.txt:1: anchor equals the target"),
    ("circle | domain: shape\n", r"req.txt:1: field 'domain' must be one of"),
    ("circle | templates: a circle\n", r"has no '\{\}' placeholder"),
    ("circle | templates: " + "a very " * 40 + "{}\n", r"req.txt:1: prompt .* beyond 77"),
    ("\U0001f600\u200b | related: ring\n", None),
])
def test_bad_requests(tmp_path, tokenizer, text, message):
    p = write(tmp_path, text)
    if message is None:  # an emoji still tokenizes (byte-level BPE): this one is accepted
        assert load_requests(p, tokenizer=tokenizer)[0].target
        return
    with pytest.raises(RequestError, match=message) as info:
        load_requests(p, tokenizer=tokenizer)
    assert "\n" not in str(info.value)


def test_already_removed_and_missing_file(tmp_path, tokenizer):
    p = write(tmp_path, "circle\n")
    with pytest.raises(RequestError, match=r"req.txt:1: target 'circle' was already removed"):
        load_requests(p, tokenizer=tokenizer, removed=["circle"])
    with pytest.raises(RequestError, match="requests file not found"):
        parse_requests(tmp_path / "missing.txt")


def test_target_that_tokenizes_to_nothing(tmp_path):
    class EmptyTok:
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": []}

    p = write(tmp_path, "circle\n")
    with pytest.raises(RequestError, match="tokenizes to nothing"):
        load_requests(p, tokenizer=EmptyTok())
