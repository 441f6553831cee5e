"""The offline API end to end on a tiny checkpoint."""

from __future__ import annotations

import pytest

from localmoe import LLM, SamplingParams
from localmoe.sampling_params import SamplingParamsError


@pytest.fixture(scope="module")
def llm(tiny_mixtral_dir):
    return LLM(model=str(tiny_mixtral_dir), dtype="float32", kv_cache_memory=2**23)


def test_generate_strings_and_token_ids(llm):
    tok = llm.get_tokenizer()
    outs = llm.generate(["Hello there", {"prompt_token_ids": tok.encode("Hello there")}],
                        SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    assert len(outs[0].outputs[0].token_ids) == 8
    assert outs[0].outputs[0].text == tok.decode(outs[0].outputs[0].token_ids)
    assert outs[0].outputs[0].finish_reason == "length"


def test_n_seed_and_temperature(llm):
    params = SamplingParams(n=2, max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    first = llm.generate("abc", params)[0]
    again = llm.generate("abc", params)[0]
    other = llm.generate("abc", SamplingParams(n=2, max_tokens=12, temperature=1.0, seed=8, ignore_eos=True))[0]
    assert [o.index for o in first.outputs] == [0, 1]
    assert first.outputs[0].token_ids != first.outputs[1].token_ids
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in again.outputs]
    assert [o.token_ids for o in first.outputs] != [o.token_ids for o in other.outputs]


def test_stop_strings_and_stop_token_ids(llm):
    free = llm.generate("stop test", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0].outputs[0]
    stop = free.text[5:7]
    cut = llm.generate("stop test", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                                   stop=[stop]))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == free.text[:free.text.index(stop)]
    token = free.token_ids[3]
    by_id = llm.generate("stop test", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                                     stop_token_ids=[token]))[0].outputs[0]
    assert by_id.token_ids == free.token_ids[:free.token_ids.index(token) + 1]
    assert by_id.stop_reason == token


def test_logprobs_come_back_per_token(llm):
    out = llm.generate("abc", SamplingParams(max_tokens=3, temperature=0, logprobs=2, ignore_eos=True))[0].outputs[0]
    assert len(out.logprobs) == 3
    for token, entry in zip(out.token_ids, out.logprobs):
        assert token in entry and len(entry) <= 3
        assert entry[token].logprob == max(lp.logprob for lp in entry.values())  # greedy picks the best
    assert out.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs)))


def test_chat_uses_the_template(llm):
    out = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    tok = llm.get_tokenizer()
    expected = tok.encode("<|user|>\nhi<|end|>\n<|assistant|>\n", add_special_tokens=False)
    assert out.prompt_token_ids == expected


def test_invalid_params_and_prompts_are_refused(llm):
    with pytest.raises(SamplingParamsError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(SamplingParamsError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="maximum context length"):
        llm.generate({"prompt_token_ids": [5] * 5000})
    assert llm.engine.block_manager.usage == 0


def test_random_model_is_shaped_by_the_model_section():
    llm = LLM(model="localmoe-random", max_model_len=256, kv_cache_memory=2**26)
    assert llm.engine.model_name == "localmoe-random"
    hf = llm.engine.hf_config
    assert hf["num_local_experts"] == 8 and hf["num_experts_per_tok"] == 2 and hf["hidden_size"] == 768
    out = llm.generate("Hello", SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 4


def test_prompt_logprobs_match_transformers(tiny_mixtral_dir, llm):
    import torch

    from checkpoints import reference_model

    ids = llm.get_tokenizer().encode("a longer prompt whose every token is scored")
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=1))[0]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    with torch.no_grad():
        expected = torch.log_softmax(reference_model(tiny_mixtral_dir)(torch.tensor([ids])).logits[0], -1)
    for position, entry in enumerate(out.prompt_logprobs[1:]):
        target = ids[position + 1]
        assert abs(entry[target].logprob - expected[position, target].item()) < 1e-4
