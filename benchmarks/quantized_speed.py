"""Quantized serving, side by side: LocalMoE bf16, int8 and int4 against llama.cpp's Q8_0 and Q4_K_M of the same
checkpoint, under the serving benchmark's load, with the fraction of the memory-bandwidth roofline each reaches.

    python benchmarks/make_checkpoint.py --out /tmp/bench-large --shape large
    PYTHONPATH=vendor/llama.cpp/gguf-py python vendor/llama.cpp/convert_hf_to_gguf.py /tmp/bench-large \\
        --outtype bf16 --outfile /tmp/bench-large.gguf
    llama-quantize /tmp/bench-large.gguf /tmp/bench-large-Q8_0.gguf Q8_0
    llama-quantize /tmp/bench-large.gguf /tmp/bench-large-Q4_K_M.gguf Q4_K_M
    python benchmarks/quantized_speed.py --model /tmp/bench-large --q8 /tmp/bench-large-Q8_0.gguf \\
        --q4 /tmp/bench-large-Q4_K_M.gguf --llama-server /path/to/llama-server --out results/quantized_speed.json

The five servers run one after the other through benchmarks/serve_bench.py (each started fresh, measured at every
--concurrency, stopped). The roofline: a decode step of one stream reads every weight it uses once (the dense
layers, the output head, top_k experts per MoE layer; not the embedding table, of which it reads a row), so
tokens/s times those bytes over the bandwidth of a 2-thread read of a 1 GiB buffer (measured in the same run) is
the fraction of the machine's reading speed a system reaches. LocalMoE's bytes come from the checkpoint's shapes
and the scheme (quant/scheme.py), llama.cpp's from the GGUF's own tensor sizes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_bench import localmoe_command  # noqa: E402
from weights_floor import localmoe_bytes_per_token, read_bandwidth  # noqa: E402


LOCALMOE = {"localmoe": None, "localmoe-int8": "int8", "localmoe-int4": "int4"}
PAIRS = [("localmoe-int8", "localmoe"), ("localmoe-int4", "localmoe"), ("localmoe-int8", "llama.cpp-Q8_0"),
         ("localmoe-int4", "llama.cpp-Q4_K_M"), ("llama.cpp-Q8_0", "localmoe"), ("llama.cpp-Q4_K_M", "localmoe")]


def gguf_bytes_per_token(path: Path) -> int:
    """Weight bytes one decode token reads in llama.cpp: every tensor but the embedding table, expert tensors
    (ffn_*_exps, all experts stacked) at top_k of their experts."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {f.name: f for f in reader.fields.values()}
    arch = str(bytes(fields["general.architecture"].parts[-1]), "utf-8")
    used = int(fields[f"{arch}.expert_used_count"].parts[-1][0])
    count = int(fields[f"{arch}.expert_count"].parts[-1][0])
    total = 0
    for tensor in reader.tensors:
        if tensor.name == "token_embd.weight":
            continue
        total += tensor.n_bytes * (used / count if "_exps" in tensor.name else 1)
    return int(total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="the bf16 checkpoint directory")
    parser.add_argument("--q8", type=Path, required=True, help="its GGUF quantized to Q8_0 by llama-quantize")
    parser.add_argument("--q4", type=Path, required=True, help="its GGUF quantized to Q4_K_M by llama-quantize")
    parser.add_argument("--llama-server", required=True)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompts-per-stream", type=int, default=2)
    parser.add_argument("--min-prompts", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("results/quantized_speed.json"))
    args = parser.parse_args()

    bandwidth = read_bandwidth()
    print(f"2-thread read of 1 GiB: {bandwidth / 1e9:.1f} GB/s", flush=True)
    slots = max(args.concurrency)
    peers = []
    for port, (name, quantization) in enumerate(list(LOCALMOE.items())[1:], start=8201):
        peers.append((name, f"http://127.0.0.1:{port}",
                      localmoe_command(str(args.model), port, f"--quantization {quantization}")))
    for port, (name, gguf_file) in enumerate((("llama.cpp-Q8_0", args.q8), ("llama.cpp-Q4_K_M", args.q4)), start=8211):
        peers.append((name, f"http://127.0.0.1:{port}", f"{args.llama_server} -m {gguf_file} -t 2 -np {slots} "
                      f"-c {slots * 512} --host 127.0.0.1 --port {port}"))
    serve_out = args.out.with_name(args.out.stem + "_serve.json")
    command = [sys.executable, str(Path(__file__).with_name("serve_bench.py")), "--model", str(args.model),
               "--concurrency", *map(str, args.concurrency), "--prompts-per-stream", str(args.prompts_per_stream),
               "--min-prompts", str(args.min_prompts), "--out", str(serve_out)]
    for peer in peers:
        command += ["--peer", *peer]
    subprocess.run(command, check=True)
    systems = json.loads(serve_out.read_text())["systems"]

    per_token = {name: localmoe_bytes_per_token(args.model, q) for name, q in LOCALMOE.items()}
    per_token |= {"llama.cpp-Q8_0": gguf_bytes_per_token(args.q8), "llama.cpp-Q4_K_M": gguf_bytes_per_token(args.q4)}
    report = {"bandwidth_bytes_per_s": bandwidth, "bytes_per_token": per_token, "serve_bench": str(serve_out),
              "levels": {}}
    for level in map(str, args.concurrency):
        rates = {name: levels[level]["output_throughput"] for name, levels in systems.items() if level in levels}
        entry = {"output_tokens_per_s": rates,
                 "ratios": {f"{a} / {b}": rates[a] / rates[b] for a, b in PAIRS if a in rates and b in rates}}
        if level == "1":  # one stream: every token reads its weights once
            entry["roofline_fraction"] = {name: rate * per_token[name] / bandwidth for name, rate in rates.items()}
        report["levels"][level] = entry
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["levels"], indent=2))


if __name__ == "__main__":
    main()
