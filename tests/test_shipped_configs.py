"""The YAML configs, request files and concept sets shipped in configs/: every one loads and
validates, the derived ones say what they derive, and the Stable Diffusion configs drive a real
run, evaluation included, on tiny random SD 1.x and SDXL pipelines with a tiny random CLIP judge
(the configs' own settings, shrunk in size by overrides)."""

from __future__ import annotations

import contextlib
import io
import math
import re
from pathlib import Path

import pytest

from jaxforget.cli import main
from jaxforget.config import load_config, to_dict
from jaxforget.engine import RunConfig
from jaxforget.eval.concepts import load_concept_set
from jaxforget.eval.hook import load_rows
from jaxforget.requests import parse_requests
from jaxforget.toyworld.pretrain import PretrainConfig

REPO = Path(__file__).resolve().parents[1]
CONCEPT_SETS = sorted((REPO / "configs" / "concepts").glob("*.yaml"))
RUN_CONFIGS = sorted(p for p in (REPO / "configs").glob("*/*.yaml")
                     if p.name != "pretrain.yaml" and p not in CONCEPT_SETS)
REQUEST_FILES = sorted((REPO / "configs").glob("*/*.txt"))

# the shipped settings, at the size of a tiny test pipeline
TINY = ["steps=2", "batch_size=8", "checkpoint_every=1", "data.forget_images=8", "data.retain_images=8",
        "data.prior_images=8", "data.removed_images=8", "data.num_inference_steps=2", "data.gen_batch_size=8",
        "regularizer.ewc_samples=4"]


def test_there_are_configs_for_every_model_family():
    names = {p.relative_to(REPO / "configs").as_posix() for p in RUN_CONFIGS}
    for family in ("toyworld", "sd15", "sd21", "sdxl"):
        assert {f"{family}/dfr.yaml", f"{family}/duge.yaml"} <= names, names


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_every_run_config_loads(path):
    cfg = load_config(RunConfig, path)
    assert cfg.method in path.stem  # dfr.yaml trains dfr, duge_short.yaml duge, ...
    assert cfg.run_dir.startswith("runs/")


def test_pretrain_config_loads():
    assert load_config(PretrainConfig, REPO / "configs" / "toyworld" / "pretrain.yaml")


@pytest.mark.parametrize("path", REQUEST_FILES, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_every_request_file_parses(path):
    requests = parse_requests(path)
    assert requests and len({r.target for r in requests}) == len(requests)


@pytest.mark.parametrize("path", CONCEPT_SETS, ids=lambda p: p.name)
def test_every_concept_set_loads(path):
    concepts = load_concept_set(path)
    assert len({c.domain for c in concepts.concepts}) >= 2  # IRA and CRA both need a domain


def test_sd_configs_evaluate_every_example_target_in_its_domain():
    cfg = load_config(RunConfig, REPO / "configs" / "sd15" / "dfr.yaml")
    assert cfg.eval.every and cfg.eval.judge.startswith("clip:")
    concepts = load_concept_set(REPO / cfg.eval.concept_set)
    for r in parse_requests(REPO / "configs" / "sd15" / "requests.txt"):
        c = concepts.concept(r.target)
        assert r.domain in ("any", c.domain), r
        assert set(r.related) <= set(c.neighbours) | {n.name for n in concepts.concepts}, r


def test_duge_short_is_duge_with_the_k3_overrides():
    # configs/toyworld/duge_short.yaml is exactly the setting measured at k = 3 (NOTES.md), whose
    # t_max (999) duge.yaml no longer has
    short = to_dict(load_config(RunConfig, REPO / "configs" / "toyworld" / "duge_short.yaml"))
    ref = to_dict(load_config(RunConfig, REPO / "configs" / "toyworld" / "duge.yaml",
                              ["optim.lr=1e-3", "regularizer.weight=0.3", "duge.gamma=3", "duge.t_max=999"]))
    assert short.pop("run_dir") != ref.pop("run_dir")
    assert short == ref


def test_ci_runs_the_readme_test_command():
    # .ci/run's last line is the README's test command, word for word (install included)
    readme = (REPO / "README.md").read_text()
    block = readme.split("Run the tests", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0].strip()
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1].strip()
    assert ci == block and "pytest" in ci and "pip install" in ci, (ci, block)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from tiny_pipelines import build_clip_folder

    return build_clip_folder(tmp_path_factory.mktemp("clip"))[1]


@pytest.mark.slow
@pytest.mark.parametrize("kind, config", [("sd1", "sd15/dfr.yaml"), ("sdxl", "sdxl/duge.yaml")])
def test_sd_config_runs_a_request_on_a_tiny_pipeline(kind, config, tiny_clip, tmp_path, monkeypatch):
    from tiny_pipelines import build_sd_folder

    model = build_sd_folder(tmp_path / kind, kind)
    requests = tmp_path / "requests.txt"
    first = next(line for line in (REPO / "configs" / "sd15" / "requests.txt").read_text().splitlines()
                 if line.strip() and not line.startswith("#"))
    # without its "related:" and "domain:" fields, which the config's data.catalogue (the concept
    # set) fills in: the ledger below must show the set's neighbours and domain
    requests.write_text(re.sub(r"\| (related|domain):[^|]*", "", first) + "\n")
    assert "related" not in requests.read_text() and "domain" not in requests.read_text()
    concept_set = REPO / "configs" / "concepts" / "sd_concepts.yaml"
    # the config's evaluation (its concept set), judged by a tiny CLIP, at a tiny size
    evaluation = [f"eval.judge=clip:{tiny_clip}", f"eval.concept_set={concept_set}", f"data.catalogue={concept_set}",
                  "eval.images_per_prompt=2", "eval.prompts_per_concept=1", "eval.num_inference_steps=2"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["--concepts", str(requests), "--config", str(REPO / "configs" / config), "--model", str(model),
                   "--run-dir", str(tmp_path / "run"), *TINY, *evaluation], command="unlearn")
    assert rc == 0, out.getvalue()
    assert "request 1 'van gogh' -> 'an artist': snapshot 1" in out.getvalue(), out.getvalue()
    from jaxforget.checkpoints import RunStore

    with RunStore.open(tmp_path / "run", create=False, lock=False) as store:
        applied = store.ledger()[0]["request"]
    assert applied["domain"] == "style" and list(applied["related"]) == ["claude monet", "paul cezanne"], applied
    report = tmp_path / "run" / "report"
    rows = load_rows(report)
    assert [r["k"] for r in rows] == [0, 1]
    names = {c.name for c in load_concept_set(REPO / "configs" / "concepts" / "sd_concepts.yaml").concepts}
    assert set(rows[1]["detection"]) == names
    # distances to the base model's images: zero for the base, positive once the UNet has moved
    assert rows[0]["fid_proxy"] == 0.0 and rows[0]["cmmd"] == 0.0
    assert math.isfinite(rows[1]["fid_proxy"]) and rows[1]["fid_proxy"] > 0
    assert math.isfinite(rows[1]["cmmd"])
    for m in ("UA", "IRA", "CRA", "NRA"):
        assert 0.0 <= rows[1][m] <= 1.0, (m, rows[1])
    assert (report / "grid_k01.png").is_file() and (report / "report.html").is_file()
    # the standalone evaluation reads the run's settings and cache: same rows, nothing regenerated
    import jaxforget.eval.evaluate as E

    monkeypatch.setattr(E, "_generate_jit", None)  # any generation would fail
    with contextlib.redirect_stdout(out):
        assert main(["--run-dir", str(tmp_path / "run")], command="evaluate") == 0
    again = load_rows(report)
    for m in ("UA", "IRA", "CRA", "NRA", "fid_proxy", "cmmd", "detection"):
        assert [r[m] for r in again] == [r[m] for r in rows], m
