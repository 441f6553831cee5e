"""The shipped, trained built-in model: the same parity bar as every checkpoint, plus its perplexity."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from checkpoints import reference_model
from localmoe import LLM, SamplingParams
from localmoe.models.builtin import SHIPPED_DIR
from localmoe.train.corpus import read_documents
from localmoe.train.evaluate import SAMPLE_FILE, perplexity, token_windows

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(dtype="float32")  # no model: the built-in one


@pytest.fixture(scope="module")
def ref():
    return reference_model(SHIPPED_DIR)


@pytest.fixture(scope="module")
def windows(llm) -> list[list[int]]:
    return token_windows(llm.get_tokenizer(), read_documents(SHIPPED_DIR / SAMPLE_FILE))


def test_default_model_is_the_shipped_checkpoint(llm):
    assert llm.engine.model_name == "localmoe-builtin"
    assert sum(f.stat().st_size for f in SHIPPED_DIR.iterdir()) < 40 * 2**20


def test_logits_match_transformers(llm, ref, windows):
    prompts = [w[:n] for w, n in zip(windows[:3], (40, 97, 256))]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=1, prompt_logprobs=0))
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            expected = torch.log_softmax(ref(torch.tensor([prompt])).logits[0].float(), -1)
        got = torch.tensor([e[t].logprob for t, e in zip(prompt[1:], out.prompt_logprobs[1:])])
        want = expected[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
        assert (got - want).abs().max().item() <= 1e-4


def test_perplexity_matches_transformers_and_the_readme(llm, ref, windows):
    ours = perplexity(llm, windows)
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logprobs = torch.log_softmax(ref(torch.tensor([w])).logits[0].float(), -1)
            nll -= logprobs[torch.arange(len(w) - 1), torch.tensor(w[1:])].sum().item()
            count += len(w) - 1
    theirs = math.exp(nll / count)
    assert abs(ours - theirs) / theirs < 0.01
    readme = float(re.search(r"held-out\s+perplexity of ([\d.]+)", README.read_text()).group(1))
    assert ours < readme * 1.05


def test_greedy_generation_matches_transformers(llm, ref):
    prompt = llm.get_tokenizer().encode("It is a truth universally acknowledged, that")
    ours = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=32, temperature=0))[0]
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt):].tolist()
    assert ours.outputs[0].token_ids == theirs[:len(ours.outputs[0].token_ids)]
    assert len(ours.outputs[0].token_ids) == len(theirs) or ours.outputs[0].finish_reason == "stop"
