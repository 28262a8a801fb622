#!/usr/bin/env python3
"""Write a PEFT LoRA adapter with random A and B for a model's shapes, to measure what applying
adapters unmerged costs (benches/RESULTS.md). The values are random: the adapter means nothing.

  scripts/random-lora.py OUT_DIR --layers 30 --hidden 576 --q 576 --kv 192 --ffn 1536 [--rank 16]
      [--alpha 32] [--targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]

The defaults are SmolLM2-135M's shapes. Needs numpy and safetensors.
"""
import argparse
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

p = argparse.ArgumentParser()
p.add_argument("out", type=Path)
p.add_argument("--layers", type=int, default=30)
p.add_argument("--hidden", type=int, default=576)
p.add_argument("--q", type=int, default=576)
p.add_argument("--kv", type=int, default=192)
p.add_argument("--ffn", type=int, default=1536)
p.add_argument("--rank", type=int, default=16)
p.add_argument("--alpha", type=float, default=32)
p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
a = p.parse_args()

shapes = {  # module: (out, in)
    "q_proj": ("self_attn", a.q, a.hidden), "k_proj": ("self_attn", a.kv, a.hidden),
    "v_proj": ("self_attn", a.kv, a.hidden), "o_proj": ("self_attn", a.hidden, a.q),
    "gate_proj": ("mlp", a.ffn, a.hidden), "up_proj": ("mlp", a.ffn, a.hidden), "down_proj": ("mlp", a.hidden, a.ffn),
}
targets = a.targets.split(",")
rng = np.random.default_rng(0)
tensors = {}
for layer in range(a.layers):
    for t in targets:
        block, out, inp = shapes[t]
        name = f"base_model.model.model.layers.{layer}.{block}.{t}"
        tensors[f"{name}.lora_A.weight"] = (rng.standard_normal((a.rank, inp)) / np.sqrt(inp)).astype(np.float32)
        tensors[f"{name}.lora_B.weight"] = (rng.standard_normal((out, a.rank)) * 0.01).astype(np.float32)
a.out.mkdir(parents=True, exist_ok=True)
save_file(tensors, str(a.out / "adapter_model.safetensors"), metadata={"format": "pt"})
config = {"peft_type": "LORA", "r": a.rank, "lora_alpha": a.alpha, "use_rslora": False, "target_modules": targets,
          "bias": "none", "fan_in_fan_out": False, "use_dora": False, "task_type": "CAUSAL_LM"}
(a.out / "adapter_config.json").write_text(json.dumps(config, indent=2))
print(f"{a.out}: rank {a.rank} on {len(targets)} modules × {a.layers} layers")
