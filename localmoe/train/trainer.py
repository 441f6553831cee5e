"""Train the built-in MoE: seeded, step-based, so a rerun gives the same loss curve.

The model is transformers' Mixtral (training may use any PyTorch code; serving never does), with
its Switch-style load-balancing loss; the result is a standard Hugging Face checkpoint directory
that LocalMoE serves through its own forward pass.

A second stage continues from a checkpoint (`init_from`, keeping its tokenizer) with a share of windows that
repeat a passage (`repeat_fraction`): a model trained only on running text, with a short context, never learns
to copy what its prompt already holds, and quoting, editing and code are what prompt-lookup speculation serves.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from tokenizers import Tokenizer

from localmoe.models.builtin import save_tokenizer
from localmoe.train.corpus import read_documents
from localmoe.train.evaluate import write_heldout_sample
from localmoe.train.tokenizer import train_tokenizer


@dataclass(frozen=True)
class TrainConfig:
    corpus_dir: Path
    out_dir: Path
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4
    num_experts: int = 8
    top_k: int = 2
    context: int = 256
    batch_size: int = 16
    steps: int = 3000
    lr: float = 2e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    aux_loss_coef: float = 0.01
    eval_every: int = 250
    eval_windows: int = 64
    seed: int = 0
    init_from: Path | None = None
    repeat_fraction: float = 0.0


def encode_documents(tokenizer: Tokenizer, documents: list[str]) -> torch.Tensor:
    """One token stream; each document ends with </s> so the model learns where texts end."""
    eos = tokenizer.token_to_id("</s>")
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(documents):
        ids += encoding.ids + [eos]
    return torch.tensor(ids, dtype=torch.int32)


def repeated_window(tokens: torch.Tensor, separator: list[int], context: int, g: torch.Generator) -> torch.Tensor:
    """A passage of 16 to context/2 tokens, then the separator, over and over until the window is full: every
    copy after the first is predictable from the context alone."""
    length = int(torch.randint(16, context // 2 - len(separator), (1,), generator=g))
    start = int(torch.randint(0, len(tokens) - length, (1,), generator=g))
    unit = torch.cat([tokens[start:start + length], torch.tensor(separator, dtype=tokens.dtype)])
    return unit.repeat(context // len(unit) + 1)[:context]


def training_batch(tokens: torch.Tensor, separator: list[int], cfg: TrainConfig, g: torch.Generator) -> torch.Tensor:
    """Windows of running text, `repeat_fraction` of them replaced by repeated passages."""
    offsets = torch.randint(0, len(tokens) - cfg.context - 1, (cfg.batch_size,), generator=g)
    repeats = torch.rand(cfg.batch_size, generator=g) < cfg.repeat_fraction
    return torch.stack([repeated_window(tokens, separator, cfg.context, g) if repeat else tokens[o:o + cfg.context]
                        for o, repeat in zip(offsets.tolist(), repeats.tolist())]).long()


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_model(cfg: TrainConfig, vocab_size: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k, max_position_embeddings=cfg.context * 4,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        pad_token_id=2, output_router_logits=True, router_aux_loss_coef=cfg.aux_loss_coef,
        initializer_range=0.02)
    torch.manual_seed(cfg.seed)
    return MixtralForCausalLM(config)


def load_model(directory: Path):
    """A checkpoint to train further, in float32 (autocast gives the bf16 matmuls), with the router losses on."""
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM.from_pretrained(directory, dtype=torch.float32, output_router_logits=True)


@torch.no_grad()
def evaluate(model, tokens: torch.Tensor, cfg: TrainConfig) -> dict:
    """Held-out perplexity over non-overlapping windows, and per-layer expert load imbalance."""
    model.eval()
    windows = tokens[: (len(tokens) // cfg.context) * cfg.context].view(-1, cfg.context)[: cfg.eval_windows].long()
    nll, count = 0.0, 0
    per_layer = torch.zeros(cfg.num_layers, cfg.num_experts)
    for batch in windows.split(cfg.batch_size):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(batch, labels=batch, output_router_logits=True)
        n = batch.numel() - batch.shape[0]
        nll += (out.loss.item() - cfg.aux_loss_coef * out.aux_loss.item()) * n
        count += n
        for layer, logits in enumerate(out.router_logits):
            chosen = logits.float().topk(cfg.top_k, dim=-1).indices.flatten()
            per_layer[layer] += torch.bincount(chosen, minlength=cfg.num_experts).float()
    model.train()
    imbalance = (per_layer.max(dim=1).values / per_layer.mean(dim=1)).tolist()
    return {"heldout_loss": nll / count, "heldout_perplexity": math.exp(nll / count),
            "expert_imbalance": [round(x, 3) for x in imbalance]}


def train(cfg: TrainConfig) -> dict:
    """Tokenizer, then model; writes the checkpoint and training.json into cfg.out_dir."""
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    train_docs = read_documents(cfg.corpus_dir / "train.txt")
    if cfg.init_from is None:
        tokenizer = train_tokenizer(train_docs, cfg.vocab_size, cfg.out_dir)
        model = build_model(cfg, tokenizer.get_vocab_size())
    else:
        tokenizer = Tokenizer.from_file(str(cfg.init_from / "tokenizer.json"))
        save_tokenizer(tokenizer, cfg.out_dir)
        model = load_model(cfg.init_from)
    train_tokens = encode_documents(tokenizer, train_docs)
    heldout_tokens = encode_documents(tokenizer, read_documents(cfg.corpus_dir / "heldout.txt"))
    separator = tokenizer.encode("\n\n").ids
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(cfg.seed)
    curve, evals = [], []
    start = time.monotonic()
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns) as progress:
        task = progress.add_task("training", total=cfg.steps)
        for step in range(cfg.steps):
            batch = training_batch(train_tokens, separator, cfg, g)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(batch, labels=batch)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            curve.append(round(out.loss.item(), 4))
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                evals.append({"step": step + 1, **evaluate(model, heldout_tokens, cfg)})
            last = evals[-1]["heldout_perplexity"] if evals else float("nan")
            progress.update(task, advance=1,
                            description=f"training  loss {curve[-1]:.3f}  held-out ppl {last:.1f}")
    seconds = time.monotonic() - start
    model.to(torch.bfloat16).save_pretrained(cfg.out_dir)
    report = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens": len(train_tokens), "heldout_tokens": len(heldout_tokens),
        "wall_seconds": round(seconds, 1), "tokens_per_second": round(cfg.steps * cfg.batch_size * cfg.context / seconds),
        "loss_curve": curve, "evals": evals, **evals[-1],
    }
    (cfg.out_dir / "training.json").write_text(json.dumps(report, indent=1))
    write_heldout_sample(cfg.corpus_dir, cfg.out_dir)
    return report
