"""Routing traces record what the router really chose, and only when asked."""

from __future__ import annotations

import torch

from localmoe import LLM, SamplingParams
from localmoe.experts.trace import read_trace


def test_trace_records_every_token_and_layer(tiny_mixtral_dir, tmp_path):
    path = tmp_path / "trace.jsonl"
    llm = LLM(model=str(tiny_mixtral_dir), dtype="float32", kv_cache_memory=2**22, routing_trace=str(path))
    router_logits: list[torch.Tensor] = []
    llm.engine.model.layers[1].mlp.gate.register_forward_hook(lambda m, i, out: router_logits.append(out))
    prompt = llm.get_tokenizer().encode("route these tokens")
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]

    records = list(read_trace(path))
    tokens = [t for r in records for t in r["tokens"]]
    assert tokens == (prompt + out.outputs[0].token_ids)[:len(tokens)]
    assert len(tokens) == len(prompt) + 4  # the last sampled token is never fed back
    assert all(len(r["experts"]) == len(llm.engine.model.layers) for r in records)
    recorded = [set(choice) for r in records for choice in r["experts"][1]]
    expected = [set(row) for row in torch.cat(router_logits).topk(2, dim=-1).indices.tolist()]
    assert recorded == expected


def test_no_trace_unless_asked(tiny_mixtral_dir):
    llm = LLM(model=str(tiny_mixtral_dir), dtype="float32", kv_cache_memory=2**22)
    assert llm.engine.trace is None
    llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=2))
    assert int(llm.engine.observer.tokens.sum()) > 0  # the statistics still see the routing
