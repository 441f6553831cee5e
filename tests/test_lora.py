"""Multi-LoRA (lora/): PEFT writes adapters with random, non-zero factors (init_lora_weights=False) for a tiny
random Mixtral, and LocalMoE's outputs under each adapter equal transformers + PEFT's on the same weights, alone and
mixed with another adapter and the base model in one batch, offline and through `localmoe serve`."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
import torch
from openai import OpenAI
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from checkpoints import make_checkpoint, reference_model
from family_parity import TOL, engine, prompts_of, record_logits, reference_greedy, reference_logits
from localmoe import LoRARequest, SamplingParams
from localmoe.config import ConfigError, load_config
from localmoe.engine.llm_engine import RequestError
from localmoe.lora.adapter import AdapterError
from localmoe.server.lora_admin import LORA_PATHS, lora_admin_paths
from server_process import API_KEY, SMALL_KV, auth, serve

ADMIN_KEY = "sk-localmoe-admin"
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
ADAPTERS = {
    # attention projections (q, v: pieces of the merged qkv_proj) and the routed experts, fused as transformers 5
    # holds them (PEFT's target_parameters)
    "attn-experts": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                         target_parameters=["experts.gate_up_proj", "experts.down_proj"]),
    # another rank and rsLoRA's scale, on k and q
    "rslora-qk": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["k_proj", "q_proj"]),
}


def write_adapter(base_dir, out_dir, seed: int, **settings):
    """PEFT's adapter for the checkpoint at `base_dir`, both factors random; returns the PEFT model (the reference)."""
    torch.manual_seed(seed)
    model = get_peft_model(reference_model(base_dir), LoraConfig(init_lora_weights=False, **settings))
    model.save_pretrained(out_dir)
    return model.eval()


@pytest.fixture(scope="module")
def adapters(tiny_mixtral_dir, tmp_path_factory):
    """name -> (directory, PEFT reference model)."""
    root = tmp_path_factory.mktemp("lora-adapters")
    return {name: (root / name, write_adapter(tiny_mixtral_dir, root / name, seed, **settings))
            for seed, (name, settings) in enumerate(ADAPTERS.items(), start=1)}


@pytest.fixture(scope="module")
def llm(tiny_mixtral_dir, adapters):
    return engine(tiny_mixtral_dir, enable_lora=True, max_loras=2)


def lora(adapters, name: str | None) -> LoRARequest | None:
    return None if name is None else LoRARequest(name, 0, str(adapters[name][0]))


def test_each_adapter_changes_the_output_and_matches_peft(llm, adapters, tiny_mixtral_dir):
    base = reference_model(tiny_mixtral_dir)
    steps = record_logits(llm)
    for prompt in prompts_of([12]):
        base_logits = reference_logits(base, prompt)[-1]
        base_tokens = reference_greedy(base, prompt, GREEDY.max_tokens)
        for name, (_, peft_model) in adapters.items():
            steps.clear()
            out = llm.generate([{"prompt_token_ids": prompt}], GREEDY, lora_request=lora(adapters, name))
            expected = reference_logits(peft_model, prompt)[-1]
            assert (steps[0][0] - expected).abs().max().item() <= TOL
            assert out[0].outputs[0].token_ids == reference_greedy(peft_model, prompt, GREEDY.max_tokens)
            assert (expected - base_logits).abs().max().item() > 100 * TOL  # the adapter changes the output
            assert out[0].outputs[0].token_ids != base_tokens


def test_two_adapters_and_the_base_model_in_one_batch(llm, adapters, tiny_mixtral_dir):
    base = reference_model(tiny_mixtral_dir)
    names = ["attn-experts", None, "rslora-qk", "attn-experts", None, "rslora-qk"]
    prompts = prompts_of([9, 5, 14, 6, 11, 8], seed=3)
    steps = record_logits(llm)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY,
                        lora_request=[lora(adapters, n) for n in names])
    assert steps[0].shape[0] == len(prompts)  # every prompt prefilled in the first step, under its own adapter
    for name, prompt, out in zip(names, prompts, outs):
        reference = base if name is None else adapters[name][1]
        assert out.outputs[0].token_ids == reference_greedy(reference, prompt, GREEDY.max_tokens), name


def per_expert_copy(fused_dir, out_dir, intermediate: int, experts: int):
    """The adapter at `fused_dir` as PEFT writes it for transformers 4's Mixtral, one module per expert
    (`block_sparse_moe.experts.{e}.w1/w3/w2`): the same update in the other layout. (The tiny Mixtral's hidden size
    differs from its intermediate size, so A's width tells gate/up from down.)"""
    out_dir.mkdir()
    shutil.copy(fused_dir / "adapter_config.json", out_dir)
    tensors = load_file(fused_dir / "adapter_model.safetensors")
    per_expert = {key: tensor for key, tensor in tensors.items() if ".experts." not in key}
    for key, a in tensors.items():
        if ".experts." not in key or "lora_A" not in key:
            continue
        b, rank = tensors[key.replace("lora_A", "lora_B")], a.shape[0] // experts
        layer = key.split(".mlp.")[0]
        for e in range(experts):
            a_e, b_e = a.reshape(experts, rank, -1)[e], b.reshape(b.shape[0], rank, experts)[:, :, e]
            parts = ({"w2": b_e} if a.shape[1] == intermediate
                     else {"w1": b_e[:intermediate], "w3": b_e[intermediate:]})
            for projection, factor in parts.items():
                name = f"{layer}.block_sparse_moe.experts.{e}.{projection}"
                per_expert[f"{name}.lora_A.weight"], per_expert[f"{name}.lora_B.weight"] = a_e.clone(), factor.clone()
    save_file(per_expert, out_dir / "adapter_model.safetensors")
    return out_dir


def test_per_expert_adapters_match_the_fused_layout(llm, adapters, tmp_path):
    name = "attn-experts"
    directory, peft_model = adapters[name]
    per_expert = per_expert_copy(directory, tmp_path / "per-expert", 96, 4)
    prompt = prompts_of([11], seed=11)[0]
    out = llm.generate([{"prompt_token_ids": prompt}], GREEDY, lora_request=LoRARequest("per-expert", 0,
                                                                                          str(per_expert)))
    assert out[0].outputs[0].token_ids == reference_greedy(peft_model, prompt, GREEDY.max_tokens)
    assert any(isinstance(piece.index, int) for piece in llm.engine.lora.adapters["per-expert"].pieces)


def test_qwen_moe_adapter_on_dense_shared_and_routed_experts(tmp_path):
    """Another family: Qwen2-MoE with a dense first layer, a gated shared expert and fused routed experts."""
    directory = make_checkpoint(tmp_path / "qwen", "Qwen2Moe", num_experts=4, num_experts_per_tok=2,
                                moe_intermediate_size=32, shared_expert_intermediate_size=48, norm_topk_prob=True,
                                mlp_only_layers=[0])
    peft_model = write_adapter(directory, tmp_path / "adapter", 5, r=4, lora_alpha=8,
                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"],
                               target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    qwen = engine(directory, enable_lora=True)
    steps = record_logits(qwen)
    prompt = prompts_of([12], seed=13)[0]
    out = qwen.generate([{"prompt_token_ids": prompt}], GREEDY, lora_request=LoRARequest("q", 0,
                                                                                         str(tmp_path / "adapter")))
    assert (steps[0][0] - reference_logits(peft_model, prompt)[-1]).abs().max().item() <= TOL
    assert out[0].outputs[0].token_ids == reference_greedy(peft_model, prompt, GREEDY.max_tokens)
    routed = qwen.engine.lora.targets["layers.1.mlp.experts.w13"]
    assert routed.filled and qwen.engine.lora.targets["layers.0.mlp.gate_up_proj.weight"].filled


def test_max_loras_slots_take_turns(tiny_mixtral_dir, adapters):
    """One slot, two adapters asked for at once: the scheduler runs them in turn and each still gets its answer."""
    one_slot = engine(tiny_mixtral_dir, enable_lora=True, max_loras=1)
    prompt = prompts_of([10], seed=5)[0]
    names = list(adapters)
    outs = one_slot.generate([{"prompt_token_ids": prompt}] * 2, GREEDY,
                             lora_request=[lora(adapters, n) for n in names])
    for name, out in zip(names, outs):
        assert out.outputs[0].token_ids == reference_greedy(adapters[name][1], prompt, GREEDY.max_tokens)
    assert one_slot.engine.lora.slot_loads == 2 and len(one_slot.engine.lora.resident) == 1


def test_prefix_cache_never_crosses_adapters(llm, adapters):
    prompt = prompts_of([14], seed=7)[0]  # block_size 4: three full blocks to share
    name, (_, peft_model) = next(iter(adapters.items()))
    blocks = llm.engine.block_manager
    llm.generate([{"prompt_token_ids": prompt}], GREEDY)  # the base model computes the prompt's blocks
    hits = blocks.prefix_cache_hits
    out = llm.generate([{"prompt_token_ids": prompt}], GREEDY, lora_request=lora(adapters, name))
    assert blocks.prefix_cache_hits == hits  # nothing the base model computed was reused by the adapter
    assert out[0].outputs[0].token_ids == reference_greedy(peft_model, prompt, GREEDY.max_tokens)
    again = llm.generate([{"prompt_token_ids": prompt}], GREEDY, lora_request=lora(adapters, name))
    assert blocks.prefix_cache_hits == hits + 12  # the same adapter reuses its own blocks
    assert again[0].outputs[0].token_ids == out[0].outputs[0].token_ids


def test_unsupported_adapters_and_requests_are_refused_by_name(llm, tiny_mixtral_dir, tmp_path):
    cases = {"rank 32 is above --max-lora-rank 16": dict(r=32, target_modules=["q_proj"]),
             "modules_to_save": dict(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
             "use_dora": dict(r=4, target_modules=["q_proj"], use_dora=True),
             "embedding LoRA": dict(r=4, target_modules=["embed_tokens"])}
    for i, (reason, settings) in enumerate(cases.items()):
        write_adapter(tiny_mixtral_dir, tmp_path / str(i), 0, **settings)
        with pytest.raises(RequestError, match=reason):
            llm.engine.make_request("x", None, [5, 6], GREEDY, lora_request=LoRARequest(f"bad{i}", 0,
                                                                                        str(tmp_path / str(i))))
    with pytest.raises(RequestError, match="cannot be found"):
        llm.engine.make_request("x", None, [5, 6], GREEDY, lora_request=LoRARequest("unknown"))
    with pytest.raises(AdapterError, match="cannot read"):
        llm.engine.lora.load("missing", tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="enable_lora"):
        load_config(None, {"engine": {"lora_modules": ["a=/x"]}})
    with pytest.raises(ConfigError, match="not name=path"):
        load_config(None, {"engine": {"enable_lora": True, "lora_modules": ["a"]}})


def test_serve_with_adapters_and_load_them_at_runtime(tmp_path, tiny_mixtral_dir, adapters, llm):
    (first, first_dir), (second, second_dir) = ((name, path) for name, (path, _) in adapters.items())
    prompt = prompts_of([8], seed=9)[0]
    expected = {name: llm.generate([{"prompt_token_ids": prompt}], GREEDY, lora_request=lora(adapters, name))[0]
                .outputs[0].text for name in (first, second, None)}
    modules = ["--lora-modules", f"{first}={first_dir}",
               "--lora-modules", json.dumps({"name": second, "path": str(second_dir), "base_model_name": "tiny"})]
    with serve(tmp_path, "--model", str(tiny_mixtral_dir), "--served-model-name", "tiny", "--dtype", "float32",
               *SMALL_KV, "--enable-lora", *modules, "--max-loras", "2", "--admin-api-key", ADMIN_KEY) as server:
        client = OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY)

        def complete(model: str) -> str:
            answer = client.completions.create(model=model, prompt=prompt, max_tokens=GREEDY.max_tokens,
                                               temperature=0, extra_body={"ignore_eos": True})
            assert answer.model == model
            return answer.choices[0].text

        cards = {m.id: m for m in client.models.list().data}
        assert cards[first].parent == cards[second].parent == "tiny" and cards[first].root == str(first_dir)
        assert {name: complete(name or "tiny") for name in expected} == expected

        body = {"lora_name": "runtime", "lora_path": str(first_dir)}
        load = f"{server.url}/v1/load_lora_adapter"
        assert httpx.post(load, json=body, headers=auth()).status_code == 401  # the admin key is needed
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        answer = httpx.post(load, json=body, headers=admin)
        assert answer.status_code == 200 and "added successfully" in answer.text
        assert httpx.post(load, json=body, headers=admin).status_code == 400  # already loaded
        broken = httpx.post(load, json={"lora_name": "broken", "lora_path": str(tmp_path)}, headers=admin)
        assert broken.status_code == 400 and "cannot read adapter_config.json" in broken.json()["error"]["message"]
        assert complete("runtime") == expected[first]
        unload = f"{server.url}/v1/unload_lora_adapter"
        assert httpx.post(unload, json={"lora_name": "runtime"}, headers=admin).status_code == 200
        assert httpx.post(unload, json={"lora_name": "runtime"}, headers=admin).status_code == 404
        gone = httpx.post(f"{server.url}/v1/completions", headers=auth(),
                          json={"model": "runtime", "prompt": "hi", "max_tokens": 2})
        assert gone.status_code == 404


def test_runtime_lora_updating_opens_the_routes_to_api_keys_as_in_vllm(monkeypatch):
    monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    monkeypatch.delenv("LOCALMOE_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    assert lora_admin_paths() == LORA_PATHS  # the admin key's, by default
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    assert lora_admin_paths() == frozenset()
