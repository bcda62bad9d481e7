"""bench.elastic: the replay drives the service's own pool decisions with a fake clock."""
import pytest

import fapool.policy
import fapool.pool_plan
from bench.elastic import replay as replay_mod
from bench.elastic.costs import load
from bench.elastic.replay import Setup, replay
from bench.elastic.workloads import WORKLOADS, Request, generate
from fapool.policy import PolicyConfig, PoolCurve
from fapool.pool_plan import MembershipPlan, plan_membership, removable

COSTS = load()
LONG = [Request(1.0, 40000, 200), Request(2.0, 500, 50)]


def test_the_controller_and_the_replay_call_the_same_functions():
    import actors.controller as controller

    assert controller.decide is fapool.policy.decide is replay_mod.policy_mod.decide
    assert controller.plan_membership is fapool.pool_plan.plan_membership is replay_mod.pool_plan.plan_membership
    assert controller.removable is fapool.pool_plan.removable is replay_mod.pool_plan.removable
    # ... and the controller's tick really calls them (an unused import would pass the lines above)
    called = controller.PoolController._reconcile_locked.__code__.co_names
    assert {"decide", "plan_membership", "removable"} <= set(called)


def test_replacing_the_membership_plan_changes_the_replay(monkeypatch):
    before = replay(Setup("fa", PolicyConfig(mode="curve")), LONG, COSTS)
    assert max(n for _, n in before.pool_sizes) == 32
    monkeypatch.setattr(fapool.pool_plan, "plan_membership", lambda *a: MembershipPlan())
    after = replay(Setup("fa", PolicyConfig(mode="curve")), LONG, COSTS)
    assert [n for _, n in after.pool_sizes] == [0] and after.gpu_seconds < before.gpu_seconds


def test_replacing_the_policy_changes_the_replay(monkeypatch):
    real = fapool.policy.decide
    monkeypatch.setattr(fapool.policy, "decide", lambda c, cap, prev, now, cfg, *a: real(c, 5, prev, now, cfg, *a))
    capped = replay(Setup("fa", PolicyConfig(mode="curve")), LONG, COSTS)
    assert max(n for _, n in capped.pool_sizes) == 5


def test_plan_revives_before_adding_and_drains_the_least_loaded_newest():
    assert plan_membership(4, [1, 2, 3], {3}, {}) == MembershipPlan(revive=(3,), add=1)
    assert plan_membership(1, [1, 2, 3], set(), {1: 2, 2: 0, 3: 0}) == MembershipPlan(drain=(3, 2))
    assert plan_membership(2, [1, 2], set(), {}) == MembershipPlan()
    assert removable({2, 3}, {2: 1}) == (3,)


def test_the_pool_waits_the_cold_start_then_drains_after_the_cooldown():
    cfg = PolicyConfig(mode="curve", curve=PoolCurve.parse("16384:8,32768:16"), cooldown_s=10.0)
    o = replay(Setup("fa", cfg), [Request(1.0, 20000, 100)], COSTS)
    (t_up, n_up), (t_down, n_down) = o.pool_sizes[1:]
    assert n_up == 9 and n_down == 0  # 8 + (16 - 8) * 3616 // 16384
    assert t_up == pytest.approx(1.25 + COSTS.cold_start_s, abs=0.01)  # the tick after arrival
    s = o.seqs[0]
    assert s.admitted_s >= t_up and s.members  # it waited for the pool and ran in it
    assert t_down >= s.done_s + cfg.cooldown_s
    assert o.scale_events == {"up": 1, "down": 1}


def test_static_pools_bill_their_gpus_the_whole_time():
    trace = generate(WORKLOADS["chat"], 5.0, 20.0, seed=1)
    for p in (0, 8):
        o = replay(Setup("s", static_pool=p), trace, COSTS)
        assert o.gpu_seconds == pytest.approx((8 + p) * o.duration_s)
        assert all(s.done_s >= s.first_s >= s.req.arrival_s for s in o.seqs)
        assert len(o.seqs) == len(trace) and o.refused == 0


def test_workloads_are_seeded_and_shaped():
    w = WORKLOADS["long-document"]
    a, b = generate(w, 20.0, 60.0, seed=3), generate(w, 20.0, 60.0, seed=3)
    assert a == b and abs(len(a) / 60.0 - 20.0) < 3
    many = generate(w, 50.0, 200.0, seed=4)
    assert 0.25 < sum(r.prompt > 16384 for r in many) / len(many) < 0.45  # "a third above 16K"


def test_the_report_has_a_table_per_load_and_leaves_other_sections_alone(tmp_path):
    from bench.elastic.__main__ import run_workload
    from bench.elastic.report import END, START, write_docs

    w = run_workload("bursty", 20.0, 1, COSTS, tune=True)
    w["replay_wall_s"] = 0.0
    result = {"fit": COSTS.fit_errors(), "workloads": {"bursty": w}}
    (tmp_path / "docs").mkdir()
    other = "<!-- bench.serve start -->\nkept\n<!-- bench.serve end -->\n"
    (tmp_path / "docs" / "benchmarks.md").write_text(other + f"{START}\nstale text\n{END}\n")
    write_docs(result, tmp_path)
    write_docs(result, tmp_path)  # idempotent: one section, replaced in place
    text = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert text.startswith(other) and text.count(START) == 1 and "stale text" not in text
    for name in ("FA Pool (default)", "static pool 0", "static pool 32", "static TP4"):
        assert text.count(f"| {name}") == 2  # one row at each load
    assert text.count("against the static 32-GPU pool") == 2 and "fit error" in text
    assert (tmp_path / "docs" / "elastic-bursty.png").stat().st_size > 10_000
    assert len(w["loads"]["0.8"]["tuning"]) == 10 and not w["loads"]["0.5"]["tuning"]


def test_the_default_slo_policy_learns_the_member_cost_online_and_gives_the_pool_back():
    # 60K prompts on one base, a 12 ms TPOT target the base alone misses: the optimistic prior
    # (members free) tries the pool, the pooled steps teach the fit what a member costs (the
    # replay's own d), and after the cooldown the pool goes back to the size that pays: none.
    trace = [Request(1.0 + 2 * i, 60000, 1000) for i in range(40)]
    o = replay(Setup("slo", PolicyConfig(tpot_slo_ms=12.0, cooldown_s=5.0), num_bases=1), trace, COSTS)
    fit = o.fits[-1]
    assert fit.decode_pooled_samples > 0 and fit.decode[3] == pytest.approx(COSTS.model.d, rel=1e-3)
    assert fit.decode_error is not None and fit.decode_error < 0.01  # the replay's steps follow the model
    assert o.pool_sizes[-1][1] == 0 and o.scale_events == {"up": 1, "down": 1}
    static32 = replay(Setup("s32", static_pool=32, num_bases=1), trace, COSTS)
    assert o.gpu_seconds < 0.7 * static32.gpu_seconds
