import pytest

from fapool.policy import DEFAULT_CURVE, PolicyConfig, PolicyState, PoolCurve, decide, pool_size
from fapool.pool_plan import RemovalCause


def test_paper_table_default_curve():
    curve = PoolCurve.parse(DEFAULT_CURVE)
    assert curve.threshold == 4096
    table = {0: 0, 512: 0, 4095: 0, 4096: 8, 6144: 12, 8191: 15, 8192: 16, 12288: 20,
             16384: 24, 24576: 28, 32767: 31, 32768: 32, 1 << 20: 32}
    assert {n: curve.size_for(n) for n in table} == table


def test_curve_is_monotone():
    curve = PoolCurve.parse(DEFAULT_CURVE)
    sizes = [curve.size_for(n) for n in range(0, 40000, 7)]
    assert sizes == sorted(sizes)


@pytest.mark.parametrize("bad", ["", "4096", "4096:x", "8192:8,4096:16", "4096:16,8192:8", "4096:40", "0:1"])
def test_bad_curves_raise(bad):
    with pytest.raises(ValueError, match="curve"):
        PoolCurve.parse(bad)


def test_caps_by_max_pool_and_capacity():
    cfg = PolicyConfig(mode="curve", max_pool=10)
    d = decide([40000], capacity=32, prev=PolicyState(), now_s=0.0, cfg=cfg)
    assert d.target == 10
    d = decide([40000], capacity=3, prev=PolicyState(), now_s=0.0, cfg=cfg)
    assert d.target == 3
    d = decide([40000], capacity=0, prev=PolicyState(), now_s=0.0, cfg=cfg)
    assert d.target == 0


def test_longest_context_drives_target():
    cfg = PolicyConfig(mode="curve")
    d = decide([100, 5000, 9000, 200], 32, PolicyState(), 0.0, cfg)
    assert d.target == PoolCurve.parse(DEFAULT_CURVE).size_for(9000) == 16
    assert decide([], 32, PolicyState(), 0.0, cfg).target == 0


def test_scale_up_is_immediate_and_down_waits_for_cooldown():
    cfg = PolicyConfig(mode="curve", curve=PoolCurve.parse("16:1,32:2,64:3"), cooldown_s=10.0)
    t, s = 0.0, PolicyState()
    d = decide([70], 32, s, t, cfg)
    assert d.target == 3
    s = d.state
    # The long request ends: the pool holds its size through the cooldown (a fake clock).
    for t in (1.0, 5.0, 10.9):
        d = decide([20], 32, s, t, cfg)
        assert d.target == 3 and d.wanted == 1 and d.reason == "cooling down"
        s = d.state
    d = decide([20], 32, s, 11.0, cfg)
    assert d.target == 1
    s = d.state
    d = decide([], 32, s, 12.0, cfg)
    assert d.target == 1
    d = decide([], 32, d.state, 22.0, cfg)
    assert d.target == 0


def test_a_burst_during_cooldown_resets_it():
    cfg = PolicyConfig(mode="curve", curve=PoolCurve.parse("16:1,32:2,64:3"), cooldown_s=10.0)
    s = decide([70], 32, PolicyState(), 0.0, cfg).state
    s = decide([], 32, s, 1.0, cfg).state  # cooling since 1.0
    d = decide([70], 32, s, 5.0, cfg)  # a long request again: cooldown cancelled
    assert d.target == 3 and d.state.below_since_s is None
    d = decide([], 32, d.state, 12.0, cfg)  # a fresh cooldown starts at 12
    assert d.target == 3
    assert decide([], 32, d.state, 22.0, cfg).target == 0


def test_zero_cooldown_shrinks_at_once():
    cfg = PolicyConfig(mode="curve", curve=PoolCurve.parse("16:1,32:2"), cooldown_s=0.0)
    s = decide([40], 32, PolicyState(), 0.0, cfg).state
    assert decide([], 32, s, 0.0, cfg).target == 0


def test_bad_policy_config():
    with pytest.raises(ValueError, match="max_pool"):
        PolicyConfig(max_pool=33)
    with pytest.raises(ValueError, match="cooldown_s"):
        PolicyConfig(cooldown_s=-1)


def test_pool_size_is_the_target_decide_reaches():
    cfg = PolicyConfig(mode="curve", max_pool=20)
    for n, capacity in [(100, 32), (5000, 32), (20000, 32), (20000, 10), (50000, 0), (50000, -1)]:
        assert decide([n], capacity, PolicyState(), 0.0, cfg).target == pool_size(n, capacity, cfg)
    assert pool_size(50000, 32, cfg) == 20 and pool_size(50000, 3, cfg) == 3


def test_only_drained_members_stay_warm():
    assert RemovalCause.DRAINED.may_stay_warm and not RemovalCause.DIED.may_stay_warm


# ---- the SLO policy -------------------------------------------------------------------------
from fapool.costfit import StepFit, StepSample, fit_steps, shape_of  # noqa: E402

# 1 ms a step, 0.1 ms a sequence, 1 us per KV token read, 0.5 ms per member; prefill 10 us a token.
TRUE = StepFit(decode=(1e-3, 1e-4, 1e-6, 5e-4), prefill=(2e-3, 1e-5, 1e-9, 1e-8))


def _decode(batch, context, members):
    read = batch * context / (members + 1)
    wall = TRUE.decode_s(batch, 0, batch * context, members)
    return StepSample("decode", batch, batch, read, batch * context, context, members, wall)


def _fitted(contexts=(8192, 16384), batches=(1, 2, 4), members=(0,), repeat=8):
    samples = [_decode(b, n, p) for b in batches for n in contexts for p in members] * repeat
    samples += [StepSample("prefill", 1, n, 0, n, n, 0, TRUE.prefill_s(n, 0)) for n in (1000, 8000, 20000)] * 12
    return fit_steps(samples)


def test_fit_recovers_the_model_and_its_error_is_zero_on_exact_steps():
    fit = _fitted(members=(0, 1, 3))
    assert fit.decode == pytest.approx(TRUE.decode, rel=1e-6) and fit.decode_error < 1e-9
    assert fit.prefill[:3] == pytest.approx(TRUE.prefill[:3], rel=1e-6)
    assert fit.prefill[3] == 0.0  # no prefill used the pool: the member term keeps the prior's 0
    assert fit.decode_pooled_samples == 6 * 2 * 8 and fit.seen(shape_of("decode", 4, 4 * 16384)) == 24


def test_fit_without_pooled_steps_keeps_the_prior_member_cost():
    fit = fit_steps([_decode(b, n, 0) for b in (1, 2, 4) for n in (8192, 16384)] * 4, StepFit(decode=(0, 0, 0, 7e-3)))
    assert fit.decode[3] == 7e-3 and fit.decode[:3] == pytest.approx(TRUE.decode[:3], rel=1e-6)
    assert fit_steps([_decode(1, 100, 0)]).decode == StepFit().decode  # fewer samples than terms


def test_slo_picks_the_fewest_members_whose_predicted_step_meets_the_target():
    fit = _fitted(members=(0, 1, 3))
    cfg = PolicyConfig(tpot_slo_ms=20.0, ttft_slo_ms=1e6, hysteresis=0.0)
    contexts = [16384] * 4  # decode at 0 members: 1 + 0.4 + 65.5 ms
    want = next(p for p in range(33) if TRUE.decode_s(4, 0, 4 * 16384, p) <= 0.020)
    assert want == 3
    assert decide(contexts, 32, PolicyState(), 0.0, cfg, fit).target == want
    assert decide(contexts, 2, PolicyState(), 0.0, cfg, fit).target == 2  # the cluster has 2: the fastest of 0..2
    # Two bases: the pool is sized for the base that needs most.
    assert decide([], 32, PolicyState(), 0.0, cfg, fit, per_base=[[100], contexts]).target == want


def test_slo_adds_no_member_that_slows_the_step():
    fit = _fitted(members=(0, 1, 3))
    costly = StepFit(decode=(*fit.decode[:3], 0.1), prefill=fit.prefill, decode_samples=fit.decode_samples,
                     prefill_samples=fit.prefill_samples, shapes=fit.shapes)
    cfg = PolicyConfig(tpot_slo_ms=1.0)  # unreachable: the fastest size wins, and that is none
    assert decide([16384] * 4, 32, PolicyState(), 0.0, cfg, costly).target == 0


def test_slo_cold_start_guard_and_hysteresis():
    cfg = PolicyConfig(tpot_slo_ms=20.0, ttft_slo_ms=1e6, hysteresis=0.3, cooldown_s=5.0)
    contexts = [16384] * 4
    assert decide(contexts, 32, PolicyState(), 0.0, cfg, StepFit()).target == 0  # no fit yet
    young = _fitted(members=(0, 1, 3), repeat=1)  # 48 steps, but 4 x 16K seen only 3 times
    assert young.seen(shape_of("decode", 4, 4 * 16384)) < cfg.min_shape_steps
    assert decide(contexts, 32, PolicyState(), 0.0, cfg, young).target == 0
    fit = _fitted(members=(0, 1, 3))
    d = decide(contexts, 32, PolicyState(), 0.0, cfg, fit)
    assert d.target == 3
    # 3 members meet 20 ms (19.3 ms predicted); a pool of 8 shrinks to 6, the fewest within
    # 0.7 x 20 = 14 ms (13.8 ms), not to 3, and only after the cooldown.
    assert TRUE.decode_s(4, 0, 4 * 16384, 5) > 0.014 >= TRUE.decode_s(4, 0, 4 * 16384, 6)
    held = decide(contexts, 32, PolicyState(8), 100.0, cfg, fit)
    assert held.target == 8 and held.wanted == 6 and held.reason == "cooling down"
    assert decide(contexts, 32, held.state, 106.0, cfg, fit).target == 6
    assert decide(contexts, 32, PolicyState(6), 106.0, cfg, fit).reason == "steady"


def test_pool_size_waits_for_nothing_under_slo_and_bad_slo_config():
    assert pool_size(50000, 32, PolicyConfig()) == 0
    for bad in ({"mode": "auto"}, {"tpot_slo_ms": 0}, {"ttft_slo_ms": -1}, {"hysteresis": 1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            PolicyConfig(**bad)
