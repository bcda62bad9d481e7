"""The pool's data plane without Ray: a base's engine and two members as threads over gloo.

The same pieces the Ray shells wire (`actors/base_actor.py`, `actors/pool_actor.py`): a
`PooledAttention` executor in an `LLMEngine`, and a `ShardServer` per member over its own
`KVCache`, joined by one `DataPlane` group. Pooled greedy tokens must equal a plain engine's.
"""
import threading

import pytest
import torch

from fapool import EngineConfig, LLMEngine, SamplingParams
from fapool.attention import select_kernel
from fapool.pool.kv_store import KVCache
from fapool.policy import PolicyConfig, PoolCurve
from fapool.pool.membership import EpochSpec, MemberInfo
from fapool.pool.pooled_attention import PooledAttention
from fapool.pool.shard_server import ShardServer
from fapool.pool.transport import LOOPBACK, DataPlane

# Prefix caching off: a prompt run twice must reach the pool twice (tests/unit/test_prefix_cache.py
# runs a pool with it on).
ENGINE = EngineConfig(model="tiny", device="cpu", kv_capacity_tokens=4096, prefix_caching=False)
POLICY = PolicyConfig(curve=PoolCurve.parse("16:2"), max_pool=2)  # prompts of 16+ tokens use both members
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
TIMEOUT_S = 30.0


class GlooPool:
    """One base engine and `num_members` shard servers in threads, in one epoch."""

    def __init__(self, num_members: int = 2, config: EngineConfig = ENGINE) -> None:
        made: list[PooledAttention] = []

        def factory(loaded, cache):
            kernel = select_kernel(loaded.device, ENGINE.attention_kernel, dtype=loaded.dtype)
            # pool_wait_s=0: a prompt that finds no pool runs locally at once (it waits 30 s by default).
            made.append(PooledAttention(loaded.config, cache, kernel, POLICY, pool_wait_s=0.0))
            return made[0]

        self.engine = LLMEngine(config, executor_factory=factory)
        self.executor = made[0]
        loaded = self.engine.loaded
        self.members = tuple(MemberInfo(i, 2048, LOOPBACK) for i in range(1, num_members + 1))
        world = 1 + num_members
        store = DataPlane.host_store(LOOPBACK, TIMEOUT_S)
        self.servers: list[ShardServer] = []
        self.errors: list[BaseException] = []
        self.threads = [
            threading.Thread(target=self._serve, args=(rank, world, store.port, m), daemon=True)
            for rank, m in enumerate(self.members, start=1)
        ]
        for t in self.threads:
            t.start()
        plane = DataPlane.connect(store, LOOPBACK, store.port, "epoch1/", 0, world, loaded.device, TIMEOUT_S)
        assert self.executor.switch_epoch(EpochSpec(1, self.members), plane) == []

    def _serve(self, rank: int, world: int, port: int, m: MemberInfo) -> None:
        loaded = self.engine.loaded
        try:
            plane = DataPlane.connect(None, LOOPBACK, port, "epoch1/", rank, world, loaded.device, TIMEOUT_S)
            cache = KVCache(loaded.config, m.capacity_tokens, loaded.dtype, loaded.device)
            kernel = select_kernel(loaded.device, ENGINE.attention_kernel, dtype=loaded.dtype)
            server = ShardServer(0, plane, cache, kernel, loaded.config)
            self.servers.append(server)
            server.serve()
            plane.close()
        except BaseException as e:  # noqa: BLE001 - reported by close()
            self.errors.append(e)

    def close(self) -> None:
        self.executor.retire_plane()  # STOP: every server returns (a second close does nothing)
        for t in self.threads:
            t.join(TIMEOUT_S)
        assert not self.errors, self.errors
        assert not any(t.is_alive() for t in self.threads)


@pytest.fixture(scope="module")
def alone():
    return LLMEngine(ENGINE)


@pytest.fixture
def pool():
    p = GlooPool()
    yield p
    p.close()


def prompt(n, seed):
    return torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_pooled_tokens_equal_unpooled_prefill_and_decode(pool, alone):
    prompts = [prompt(n, s) for s, n in enumerate((8, 20, 41, 90))]  # one local, three pooled
    want = [c.token_ids for c in alone.generate(prompts, GREEDY)]
    # Each alone (a step of only pooled work), then all together (pooled and local in one step).
    assert [pool.engine.generate([p], GREEDY)[0].token_ids for p in prompts] == want
    assert [c.token_ids for c in pool.engine.generate(prompts, GREEDY)] == want
    stats = pool.executor.stats()
    assert stats.pooled_total == 6 and stats.pooled == 0
    pool.close()  # the servers have handled every op (the last FREE) once they stop
    for server in pool.servers:
        assert server.phase_totals["prefill_steps"] == 4  # three alone, one together
        assert server.phase_totals["decode_steps"] >= 3 * (GREEDY.max_tokens - 1)
        assert server.cache.seq_ids() == [] and not server.handles  # every shard freed when done


def test_members_hold_their_zigzag_blocks_until_freed(pool):
    n, rid = 60, None
    rid = pool.engine.add_request(None, GREEDY, prompt_token_ids=prompt(n, 7))
    pool.engine.step()  # the prefill
    # Three parts of 60 rows, zigzag: 20 rows on the base and on each member.
    assert pool.executor.seqs_per_member() == {1: 1, 2: 1}
    assert [used for _mid, used, _share in pool.executor.stats().members_kv] == [20, 20]
    pool.engine.abort(rid)
    assert [used for _mid, used, _share in pool.executor.stats().members_kv] == [0, 0]


def test_a_lost_group_recomputes_pooled_requests_locally(pool, alone):
    p = prompt(50, 3)
    [want] = alone.generate([p], GREEDY)
    pool.engine.add_request(None, GREEDY, prompt_token_ids=p)
    got = [t for _ in range(4) for out in pool.engine.step().outputs for t in out.new_token_ids]
    assert pool.executor.stats().pooled == 1
    # What a base does when a member dies mid-step: drop the group, prefill pooled requests again.
    pool.engine.recompute(pool.executor.abandon())
    while pool.engine.has_unfinished():
        got += [t for out in pool.engine.step().outputs for t in out.new_token_ids]
    assert got == list(want.token_ids)
    assert pool.executor.stats().pooled == 0 and pool.executor.stats().epoch == 1
