#!/usr/bin/env python3
"""Write a random-weight Hugging Face checkpoint with the exact shapes of a real model, for
measuring load memory and end-to-end speed without downloading weights (standard library only).

    scripts/synthetic-checkpoint.py OUT_DIR {smollm2-135m,qwen2.5-0.5b,llama3-8b} [--tokenizer DIR]

Weights are bf16 with magnitudes in [2^-6, 2^-5) and random signs; norms are 1. The tokenizer
files are copied from --tokenizer (default: the real ones fetched by scripts/fetch-tokenizers.sh).
"""
import json, os, shutil, struct, sys

PRESETS = {
    # name: (arch, hidden, ffn, layers, heads, kv_heads, vocab, tied, rope_theta, tokenizer)
    "smollm2-135m": ("LlamaForCausalLM", 576, 1536, 30, 9, 3, 49152, True, 100000.0, "llama3"),
    "qwen2.5-0.5b": ("Qwen2ForCausalLM", 896, 4864, 24, 14, 2, 151936, True, 1000000.0, "qwen2"),
    "llama3-8b": ("LlamaForCausalLM", 4096, 14336, 32, 32, 8, 128256, False, 500000.0, "llama3"),
}

HIGH = bytes(((b & 0x80) | 0x3C) for b in range(256))  # sign | exponent 121 >> 1
LOW = bytes((b | 0x80) for b in range(256))            # exponent's low bit, random mantissa


def random_bf16(n):
    a = bytearray(os.urandom(2 * n))
    a[1::2] = a[1::2].translate(HIGH)
    a[0::2] = a[0::2].translate(LOW)
    return bytes(a)


def main():
    out, preset = sys.argv[1], sys.argv[2]
    tok = sys.argv[sys.argv.index("--tokenizer") + 1] if "--tokenizer" in sys.argv else None
    arch, h, f, layers, heads, kv, vocab, tied, theta, tok_name = PRESETS[preset]
    d = h // heads
    os.makedirs(out, exist_ok=True)
    qwen = arch.startswith("Qwen2")
    tensors = [("model.embed_tokens.weight", [vocab, h]), ("model.norm.weight", [h])]
    if not tied:
        tensors.append(("lm_head.weight", [vocab, h]))
    for i in range(layers):
        p = f"model.layers.{i}"
        tensors += [(f"{p}.input_layernorm.weight", [h]), (f"{p}.post_attention_layernorm.weight", [h]),
                    (f"{p}.self_attn.q_proj.weight", [heads * d, h]), (f"{p}.self_attn.k_proj.weight", [kv * d, h]),
                    (f"{p}.self_attn.v_proj.weight", [kv * d, h]), (f"{p}.self_attn.o_proj.weight", [h, heads * d]),
                    (f"{p}.mlp.gate_proj.weight", [f, h]), (f"{p}.mlp.up_proj.weight", [f, h]),
                    (f"{p}.mlp.down_proj.weight", [h, f])]
        if qwen:
            tensors += [(f"{p}.self_attn.q_proj.bias", [heads * d]), (f"{p}.self_attn.k_proj.bias", [kv * d]),
                        (f"{p}.self_attn.v_proj.bias", [kv * d])]
    header, offset = {}, 0
    for name, shape in tensors:
        n = 1
        for s in shape:
            n *= s
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + 2 * n]}
        offset += 2 * n
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(os.path.join(out, "model.safetensors"), "wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text)
        for name, shape in tensors:
            n = header[name]["data_offsets"][1] // 2 - header[name]["data_offsets"][0] // 2
            fh.write(b"\x80\x3f" * n if len(shape) == 1 and "norm" in name else random_bf16(n))
    config = {"architectures": [arch], "model_type": "qwen2" if qwen else "llama", "hidden_size": h,
              "intermediate_size": f, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv, "vocab_size": vocab, "rms_norm_eps": 1e-6 if qwen else 1e-5,
              "rope_theta": theta, "max_position_embeddings": 8192, "tie_word_embeddings": tied,
              "hidden_act": "silu", "torch_dtype": "bfloat16", "eos_token_id": 2}
    json.dump(config, open(os.path.join(out, "config.json"), "w"), indent=2)
    src = tok or os.path.join(os.path.dirname(__file__), "..", ".cache", "tokenizers", tok_name)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if os.path.exists(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(out, name))
    print(f"{out}: {preset}, {offset} bytes of bf16 weights")


if __name__ == "__main__":
    main()
