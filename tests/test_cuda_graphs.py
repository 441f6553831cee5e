"""Decode steps on CUDA replay graphs captured at vLLM's batch sizes; the logits are the eager ones."""

from __future__ import annotations

import pytest
import torch

from family_parity import engine, prompts_of, record_logits
from localmoe import SamplingParams
from localmoe.engine.cuda_graphs import capture_sizes, padded_decode_inputs
from localmoe.layers.attention import AttentionMetadata


def test_capture_sizes_are_vllms_up_to_max_num_seqs():
    assert capture_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert capture_sizes(3) == [1, 2, 3] and capture_sizes(1) == [1]
    assert capture_sizes(1000)[-2:] == [504, 512]


def test_a_padded_decode_step_holds_the_eager_metadata_and_pads_into_the_scratch_block():
    tables, positions = [[5, 2], [7], [1, 3, 4]], [5, 0, 9]
    inputs = padded_decode_inputs(4, [11, 12, 13], positions, tables, block_size=4, width=5, scratch=99)
    meta = AttentionMetadata.build([1, 1, 1], [p + 1 for p in positions], tables, 4, torch.device("cpu"))
    for name, eager in (("slot_blocks", meta.slot_blocks), ("slot_offsets", meta.slot_offsets),
                        ("context_lens", meta.context_lens)):
        assert inputs[name][:3].tolist() == eager.tolist(), name
    assert inputs["input_ids"].tolist() == [11, 12, 13, 0] and inputs["positions"].tolist() == [5, 0, 9, 0]
    assert inputs["block_tables"][:, :3].tolist() == [[5, 2, 99], [7, 99, 99], [1, 3, 4], [99] * 3]
    assert (inputs["slot_blocks"][3], inputs["context_lens"][3]) == (99, 1)  # the pad row writes and reads scratch


def test_on_cpu_every_step_is_eager(tiny_mixtral_dir):
    llm = engine(tiny_mixtral_dir)
    assert llm.engine.runner.graphs is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_decode_graphs_give_the_eager_logits_and_routing_counts(tiny_mixtral_dir):
    """Three sequences decode in a graph of four rows (one padded); the tokens, every step's logits and the
    routing observer's counts are those of --enforce-eager."""
    prompts = [{"prompt_token_ids": p} for p in prompts_of([5, 9, 3], seed=7)]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    runs = []
    for eager in (True, False):
        llm = engine(tiny_mixtral_dir, device="cuda", enforce_eager=eager, gpu_memory_utilization=0.2,
                     max_model_len=256, max_num_seqs=4)
        graphs = llm.engine.runner.graphs
        assert (graphs is None) == eager
        steps = record_logits(llm)
        tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        runs.append((tokens, torch.cat(steps).cpu(), llm.engine.observer.tokens.clone()))
        if not eager:
            assert graphs.replayed == 5  # every step after the prefill
    assert runs[0][0] == runs[1][0]
    assert (runs[0][1] - runs[1][1]).abs().max() <= 1e-4
    assert torch.equal(runs[0][2], runs[1][2])
