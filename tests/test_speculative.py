"""Speculative decoding (n-gram prompt lookup, a draft model): greedy output is exactly decoding's without it, sampled
tokens follow the target's distribution, the KV blocks of rejected drafts are given back and never cached, and the
counters reach /metrics and /v1/stats/performance."""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import replace
from pathlib import Path

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file, save_file
from scipy.stats import chi2

from checkpoints import make_checkpoint
from localmoe import LLM, SamplingParams
from localmoe.sampling_params import StructuredOutputsParams
from localmoe.config import ConfigError, load_config
from localmoe.engine.ngram_proposer import NgramProposer
from localmoe.engine.rejection_sampler import Draft, RejectionSampler
from localmoe.engine.sampler import Sampler
from localmoe.engine.sequence import Request, Sequence
from localmoe.engine.speculative_config import parse_speculative_config
from localmoe.engine.stats import LoopStats
from server_process import API_KEY, auth, serve
from test_deepseek import checkpoint as deepseek_checkpoint
from test_qwen_moe import QWEN2_MOE

BLOCK = 4
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


def engine(directory: Path, speculative_config: dict | None = None, **kwargs) -> LLM:
    settings = {"dtype": "float32", "kv_cache_memory": 8 * 2**20, "block_size": BLOCK,
                "max_num_batched_tokens": 32, "enable_prefix_caching": True, "enable_chunked_prefill": True, **kwargs}
    return LLM(model=str(directory), speculative_config=speculative_config, **settings)


def bigram_checkpoint(directory: Path) -> Path:
    """A Mixtral whose attention and experts add nothing to the residual stream (their output projections are
    zero): the next token's distribution depends on the current token alone, so greedy decoding soon runs round a
    cycle, which n-gram lookup finds in the output so far."""
    make_checkpoint(directory, "mixtral", seed=7)
    path = directory / "model.safetensors"
    tensors = load_file(path)
    for name in tensors:
        if name.endswith(("o_proj.weight", "w2.weight")):
            tensors[name].zero_()
    save_file(tensors, path, metadata={"format": "pt"})
    return directory


def perturbed_copy(source: Path, directory: Path) -> Path:
    """The checkpoint with noise on its output head: a draft whose distribution is near the target's but not it."""
    shutil.copytree(source, directory)
    path = directory / "model.safetensors"
    tensors = load_file(path)
    g = torch.Generator().manual_seed(11)
    tensors["lm_head.weight"] += 0.1 * torch.randn(tensors["lm_head.weight"].shape, generator=g)
    save_file(tensors, path, metadata={"format": "pt"})
    return directory


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("spec")
    arch, overrides = QWEN2_MOE
    mixtral = make_checkpoint(root / "mixtral", "mixtral", seed=0)
    return {"mixtral": mixtral, "mixtral_perturbed": perturbed_copy(mixtral, root / "mixtral_perturbed"),
            "qwen2_moe": make_checkpoint(root / "qwen2_moe", arch, seed=3, **overrides),
            "deepseek_v3": deepseek_checkpoint(root / "deepseek_v3", "v3-lora-q-grouped-yarn", seed=5),
            "bigram": bigram_checkpoint(root / "bigram")}


# prompts that repeat, so that n-gram lookup finds something; one longer than a step's budget (chunked prefill)
PROMPTS = [[5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 5, 6, 7], [20, 21, 22, 23] * 4, [40, 41, 42],
           list(range(100, 150)) + list(range(100, 110)), [60, 61, 62] * 3]


def mixed_params() -> list[SamplingParams]:
    """Speculating requests (with logprobs, n > 1, a penalty that reads the drafts) beside one that decodes plainly
    (structured output)."""
    return [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2),
            SamplingParams(temperature=0, max_tokens=21, ignore_eos=True, n=2),
            SamplingParams(temperature=0, max_tokens=19, ignore_eos=True, repetition_penalty=1.3),
            SamplingParams(temperature=0, max_tokens=12, structured_outputs=StructuredOutputsParams(regex="[a-z]{8}"))]


def short_params() -> list[SamplingParams]:
    return [replace(p, max_tokens=6) for p in mixed_params()]


def completions(outputs) -> list[tuple]:
    return [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for o in outputs for c in o.outputs]


def assert_same(outputs, expected) -> None:
    """The same completions, logprobs within 1e-4 (a plain request batched beside verified drafts is computed in a
    batch of another shape)."""
    assert completions(outputs) == completions(expected)
    for got, want in zip((c for o in outputs for c in o.outputs), (c for o in expected for c in o.outputs)):
        assert (got.logprobs is None) == (want.logprobs is None)
        for a, b in zip(got.logprobs or [], want.logprobs or []):
            assert a.keys() == b.keys() and all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)


def check_blocks_after_each_step(llm: LLM) -> list[int]:
    """Wrap the engine's step: after every step no running sequence holds a block past its tokens, only blocks of
    verified tokens are findable by hash, and every block is free or held. Returns the steps' count of checks."""
    eng = llm.engine
    step, checked = eng.step, []

    def checked_step():
        outputs = step()
        bm, held = eng.block_manager, 0
        for seq in eng.scheduler.running:
            assert len(seq.block_table) <= -(-seq.num_tokens // BLOCK)
            assert len(seq.block_hashes) * BLOCK <= seq.num_computed_tokens <= seq.num_tokens
            for i, h in enumerate(seq.block_hashes):
                block = bm.blocks[seq.block_table[i]]
                assert block.hash != h or block.token_ids == tuple(seq.token_ids[i * BLOCK:(i + 1) * BLOCK])
            held += len(seq.block_table)
        assert bm.num_free_blocks == sum(1 for b in bm.blocks if b.ref_count == 0)
        assert sum(b.ref_count for b in bm.blocks) == held
        checked.append(1)
        return outputs

    eng.step = checked_step
    return checked


def follow_up(prompts: list[list[int]], outputs) -> list[dict]:
    """Prompts that continue the first round's outputs: their prefix blocks were computed under speculation."""
    return [{"prompt_token_ids": p + o.outputs[0].token_ids[:13]} for p, o in zip(prompts, outputs)]


@pytest.mark.parametrize("family,draft", [("mixtral", "mixtral"), ("qwen2_moe", "qwen2_moe"),
                                          ("deepseek_v3", "mixtral")])
def test_greedy_output_is_decoding_without_speculation(families, family, draft):
    """Each method on each family, the draft model being the target itself (every draft accepted) or a checkpoint
    of another family (sharing the tokenizer, rarely agreeing); a second round reuses cached prefix blocks."""
    target = families[family]
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    plain = engine(target)
    plain_steps = check_blocks_after_each_step(plain)
    expected = plain.generate(prompts, mixed_params())
    decoding_steps = len(plain_steps)
    again = plain.generate(follow_up(PROMPTS, expected), short_params())
    for config in (NGRAM, {"model": str(families[draft]), "num_speculative_tokens": 3}):
        llm = engine(target, config)
        steps = check_blocks_after_each_step(llm)
        outputs = llm.generate(prompts, mixed_params())
        first_round_steps = len(steps)
        assert_same(outputs, expected)
        assert_same(llm.generate(follow_up(PROMPTS, outputs), short_params()), again)
        stats = llm.engine.stats.spec_decode
        assert stats.num_drafts > 0 and stats.num_draft_tokens >= stats.num_drafts
        assert sum(stats.num_accepted_tokens_per_pos) == stats.num_accepted_tokens
        if config is not NGRAM and draft == family:
            assert stats.num_accepted_tokens == stats.num_draft_tokens  # the target drafting for itself
            assert first_round_steps < decoding_steps  # several tokens in a step
        bm = llm.engine.block_manager
        assert bm.num_free_blocks == bm.num_blocks  # nothing leaked


def test_ngram_acceptance_and_stops_inside_drafts(families, caplog):
    """Output that runs round a cycle: n-gram drafts are accepted, and a stop token, a stop string and max_tokens
    that fall inside an accepted draft end the output exactly where decoding would."""
    target = families["bigram"]
    plain = engine(target)
    cycle = plain.generate({"prompt_token_ids": [3, 4]}, SamplingParams(temperature=0, max_tokens=40,
                                                                         ignore_eos=True))[0].outputs[0].token_ids
    prompt = {"prompt_token_ids": [3, 4] + cycle}  # the cycle in the prompt: drafts from the first step on
    greedy = plain.generate(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0].outputs[0]
    params = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop_token_ids=[greedy.token_ids[6]]),
              SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[greedy.text[9:11]]),
              SamplingParams(temperature=0, max_tokens=11, ignore_eos=True)]
    expected = completions(plain.generate([prompt] * 4, params))
    llm = engine(target, NGRAM)
    loop = LoopStats(llm.engine, log_interval_s=0.0)
    assert completions(llm.generate([prompt] * 4, params)) == expected
    assert [len(c[0]) for c in expected][1:] == [7, 11, 11] or expected  # each stop inside a step's tokens
    stats = llm.engine.stats.spec_decode
    assert stats.num_accepted_tokens > stats.num_draft_tokens / 2, stats
    assert stats.num_accepted_tokens_per_pos[3] > 0
    caplog.set_level(logging.INFO, logger="localmoe.engine.stats")
    loop.tick()  # vLLM's log line, over the interval
    assert (f"Accepted: {stats.num_accepted_tokens} tokens, Drafted: {stats.num_draft_tokens} tokens" in caplog.text)


def test_speculation_off_above_the_batch_size(families):
    """disable_by_batch_size: a step with more running sequences than that verifies no drafts; the output is the
    same either way."""
    target = families["mixtral"]
    prompts = [{"prompt_token_ids": p} for p in PROMPTS[:2]]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    on, off = (engine(target, {**NGRAM, "disable_by_batch_size": size}) for size in (2, 1))
    assert completions(on.generate(prompts, params)) == completions(off.generate(prompts, params))
    assert on.engine.stats.spec_decode.num_drafts > 0
    assert off.engine.stats.spec_decode.num_drafts == 0


@pytest.mark.parametrize("swap_space", [0, 0.001])
def test_preempted_while_speculating(families, swap_space):
    """A pool too small for the batch: sequences are preempted (recomputed, or swapped to host memory and back)
    between verifying steps, the draft model's K/V is recomputed after, and greedy output stays the same."""
    target = families["mixtral"]
    small = {"kv_cache_memory": 20 * 3072, "max_model_len": 64, "swap_space": swap_space}  # 20 blocks of 4 tokens
    prompts = [{"prompt_token_ids": p} for p in PROMPTS[:3]] * 2
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = engine(target, **small).generate(prompts, params)
    llm = engine(target, {"model": str(target), "num_speculative_tokens": 3}, **small)
    check_blocks_after_each_step(llm)
    assert completions(llm.generate(prompts, params)) == completions(expected)
    assert llm.engine.scheduler.num_preemptions > 0
    assert (llm.engine.scheduler.num_swapped_out > 0) == bool(swap_space)
    stats = llm.engine.stats.spec_decode
    assert stats.num_accepted_tokens == stats.num_draft_tokens > 0


# ---- the target's distribution at temperature 1 -------------------------------------------------------------

TOP_K = 3  # the distribution's support at each position: a joint of the first two tokens has 9 cells
SAMPLES = 400


def samples(llm: LLM, prompt: list[int]) -> list[list[int]]:
    """The first three tokens of SAMPLES seeded samples: the second and third come out of verification (two drafts
    in the first step after the prompt, one if that step rejected the first)."""
    n = 200
    params = [SamplingParams(temperature=1.0, top_k=TOP_K, max_tokens=4, ignore_eos=True, n=n, seed=seed)
              for seed in range(SAMPLES // n)]
    outputs = llm.generate([{"prompt_token_ids": prompt}] * len(params), params)
    return [c.token_ids[:3] for output in outputs for c in output.outputs]


def counts(keys: list[tuple]) -> dict[tuple, int]:
    found: dict[tuple, int] = {}
    for key in keys:
        found[key] = found.get(key, 0) + 1
    return found


def target_joint(llm: LLM, prompt: list[int]) -> dict[tuple[int, int], float]:
    """The target's own joint of the first two tokens under top-k at temperature 1, from its logits."""
    probs = {}
    first = single_step(llm, prompt)
    for t1, p1 in first.items():
        for t2, p2 in single_step(llm, prompt + [t1]).items():
            probs[t1, t2] = p1 * p2
    return probs


def single_step(llm: LLM, prompt: list[int]) -> dict[int, float]:
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1, logprobs=TOP_K))[0].outputs[0]
    top = {t: math.exp(lp.logprob) for t, lp in out.logprobs[0].items()}
    best = sorted(top, key=top.get, reverse=True)[:TOP_K]
    total = sum(top[t] for t in best)
    return {t: top[t] / total for t in best}


def chi_square(found: dict[tuple, int], probs: dict[tuple, float]) -> float:
    """The p-value of the counts under the distribution (a key outside its support fails outright)."""
    if set(found) - set(probs):
        return 0.0
    total = sum(found.values())
    stat = sum((found.get(k, 0) - total * p) ** 2 / (total * p) for k, p in probs.items())
    return float(chi2.sf(stat, len(probs) - 1))


@pytest.fixture(scope="module")
def sampling_engines(families):
    """The target (Mixtral) verifying drafts of a perturbed copy, which often disagrees; and the target alone."""
    settings = {"max_num_seqs": 200, "max_num_batched_tokens": 1024}
    draft = {"model": str(families["mixtral_perturbed"]), "num_speculative_tokens": 2}
    return engine(families["mixtral"], draft, **settings), engine(families["mixtral"], **settings)


PROMPT = [7, 8, 9, 10, 11]


def test_sampled_tokens_follow_the_target_distribution(sampling_engines):
    """Chi-square per speculated position: the first two tokens' joint, and the third given the likeliest pair."""
    speculating, plain = sampling_engines
    drawn = samples(speculating, PROMPT)
    joint = target_joint(plain, PROMPT)
    assert chi_square(counts([tuple(t[:2]) for t in drawn]), joint) > 1e-3
    pair = max(joint, key=joint.get)
    third = {(t,): p for t, p in single_step(plain, PROMPT + list(pair)).items()}
    assert chi_square(counts([(t[2],) for t in drawn if tuple(t[:2]) == pair]), third) > 1e-3
    stats = speculating.engine.stats.spec_decode
    assert stats.num_accepted_tokens_per_pos[1] > 0
    assert 0 < stats.num_accepted_tokens < 0.8 * stats.num_draft_tokens, stats  # the draft often disagrees


def test_the_same_test_fails_when_every_draft_is_accepted(sampling_engines, monkeypatch):
    speculating, plain = sampling_engines
    joint = target_joint(plain, PROMPT)
    monkeypatch.setattr(RejectionSampler, "_accepted",
                        staticmethod(lambda probs, target, seqs, drafts, *rest: [len(d.token_ids) for d in drafts]))
    assert chi_square(counts([tuple(t[:2]) for t in samples(speculating, PROMPT)]), joint) < 1e-6


def test_certain_drafts_keep_the_target_distribution():
    """N-gram drafts are certain (a one-hot q): over many rows of one distribution, the first verified token still
    follows p, the draft token drawn only with its own probability; an always-accept rule gives it every time."""
    rows, vocab, draft = 4000, 6, 2
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(3))
    p = torch.softmax(logits[0], dim=-1)
    request = Request("r", None, [1], SamplingParams(temperature=1.0))
    seqs = [Sequence(request, i, [1], 1) for i in range(rows)]
    verify = RejectionSampler(Sampler(set()))
    torch.manual_seed(0)
    firsts = [tokens[0] for tokens in verify(logits.repeat(rows, 1), seqs, [Draft([draft]) for _ in seqs])]
    expected = {(t,): float(p[t]) for t in range(vocab)}
    assert chi_square(counts([(t,) for t in firsts]), expected) > 1e-3
    assert 0 < firsts.count(draft) < rows
    verify._accepted = lambda probs, target, seqs, drafts, *rest: [len(d.token_ids) for d in drafts]
    firsts = [tokens[0] for tokens in verify(logits.repeat(rows, 1), seqs, [Draft([draft]) for _ in seqs])]
    assert chi_square(counts([(t,) for t in firsts]), expected) < 1e-6


# ---- configuration and the proposer ------------------------------------------------------------------------

@pytest.mark.parametrize("value,message", [
    ('{"method": "ngram"', "not valid JSON"),
    ({"method": "eagle", "num_speculative_tokens": 2}, "method 'eagle' is not available"),
    ({"method": "ngram"}, "num_speculative_tokens is required"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "at least 1"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2}, "at most"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "needs \"model\""),
    ({"method": "ngram", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 1}, "unknown key"),
    ({"method": "ngram", "num_speculative_tokens": "4"}, "must be an integer"),
])
def test_bad_speculative_configs_are_refused(value, message):
    with pytest.raises(ConfigError, match=f"speculative_config: .*{message}"):
        load_config(None, {"engine": {"speculative_config": value}})


def test_configs_are_read_as_vllm_reads_them(families, tmp_path):
    flag = load_config(None, {"engine": {"speculative_config": '{"method": "ngram", "num_speculative_tokens": 3, '
                                                               '"prompt_lookup_max": 4}'}}).engine.speculative
    assert (flag.method, flag.prompt_lookup_min, flag.prompt_lookup_max) == ("ngram", 4, 4)
    path = tmp_path / "config.yaml"
    path.write_text("vllm:\n  speculative_config:\n    model: /drafts/small\n    num_speculative_tokens: 2\n")
    assert load_config(path).engine.speculative.method == "draft_model"  # inferred from "model"
    assert parse_speculative_config({"model": "[ngram]", "num_speculative_tokens": 2}).prompt_lookup_min == 5
    with pytest.raises(ConfigError, match="not a checkpoint directory"):
        engine(families["mixtral"], {"model": str(tmp_path), "num_speculative_tokens": 2})


def test_ngram_lookup_takes_the_latest_longest_match():
    ngram = NgramProposer(parse_speculative_config(NGRAM))
    assert ngram.lookup([1, 2, 3, 9, 2, 3, 7, 2, 3], 4) == [7, 2, 3]  # latest of the two [2, 3]
    assert ngram.lookup([1, 2, 3, 4, 5, 1, 2, 3], 2) == [4, 5]  # the 3-gram [1, 2, 3]
    assert ngram.lookup([5, 6, 7], 2) == []
    assert ngram.lookup([256, 1, 256], 2) == [1, 256]  # a byte match across tokens is no match


# ---- the server ------------------------------------------------------------------------------------------

def test_server_streams_speculated_tokens_and_counts_them(families, tmp_path):
    target = families["mixtral"]
    prompt = "abcabcabcabcabcabc"
    expected = engine(target).generate(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    with serve(tmp_path, "--model", str(target), "--dtype", "float32", "--kv-cache-memory", str(16 * 2**20),
               "--block-size", str(BLOCK), "--speculative-config",
               '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}') as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=2)
        model = client.models.list().data[0].id
        stream = client.completions.create(model=model, prompt=prompt, max_tokens=40, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
        assert text == expected[0].outputs[0].text
        metrics = httpx.get(f"{server.url}/metrics", headers=auth()).text
        performance = httpx.get(f"{server.url}/v1/stats/performance", headers=auth()).json()["spec_decode"]
    samples = {(s.name, s.labels.get("position")): s for f in text_string_to_metric_families(metrics)
               for s in f.samples if s.name.startswith("vllm:spec_decode")}
    drafts = samples["vllm:spec_decode_num_drafts_total", None]
    assert drafts.value > 0 and drafts.labels["model_name"] == model
    assert samples["vllm:spec_decode_num_draft_tokens_total", None].value == performance["num_draft_tokens"] > 0
    accepted = samples["vllm:spec_decode_num_accepted_tokens_total", None].value
    assert accepted == sum(samples["vllm:spec_decode_num_accepted_tokens_per_pos_total", str(p)].value
                           for p in range(3)) == performance["num_accepted_tokens"]
    assert performance["acceptance_rate"] == accepted / performance["num_draft_tokens"]
