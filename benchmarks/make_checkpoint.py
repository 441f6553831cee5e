"""Build the benchmark checkpoint of shared/PEERS.md: a random-weight Mixtral and a SentencePiece tokenizer.

    python benchmarks/make_checkpoint.py --out /tmp/bench-small
    python benchmarks/make_checkpoint.py --out /tmp/bench-large --shape large

The directory gets config.json, model.safetensors (bf16), tokenizer.json, tokenizer_config.json and
tokenizer.model. The tokenizer is a BPE model (byte fallback, <unk>/<s>/</s> = 0/1/2) trained on English
text found on this machine: licenses and package docs, read in sorted order up to a fixed number of bytes.
Needs protobuf (transformers reads tokenizer.model with it).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import sys
import tempfile
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import AutoTokenizer, LlamaTokenizer, MixtralConfig, MixtralForCausalLM

VOCAB_SIZE = 32000
CORPUS_BYTES = 8 * 2**20
FILE_BYTES = 256 * 2**10
TEXT_ROOTS = [Path("/usr/share/common-licenses"), Path("/usr/share/doc")]
TEXT_SUFFIXES = {".txt", ".md", ".rst"}
TEXT_NAMES = {"copyright", "license", "readme", "news", "changelog", "authors"}

SHAPES: dict[str, dict[str, int]] = {
    "small": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4),
    "large": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                  num_attention_heads=16, num_key_value_heads=8),
}


def text_files() -> list[Path]:
    """Plain-text English files under TEXT_ROOTS, root by root, each sorted so every run reads the same."""
    found = []
    for root in TEXT_ROOTS:
        found += sorted(
            path for path in root.rglob("*")
            if path.is_file() and not path.is_symlink()
            and (path.suffix in TEXT_SUFFIXES or path.name.split(".")[0].lower() in TEXT_NAMES)
        )
    return found


def corpus_lines() -> list[str]:
    """Distinct non-empty lines of the text files, in file order, up to CORPUS_BYTES in all."""
    seen: set[str] = set()
    lines: list[str] = []
    total = 0
    for path in text_files():
        try:
            text = path.read_bytes()[:FILE_BYTES].decode("utf-8")
        except UnicodeDecodeError:
            continue
        for line in text.splitlines():
            line = line.strip()
            if line and line not in seen:
                seen.add(line)
                lines.append(line)
                total += len(line) + 1
                if total >= CORPUS_BYTES:
                    return lines
    return lines


def train_tokenizer(out: Path) -> None:
    """Train the SentencePiece BPE model, load it as a LlamaTokenizer and save it into `out`."""
    if importlib.util.find_spec("google") is None or importlib.util.find_spec("google.protobuf") is None:
        sys.exit("transformers needs protobuf to read tokenizer.model: pip install protobuf")
    lines = corpus_lines()
    print(f"tokenizer corpus: {len(lines)} lines, {sum(len(s) + 1 for s in lines) / 2**20:.1f} MiB")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=VOCAB_SIZE,
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=0.99995,
        split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, num_threads=2, minloglevel=2,
    )
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "tokenizer.model").write_bytes(model.getvalue())
        tokenizer = LlamaTokenizer.from_pretrained(folder, add_bos_token=True)
    tokenizer.save_pretrained(out)
    # transformers 5 saves only tokenizer.json; peers that read the SentencePiece model (llama.cpp) want this too
    (out / "tokenizer.model").write_bytes(model.getvalue())


def build_model(out: Path, shape: str) -> None:
    """Random Mixtral of the given shape (seed 0, std 0.02), saved in bf16."""
    config = MixtralConfig(
        vocab_size=VOCAB_SIZE, num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6,
        max_position_embeddings=4096, initializer_range=0.02, **SHAPES[shape],
    )
    torch.manual_seed(0)
    model = MixtralForCausalLM(config).to(torch.bfloat16)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters")
    model.save_pretrained(out)


def check(out: Path) -> None:
    """Load the directory back with AutoTokenizer and MixtralForCausalLM and run one forward pass."""
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = MixtralForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    ids = tokenizer("The licensee may copy and distribute the Program.", return_tensors="pt").input_ids
    with torch.inference_mode():
        logits = model(ids).logits
    print(f"check: {type(tokenizer).__name__} vocab {len(tokenizer)}, ids {ids[0, :8].tolist()}..., "
          f"logits {tuple(logits.shape)} {logits.dtype}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory to write the checkpoint into")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train_tokenizer(args.out)
    build_model(args.out, args.shape)
    check(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
