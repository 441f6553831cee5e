"""Decode steps on CUDA replay graphs captured at vLLM's batch sizes; the logits are the eager ones."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from family_parity import engine, prompts_of, record_logits
from localmoe import SamplingParams
from localmoe.engine.cuda_graphs import DecodeGraphs, capture_sizes, padded_decode_inputs
from localmoe.experts.observer import RoutingObserver
from localmoe.layers import attention, triton_kernels
from localmoe.layers.attention import AttentionMetadata
from localmoe.layers.moe import moe_blocks


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


class ReplayingGraph:
    """Stands in for torch.cuda.CUDAGraph on CPU: capture runs the forward once (as CUDA's capture does not; here
    it must, to learn what to replay), replay reruns it on the same buffers into the same output tensor with no
    Python hooks firing, as a real replay fires none."""

    capturing: "ReplayingGraph | None" = None

    def __init__(self) -> None:
        self.work = None
        self.experts_inputs = []  # (experts module, its inputs during the capture)

    def replay(self) -> None:
        """The captured forward again, on new views of its input buffers (a replay reruns every kernel the capture
        recorded, so nothing cached by input identity may be reused; that the capture recomputed it is checked
        apart), with the experts' pre-hooks (the routing observer) silent. As a real replay writes where the
        capture's tensors are, the experts' new inputs are copied into the tensors they had at capture."""
        model, (ids, positions, caches, meta), out = self.work
        saved = [(m, dict(m._forward_pre_hooks)) for m in model.modules()]
        for module, _ in saved:
            module._forward_pre_hooks.clear()
        for module, captured in self.experts_inputs:
            module.register_forward_pre_hook(
                lambda _, new, captured=captured: [old.copy_(t) for old, t in zip(captured, new)] and None)
        try:
            out.copy_(model(ids[:], positions[:], caches, meta))
        finally:
            for module, hooks in saved:
                module._forward_pre_hooks.clear()
                module._forward_pre_hooks.update(hooks)

    def pool(self) -> None:
        return None


@contextmanager
def replaying_capture(graph: ReplayingGraph, pool=None):
    ReplayingGraph.capturing = graph
    try:
        yield
    finally:
        ReplayingGraph.capturing = None


def test_decode_steps_through_the_graph_machinery_give_the_eager_logits(tiny_mixtral_dir, monkeypatch):
    """On CPU, with the Triton paths forced (in Triton's interpreter) and CUDA's graph capture stood in for: three
    sequences decode through DecodeGraphs' buffers, padded to a batch of four whose pad row lives in the scratch
    block; tokens, every step's logits and the routing observer's counts equal the eager run's."""
    monkeypatch.setattr(attention, "_kernel_takes", lambda *_: False)
    monkeypatch.setattr(triton_kernels, "runs_here", lambda t: True)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", ReplayingGraph)
    monkeypatch.setattr(torch.cuda, "graph", replaying_capture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    prompts = [{"prompt_token_ids": p} for p in prompts_of([5, 9, 3], seed=7)]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    runs = []
    for graphs in (False, True):
        llm = engine(tiny_mixtral_dir)
        runner = llm.engine.runner
        if graphs:
            calls = []

            def record(model, args, out):
                calls.append(args)
                if ReplayingGraph.capturing is not None:
                    ReplayingGraph.capturing.work = (model, args, out)
            hooks = [runner.model.register_forward_hook(record)] + [
                moe.experts.register_forward_pre_hook(
                    lambda m, inputs: ReplayingGraph.capturing and ReplayingGraph.capturing.experts_inputs.append(
                        (m, inputs)) and None)
                for _, moe in moe_blocks(runner.model)]
            scratch = runner.kv_caches[0].shape[1] - 1  # the last block: this short run never reaches it
            runner.graphs = DecodeGraphs(runner.model, runner.kv_caches, [1, 2, 4], 8, runner.block_size, scratch)
            for hook in hooks:
                hook.remove()
            # each size: a warm-up, then the capture on other input tensors (see DecodeGraphs._capture)
            assert len(calls) == 6 and all(calls[i][1] is not calls[i + 1][1] for i in range(0, 6, 2))
            llm.engine.observer.close()
            llm.engine.observer = RoutingObserver(llm.engine.model)  # its counts start after the captures
        steps = record_logits(llm)
        tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        runs.append((tokens, torch.cat(steps), llm.engine.observer.tokens.clone()))
    assert runner.graphs.replayed == 3  # every step after the prefill, each padded from 3 rows to 4
    assert runs[0][0] == runs[1][0]
    assert (runs[0][1] - runs[1][1]).abs().max() <= 1e-5
    assert torch.equal(runs[0][2], runs[1][2])
