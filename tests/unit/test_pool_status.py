"""What /pool, /metrics and the dashboard read of the SLO policy: pending members, targets, the fit."""
from prometheus_client import generate_latest

from actors.controller import pool_policy_json
from actors.messages import PoolStatus
from fapool.costfit import StepFit
from fapool.policy import PolicyConfig
from serve.metrics import Metrics, Snapshot

FIT = StepFit(decode=(1e-3, 1e-4, 1e-6, 5e-4), decode_samples=40, decode_error=0.031, decode_pooled_samples=8)
STATUS = PoolStatus(3, 3, 2, (1, 2, 3), (), 0, 3, 9000, (9000,), state="short_of_gpus", pending=2,
                    retry_in_s=1.5, fit=FIT, step_ms=((0, 12.5, 11.9),))


def test_pool_json_carries_pending_targets_and_the_fit():
    j = pool_policy_json(PolicyConfig(tpot_slo_ms=40.0), STATUS)
    assert (j["state"], j["pending"], j["retry_in_s"], j["policy"], j["tpot_slo_ms"]) == ("short_of_gpus", 2, 1.5, "slo", 40.0)
    assert j["fit"]["decode_error"] == 0.031 and j["fit"]["prefill_error"] is None
    assert j["step_ms"] == [{"base": 0, "measured": 12.5, "predicted": 11.9}]
    assert pool_policy_json(PolicyConfig(), None)["fit"] is None


def test_metrics_export_pending_and_the_fit_error():
    snap = Snapshot()
    snap.status = STATUS
    text = generate_latest(Metrics(lambda: snap).registry).decode()
    assert "fapool_pool_pending 2.0" in text
    assert 'fapool_cost_fit_error{kind="decode"} 0.031' in text
    assert 'fapool_cost_fit_error{kind="prefill"} NaN' in text  # no prefill fitted yet
