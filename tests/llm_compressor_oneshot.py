"""Run by tests/test_llm_compressor.py in llm-compressor's own environment (it pins transformers<=5.17): quantize
the checkpoint SOURCE with llm-compressor's `oneshot` and the preset SCHEME (W4A16, W8A16: round to nearest, no
calibration data), the routers and the head left alone as its MoE examples do, and save it compressed to TARGET.

    python llm_compressor_oneshot.py SOURCE SCHEME TARGET
"""

import shutil
import sys
from pathlib import Path

from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier

source, scheme, target = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
recipe = QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head", "re:.*block_sparse_moe.gate$"])
model = oneshot(model=str(source), recipe=recipe)
model.save_pretrained(target, save_compressed=True)
for tokenizer_file in source.glob("tokenizer*"):
    shutil.copy(tokenizer_file, target)
