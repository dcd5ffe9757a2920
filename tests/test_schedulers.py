"""Parity of jaxforget.schedulers with diffusers' DDPM / DDIM / Euler discrete schedulers.

Tolerance: max abs error <= 1e-5 in fp32 for every compared tensor (timestep lists exact).
"""

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

from jaxforget import schedulers as S
from jaxforget.errors import ConfigError

TOL = 1e-5

SD_CONFIG = {  # Stable Diffusion 1.x scheduler_config.json (PNDM), as shipped
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def cfg(**kw):
    d = {k: v for k, v in SD_CONFIG.items() if k not in ("_class_name", "skip_prk_steps")}
    d.update(kw)
    return d


def maxerr(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def rand(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_schedule_from_config_fields_and_tables():
    sched = S.schedule_from_config(SD_CONFIG)
    assert sched.num_train_timesteps == 1000 and sched.beta_schedule == "scaled_linear"
    assert sched.prediction_type == "epsilon" and sched.steps_offset == 1
    assert sched.timestep_spacing == "leading" and not sched.set_alpha_to_one and not sched.clip_sample
    ref = DDIMScheduler.from_config(SD_CONFIG)
    assert maxerr(sched.betas, ref.betas.numpy()) <= 1e-8
    assert maxerr(sched.alphas_cumprod, ref.alphas_cumprod.numpy()) <= 1e-6
    assert sched.final_alpha_cumprod == pytest.approx(float(ref.final_alpha_cumprod), abs=1e-7)
    # class defaults for missing options follow diffusers
    assert S.schedule_from_config({"_class_name": "EulerDiscreteScheduler"}).timestep_spacing == "linspace"
    ddim_default = S.schedule_from_config({"_class_name": "DDIMScheduler"})
    assert ddim_default.clip_sample and ddim_default.beta_schedule == "linear"
    cos = S.schedule_from_config({"beta_schedule": "squaredcos_cap_v2"})
    assert maxerr(cos.betas, DDPMScheduler(beta_schedule="squaredcos_cap_v2").betas.numpy()) <= 1e-7
    zsnr = S.schedule_from_config(cfg(rescale_betas_zero_snr=True))
    ref_z = DDIMScheduler.from_config(cfg(rescale_betas_zero_snr=True))
    assert maxerr(zsnr.alphas_cumprod, ref_z.alphas_cumprod.numpy()) <= 1e-6


def test_schedule_value_semantics():
    """Equal configs give equal, equally-hashed schedules (a jit static argument reuses its program)."""
    a, b = S.schedule_from_config(SD_CONFIG), S.schedule_from_config(dict(SD_CONFIG))
    assert a == b and hash(a) == hash(b)
    assert a != S.schedule_from_config(cfg(prediction_type="v_prediction"))
    assert a.with_prediction_type("v_prediction") == S.schedule_from_config(
        {**SD_CONFIG, "prediction_type": "v_prediction"})
    assert a != S.schedule_from_config(cfg(beta_end=0.0121))


@pytest.mark.parametrize(
    "bad",
    [{"prediction_type": "flow"}, {"beta_schedule": "cubic"}, {"use_karras_sigmas": True},
     {"timestep_spacing": "middle"}, {"interpolation_type": "log_linear"}],
)
def test_schedule_from_config_rejects_unsupported(bad):
    with pytest.raises(ConfigError):
        S.schedule_from_config(cfg(**bad))


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_add_noise_and_velocity_match_ddpm(beta_schedule):
    d = cfg(beta_schedule=beta_schedule, beta_start=0.0001 if beta_schedule == "linear" else 0.00085)
    ref = DDPMScheduler.from_config(d)
    sched = S.schedule_from_config(d)
    x0, noise = rand((5, 4, 8, 8), 0), rand((5, 4, 8, 8), 1)
    t = np.array([0, 1, 500, 998, 999])
    want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    got = jax.jit(lambda a, b, c: S.add_noise(sched, a, b, c))(x0, noise, t)
    assert maxerr(got, want) <= TOL
    want_v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    assert maxerr(S.velocity(sched, x0, noise, t), want_v) <= TOL
    # scalar timestep broadcasts too
    assert maxerr(S.add_noise(sched, x0, noise, 500), S.add_noise(sched, x0, noise, np.full(5, 500))) == 0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_training_target_and_predict_x0_eps_invert(prediction_type):
    sched = S.schedule_from_config(cfg(prediction_type=prediction_type))
    x0, noise = rand((3, 8, 8, 4), 2), rand((3, 8, 8, 4), 3)
    t = jnp.array([10, 400, 900])
    xt = S.add_noise(sched, x0, noise, t)
    target = S.training_target(sched, x0, noise, t)
    if prediction_type == "epsilon":
        assert maxerr(target, noise) == 0
    px0, peps = S.predict_x0_eps(sched, target, xt, t)
    # t=900 divides by sqrt(alpha_t) ~ 0.1 (epsilon) so allow the fp32 amplification
    assert maxerr(px0, x0) <= 1e-4 and maxerr(peps, noise) <= 1e-4


@pytest.mark.parametrize(
    "spacing,steps_offset,n",
    [("leading", 1, 4), ("leading", 1, 50), ("leading", 0, 7), ("trailing", 0, 4), ("trailing", 0, 7),
     ("linspace", 0, 4), ("linspace", 0, 7)],
)
def test_ddim_timesteps_match(spacing, steps_offset, n):
    d = cfg(timestep_spacing=spacing, steps_offset=steps_offset)
    ref = DDIMScheduler.from_config(d)
    ref.set_timesteps(n)
    got = S.ddim_timesteps(S.schedule_from_config(d), n)
    np.testing.assert_array_equal(got.timesteps, ref.timesteps.numpy())
    np.testing.assert_array_equal(got.prev_timesteps, ref.timesteps.numpy() - 1000 // n)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("set_alpha_to_one,clip_sample", [(False, False), (True, True)])
def test_ddim_steps_match(spacing, prediction_type, set_alpha_to_one, clip_sample):
    d = cfg(timestep_spacing=spacing, prediction_type=prediction_type, set_alpha_to_one=set_alpha_to_one,
            clip_sample=clip_sample, steps_offset=1 if spacing == "leading" else 0)
    ref = DDIMScheduler.from_config(d)
    ref.set_timesteps(7)
    sched = S.schedule_from_config(d)
    ts = S.ddim_timesteps(sched, 7)
    step = jax.jit(lambda m, t, tp, x: S.ddim_step(sched, m, t, tp, x))
    x = rand((2, 4, 8, 8), 4)
    for i, t in enumerate(ref.timesteps):
        m = rand((2, 4, 8, 8), 10 + i)
        want = ref.step(torch.from_numpy(m), t, torch.from_numpy(x))
        got, x0 = step(m, ts.timesteps[i], ts.prev_timesteps[i], x)
        assert maxerr(got, want.prev_sample.numpy()) <= TOL, (i, int(t))
        assert maxerr(x0, want.pred_original_sample.numpy()) <= 2 * TOL * max(1, np.abs(x0).max())
        x = want.prev_sample.numpy()


def test_ddim_step_with_eta_and_per_example_timesteps():
    d = cfg(prediction_type="v_prediction")
    ref = DDIMScheduler.from_config(d)
    ref.set_timesteps(10)
    sched = S.schedule_from_config(d)
    x, m, z = rand((2, 4, 8, 8), 5), rand((2, 4, 8, 8), 6), rand((2, 4, 8, 8), 7)
    t = ref.timesteps[3]
    want = ref.step(torch.from_numpy(m), t, torch.from_numpy(x), eta=0.7, variance_noise=torch.from_numpy(z))
    got, _ = S.ddim_step(sched, m, jnp.array([int(t)] * 2), int(t) - 100, x, eta=0.7, noise=z)
    assert maxerr(got, want.prev_sample.numpy()) <= TOL
    # key-based noise is used when eta > 0 and changes the result; missing key is an error
    k1, _ = S.ddim_step(sched, m, int(t), int(t) - 100, x, eta=0.7, key=jax.random.key(0))
    assert maxerr(k1, got) > 1e-3
    with pytest.raises(ValueError):
        S.ddim_step(sched, m, int(t), int(t) - 100, x, eta=0.7)


@pytest.mark.parametrize(
    "spacing,steps_offset,n", [("linspace", 0, 4), ("linspace", 0, 7), ("leading", 1, 4), ("trailing", 0, 7)]
)
def test_euler_sigmas_timesteps_match(spacing, steps_offset, n):
    d = cfg(timestep_spacing=spacing, steps_offset=steps_offset)
    ref = EulerDiscreteScheduler.from_config(d)
    ref.set_timesteps(n)
    got = S.euler_sigmas_and_timesteps(S.schedule_from_config(d), n)
    assert maxerr(got.timesteps, ref.timesteps.numpy()) == 0
    assert maxerr(got.sigmas, ref.sigmas.numpy()) <= TOL
    assert got.sigmas[-1] == 0 and len(got.sigmas) == n + 1
    assert got.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), abs=TOL)


@pytest.mark.parametrize("spacing", ["leading", "linspace"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_euler_steps_match(spacing, prediction_type):
    d = cfg(timestep_spacing=spacing, prediction_type=prediction_type)
    ref = EulerDiscreteScheduler.from_config(d)
    ref.set_timesteps(6)
    sched = S.schedule_from_config(d)
    es = S.euler_sigmas_and_timesteps(sched, 6)
    step = jax.jit(lambda m, s, sn, x: S.euler_step(sched, m, s, sn, x))
    x = rand((2, 4, 8, 8), 8) * float(ref.init_noise_sigma)
    for i, t in enumerate(ref.timesteps):
        scaled_ref = ref.scale_model_input(torch.from_numpy(x), t).numpy()
        assert maxerr(S.euler_scale_model_input(x, es.sigmas[i]), scaled_ref) <= TOL
        m = rand((2, 4, 8, 8), 20 + i)
        want = ref.step(torch.from_numpy(m), t, torch.from_numpy(x))
        got, _ = step(m, es.sigmas[i], es.sigmas[i + 1], x)
        assert maxerr(got, want.prev_sample.numpy()) <= TOL * max(1.0, float(np.abs(x).max())), i
        x = want.prev_sample.numpy()
