"""Noise schedules and sampler steps (DDPM forward, DDIM, Euler discrete) as pure functions.

``NoiseSchedule`` is immutable configuration: host (numpy) tables plus the scheduler options of a
diffusers ``scheduler_config.json``. It is not a pytree: jitted code closes over it (or takes it
as a static argument; it hashes by value), so the timestep tables below can be computed on the
host from a static number of steps while the per-step math runs in ``jnp``.

Every formula follows diffusers (DDIMScheduler / EulerDiscreteScheduler / DDPMScheduler) so that a
sampling run matches ``StableDiffusionPipeline`` given the same initial latents.
Timesteps ``t`` may be a scalar or a per-example vector [B]; coefficients broadcast over the
trailing dimensions of the sample (layout-agnostic: NHWC or NCHW both work).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxforget.errors import ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")

# diffusers' per-class defaults for options a config file may leave out
_CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDIMScheduler": {"timestep_spacing": "leading", "set_alpha_to_one": True, "clip_sample": True,
                      "beta_schedule": "linear"},
    "DDPMScheduler": {"timestep_spacing": "leading", "set_alpha_to_one": True, "clip_sample": True,
                      "beta_schedule": "linear"},
    "PNDMScheduler": {"timestep_spacing": "leading", "set_alpha_to_one": False, "clip_sample": False,
                      "beta_schedule": "linear"},
    "EulerDiscreteScheduler": {"timestep_spacing": "linspace", "set_alpha_to_one": True, "clip_sample": False,
                               "beta_schedule": "linear"},
}
# Euler options we do not implement: refuse rather than silently sample differently
_UNSUPPORTED_TRUE = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "thresholding")
_UNSUPPORTED_VALUES = {"interpolation_type": ("linear",), "timestep_type": ("discrete",),
                       "final_sigmas_type": ("zero",)}


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A discrete diffusion noise schedule (fp32 host tables) and the sampler options from config."""

    betas: np.ndarray  # [T] float32
    alphas_cumprod: np.ndarray  # [T] float32
    num_train_timesteps: int = 1000
    prediction_type: str = "epsilon"
    beta_schedule: str = "scaled_linear"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    rescale_betas_zero_snr: bool = False

    # value semantics (the tables are a function of the fields and betas), so that an equal
    # schedule rebuilt from the same config reuses a compiled program when passed as static arg
    def _identity(self) -> tuple:
        fields_ = tuple(getattr(self, k) for k in (
            "num_train_timesteps", "prediction_type", "beta_schedule", "timestep_spacing", "steps_offset",
            "set_alpha_to_one", "clip_sample", "clip_sample_range", "rescale_betas_zero_snr"))
        return fields_ + (np.asarray(self.betas, np.float32).tobytes(),)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NoiseSchedule) and self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash(self._identity())

    @property
    def final_alpha_cumprod(self) -> float:
        # DDIM's alpha_prod for the step after t=0 ("prev_timestep < 0")
        return 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod[0])

    def with_prediction_type(self, prediction_type: str) -> "NoiseSchedule":
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        return replace(self, prediction_type=prediction_type)


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"scheduler: {name}={value!r} is not supported (use one of {', '.join(map(str, allowed))})")


def _betas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str) -> np.ndarray:
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64).astype(np.float32)
    if beta_schedule == "scaled_linear":  # the Stable Diffusion schedule
        return (np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2).astype(
            np.float32
        )
    if beta_schedule == "squaredcos_cap_v2":

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.asarray(
            [min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), 0.999)
             for i in range(num_train_timesteps)],
            np.float32,
        )
    _check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
    raise AssertionError  # unreachable


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    # Lin et al. 2023: shift/scale sqrt(alpha_bar) so the last step has zero SNR
    alphas_cumprod = np.cumprod(1.0 - betas, dtype=np.float32)
    s = np.sqrt(alphas_cumprod)
    s0, s_t = s[0].copy(), s[-1].copy()
    s = (s - s_t) * (s0 / (s0 - s_t))
    ab = s**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return (1.0 - alphas).astype(np.float32)


def make_schedule(
    *,
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    beta_schedule: str = "scaled_linear",
    trained_betas: Any = None,
    prediction_type: str = "epsilon",
    timestep_spacing: str = "leading",
    steps_offset: int = 0,
    set_alpha_to_one: bool = True,
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    rescale_betas_zero_snr: bool = False,
) -> NoiseSchedule:
    """Build a schedule directly (defaults: Stable Diffusion's scaled_linear 0.00085..0.012)."""
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    _check_choice("timestep_spacing", timestep_spacing, SPACINGS)
    if trained_betas is not None:
        betas = np.asarray(trained_betas, np.float32)
        num_train_timesteps = len(betas)
    else:
        betas = _betas(int(num_train_timesteps), float(beta_start), float(beta_end), beta_schedule)
    if rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    # cumulative product in fp32, in order, as diffusers does (torch.cumprod on fp32)
    alphas_cumprod = np.cumprod(1.0 - betas, dtype=np.float32)
    return NoiseSchedule(
        betas=betas,
        alphas_cumprod=alphas_cumprod,
        num_train_timesteps=int(num_train_timesteps),
        prediction_type=prediction_type,
        beta_schedule=beta_schedule,
        timestep_spacing=timestep_spacing,
        steps_offset=int(steps_offset),
        set_alpha_to_one=bool(set_alpha_to_one),
        clip_sample=bool(clip_sample),
        clip_sample_range=float(clip_sample_range),
        rescale_betas_zero_snr=bool(rescale_betas_zero_snr),
    )


def schedule_from_config(d: Mapping[str, Any]) -> NoiseSchedule:
    """A schedule from a diffusers scheduler config (DDPM / DDIM / Euler / PNDM share these fields).

    Options absent from ``d`` take the default of the config's ``_class_name`` class, as
    ``SchedulerClass.from_config(d)`` would (e.g. DDIM clips x0 unless clip_sample is false).
    """
    cls = d.get("_class_name", "DDIMScheduler")
    defaults = _CLASS_DEFAULTS.get(cls, _CLASS_DEFAULTS["DDIMScheduler"])
    for key in _UNSUPPORTED_TRUE:
        if d.get(key):
            raise ConfigError(f"scheduler: {key}=true is not supported")
    for key, allowed in _UNSUPPORTED_VALUES.items():
        if d.get(key) is not None and d[key] not in allowed:
            raise ConfigError(f"scheduler: {key}={d[key]!r} is not supported (use {allowed[0]!r})")

    def get(key: str, default: Any) -> Any:
        value = d.get(key)
        return default if value is None else value

    return make_schedule(
        num_train_timesteps=int(get("num_train_timesteps", 1000)),
        beta_start=float(get("beta_start", 0.0001)),
        beta_end=float(get("beta_end", 0.02)),
        beta_schedule=get("beta_schedule", defaults["beta_schedule"]),
        trained_betas=d.get("trained_betas"),
        prediction_type=get("prediction_type", "epsilon"),
        timestep_spacing=get("timestep_spacing", defaults["timestep_spacing"]),
        steps_offset=int(get("steps_offset", 0)),
        set_alpha_to_one=bool(get("set_alpha_to_one", defaults["set_alpha_to_one"])),
        clip_sample=bool(get("clip_sample", defaults["clip_sample"])),
        clip_sample_range=float(get("clip_sample_range", 1.0)),
        rescale_betas_zero_snr=bool(get("rescale_betas_zero_snr", False)),
    )


# ----------------------------------------------------------------------------- training-side
def _coef(table: jax.Array, t: jax.Array, like: jax.Array) -> jax.Array:
    """table[t] broadcast against ``like`` ([B] -> [B,1,1,1]; scalar stays scalar)."""
    c = jnp.take(table, jnp.asarray(t, jnp.int32), axis=0)
    if c.ndim:
        c = c.reshape(c.shape + (1,) * (like.ndim - c.ndim))
    return c.astype(like.dtype)


def _alpha_sigma(schedule: NoiseSchedule, t: jax.Array, like: jax.Array) -> tuple[jax.Array, jax.Array]:
    ac = jnp.asarray(schedule.alphas_cumprod)
    return _coef(jnp.sqrt(ac), t, like), _coef(jnp.sqrt(1.0 - ac), t, like)


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """DDPM forward process: sqrt(a_t) x0 + sqrt(1 - a_t) noise (integer t)."""
    a, s = _alpha_sigma(schedule, t, x0)
    return a * x0 + s * noise


def velocity(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """The v-prediction target: sqrt(a_t) noise - sqrt(1 - a_t) x0."""
    a, s = _alpha_sigma(schedule, t, x0)
    return a * noise - s * x0


def training_target(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """What the UNet is trained to output for this schedule's prediction type."""
    if schedule.prediction_type == "epsilon":
        return noise
    if schedule.prediction_type == "v_prediction":
        return velocity(schedule, x0, noise, t)
    return x0


def predict_x0_eps(
    schedule: NoiseSchedule, model_output: jax.Array, sample: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Convert a model output at integer timestep t into (predicted x0, predicted noise)."""
    a, s = _alpha_sigma(schedule, t, sample)
    if schedule.prediction_type == "epsilon":
        return (sample - s * model_output) / a, model_output
    if schedule.prediction_type == "v_prediction":
        return a * sample - s * model_output, a * model_output + s * sample
    return model_output, (sample - a * model_output) / s


def random_timesteps(key: jax.Array, schedule: NoiseSchedule, shape: tuple[int, ...]) -> jax.Array:
    """Uniform training timesteps in [0, num_train_timesteps)."""
    return jax.random.randint(key, shape, 0, schedule.num_train_timesteps, dtype=jnp.int32)


# ----------------------------------------------------------------------------- DDIM
class DDIMTimesteps(NamedTuple):
    timesteps: np.ndarray  # [n] int32, descending
    prev_timesteps: np.ndarray  # [n] int32; negative = past t=0 (uses final_alpha_cumprod)


def ddim_timesteps(
    schedule: NoiseSchedule, num_inference_steps: int, spacing: str | None = None
) -> DDIMTimesteps:
    """DDIMScheduler.set_timesteps, plus the prev timestep DDIMScheduler.step uses for each.

    As in diffusers, the previous timestep is always ``t - T // n`` (not the next list entry,
    which differs for "trailing"/"linspace" spacing when n does not divide T).
    """
    n, big_t = int(num_inference_steps), schedule.num_train_timesteps
    spacing = spacing or schedule.timestep_spacing
    if not 0 < n <= big_t:
        raise ConfigError(f"num_inference_steps={n} must be in 1..{big_t}")
    if spacing == "linspace":
        ts = np.linspace(0, big_t - 1, n).round()[::-1].astype(np.int64)
    elif spacing == "leading":
        ts = (np.arange(0, n) * (big_t // n)).round()[::-1].astype(np.int64) + schedule.steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(big_t, 0, -big_t / n)).astype(np.int64) - 1
    else:
        _check_choice("timestep_spacing", spacing, SPACINGS)
        raise AssertionError
    prev = ts - big_t // n
    return DDIMTimesteps(ts.astype(np.int32), prev.astype(np.int32))


def ddim_step(
    schedule: NoiseSchedule,
    model_output: jax.Array,
    t: jax.Array,
    t_prev: jax.Array,
    sample: jax.Array,
    eta: float = 0.0,
    key: jax.Array | None = None,
    noise: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One DDIM update x_t -> x_{t_prev}. Returns (prev_sample, predicted x0).

    eta > 0 adds eta-scaled DDPM noise drawn from ``key`` (or the given ``noise``).
    """
    ac = jnp.asarray(schedule.alphas_cumprod)
    alpha_t = _coef(ac, t, sample)
    t_prev = jnp.asarray(t_prev, jnp.int32)
    alpha_prev = jnp.where(
        t_prev >= 0, jnp.take(ac, jnp.maximum(t_prev, 0)), jnp.float32(schedule.final_alpha_cumprod)
    )
    if alpha_prev.ndim:
        alpha_prev = alpha_prev.reshape(alpha_prev.shape + (1,) * (sample.ndim - alpha_prev.ndim))
    alpha_prev = alpha_prev.astype(sample.dtype)
    beta_t = 1 - alpha_t
    if schedule.prediction_type == "epsilon":
        x0 = (sample - jnp.sqrt(beta_t) * model_output) / jnp.sqrt(alpha_t)
        eps = model_output
    elif schedule.prediction_type == "v_prediction":
        x0 = jnp.sqrt(alpha_t) * sample - jnp.sqrt(beta_t) * model_output
        eps = jnp.sqrt(alpha_t) * model_output + jnp.sqrt(beta_t) * sample
    else:
        x0 = model_output
        eps = (sample - jnp.sqrt(alpha_t) * x0) / jnp.sqrt(beta_t)
    if schedule.clip_sample:
        x0 = jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
    variance = ((1 - alpha_prev) / beta_t) * (1 - alpha_t / alpha_prev)
    std = eta * jnp.sqrt(variance)
    direction = jnp.sqrt(jnp.maximum(1 - alpha_prev - std**2, 0.0)) * eps
    prev = jnp.sqrt(alpha_prev) * x0 + direction
    if not (isinstance(eta, (int, float)) and eta == 0):
        if noise is None:
            if key is None:
                raise ValueError("ddim_step: eta > 0 needs a PRNG key (or explicit noise)")
            noise = jax.random.normal(key, sample.shape, sample.dtype)
        prev = prev + std * noise
    return prev, x0


# ----------------------------------------------------------------------------- Euler discrete
class EulerSchedule(NamedTuple):
    sigmas: np.ndarray  # [n + 1] float32, descending, last = 0
    timesteps: np.ndarray  # [n] float32 (fractional for "linspace" spacing): the UNet's t input
    init_noise_sigma: float  # scale of the initial N(0, 1) latents


def euler_sigmas_and_timesteps(
    schedule: NoiseSchedule, num_inference_steps: int, spacing: str | None = None
) -> EulerSchedule:
    """EulerDiscreteScheduler.set_timesteps (linear sigma interpolation, final sigma 0)."""
    n, big_t = int(num_inference_steps), schedule.num_train_timesteps
    spacing = spacing or schedule.timestep_spacing
    if not 0 < n <= big_t:
        raise ConfigError(f"num_inference_steps={n} must be in 1..{big_t}")
    if spacing == "linspace":
        ts = np.linspace(0, big_t - 1, n, dtype=np.float32)[::-1].copy()
    elif spacing == "leading":
        ts = (np.arange(0, n) * (big_t // n)).round()[::-1].astype(np.float32) + schedule.steps_offset
    elif spacing == "trailing":
        ts = np.arange(big_t, 0, -big_t / n).round().astype(np.float32) - 1
    else:
        _check_choice("timestep_spacing", spacing, SPACINGS)
        raise AssertionError
    ac = schedule.alphas_cumprod.astype(np.float32).copy()
    if schedule.rescale_betas_zero_snr:
        ac[-1] = 2.0**-24  # diffusers: avoid an infinite sigma at the zero-SNR step
    train_sigmas = np.sqrt((1 - ac) / ac).astype(np.float32)
    sigmas = np.interp(ts, np.arange(0, len(train_sigmas)), train_sigmas)
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    max_sigma = float(sigmas.max())
    # diffusers' init_noise_sigma: the max sigma itself for linspace/trailing spacing
    init = max_sigma if spacing in ("linspace", "trailing") else float(np.sqrt(np.float32(max_sigma) ** 2 + 1))
    return EulerSchedule(sigmas, ts.astype(np.float32), init)


def euler_scale_model_input(sample: jax.Array, sigma: jax.Array) -> jax.Array:
    """The UNet sees x / sqrt(sigma^2 + 1) (variance-preserving input)."""
    sigma = jnp.asarray(sigma, jnp.float32)
    return (sample / jnp.sqrt(sigma**2 + 1)).astype(sample.dtype)


def euler_step(
    schedule: NoiseSchedule, model_output: jax.Array, sigma: jax.Array, sigma_next: jax.Array, sample: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One Euler update from sigma to sigma_next (no churn). Returns (prev_sample, predicted x0)."""
    out_dtype = model_output.dtype
    x = sample.astype(jnp.float32)  # diffusers steps in fp32 and casts back
    m = model_output.astype(jnp.float32)
    sigma = jnp.asarray(sigma, jnp.float32)
    sigma_next = jnp.asarray(sigma_next, jnp.float32)
    if schedule.prediction_type == "epsilon":
        x0 = x - sigma * m
    elif schedule.prediction_type == "v_prediction":
        x0 = m * (-sigma / jnp.sqrt(sigma**2 + 1)) + x / (sigma**2 + 1)
    else:
        x0 = m
    derivative = (x - x0) / sigma
    prev = x + derivative * (sigma_next - sigma)
    return prev.astype(out_dtype), x0


__all__ = [
    "NoiseSchedule", "make_schedule", "schedule_from_config", "add_noise", "velocity", "training_target",
    "predict_x0_eps", "random_timesteps", "DDIMTimesteps", "ddim_timesteps", "ddim_step",
    "EulerSchedule", "euler_sigmas_and_timesteps", "euler_scale_model_input", "euler_step",
]
