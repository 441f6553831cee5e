"""A few training steps on a tiny shape prove the training path end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from checkpoints import reference_model
from localmoe import LLM, SamplingParams
from localmoe.train.corpus import extract_austen, join_documents
from localmoe.train.induction import copy_sources
from localmoe.train.trainer import TrainConfig, repeated_window, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus")
    chapters = extract_austen()[:12]
    (corpus / "train.txt").write_text(join_documents(chapters[:10]), encoding="utf-8")
    (corpus / "heldout.txt").write_text(join_documents(chapters[10:]), encoding="utf-8")
    out = tmp_path_factory.mktemp("trained")
    cfg = TrainConfig(corpus_dir=corpus, out_dir=out, vocab_size=400, hidden_size=64, intermediate_size=96,
                      num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4, top_k=2, context=64,
                      batch_size=8, steps=40, lr=5e-3, warmup_steps=5, eval_every=20, eval_windows=8)
    return out, train(cfg)


@pytest.fixture(scope="module")
def continued(trained, tmp_path_factory):
    """The second stage: the trained checkpoint, on windows that all repeat a passage."""
    first, report = trained
    out = tmp_path_factory.mktemp("continued")
    cfg = TrainConfig(corpus_dir=Path(report["config"]["corpus_dir"]), out_dir=out, context=64, batch_size=8, steps=40, lr=5e-3,
                      warmup_steps=5, eval_every=20, eval_windows=8, init_from=first, repeat_fraction=1.0)
    return out, train(cfg)


def test_loss_goes_down_and_the_report_is_written(trained):
    out, report = trained
    curve = report["loss_curve"]
    assert len(curve) == 40
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.5
    assert report["evals"][0]["heldout_perplexity"] > report["evals"][-1]["heldout_perplexity"]
    assert len(report["expert_imbalance"]) == 2
    saved = json.loads((out / "training.json").read_text())
    assert saved["heldout_perplexity"] == report["heldout_perplexity"] and saved["loss_curve"] == curve


def test_checkpoint_loads_in_transformers_and_localmoe_alike(trained):
    out, _ = trained
    ref = reference_model(out)
    llm = LLM(model=str(out), dtype="float32", kv_cache_memory=2**22)
    tok = llm.get_tokenizer()
    ids = tok.encode("It is a truth universally acknowledged")
    with torch.no_grad():
        expected = ref.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(ids):].tolist()
    got = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    assert got[0].outputs[0].token_ids == expected
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<|user|>")


def test_a_repeated_window_is_a_passage_and_its_copies():
    tokens = torch.arange(1000, dtype=torch.int32)
    filler = torch.arange(-9, -4, dtype=torch.int32)
    cfg = TrainConfig(corpus_dir=Path("."), out_dir=Path("."), context=96, max_passage=40)
    g = torch.Generator().manual_seed(0)
    separators = set()
    for _ in range(30):
        window, period = repeated_window(tokens, filler, [-1, -2], cfg, g)
        assert len(window) == 96 and 16 <= period <= 40 + 3
        assert torch.equal(window[period:], window[:96 - period])
        unit = window[:period]
        passage = unit[unit >= 0]
        assert len(passage) >= 16
        assert torch.equal(passage, torch.arange(int(passage[0]), int(passage[0]) + len(passage), dtype=torch.int32))
        between = unit[len(passage):].tolist()
        assert between in ([], [-1, -2]) or all(t in filler.tolist() for t in between)
        separators.add("none" if not between else "corpus" if between == [-1, -2] else "filler")
    assert separators == {"none", "corpus", "filler"}


def test_the_second_stage_continues_the_checkpoint_and_learns_to_copy(trained, continued):
    (first, report), (out, again) = trained, continued
    assert (out / "tokenizer.json").read_text() == (first / "tokenizer.json").read_text()
    # Its first loss is the trained model's on repeated passages, well below a fresh model's ln(400) ~ 6.
    assert again["loss_curve"][0] < report["loss_curve"][0] - 1
    assert sum(again["loss_curve"][-5:]) / 5 < sum(again["loss_curve"][:5]) / 5 - 0.2


def test_copy_sources_point_after_the_counterpart_one_period_back():
    assert copy_sources(torch.tensor([3, 0]), 7).tolist() == [[-1, -1, -1, 1, 2, 3, 4], [-1] * 7]


@pytest.fixture(scope="module")
def supervised(trained, tmp_path_factory):
    """The second stage on repeated random tokens, with the induction circuit taught (its MoE blocks frozen) and
    without."""
    first, report = trained
    runs = {}
    for weight in (0.0, 1.0):
        out = tmp_path_factory.mktemp(f"induction{weight}")
        cfg = TrainConfig(corpus_dir=Path(report["config"]["corpus_dir"]), out_dir=out, context=64, batch_size=8,
                          steps=40, lr=5e-3, warmup_steps=5, eval_every=40, eval_windows=8, init_from=first,
                          copy_fraction=0.75, induction_weight=weight, freeze_moe=bool(weight))
        runs[weight] = out, train(cfg)
    return runs


def previous_token_attention(directory: Path, ids: torch.Tensor) -> float:
    """Head 0 of layer 0's mean attention on the previous position."""
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        attention = model(ids, output_attentions=True).attentions[0][:, 0]
    rows = torch.arange(1, ids.shape[1])
    return attention[:, rows, rows - 1].mean().item()


def test_the_induction_heads_are_taught_only_when_asked(supervised):
    (plain_dir, plain), (taught_dir, taught) = supervised[0.0], supervised[1.0]
    curve = taught["induction_attention_curve"]
    assert len(curve) <= 40 and sum(curve[-5:]) > 2 * sum(curve[:5])  # attention on the sources doubles at least
    assert "induction_attention_curve" not in plain
    ids = torch.randint(10, 400, (4, 48), generator=torch.Generator().manual_seed(0))
    assert previous_token_attention(taught_dir, ids) > previous_token_attention(plain_dir, ids) + 0.1
    assert all(math.isfinite(run["heldout_repeat_loss"]) for run in (plain, taught))


def test_a_frozen_moe_block_keeps_its_weights(trained, supervised):
    from safetensors.torch import load_file

    first = load_file(trained[0] / "model.safetensors")
    for weight, moved in ((1.0, False), (0.0, True)):
        after = load_file(supervised[weight][0] / "model.safetensors")
        moe = [name for name in first if ".block_sparse_moe." in name]  # the checkpoint names of the mlp blocks
        assert moe and any(not torch.equal(first[n], after[n]) for n in moe) == moved
        assert any(not torch.equal(first[n], after[n]) for n in first if "self_attn" in n)


def test_the_shares_of_repeated_windows_cannot_pass_one(tmp_path):
    from typer.testing import CliRunner

    from localmoe.cli import app

    with pytest.raises(ValueError, match="at most 1 together"):
        TrainConfig(corpus_dir=tmp_path, out_dir=tmp_path, copy_fraction=0.75, repeat_fraction=0.5)
    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "out"), "--corpus", str(tmp_path / "corpus"),
                                      "--copy-fraction", "0.75", "--repeat-fraction", "0.5"])
    assert result.exit_code == 2 and "at most 1 together" in result.output
    assert not (tmp_path / "corpus").exists() and not (tmp_path / "out").exists()


def test_added_heads_leave_the_model_as_it_was(trained):
    from transformers import MixtralForCausalLM

    from localmoe.train.widen import add_heads

    model = MixtralForCausalLM.from_pretrained(trained[0], dtype=torch.float32)
    widened = add_heads(model, 4)
    assert (widened.config.num_attention_heads, widened.config.num_key_value_heads) == (8, 4)
    ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, widened(ids).logits)
    with pytest.raises(ValueError, match="whole groups of 2"):
        add_heads(model, 3)


@pytest.fixture(scope="module")
def widened(trained, tmp_path_factory):
    """The second stage through the CLI, teaching four added heads."""
    from typer.testing import CliRunner

    from localmoe.cli import app

    first, report = trained
    out = tmp_path_factory.mktemp("widened")
    result = CliRunner().invoke(app, [
        "train", "--out", str(out), "--corpus", report["config"]["corpus_dir"], "--init-from", str(first),
        "--steps", "30", "--context", "64", "--batch-size", "8", "--lr", "5e-3", "--warmup-steps", "5",
        "--eval-every", "30", "--copy-fraction", "0.75", "--induction-weight", "1", "--add-heads", "4"])
    assert result.exit_code == 0, result.output
    return out


def test_only_the_added_heads_are_trained(trained, widened):
    from safetensors.torch import load_file

    first, after = load_file(trained[0] / "model.safetensors"), load_file(widened / "model.safetensors")
    config = json.loads((widened / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (8, 4, 16)
    for name, old in first.items():
        new = after[name]
        if name.endswith("o_proj.weight"):
            assert torch.equal(new[:, :old.shape[1]], old) and new[:, old.shape[1]:].abs().sum() > 0
        elif name.split(".")[-2] in ("q_proj", "k_proj", "v_proj"):  # four heads to eight, two KV heads to four
            assert torch.equal(new[:old.shape[0]], old) and new.shape[0] == 2 * old.shape[0]
        else:
            assert torch.equal(new, old), name
    curve = json.loads((widened / "training.json").read_text())["induction_attention_curve"]
    assert sum(curve[-5:]) > 1.5 * sum(curve[:5])


def test_a_widened_checkpoint_is_served_as_transformers_runs_it(widened):
    ref = reference_model(widened)
    ids = [5, 17, 33, 5, 17, 60, 71, 5]
    expected = ref.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, len(ids):].tolist()
    llm = LLM(model=str(widened), dtype="float32", kv_cache_memory=32 * 2**20)
    got = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert got[0].outputs[0].token_ids == expected


def test_the_copying_heads_need_a_layer_before_them(tmp_path):
    with pytest.raises(ValueError, match="a layer before theirs"):
        TrainConfig(corpus_dir=tmp_path, out_dir=tmp_path, induction_layer=0)
    with pytest.raises(ValueError, match="needs init_from"):
        TrainConfig(corpus_dir=tmp_path, out_dir=tmp_path, add_heads=4)
