"""Train the built-in MoE: seeded, step-based, so a rerun gives the same loss curve.

The model is transformers' Mixtral (training may use any PyTorch code; serving never does), with
its Switch-style load-balancing loss; the result is a standard Hugging Face checkpoint directory
that LocalMoE serves through its own forward pass.

A second stage continues from a checkpoint (`init_from`, keeping its tokenizer) on windows of which a share repeat
a passage: `repeat_fraction` of them passages of the corpus, `copy_fraction` passages of random tokens, where only
copying predicts anything. A model trained only on running text, with a short context, never learns to copy what
its prompt already holds, and quoting, editing and code are what prompt-lookup speculation serves. Repeats alone
leave it on the plateau before the copying circuit forms, so `induction_weight` teaches that circuit's heads
directly (train/induction.py), and `freeze_moe` keeps the MoE blocks (routers and experts) as they are while the
attention learns.
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
from localmoe.train.induction import InductionLoss
from localmoe.train.tokenizer import train_tokenizer
from localmoe.train.widen import add_heads, new_head_masks


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
    copy_fraction: float = 0.0
    induction_weight: float = 0.0
    induction_layer: int = 1  # the layer whose heads are taught to copy; the previous-token heads are the layer before
    freeze_moe: bool = False
    max_passage: int = 256  # longest repeated passage, in tokens
    add_heads: int = 0  # new attention heads per layer, trained alone (train/widen.py)

    def __post_init__(self) -> None:
        if self.copy_fraction + self.repeat_fraction > 1:
            raise ValueError(f"copy_fraction + repeat_fraction is {self.copy_fraction + self.repeat_fraction:g}: "
                             "they are shares of the same windows, so at most 1 together")
        if self.induction_layer < 1:
            raise ValueError(f"induction_layer is {self.induction_layer}: the copying heads need a layer before theirs")
        if self.add_heads and self.init_from is None:
            raise ValueError("add_heads widens a trained model: it needs init_from")


def encode_documents(tokenizer: Tokenizer, documents: list[str]) -> torch.Tensor:
    """One token stream; each document ends with </s> so the model learns where texts end."""
    eos = tokenizer.token_to_id("</s>")
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(documents):
        ids += encoding.ids + [eos]
    return torch.tensor(ids, dtype=torch.int32)


def repeated_window(tokens: torch.Tensor, filler: torch.Tensor, separator: list[int], cfg: TrainConfig,
                    g: torch.Generator) -> tuple[torch.Tensor, int]:
    """A passage of 16 to `max_passage` tokens (at most half the window), then a separator, over and over until the
    window is full, and the period it repeats with: every copy after the first is predictable from the context
    alone. The separator is drawn per window: none, the corpus's, or one to three `filler` tokens, so the copy
    cannot lean on one anchor token to find where a passage starts again."""
    kind = int(torch.randint(0, 3, (1,), generator=g))
    between = [torch.tensor([], dtype=tokens.dtype), torch.tensor(separator, dtype=tokens.dtype),
               filler[torch.randint(0, len(filler), (int(torch.randint(1, 4, (1,), generator=g)),), generator=g)]][kind]
    longest = min(cfg.max_passage, cfg.context // 2 - len(between))
    length = int(torch.randint(16, longest + 1, (1,), generator=g))
    start = int(torch.randint(0, len(tokens) - length, (1,), generator=g))
    unit = torch.cat([tokens[start:start + length], between.to(tokens.dtype)])
    return unit.repeat(cfg.context // len(unit) + 1)[:cfg.context], len(unit)


def training_batch(tokens: torch.Tensor, alphabet: torch.Tensor, separator: list[int], cfg: TrainConfig,
                   g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of running text, `repeat_fraction` of them replaced by repeated passages of the corpus and
    `copy_fraction` by repeated passages of random tokens drawn from `alphabet` (the tokens the corpus holds); and
    the period each window repeats with (0 for running text)."""
    offsets = torch.randint(0, len(tokens) - cfg.context - 1, (cfg.batch_size,), generator=g)
    kinds = torch.rand(cfg.batch_size, generator=g)

    def window(offset: int, kind: float) -> tuple[torch.Tensor, int]:
        if kind < cfg.copy_fraction:
            random = alphabet[torch.randint(0, len(alphabet), (cfg.context,), generator=g)]
            return repeated_window(random, alphabet, separator, cfg, g)
        if kind < cfg.copy_fraction + cfg.repeat_fraction:
            return repeated_window(tokens, alphabet, separator, cfg, g)
        return tokens[offset:offset + cfg.context], 0

    windows, periods = zip(*(window(o, k) for o, k in zip(offsets.tolist(), kinds.tolist())))
    return torch.stack(windows).long(), torch.tensor(periods)


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
        initializer_range=0.02, attn_implementation=attention(cfg))
    torch.manual_seed(cfg.seed)
    return MixtralForCausalLM(config)


def load_model(directory: Path, cfg: TrainConfig):
    """A checkpoint to train further, in float32 (autocast gives the bf16 matmuls), with the router losses on."""
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM.from_pretrained(directory, dtype=torch.float32, output_router_logits=True,
                                              attn_implementation=attention(cfg))


def train_new_heads_only(model, old_heads: int):
    """Freeze all but the attention projections, and mask their gradients to the heads added after `old_heads`:
    with no gradient and no weight decay, AdamW leaves every old weight exactly as it was."""
    masks = new_head_masks(model, old_heads)
    for name, p in model.named_parameters():
        p.requires_grad_(name in masks)
        if name in masks:
            p.register_hook(lambda grad, mask=masks[name]: grad * mask)
    return model


def attention(cfg: TrainConfig) -> str:
    """Supervising heads needs their attention weights, which only the eager implementation returns."""
    return "eager" if cfg.induction_weight else "sdpa"


@torch.no_grad()
def evaluate(model, tokens: torch.Tensor, cfg: TrainConfig) -> dict:
    """Held-out perplexity over non-overlapping windows, per-layer expert load imbalance, and the loss on a second
    reading of each window's first half (the first half again after it): near zero once the model quotes."""
    model.eval()
    windows = tokens[: (len(tokens) // cfg.context) * cfg.context].view(-1, cfg.context)[: cfg.eval_windows].long()
    nll, count = 0.0, 0
    config = model.config  # a continued checkpoint's shape, not the options'
    per_layer = torch.zeros(config.num_hidden_layers, config.num_local_experts)
    for batch in windows.split(cfg.batch_size):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(batch, labels=batch, output_router_logits=True)
        n = batch.numel() - batch.shape[0]
        nll += (out.loss.item() - cfg.aux_loss_coef * out.aux_loss.item()) * n
        count += n
        for layer, logits in enumerate(out.router_logits):
            chosen = logits.float().topk(config.num_experts_per_tok, dim=-1).indices.flatten()
            per_layer[layer] += torch.bincount(chosen, minlength=config.num_local_experts).float()
    half = cfg.context // 2
    reread = windows[:, :half].repeat(1, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = torch.cat([model(batch).logits[:, half - 1:-1].float() for batch in reread.split(cfg.batch_size)])
    repeat_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), reread[:, half:].flatten()).item()
    model.train()
    imbalance = (per_layer.max(dim=1).values / per_layer.mean(dim=1)).tolist()
    return {"heldout_loss": nll / count, "heldout_perplexity": math.exp(nll / count),
            "expert_imbalance": [round(x, 3) for x in imbalance], "heldout_repeat_loss": repeat_loss}


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
        model = load_model(cfg.init_from, cfg)
    train_tokens = encode_documents(tokenizer, train_docs)
    heldout_tokens = encode_documents(tokenizer, read_documents(cfg.corpus_dir / "heldout.txt"))
    separator = tokenizer.encode("\n\n").ids
    alphabet = train_tokens.unique()  # what random passages draw from: once, not per batch
    first_new_head = model.config.num_attention_heads
    if cfg.add_heads:
        model = train_new_heads_only(add_heads(model, cfg.add_heads), first_new_head)
    elif cfg.freeze_moe:
        for layer in model.model.layers:
            layer.mlp.requires_grad_(False)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trained if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in trained if not (p.dim() >= 2 and "embed" not in n)]
    weight_decay = 0.0 if cfg.add_heads else cfg.weight_decay  # decay would move the old heads' masked weights
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(cfg.seed)
    first_taught = first_new_head if cfg.add_heads else 0
    induction = InductionLoss(model, first_taught, cfg.induction_layer) if cfg.induction_weight else None
    curve, evals, attended = [], [], []
    start = time.monotonic()
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns) as progress:
        task = progress.add_task("training", total=cfg.steps)
        for step in range(cfg.steps):
            batch, periods = training_batch(train_tokens, alphabet, separator, cfg, g)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(batch, labels=batch, output_attentions=bool(induction))
            loss = out.loss
            if induction and periods.any():
                terms = induction(batch, out.attentions, periods)
                loss = loss + cfg.induction_weight * (terms["previous_token"] + terms["induction"] + terms["copied"])
                attended.append(round(terms["induction_attention"].item(), 4))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
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
        **({"induction_attention_curve": attended} if attended else {}),
    }
    (cfg.out_dir / "training.json").write_text(json.dumps(report, indent=1))
    write_heldout_sample(cfg.corpus_dir, cfg.out_dir)
    return report
