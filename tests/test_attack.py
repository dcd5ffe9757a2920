"""The adversarial soft-prompt attack (jaxforget.eval.attack) on the shipped toy-world model.

- The prefixed text encoding is exact: an empty prefix is the plain encoding, and a prefix equal
  to real token embeddings is the encoding of the prompt with those words in front (SD-1 toy
  model and a tiny SDXL pipeline with two encoders and a pooled projection).
- Sanity: the attack makes a model generate a concept it otherwise does not. The "unlearned"
  model is the base UNet prompted with the concept word replaced by an unrelated one, so the
  judge rarely finds the concept before the attack; the optimized prefix (teacher: the base
  model on the true prompt) must raise the detection rate.
- attack_concepts caches per concept; AttackConfig validates its knobs.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxforget import pipeline as P
from jaxforget.errors import ConfigError
from jaxforget.eval import attack as A


@pytest.fixture(scope="module")
def toy_model():
    from jaxforget.engine import default_model_dir
    from jaxforget.io.diffusers_folder import load_model_folder

    return P.DiffusionModel.from_folder(load_model_folder(default_model_dir()))


@pytest.fixture(scope="module")
def toy_judge():
    from jaxforget.eval.judges import load_judge

    return load_judge("toyworld")


def _word_embeddings(model, encoder, tokenizer, words: str) -> jnp.ndarray:
    ids = tokenizer(words)["input_ids"][1:-1]  # without start / end tokens
    return encoder.text_model.embeddings.token_embedding.embedding[...][jnp.asarray(ids)]


def _prefix_parity(model, words: str, prompt: str, *, atol: float) -> None:
    nets = model.networks
    plain = P.encode_prompt_ids(nets, P.tokenize_prompts(model, [f"{words} {prompt}"]))
    encs = [(nets.text_encoder, model.tokenizer)] + (
        [(nets.text_encoder_2, model.tokenizer_2)] if model.is_sdxl else [])
    prefix = tuple(_word_embeddings(model, e, t, words) for e, t in encs)
    got = A.encode_with_prefix(nets, P.tokenize_prompts(model, [prompt]), prefix)
    # the prompt shifted right by the prefix; padding beyond it differs only in which pad tokens
    # fell off the end, and causal attention keeps every earlier position identical
    np.testing.assert_allclose(np.asarray(got.context), np.asarray(plain.context), atol=atol)
    if model.is_sdxl:
        np.testing.assert_allclose(np.asarray(got.text_embeds), np.asarray(plain.text_embeds), atol=atol)
    empty = tuple(jnp.zeros((0, p.shape[1]), p.dtype) for p in prefix)
    ids = P.tokenize_prompts(model, [prompt])
    np.testing.assert_array_equal(np.asarray(A.encode_with_prefix(nets, ids, empty).context),
                                  np.asarray(P.encode_prompt_ids(nets, ids).context))


def test_prefix_encoding_equals_real_tokens(toy_model):
    # tolerance 1e-5: the same fp32 ops on the same values, only XLA's fusion may differ
    _prefix_parity(toy_model, "a red", "circle on checker background", atol=1e-5)


def test_prefix_encoding_sdxl_two_encoders(tmp_path):
    from tiny_pipelines import build_sd_folder

    from jaxforget.io.diffusers_folder import load_model_folder

    model = P.DiffusionModel.from_folder(load_model_folder(build_sd_folder(tmp_path / "sdxl", "sdxl")))
    # tokenizer_2 pads with "!" (not end-of-text): the pooled position must still follow the prompt
    _prefix_parity(model, "a red", "car on a street", atol=1e-5)


def test_attack_raises_detection_of_a_concept_the_model_fails_to_draw(toy_model, toy_judge):
    base = nnx.state(toy_model.unet)
    cfg = A.AttackConfig(steps=60, images=8, eval_images=8)
    r = A.soft_prompt_attack(toy_model, base, base, "checker background", toy_judge, cfg, concept="checker",
                             domain="style", attack_prompt="circle background")
    assert r.teacher_rate >= 0.75, f"the base model must draw the target for the test to mean anything: {r}"
    assert r.before <= 0.5  # "circle background" does not ask for checker
    assert r.after >= 0.75 and r.after - r.before >= 0.4, r.summary()
    assert r.loss_end < 0.5 * r.loss_start  # the prefix learned to imitate the teacher
    assert r.prefix[0].shape == (cfg.n_prefix, toy_model.text_encoder.config.hidden_size)
    assert {k: v.shape[0] for k, v in r.images.items()} == {"teacher": 8, "before": 8, "after": 8}
    assert all(v.dtype == np.uint8 for v in r.images.values())


def test_attack_concepts_cache_and_row(toy_model, toy_judge, tmp_path, monkeypatch):
    from jaxforget.toyworld.catalogue import load_catalogue

    cat = load_catalogue()
    base = nnx.state(toy_model.unet)
    cfg = A.AttackConfig(steps=2, images=2, eval_images=2, batch_size=2, prompts_per_concept=2)
    calls = []
    real = A._optimize
    monkeypatch.setattr(A, "_optimize", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    targets = [("circle", "object"), "dots"]
    first = A.attack_concepts(toy_model, base, base, targets, toy_judge, cat, cfg, cache_dir=tmp_path,
                              cache_key="snap-x")
    assert len(calls) == 2 and list(first) == ["circle", "dots"]
    assert first["dots"].domain == "style" and first["circle"].prompts == cat.concept("circle").eval_prompts[:2]
    again = A.attack_concepts(toy_model, base, base, targets, toy_judge, cat, cfg, cache_dir=tmp_path,
                              cache_key="snap-x")
    assert len(calls) == 2 and all(r.from_cache for r in again.values())
    for c in first:
        assert again[c].summary() == first[c].summary()
        np.testing.assert_array_equal(again[c].images["after"], first[c].images["after"])
        np.testing.assert_array_equal(again[c].prefix[0], first[c].prefix[0])
    row = A.attack_row(again)
    assert set(row) == {"attack_success", "attack_before", "attack_success/circle", "attack_success/dots"}
    assert row["attack_success"] == pytest.approx((first["circle"].after + first["dots"].after) / 2)
    # another key (another snapshot) is another entry
    A.attack_concepts(toy_model, base, base, ["dots"], toy_judge, cat, cfg, cache_dir=tmp_path, cache_key="snap-y")
    assert len(calls) == 3
    grid = A.attack_grid(again, tmp_path / "attack.png")
    assert grid.is_file()


@pytest.mark.parametrize("kw, needle", [
    ({"steps": 0}, "attack.steps"), ({"n_prefix": 0}, "attack.n_prefix"), ({"lr": 0.0}, "attack.lr"),
    ({"objective": "kl"}, "attack.objective"), ({"t_min": 10, "t_max": 5}, "t_min"),
    ({"sampler": "plms"}, "attack.sampler"),
])
def test_attack_config_validation(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        A.AttackConfig(**kw)


def test_attack_prompt_without_room_for_the_prefix(toy_model, toy_judge):
    base = nnx.state(toy_model.unet)
    long_prompt = " ".join(["a red circle on checker background"] * 12)  # ~72 tokens of 77
    with pytest.raises(ConfigError, match="no room"):
        A.soft_prompt_attack(toy_model, base, base, long_prompt, toy_judge, A.AttackConfig(n_prefix=8, steps=1),
                             concept="circle", domain="object")
