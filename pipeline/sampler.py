"""Flow-matching samplers and InfiniteTalk's classifier-free guidance, on velocities.

Conventions (Wan2.1): sigma 1 is pure noise and 0 is clean, x_sigma = (1 - sigma) * x0 + sigma * noise;
the DiT predicts the velocity v = noise - x0 and is called with the timestep t = 1000 * sigma.
A sampler holds `steps` + 1 sigmas, the last one 0, and turns one (guided) velocity per step into the
next latent, so a window costs exactly `steps` guided model evaluations:

    sampler = make_sampler("unipc", steps=8, shift=7.0, generator=g)      # logs its timesteps
    for i, t in enumerate(sampler.timesteps):
        passes = guidance_passes(text_scale, audio_scale)                  # which DiT calls to make
        v = guide({name: dit(x, t, name) for name in passes}, text_scale, audio_scale, apg)
        x = sampler.step(i, x, v)

Every schedule is a grid u in (0, 1] put through Wan's shift s(u) = shift * u / (1 + (shift - 1) * u),
which spends more of the steps at high noise when shift > 1 (7 at 480p, 11 at 720p), then a final 0:
- euler: official InfiniteTalk, u = linspace(1000, 1, steps) / 1000.
- flowmatch_distill: ComfyUI wrapper, u = (999, 750, 500, 250) / 1000, 4 steps only.
- unipc, dpm++_sde: u = linspace(0.999, 0, steps + 1) without its last point; Wan's
  FlowUniPCMultistepScheduler (0.999 is the top of the 1000-step training grid), and the same grid as
  diffusers' DPMSolverMultistepScheduler with use_flow_sigmas.
Timesteps are kept as floats; Wan's own UniPC/DPM++ hand the model int64-truncated ones (999, not 999.86).
The ComfyUI wrapper starts its unipc/dpm++ grids at the shifted top sigma and shifts again, which moves
its timesteps by up to ~0.25 (of 1000); that is not copied.
"""

import logging
import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SCHEDULERS = ("euler", "flowmatch_distill", "unipc", "dpm++_sde")
NUM_TRAIN_TIMESTEPS = 1000
DISTILL_TIMESTEPS = (999, 750, 500, 250)


# ------------------------------------------------------------------------------------------ schedules


def shift_sigma(u: float, shift: float) -> float:
    """Wan's timestep shift of an unshifted time u in [0, 1]."""
    return shift * u / (1 + (shift - 1) * u)


def _check_scheduler(scheduler: str) -> None:
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; known schedulers: {', '.join(SCHEDULERS)}")


def flow_sigmas(scheduler: str, steps: int, shift: float) -> tuple[float, ...]:
    """The `steps` + 1 sigmas (float64, decreasing, the last one 0) that `scheduler` steps through."""
    _check_scheduler(scheduler)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not (shift > 0 and math.isfinite(shift)):
        raise ValueError(f"shift must be a positive number, got {shift!r}")
    if scheduler == "euler":
        u = np.linspace(NUM_TRAIN_TIMESTEPS, 1, steps) / NUM_TRAIN_TIMESTEPS
    elif scheduler == "flowmatch_distill":
        if steps != len(DISTILL_TIMESTEPS):
            raise ValueError(
                f"scheduler 'flowmatch_distill' runs exactly {len(DISTILL_TIMESTEPS)} steps "
                f"(timesteps {list(DISTILL_TIMESTEPS)}), got steps={steps}"
            )
        u = np.array(DISTILL_TIMESTEPS) / NUM_TRAIN_TIMESTEPS
    else:
        u = np.linspace(1 - 1 / NUM_TRAIN_TIMESTEPS, 0, steps + 1)[:-1]
    return tuple(shift_sigma(float(ui), shift) for ui in u) + (0.0,)


def _half_log_snr(sigma: float) -> float:
    """lambda = log(alpha / sigma) with alpha = 1 - sigma: the time variable of DPM-Solver and UniPC."""
    return math.log1p(-sigma) - math.log(sigma)


# ------------------------------------------------------------------------------------------- samplers


class Sampler:
    """Steps a latent through one schedule, one velocity (one guided model evaluation) per step.

    `step(i, x, velocity)` is called for i = 0, 1, ..., steps - 1 in order; i = 0 starts a new trajectory
    and clears the history, so one sampler serves every window of a job. The velocity must be the one
    the model returned at exactly this `x` and `timesteps[i]`. Arithmetic runs in float32 (float64 for
    float64 input); the result has x's dtype. Any tensor shape: the updates are elementwise.
    """

    def __init__(self, scheduler: str, steps: int, shift: float):
        self.scheduler = scheduler
        self.steps = steps
        self.shift = shift
        self.sigmas = flow_sigmas(scheduler, steps, shift)
        self.timesteps = tuple(NUM_TRAIN_TIMESTEPS * s for s in self.sigmas[:-1])
        self._next = 0
        log.info(
            "sampler %s: %d steps, shift %g, timesteps [%s]",
            scheduler, steps, shift, ", ".join(f"{t:.3f}" for t in self.timesteps),
        )

    def step(self, i: int, x: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
        if not (i == 0 or i == self._next) or i >= self.steps:
            raise ValueError(
                f"{self.scheduler}: step {i} out of order; expected 0 or {self._next} (of {self.steps})"
            )
        if i == 0:
            self._reset()
        self._next = i + 1
        dtype = torch.promote_types(x.dtype, torch.float32)
        return self._update(i, x.to(dtype), velocity.to(dtype)).to(x.dtype)

    def _reset(self) -> None:
        pass

    def _update(self, i: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class EulerSampler(Sampler):
    """First-order flow step x += v * (sigma_next - sigma): the official sampler, and flowmatch_distill."""

    def _update(self, i, x, v):
        return x + (self.sigmas[i + 1] - self.sigmas[i]) * v


class UniPCSampler(Sampler):
    """UniPC (Zhao et al. 2023) in flow form, as Wan's FlowUniPCMultistepScheduler with its defaults
    (order 2, B(h) = e^h - 1 "bh2", on data predictions, first and last step first order, corrector
    always on); diffusers' UniPCMultistepScheduler with use_flow_sigmas computes the same.

    Step i: the data prediction x0_i = x_i - sigma_i * v_i, taken at the x_i the model saw; the corrector
    (UniC) redoes step i - 1 with x0_i and replaces x_i; the predictor (UniP) goes from there to x_{i+1}.
    The last step lands on x0_{N-1}.

    History: x0_{i-1}, x0_{i-2} and the corrected x_{i-1} that the previous predictor started from.
    Every update combines these elementwise with scalar coefficients, so the caller may overwrite
    positions of x (the clean motion frames) between calls: the stale history there only ever feeds
    those same positions, which the caller overwrites again after the step.
    """

    def _reset(self):
        self._x0 = []  # the last two data predictions, oldest first
        self._x_prev = None
        self._order_prev = 0

    def _update(self, i, x, v):
        x0 = x - self.sigmas[i] * v
        # The corrector rebuilds x_i from the history alone; at step 0 keep a copy, as the caller owns x.
        x = self._correct(i, x0) if i > 0 else x.clone()
        # First order at step 0 (no history yet) and at the last step (into sigma = 0 the second-order
        # term would divide by an infinite lambda step): Wan's warm-up and lower_order_final.
        order = 1 if i in (0, self.steps - 1) else 2
        x_next = self._predict(i, x, x0, order)
        self._x0 = (self._x0 + [x0])[-2:]
        self._x_prev = x
        self._order_prev = order
        return x_next

    def _predict(self, i, x, x0, order):
        s, t = self.sigmas[i], self.sigmas[i + 1]
        if t == 0:
            return x0  # lambda_t = inf: sigma_t / sigma_s -> 0, alpha_t * (1 - e^-h) -> 1
        h = _half_log_snr(t) - _half_log_snr(s)
        b_h = math.expm1(-h)
        x_next = (t / s) * x - (1 - t) * b_h * x0
        if order == 2:
            r = (_half_log_snr(self.sigmas[i - 1]) - _half_log_snr(s)) / h
            x_next = x_next - (1 - t) * b_h * 0.5 * (self._x0[-1] - x0) / r
        return x_next

    def _correct(self, i, x0):
        s, t = self.sigmas[i - 1], self.sigmas[i]
        m0 = self._x0[-1]
        hh = -(_half_log_snr(t) - _half_log_snr(s))
        b_h = math.expm1(hh)
        x_corr = (t / s) * self._x_prev - (1 - t) * b_h * m0
        d_t = x0 - m0
        if self._order_prev == 1:
            return x_corr - (1 - t) * b_h * 0.5 * d_t
        # UniC-2 weights: solve [[1, 1], [r, 1]] rho = b, b_k = k! * h*phi_{k+1}(h) / B(h) (Wan's loop unrolled)
        r = (_half_log_snr(self.sigmas[i - 2]) - _half_log_snr(s)) / -hh
        d_1 = (self._x0[-2] - m0) / r
        hphi_2 = b_h / hh - 1
        hphi_3 = hphi_2 / hh - 0.5
        b1, b2 = hphi_2 / b_h, 2 * hphi_3 / b_h
        rho_1 = (b1 - b2) / (1 - r)
        rho_t = b1 - rho_1
        return x_corr - (1 - t) * b_h * (rho_1 * d_1 + rho_t * d_t)


class DPMSolverSDESampler(Sampler):
    """SDE-DPM-Solver++(2M), midpoint, in flow form: the ComfyUI wrapper's `dpm++_sde` (Wan's
    FlowDPMSolverMultistepScheduler with algorithm_type="sde-dpmsolver++"); diffusers'
    DPMSolverMultistepScheduler with use_flow_sigmas computes the same. First and last step first order.

    Every step but the last adds fresh Gaussian noise, drawn in float32 on the generator's device (so a
    seed gives the same result on any device) and scaled by sigma_next * sqrt(1 - e^-2h); the last step
    lands on the data prediction and draws none.

    History: the previous data prediction x0_{i-1} = x_{i-1} - sigma_{i-1} * v_{i-1}. It is combined
    elementwise, so positions the caller overwrites between calls (the motion frames) stay confined to
    themselves, as in UniPCSampler.
    """

    def __init__(self, steps: int, shift: float, generator: torch.Generator):
        super().__init__("dpm++_sde", steps, shift)
        self.generator = generator

    def _reset(self):
        self._x0_prev = None

    def _update(self, i, x, v):
        s, t = self.sigmas[i], self.sigmas[i + 1]
        x0 = x - s * v
        x0_prev, self._x0_prev = self._x0_prev, x0
        if t == 0:
            return x0  # the last step, first order: e^-h -> 0, alpha_t -> 1, sigma_t = 0
        h = _half_log_snr(t) - _half_log_snr(s)
        one_minus_e2h = -math.expm1(-2 * h)
        d = x0
        if i > 0:
            r = (_half_log_snr(s) - _half_log_snr(self.sigmas[i - 1])) / h
            d = x0 + 0.5 * (x0 - x0_prev) / r
        noise = torch.randn(x.shape, generator=self.generator, device=self.generator.device, dtype=torch.float32)
        noise = noise.to(device=x.device, dtype=x.dtype)
        return (t / s * math.exp(-h)) * x + (1 - t) * one_minus_e2h * d + t * math.sqrt(one_minus_e2h) * noise


def make_sampler(scheduler: str, steps: int, shift: float, generator: torch.Generator | None = None) -> Sampler:
    """The sampler for a scheduler name in SCHEDULERS; dpm++_sde needs `generator` for its noise."""
    _check_scheduler(scheduler)
    if scheduler in ("euler", "flowmatch_distill"):
        return EulerSampler(scheduler, steps, shift)
    if scheduler == "unipc":
        return UniPCSampler(scheduler, steps, shift)
    if generator is None:
        raise ValueError("scheduler 'dpm++_sde' adds noise at every step: pass a seeded torch.Generator")
    return DPMSolverSDESampler(steps, shift, generator)


# ------------------------------------------------------------------------------------------- guidance

# The DiT passes a step can need. cond: prompt + audio; drop_text: negative prompt + audio;
# drop_audio: prompt + zero audio; uncond: negative prompt + zero audio.
COND, DROP_TEXT, DROP_AUDIO, UNCOND = "cond", "drop_text", "drop_audio", "uncond"


def guidance_passes(text_scale: float, audio_scale: float) -> tuple[str, ...]:
    """The passes that `guide` needs for these scales, cond first.

    text != 1 and audio != 1: cond, drop_text, uncond (official). text == 1: cond, drop_audio (official),
    or cond alone when audio == 1 too. text != 1 and audio == 1: cond, drop_text: the official 3-pass
    formula's uncond terms then cancel exactly (with APG too), so running uncond would be wasted.
    """
    text = not math.isclose(text_scale, 1.0)
    audio = not math.isclose(audio_scale, 1.0)
    if text:
        return (COND, DROP_TEXT, UNCOND) if audio else (COND, DROP_TEXT)
    return (COND, DROP_AUDIO) if audio else (COND,)


class APG:
    """Adaptive projected guidance (Sadat et al. 2024, arXiv:2410.02416) as InfiniteTalk applies it.

    Per guidance difference ("text", "audio") a momentum running average r <- diff + momentum * r is
    kept; r is scaled down to an L2 norm of at most `norm_threshold` (0 disables this) and only its part
    orthogonal to the cond velocity is returned (the official eta is 0: the parallel part, which mostly
    oversaturates, is dropped). Norms and projection span the last four dims, [C, T, H, W]: the whole
    window's latent, motion frames included, as in the official code.

    The official code creates the momentum buffers right before each window's step loop, so they carry
    over the steps of one window and restart with the next: make one APG per window.
    """

    def __init__(self, momentum: float = -0.75, norm_threshold: float = 55.0):
        self.momentum = momentum
        self.norm_threshold = norm_threshold
        self._running: dict[str, torch.Tensor] = {}

    def __call__(self, key: str, diff: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        dims = (-1, -2, -3, -4)
        if key in self._running:
            diff = diff + self.momentum * self._running[key]
        self._running[key] = diff
        if self.norm_threshold > 0:
            norm = diff.norm(p=2, dim=dims, keepdim=True)
            diff = diff * torch.clamp(self.norm_threshold / norm, max=1.0)
        # Projection in float64, as the official code: the dot product runs over millions of elements.
        d = diff.double()
        unit = F.normalize(cond.double(), dim=dims)
        parallel = (d * unit).sum(dim=dims, keepdim=True) * unit
        return (d - parallel).to(diff.dtype)


def guide(
    velocities: Mapping[str, torch.Tensor], text_scale: float, audio_scale: float, apg: APG | None = None
) -> torch.Tensor:
    """Combine the passes of `guidance_passes(text_scale, audio_scale)` into one velocity (official formulas).

    3 passes: uncond + s_t * (cond - drop_text) + s_a * (drop_text - uncond)
    2 passes: drop_audio + s_a * (cond - drop_audio)      (text scale 1: distilled models / LoRAs)
              drop_text + s_t * (cond - drop_text)         (audio scale 1: the 3-pass formula, uncond cancels)
    1 pass:   cond
    With APG: cond + (s_t - 1) * apg(cond - drop_text) + (s_a - 1) * apg(drop_text - uncond), resp.
    cond + (s_a - 1) * apg(cond - drop_audio).
    """
    passes = guidance_passes(text_scale, audio_scale)
    missing = [p for p in passes if p not in velocities]
    if missing:
        raise ValueError(
            f"guidance with text scale {text_scale}, audio scale {audio_scale} needs passes {missing}"
        )
    cond = velocities[COND]
    if passes == (COND,):
        return cond
    if passes == (COND, DROP_AUDIO):
        drop_audio = velocities[DROP_AUDIO]
        if apg is None:
            return drop_audio + audio_scale * (cond - drop_audio)
        return cond + (audio_scale - 1) * apg("audio", cond - drop_audio, cond)
    drop_text = velocities[DROP_TEXT]
    if passes == (COND, DROP_TEXT):
        if apg is None:
            return drop_text + text_scale * (cond - drop_text)
        return cond + (text_scale - 1) * apg("text", cond - drop_text, cond)
    uncond = velocities[UNCOND]
    if apg is None:
        return uncond + text_scale * (cond - drop_text) + audio_scale * (drop_text - uncond)
    return (
        cond
        + (text_scale - 1) * apg("text", cond - drop_text, cond)
        + (audio_scale - 1) * apg("audio", drop_text - uncond, cond)
    )
