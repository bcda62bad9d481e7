"""A checkpoint loaded by fapool gives transformers' logits and greedy tokens on the same weights."""
import pytest
import torch

from fapool import EngineConfig, LLMEngine, SamplingParams
from fapool.executor import LocalAttention
from fapool.paged_cache import PagedKVCache
from fapool.step_batch import SeqSlice, StepBatch
from tests.helpers.checkpoints import make_llama_checkpoint, make_qwen2_checkpoint

STEPS = 32


@pytest.fixture(scope="module", params=["llama-gqa", "llama-tied", "qwen2-bias"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "llama-gqa":
        return make_llama_checkpoint(path, gqa=True)
    if request.param == "llama-tied":
        return make_llama_checkpoint(path, gqa=False, tie=True, seed=3)
    return make_qwen2_checkpoint(path)


@pytest.fixture(scope="module")
def pair(checkpoint):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    engine = LLMEngine(EngineConfig(model=str(checkpoint), device="cpu", kv_capacity_tokens=4096))
    return hf, engine


def prompts(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (5, 17, 40, 9)]


def test_prefill_logits_match(pair):
    hf, engine = pair
    ids = prompts(engine.loaded.config.vocab_size)[2]
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]  # (T, V)
    seq_id = "logits"
    loaded = engine.loaded  # the model forward alone, over a cache of its own
    cache = PagedKVCache(loaded.config, 4096, loaded.dtype, loaded.device)
    executor = LocalAttention(cache, engine.kernel)
    cache.allocate(seq_id, len(ids))
    executor.begin_step(StepBatch("prefill", (SeqSlice(seq_id, 0, len(ids)),)))
    hidden = engine.model(torch.tensor(ids), torch.arange(len(ids)), executor)
    executor.end_step()
    got = engine.model.logits(hidden)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def hf_greedy(hf, ids, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


def test_greedy_tokens_match_single_and_batched(pair):
    hf, engine = pair
    ps = prompts(engine.loaded.config.vocab_size, seed=1)
    want = [hf_greedy(hf, p, STEPS) for p in ps]
    params = SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True)
    single = [list(engine.generate([p], params)[0].token_ids) for p in ps]
    batched = [list(c.token_ids) for c in engine.generate(ps, params)]
    assert single == want
    assert batched == want
    assert len({tuple(w) for w in want}) == len(want)  # the prompts really lead to different text
