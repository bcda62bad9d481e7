"""GPU shortage: members the cluster cannot place wedge nothing (a real local Ray cluster, CPU with
4 logical GPUs). The pool shows them pending, the controller asks the autoscaler and retries with
backoff, requests run on the base meanwhile, and the pool still shrinks."""
import json
import threading

from fapool import EngineConfig, LLMEngine, SamplingParams
from fapool.policy import PoolCurve
from tests.actors.conftest import wait_for
from tests.actors.test_pool import GREEDY, cfg_for, prompt


def autoscaler_request():
    """The bundles last asked of the autoscaler (v1 protocol: the GCS key it reads)."""
    from ray.experimental.internal_kv import _internal_kv_get
    from ray.autoscaler._private.constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.autoscaler.v2.utils import is_autoscaler_v2

    assert not is_autoscaler_v2()  # a local cluster: the v1 key is where the request lands
    raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return json.loads(raw) if raw else []


def _in_background(cluster, ids, max_tokens=300):
    """A long request streaming in a thread (it runs on the base while the pool grows)."""
    out = {}
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    t = threading.Thread(target=lambda: out.update(r=cluster.generate(None, params, prompt_token_ids=ids)))
    t.start()
    return t, out, params


def test_more_members_asked_than_gpus_are_pending_and_asked_of_the_autoscaler(start_cluster):
    # One base takes 1 of the 4 logical GPUs; the curve wants 5 members for any prompt of 16+.
    cluster = start_cluster(cfg_for("tiny", curve=PoolCurve.parse("16:5"), cooldown_s=1.0, actor_num_gpus=1.0))
    p = prompt(30, 60)
    t, out, params = _in_background(cluster, p)
    st = wait_for(lambda: (s := cluster.status()).size == 3 and s, timeout_s=120, what="3 members")
    assert (st.target, st.pending, st.state) == (3, 2, "short_of_gpus")
    assert autoscaler_request() == [{"GPU": 1.0}] * (1 + 5)  # the base and all 5 members wanted
    t.join()
    want = LLMEngine(EngineConfig(model="tiny", device="cpu")).generate([p], params)[0].token_ids
    assert out["r"].token_ids == want
    # The long request is done: the pool shrinks although it never got what it wanted.
    wait_for(lambda: cluster.status().size == 0, timeout_s=60, what="the pool to shrink")
    st = cluster.status()
    assert (st.pending, st.state) == (0, "ready")


def test_unplaceable_members_back_off_and_requests_run_on_the_base(start_cluster):
    # Members ask for a resource no node has: Ray never places them.
    cluster = start_cluster(cfg_for("tiny", curve=PoolCurve.parse("16:2"), cooldown_s=1.0,
                                    member_resources=(("fapool_test_nowhere", 1.0),),
                                    member_start_timeout_s=1.5))
    ref = LLMEngine(EngineConfig(model="tiny", device="cpu"))
    p = prompt(30, 61)
    t, out, params = _in_background(cluster, p, max_tokens=2000)
    st = wait_for(lambda: (s := cluster.status()).retry_in_s is not None and s, timeout_s=120, what="a backoff")
    assert st.size == 0 and st.pending == 2 and st.state == "short_of_gpus"
    assert autoscaler_request()[-2:] == [{"fapool_test_nowhere": 1.0}] * 2
    # While it backs off, a short request runs on the base, with the tokens it would have anyway.
    short = prompt(8, 62)
    assert cluster.generate(None, GREEDY, prompt_token_ids=short).token_ids == ref.generate([short], GREEDY)[0].token_ids
    t.join()
    assert out["r"].token_ids == ref.generate([p], params)[0].token_ids  # ran on the base alone
    # Nothing is wanted once the long prompt is gone: pending clears, no member is left starting.
    wait_for(lambda: cluster.status().pending == 0, timeout_s=60, what="pending to clear")
    assert cluster.status().size == 0
