"""pipeline.sampler: schedules against the official formulas, solvers against diffusers, guidance by hand.

The UniPC and SDE-DPM-Solver++ references are diffusers' UniPCMultistepScheduler and
DPMSolverMultistepScheduler in flow mode (use_flow_sigmas, prediction_type="flow_prediction"): an
independent implementation whose flow update is the one Wan's fm_solvers_unipc / fm_solvers copied.
Their sigma grids are checked against ours to float32 precision; the solvers are then compared on the
same float64 sigmas, because diffusers (like Wan) derives alpha = 1 - sigma from float32 sigmas, which
near sigma = 1 (0.99986 at shift 7) keeps only ~3 digits of alpha and moves the first step by ~1e-5.
On those, every step of UniPC agrees to 1e-12; DPM-Solver casts the sample to float32, so its steps
(latents of order 1) agree to 2e-6 absolute (measured: <= 5e-7).
"""

import logging
import math

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

from pipeline.sampler import (
    APG,
    COND,
    DROP_AUDIO,
    DROP_TEXT,
    SCHEDULERS,
    UNCOND,
    flow_sigmas,
    guidance_passes,
    guide,
    make_sampler,
)

SHAPE = (4, 5, 3, 6)  # [C, T, H, W]


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    noise = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    return x0, noise


def toy_velocity(x, sigma, x0):
    """Elementwise, nonlinear, sigma-dependent: a point mass at x0 plus a perturbation that keeps the
    multistep terms of the solvers busy."""
    return (x - x0) / sigma + 0.3 * torch.sin(3 * x) + 0.5 * sigma * x


def _steps_for(name):
    return 4 if name == "flowmatch_distill" else 6


def _sampler(name, steps, shift=7.0, seed=0):
    return make_sampler(name, steps, shift, torch.Generator().manual_seed(seed))


def run(sampler, x, field, motion=None):
    """Sample like the window loop: motion frames overwritten before every model call and after every step."""
    calls = 0
    for i, t in enumerate(sampler.timesteps):
        if motion is not None:
            x = x.clone()
            x[:, : motion.shape[1]] = motion
        calls += 1
        x = sampler.step(i, x, field(x, t / 1000))
        if motion is not None:
            x[:, : motion.shape[1]] = motion
    return x, calls


# ------------------------------------------------------------------------------------------ schedules


@pytest.mark.parametrize("steps, shift", [(40, 7.0), (40, 11.0), (8, 5.0), (1, 7.0)])
def test_euler_schedule_is_the_official_formula(steps, shift):
    t = np.linspace(1000, 1, steps, dtype=np.float64) / 1000
    expected = list(shift * t / (1 + (shift - 1) * t)) + [0.0]
    sampler = make_sampler("euler", steps, shift)
    np.testing.assert_allclose(sampler.sigmas, expected, rtol=1e-14, atol=0)
    np.testing.assert_allclose(sampler.timesteps, 1000 * np.array(expected[:-1]), rtol=1e-14, atol=0)


def test_euler_40_steps_shift_7_values():
    ts = make_sampler("euler", 40, 7.0).timesteps
    assert ts[0] == 1000.0
    np.testing.assert_allclose(ts[1:3], [996.258511, 992.345180], atol=1e-6)
    np.testing.assert_allclose(ts[-3:], [278.376479, 160.652693, 6.958250], atol=1e-6)


def test_flowmatch_distill_timesteps():
    # shift 1 leaves the distilled timesteps as they are; shift s maps u = t/1000 to s*u/(1+(s-1)*u)
    assert make_sampler("flowmatch_distill", 4, 1.0).timesteps == pytest.approx((999, 750, 500, 250), abs=1e-9)
    shifted = make_sampler("flowmatch_distill", 4, 7.0)
    assert shifted.timesteps == pytest.approx((6993 / 6.994, 5250 / 5.5, 875.0, 700.0), abs=1e-9)
    assert shifted.sigmas[-1] == 0.0
    # The ComfyUI wrapper's construction (float32): the shifted 1000-step grid linspace(1, 0, 1001)[:-1],
    # with 0 appended, indexed at 1000 - t.
    u = torch.linspace(1.0, 0.0, 1001)[:-1]
    grid = torch.cat([1000 * 7.0 * u / (1 + 6.0 * u), torch.zeros(1)])
    comfy = [grid[1000 - t].item() for t in (999, 750, 500, 250)]
    np.testing.assert_allclose(shifted.timesteps, comfy, atol=1e-3)


@pytest.mark.parametrize("steps", [1, 3, 6, 8])
def test_flowmatch_distill_needs_4_steps(steps):
    with pytest.raises(ValueError, match=r"flowmatch_distill.*exactly 4 steps"):
        make_sampler("flowmatch_distill", steps, 5.0)


@pytest.mark.parametrize("name", ["unipc", "dpm++_sde"])
@pytest.mark.parametrize("steps, shift", [(6, 7.0), (40, 11.0)])
def test_multistep_grid_is_wans_unipc_grid(name, steps, shift):
    u = np.linspace(0.999, 0, steps + 1)[:-1]
    expected = list(shift * u / (1 + (shift - 1) * u)) + [0.0]
    np.testing.assert_allclose(_sampler(name, steps, shift).sigmas, expected, rtol=1e-14, atol=0)


def test_unknown_scheduler_lists_the_known_ones():
    with pytest.raises(ValueError, match="lcm") as err:
        make_sampler("lcm", 6, 5.0)
    for name in SCHEDULERS:
        assert name in str(err.value)


@pytest.mark.parametrize("steps", [0, -2, 2.5, True])
def test_bad_steps_raise(steps):
    with pytest.raises(ValueError, match="steps"):
        flow_sigmas("euler", steps, 5.0)


@pytest.mark.parametrize("shift", [0.0, -1.0, math.nan, math.inf])
def test_bad_shift_raises(shift):
    with pytest.raises(ValueError, match="shift"):
        make_sampler("unipc", 6, shift)


def test_dpm_sde_requires_a_generator():
    with pytest.raises(ValueError, match=r"dpm\+\+_sde.*Generator"):
        make_sampler("dpm++_sde", 6, 5.0)


def test_sampler_logs_its_schedule_once(caplog):
    with caplog.at_level(logging.INFO, logger="pipeline.sampler"):
        make_sampler("unipc", 6, 7.0)
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    for part in ("unipc", "6 steps", "shift 7", "999.857", "583.042"):
        assert part in message


# ------------------------------------------------------------------------------------------- samplers


@pytest.mark.parametrize("name", SCHEDULERS)
def test_one_velocity_per_step(name):
    steps = _steps_for(name)
    sampler = _sampler(name, steps)
    x0, noise = _data()
    _, calls = run(sampler, noise, lambda x, s: toy_velocity(x, s, x0))
    assert calls == steps == len(sampler.timesteps) == len(sampler.sigmas) - 1
    assert sampler.sigmas[-1] == 0.0 and all(a > b for a, b in zip(sampler.sigmas, sampler.sigmas[1:]))


@pytest.mark.parametrize("name", SCHEDULERS)
def test_point_mass_is_reached_exactly(name):
    # For data concentrated at x0 the exact velocity is (x - x0) / sigma; its data prediction is x0 at every
    # step, so every solver (the SDE one included: its last step adds no noise) must end on x0.
    x0, noise = _data(1)
    out, _ = run(_sampler(name, _steps_for(name)), noise, lambda x, s: (x - x0) / s)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-12)


def _diffusers_run(scheduler, x, field, generator=None):
    scheduler.set_begin_index(0)
    xs = []
    for i, t in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[i].double()
        kwargs = {"generator": generator} if generator is not None else {}
        x = scheduler.step(field(x, sigma), t, x, **kwargs).prev_sample.double()
        xs.append(x)
    return xs


def _our_run(sampler, x, field):
    xs = []
    for i, t in enumerate(sampler.timesteps):
        x = sampler.step(i, x, field(x, t / 1000))
        xs.append(x)
    return xs


@pytest.mark.parametrize("steps, shift", [(1, 7.0), (2, 7.0), (3, 11.0), (6, 7.0), (20, 5.0), (40, 7.0)])
def test_unipc_matches_diffusers(steps, shift):
    # diffusers shifts the sigmas it is given by flow_shift: handing it Wan's unshifted grid reproduces
    # Wan's FlowUniPCMultistepScheduler(shift=1).set_timesteps(steps, shift=shift) schedule.
    reference = UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift)
    reference.set_timesteps(sigmas=np.linspace(0.999, 0, steps + 1)[:-1])
    ours = make_sampler("unipc", steps, shift)
    np.testing.assert_allclose(ours.sigmas, reference.sigmas.numpy(), rtol=1e-6, atol=0)
    reference.sigmas = torch.tensor(ours.sigmas, dtype=torch.float64)

    x0, noise = _data(2)
    field = lambda x, s: toy_velocity(x, s, x0)  # noqa: E731
    for a, b in zip(_our_run(ours, noise, field), _diffusers_run(reference, noise, field), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("steps, shift", [(1, 7.0), (2, 7.0), (3, 11.0), (6, 7.0), (20, 5.0), (40, 7.0)])
def test_dpm_sde_matches_diffusers(steps, shift):
    # diffusers' own flow grid for DPM-Solver is Wan's UniPC grid: no custom sigmas needed.
    reference = DPMSolverMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift, algorithm_type="sde-dpmsolver++"
    )
    reference.set_timesteps(steps)
    ours = _sampler("dpm++_sde", steps, shift, seed=3)
    np.testing.assert_allclose(ours.sigmas, reference.sigmas.numpy(), rtol=1e-6, atol=0)
    reference.sigmas = torch.tensor(ours.sigmas, dtype=torch.float64)

    x0, noise = _data(3)
    field = lambda x, s: toy_velocity(x, s, x0)  # noqa: E731
    theirs = _diffusers_run(reference, noise, field, torch.Generator().manual_seed(3))
    for a, b in zip(_our_run(ours, noise, field), theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)


def test_dpm_sde_seed_fixes_the_result():
    x0, noise = _data(4)
    field = lambda x, s: toy_velocity(x, s, x0)  # noqa: E731
    a, _ = run(_sampler("dpm++_sde", 6, seed=11), noise, field)
    b, _ = run(_sampler("dpm++_sde", 6, seed=11), noise, field)
    c, _ = run(_sampler("dpm++_sde", 6, seed=12), noise, field)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["euler", "unipc"])
def test_step_zero_restarts_the_trajectory(name):
    # One sampler per job: each window starts again at step 0 with an empty history.
    x0, noise = _data(5)
    field = lambda x, s: toy_velocity(x, s, x0)  # noqa: E731
    sampler = _sampler(name, 6)
    first, _ = run(sampler, noise, field)
    second, _ = run(sampler, noise, field)
    assert torch.equal(first, second)


def test_steps_out_of_order_raise():
    sampler = make_sampler("unipc", 6, 7.0)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="out of order"):
        sampler.step(1, x, x)
    sampler.step(0, x, x)
    with pytest.raises(ValueError, match="out of order"):
        sampler.step(2, x, x)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_motion_frames_do_not_leak_through_the_history(name):
    # The window loop overwrites the first latent frames with clean context around every step. Whatever
    # the context holds, the other frames must come out the same (same seed for dpm++_sde).
    x0, noise = _data(6)
    field = lambda x, s: toy_velocity(x, s, x0)  # noqa: E731
    steps = _steps_for(name)
    motion_a = torch.randn(SHAPE[0], 2, *SHAPE[2:], dtype=torch.float64)
    out_a, _ = run(_sampler(name, steps, seed=7), noise, field, motion=motion_a)
    out_b, _ = run(_sampler(name, steps, seed=7), noise, field, motion=-3 * motion_a)
    assert torch.equal(out_a[:, :2], motion_a)
    torch.testing.assert_close(out_a[:, 2:], out_b[:, 2:], rtol=0, atol=0)


def test_keeps_the_latent_dtype():
    x = torch.randn(SHAPE, dtype=torch.bfloat16)
    sampler = make_sampler("unipc", 3, 5.0)
    assert sampler.step(0, x, x).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------- guidance


@pytest.mark.parametrize(
    "text, audio, passes",
    [
        (5.0, 4.0, (COND, DROP_TEXT, UNCOND)),
        (1.0, 4.0, (COND, DROP_AUDIO)),
        (1.0 + 1e-12, 4.0, (COND, DROP_AUDIO)),
        (1.0, 1.0, (COND,)),
        (5.0, 1.0, (COND, DROP_TEXT)),
    ],
)
def test_guidance_passes(text, audio, passes):
    assert guidance_passes(text, audio) == passes


def _scalars(**values):
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()}


def test_guide_by_hand():
    v = _scalars(cond=3.0, drop_text=2.0, uncond=0.5, drop_audio=1.0)
    assert guide(v, 5.0, 4.0).item() == 0.5 + 5 * (3 - 2) + 4 * (2 - 0.5)  # 11.5
    assert guide(v, 1.0, 4.0).item() == 1 + 4 * (3 - 1)  # 9
    assert guide(v, 1.0, 1.0).item() == 3.0
    # audio scale 1: the official 3-pass formula, uncond cancelling
    assert guide(v, 5.0, 1.0).item() == pytest.approx(0.5 + 5 * (3 - 2) + 1 * (2 - 0.5))  # 7


def test_guide_names_a_missing_pass():
    with pytest.raises(ValueError, match="uncond"):
        guide(_scalars(cond=1.0, drop_text=0.0), 5.0, 4.0)


def _vec(*values):
    return torch.tensor(values, dtype=torch.float64).reshape(1, 1, 1, -1)


def test_apg_by_hand():
    cond = _vec(2.0, 0.0)
    apg = APG(momentum=-0.75, norm_threshold=55.0)
    torch.testing.assert_close(apg("text", _vec(3.0, 4.0), cond), _vec(0.0, 4.0))  # parallel part dropped
    # momentum: r = diff + momentum * r_prev = (1, 1) - 0.75 * (3, 4)
    torch.testing.assert_close(apg("text", _vec(1.0, 1.0), cond), _vec(0.0, -2.0))

    clipped = APG(momentum=-0.75, norm_threshold=1.0)
    torch.testing.assert_close(clipped("text", _vec(3.0, 4.0), cond), _vec(0.0, 0.8))  # (3, 4) / 5
    # the buffer keeps the unclipped average (-1.25, -2), which is clipped afterwards
    r = math.hypot(1.25, 2.0)
    torch.testing.assert_close(clipped("text", _vec(1.0, 1.0), cond), _vec(0.0, -2.0 / r))
    # each difference has its own buffer
    torch.testing.assert_close(clipped("audio", _vec(0.0, 0.5), cond), _vec(0.0, 0.5))


def _apg_reference(diffs, cond, momentum=-0.75, threshold=55.0):
    """InfiniteTalk's adaptive_projected_guidance after len(diffs) steps, in float64 numpy."""
    running = 0.0
    for d in diffs:
        running = d.numpy().ravel() + momentum * running
    r = running * min(1.0, threshold / np.linalg.norm(running))
    unit = cond.numpy().ravel() / np.linalg.norm(cond.numpy())
    return torch.from_numpy((r - (r @ unit) * unit).reshape(cond.shape))


def test_guide_with_apg_matches_the_official_formulas():
    g = torch.Generator().manual_seed(8)
    # scaled so that the running differences (norms ~42, ~52, ~57) pass the threshold 55 at the third step
    steps = [
        {k: 1.5 * torch.randn(SHAPE, generator=g, dtype=torch.float64) for k in (COND, DROP_TEXT, UNCOND)}
        for _ in range(3)
    ]
    apg = APG()
    for k, v in enumerate(steps):
        text_k = _apg_reference([s[COND] - s[DROP_TEXT] for s in steps[: k + 1]], v[COND])
        audio_k = _apg_reference([s[DROP_TEXT] - s[UNCOND] for s in steps[: k + 1]], v[COND])
        expected = v[COND] + 4.0 * text_k + 3.0 * audio_k
        torch.testing.assert_close(guide(v, 5.0, 4.0, apg), expected, rtol=1e-12, atol=1e-10)

    two_pass = [{COND: v[COND], DROP_AUDIO: v[UNCOND]} for v in steps]
    apg = APG()
    for k, v in enumerate(two_pass):
        audio_k = _apg_reference([s[COND] - s[DROP_AUDIO] for s in two_pass[: k + 1]], v[COND])
        torch.testing.assert_close(guide(v, 1.0, 4.0, apg), v[COND] + 3.0 * audio_k, rtol=1e-12, atol=1e-10)
