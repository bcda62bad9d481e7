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
    cfg = PolicyConfig(max_pool=10)
    d = decide([40000], capacity=32, prev=PolicyState(), now_s=0.0, cfg=cfg)
    assert d.target == 10
    d = decide([40000], capacity=3, prev=PolicyState(), now_s=0.0, cfg=cfg)
    assert d.target == 3
    d = decide([40000], capacity=0, prev=PolicyState(), now_s=0.0, cfg=cfg)
    assert d.target == 0


def test_longest_context_drives_target():
    cfg = PolicyConfig()
    d = decide([100, 5000, 9000, 200], 32, PolicyState(), 0.0, cfg)
    assert d.target == PoolCurve.parse(DEFAULT_CURVE).size_for(9000) == 16
    assert decide([], 32, PolicyState(), 0.0, cfg).target == 0


def test_scale_up_is_immediate_and_down_waits_for_cooldown():
    cfg = PolicyConfig(curve=PoolCurve.parse("16:1,32:2,64:3"), cooldown_s=10.0)
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
    cfg = PolicyConfig(curve=PoolCurve.parse("16:1,32:2,64:3"), cooldown_s=10.0)
    s = decide([70], 32, PolicyState(), 0.0, cfg).state
    s = decide([], 32, s, 1.0, cfg).state  # cooling since 1.0
    d = decide([70], 32, s, 5.0, cfg)  # a long request again: cooldown cancelled
    assert d.target == 3 and d.state.below_since_s is None
    d = decide([], 32, d.state, 12.0, cfg)  # a fresh cooldown starts at 12
    assert d.target == 3
    assert decide([], 32, d.state, 22.0, cfg).target == 0


def test_zero_cooldown_shrinks_at_once():
    cfg = PolicyConfig(curve=PoolCurve.parse("16:1,32:2"), cooldown_s=0.0)
    s = decide([40], 32, PolicyState(), 0.0, cfg).state
    assert decide([], 32, s, 0.0, cfg).target == 0


def test_bad_policy_config():
    with pytest.raises(ValueError, match="max_pool"):
        PolicyConfig(max_pool=33)
    with pytest.raises(ValueError, match="cooldown_s"):
        PolicyConfig(cooldown_s=-1)


def test_pool_size_is_the_target_decide_reaches():
    cfg = PolicyConfig(max_pool=20)
    for n, capacity in [(100, 32), (5000, 32), (20000, 32), (20000, 10), (50000, 0), (50000, -1)]:
        assert decide([n], capacity, PolicyState(), 0.0, cfg).target == pool_size(n, capacity, cfg)
    assert pool_size(50000, 32, cfg) == 20 and pool_size(50000, 3, cfg) == 3


def test_only_drained_members_stay_warm():
    assert RemovalCause.DRAINED.may_stay_warm and not RemovalCause.DIED.may_stay_warm
