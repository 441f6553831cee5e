"""A request that fails, fails alone: errors while sampling, detokenizing or computing one request's step leave
the other requests running, and the block pool whole. Also the engine-side limits and logit_bias."""

from __future__ import annotations

import pytest

from localmoe import LLM, SamplingParams
from localmoe.engine.llm_engine import LLMEngine, RequestError
from localmoe.sampling_params import SamplingParamsError

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_mixtral_dir) -> LLM:
    return LLM(model=str(tiny_mixtral_dir), dtype="float32", kv_cache_memory=2**23, max_num_seqs=8)


def run(engine: LLMEngine, prompts: dict[str, str], params: SamplingParams = GREEDY) -> tuple[dict, dict]:
    """Serve `prompts` (request id -> text) to the end: (finished outputs, failures) by request id."""
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, prompt, None, params)
    finished, failures = {}, {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
        failures.update(engine.take_failures())
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks  # nothing leaked
    return finished, failures


@pytest.fixture
def alone(llm: LLM) -> list[int]:
    return llm.generate("the good one", GREEDY)[0].outputs[0].token_ids


def test_a_detokenizer_error_fails_only_its_request(llm: LLM, alone: list[int], monkeypatch) -> None:
    engine = llm.engine
    real = engine._append_token

    def append(seq, *args):
        if seq.request.request_id == "bad" and seq.num_output_tokens == 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "poisoned")
        real(seq, *args)

    monkeypatch.setattr(engine, "_append_token", append)
    finished, failures = run(engine, {"good": "the good one", "bad": "the bad one"})
    assert set(failures) == {"bad"} and isinstance(failures["bad"], UnicodeDecodeError)
    assert finished["good"].outputs[0].token_ids == alone


def test_a_row_that_cannot_be_sampled_fails_only_its_request(llm: LLM, alone: list[int], monkeypatch) -> None:
    engine = llm.engine
    sampler_class = type(engine.sampler)
    real = sampler_class.__call__
    calls = []

    def sample(self, logits, seqs):
        calls.append(len(seqs))
        if any(s.request.request_id == "bad" for s in seqs):
            raise OverflowError("poisoned row")
        return real(self, logits, seqs)

    monkeypatch.setattr(sampler_class, "__call__", sample)
    finished, failures = run(engine, {"good": "the good one", "bad": "the bad one"})
    assert set(failures) == {"bad"} and isinstance(failures["bad"], OverflowError)
    assert finished["good"].outputs[0].token_ids == alone
    assert calls[:3] == [2, 1, 1]  # the batch failed, then each row was drawn alone


def test_a_failed_forward_pass_fails_its_step_and_the_engine_serves_on(llm: LLM, alone: list[int],
                                                                       monkeypatch) -> None:
    engine = llm.engine
    real = engine.runner.execute
    failed_once = []

    def execute(batch):
        if not failed_once:
            failed_once.append([s.request.request_id for s in batch.seqs])
            raise RuntimeError("the forward pass broke")
        return real(batch)

    monkeypatch.setattr(engine.runner, "execute", execute)
    _, failures = run(engine, {"first": "the first one"})
    assert set(failures) == {"first"} == set(failed_once[0])
    finished, failures = run(engine, {"good": "the good one"})
    assert not failures and finished["good"].outputs[0].token_ids == alone


def test_recover_makes_the_pool_whole(llm: LLM) -> None:
    engine = llm.engine
    engine.add_request("held", "hold some blocks", None, GREEDY)
    engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    assert engine.recover() == ["held"]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("fields, param", [
    ({"top_k": 10**6}, "top_k"), ({"n": 9}, "n"), ({"logprobs": 21}, "logprobs"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"), ({"stop_token_ids": [10**6]}, "stop_token_ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"logit_bias": {10**6: 1.0}}, "logit_bias"),
])
def test_engine_limits_name_the_field(llm: LLM, fields: dict, param: str) -> None:
    with pytest.raises(RequestError) as error:
        llm.engine.make_request("r", "a", None, SamplingParams(**fields))
    assert error.value.param == param


@pytest.mark.parametrize("fields, param", [
    ({"seed": 2**63}, "seed"), ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"repetition_penalty": 2.5}, "repetition_penalty"), ({"temperature": float("nan")}, "temperature"),
    ({"presence_penalty": float("nan")}, "presence_penalty"), ({"min_tokens": 17}, "min_tokens"),
    ({"stop": ["x"] * 65}, "stop"), ({"stop": ["x" * 257]}, "stop"), ({"logit_bias": {1: 101.0}}, "logit_bias"),
])
def test_sampling_params_refuse_values_they_cannot_honour(fields: dict, param: str) -> None:
    with pytest.raises(SamplingParamsError) as error:
        SamplingParams(**fields)
    assert error.value.param == param


def test_logit_bias_steers_the_draw(llm: LLM) -> None:
    plain = llm.generate("bias me", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    target = next(t for t in range(5, 50) if t not in plain.outputs[0].token_ids)
    biased = llm.generate("bias me", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True,
                                                    logit_bias={target: 100.0}))[0]
    assert biased.outputs[0].token_ids == [target] * 4
    banned = plain.outputs[0].token_ids[0]
    avoided = llm.generate("bias me", SamplingParams(max_tokens=1, temperature=0, ignore_eos=True,
                                                     logit_bias={banned: -100.0}))[0]
    assert avoided.outputs[0].token_ids[0] != banned
