#!/usr/bin/env python3
"""Writes the fuzz targets' seed inputs (fuzz/seeds/<target>/) from the tiny fixtures.

Seeds are small on purpose: libFuzzer's speed is executions per second, and a tokenizer.json of
the tiny fixtures' 1,000 tokens costs several times more per execution than one of 300. So the
tokenizers here are the fixtures' own cut to their first 300 ids (the 256 byte-level base tokens
come first) and the merges among those, with the special tokens renumbered after them; the chat
templates are the fixtures' and Qwen2.5's real one (tools, several branches).

  hf_files/        config.json NUL tokenizer.json NUL tokenizer_config.json
  gguf_tokenizer/  GGUF files holding only tokenizer.ggml.* metadata (written by gguf-py), one
                   per pre-tokenizer kiln knows
  gguf/            tiny llama, qwen2, qwen3, qwen2moe, qwen3moe and Mixtral models (every tensor kiln loads,
                   F32/F16/Q8_0),
                   besides the two reader seeds tests/gguf.rs keeps
  safetensors/     small files of every float dtype kiln loads, plus dtypes it refuses

Needs gguf-py and numpy (`pip install gguf numpy`). Run from anywhere:
  python3 fuzz/make_seeds.py
"""

import json
import struct
from pathlib import Path

import gguf
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SEEDS = ROOT / "fuzz" / "seeds"
FIXTURES = ROOT / "tests" / "fixtures"
KEEP = 300

# Qwen2.5's chat template (Qwen/Qwen2.5-*-Instruct tokenizer_config.json), as
# scripts/fetch-tokenizers.sh fetches it; the seeds carry a copy so this script needs no network.
QWEN25_CONFIG = ROOT / ".cache" / "tokenizers" / "qwen2" / "tokenizer_config.json"


# GPT-2's and SmolLM's pre-tokenizer: its byte-level regex is compiled once per process, where a
# `Split` pattern (Llama 3's, Qwen2's) is compiled for every tokenizer loaded, which costs the
# fuzzer 90% of its speed. Most seeds use this one; one per target keeps a `Split`.
BYTE_LEVEL = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}


def mini_tokenizer(name, byte_level=False):
    """The fixture's tokenizer.json cut to KEEP ids, its special tokens renumbered after them."""
    tok = json.loads((FIXTURES / name / "tokenizer.json").read_text())
    if byte_level:
        tok["pre_tokenizer"] = BYTE_LEVEL
    vocab = {t: i for t, i in tok["model"]["vocab"].items() if i < KEEP}
    merges = []
    for m in tok["model"]["merges"]:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        if a in vocab and b in vocab and a + b in vocab:
            merges.append(m)
    tok["model"]["vocab"] = vocab
    tok["model"]["merges"] = merges
    remap = {}
    for n, added in enumerate(tok["added_tokens"]):
        remap[added["id"]] = KEEP + n
        added["id"] = KEEP + n

    def renumber(node):
        if isinstance(node, dict):
            if "ids" in node:
                node["ids"] = [remap.get(i, i) for i in node["ids"]]
            for v in node.values():
                renumber(v)
        elif isinstance(node, list):
            for v in node:
                renumber(v)

    renumber(tok["post_processor"])
    return tok


def tokenizer_config(name, template=None):
    config = json.loads((FIXTURES / name / "tokenizer_config.json").read_text())
    config.pop("added_tokens_decoder", None)
    if template is not None:
        config["chat_template"] = template
    return config


def compact(value):
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def write(target, name, data):
    path = SEEDS / target / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    print(f"{path.relative_to(ROOT)}: {len(data)} bytes")


def hf_files(qwen25_template):
    # Every family's config: Qwen3's head_dim and q/k norms, Mistral's window, the mixtures.
    for name in ["llama3-tiny", "qwen2-tiny", "qwen3-tiny", "mistral-swa-tiny", "qwen2-moe-tiny", "mixtral-tiny"]:
        config = (FIXTURES / name / "config.json").read_bytes()
        tok = compact(mini_tokenizer(name, byte_level=True))
        write("hf_files", f"{name}.bin", config + b"\0" + tok + b"\0" + compact(tokenizer_config(name)))
    config = (FIXTURES / "qwen2-tiny" / "config.json").read_bytes()
    for byte_level in [True, False]:
        tok = compact(mini_tokenizer("qwen2-tiny", byte_level))
        write(
            "hf_files",
            f"qwen2-tiny-qwen25-template{'' if byte_level else '-split'}.bin",
            config + b"\0" + tok + b"\0" + compact(tokenizer_config("qwen2-tiny", qwen25_template)),
        )


def gguf_tokenizer(qwen25_template):
    # llama-bpe and qwen2 build a `Split` pre-tokenizer, compiled for every tokenizer (see
    # BYTE_LEVEL above): one seed has it, the others take the byte-level ones.
    cases = [
        ("llama3-tiny", "llama-bpe", True, None),
        ("llama3-tiny", "smollm", False, None),
        ("qwen2-tiny", "gpt2", False, qwen25_template),
    ]
    for fixture, pre, add_bos, template in cases:
        tok = mini_tokenizer(fixture)
        config = tokenizer_config(fixture, template)
        tokens = [t for t, _ in sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])]
        types = [gguf.TokenType.NORMAL] * len(tokens)
        for added in tok["added_tokens"]:
            tokens.append(added["content"])
            types.append(gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED)
        ids = {t: i for i, t in enumerate(tokens)}
        merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]

        path = SEEDS / "gguf_tokenizer" / f"{fixture}-{pre}.gguf"
        path.parent.mkdir(parents=True, exist_ok=True)
        w = gguf.GGUFWriter(str(path), "llama")
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        if config.get("bos_token") in ids:
            w.add_bos_token_id(ids[config["bos_token"]])
        if config.get("eos_token") in ids:
            w.add_eos_token_id(ids[config["eos_token"]])
        w.add_add_bos_token(add_bos)
        w.add_chat_template(config["chat_template"])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        print(f"{path.relative_to(ROOT)}: {path.stat().st_size} bytes")


def gguf_models():
    """Tiny models of every GGUF arch kiln loads, as llama.cpp names their tensors: llama, qwen2,
    qwen3 (q/k norms, key_length), qwen2moe (experts stacked in *_exps, a shared expert),
    qwen3moe and Mixtral (arch llama with experts)."""
    rng = np.random.default_rng(7)
    h, f, heads, kv_heads, vocab = 32, 64, 4, 2, 40
    n_exp, ef = 4, 32
    head_dim = h // heads
    for name, arch in [("llama", "llama"), ("qwen2", "qwen2"), ("qwen3", "qwen3"), ("qwen2moe", "qwen2moe"),
                       ("qwen3moe", "qwen3moe"), ("mixtral", "llama")]:
        moe = name in ("qwen2moe", "qwen3moe", "mixtral")
        path = SEEDS / "gguf" / f"tiny-{name}.gguf"
        w = gguf.GGUFWriter(str(path), arch)
        w.add_context_length(128)
        w.add_embedding_length(h)
        w.add_block_count(1)
        w.add_feed_forward_length(f)
        w.add_head_count(heads)
        w.add_head_count_kv(kv_heads)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_rope_freq_base(10000.0)
        w.add_vocab_size(vocab)
        if arch in ("qwen3", "qwen3moe"):
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        if moe:
            w.add_expert_count(n_exp)
            w.add_expert_used_count(2)
            if name != "mixtral":
                w.add_expert_feed_forward_length(ef)
            if name == "qwen2moe":
                w.add_expert_shared_feed_forward_length(f)

        def t(name, shape, qtype=gguf.GGMLQuantizationType.F32):
            data = rng.standard_normal(shape).astype(np.float32) * 0.1
            if qtype == gguf.GGMLQuantizationType.F16:
                data = data.astype(np.float16)
            elif qtype != gguf.GGMLQuantizationType.F32:
                data = gguf.quantize(data, qtype)
            w.add_tensor(name, data, raw_dtype=qtype)

        q8 = gguf.GGMLQuantizationType.Q8_0
        t("token_embd.weight", (vocab, h), q8)
        t("output_norm.weight", (h,))
        t("blk.0.attn_norm.weight", (h,))
        t("blk.0.ffn_norm.weight", (h,))
        t("blk.0.attn_q.weight", (heads * head_dim, h), q8)
        t("blk.0.attn_k.weight", (kv_heads * head_dim, h), gguf.GGMLQuantizationType.F16)
        t("blk.0.attn_v.weight", (kv_heads * head_dim, h), gguf.GGMLQuantizationType.F16)
        t("blk.0.attn_output.weight", (h, heads * head_dim), q8)
        if arch in ("qwen2", "qwen2moe"):
            t("blk.0.attn_q.bias", (heads * head_dim,))
            t("blk.0.attn_k.bias", (kv_heads * head_dim,))
            t("blk.0.attn_v.bias", (kv_heads * head_dim,))
        if arch in ("qwen3", "qwen3moe"):
            t("blk.0.attn_q_norm.weight", (head_dim,))
            t("blk.0.attn_k_norm.weight", (head_dim,))
        if moe:
            e_f = f if name == "mixtral" else ef
            t("blk.0.ffn_gate_inp.weight", (n_exp, h))
            t("blk.0.ffn_gate_exps.weight", (n_exp, e_f, h), q8)
            t("blk.0.ffn_up_exps.weight", (n_exp, e_f, h), q8)
            t("blk.0.ffn_down_exps.weight", (n_exp, h, e_f), q8)
            if name == "qwen2moe":
                t("blk.0.ffn_gate_shexp.weight", (f, h), q8)
                t("blk.0.ffn_up_shexp.weight", (f, h), q8)
                t("blk.0.ffn_down_shexp.weight", (h, f), q8)
                t("blk.0.ffn_gate_inp_shexp.weight", (h,))
        else:
            t("blk.0.ffn_gate.weight", (f, h), q8)
            t("blk.0.ffn_up.weight", (f, h), q8)
            t("blk.0.ffn_down.weight", (h, f), q8)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        print(f"{path.relative_to(ROOT)}: {path.stat().st_size} bytes")


def safetensors_file(tensors, metadata=None):
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def safetensors_seeds():
    rng = np.random.default_rng(11)
    f32 = rng.standard_normal((4, 6)).astype(np.float32)
    write(
        "safetensors",
        "floats.safetensors",
        safetensors_file(
            [
                ("model.norm.weight", "F32", [6], f32[0].tobytes()),
                ("model.embed_tokens.weight", "F16", [4, 6], f32.astype(np.float16).tobytes()),
                ("lm_head.weight", "BF16", [4, 6], (f32.view(np.uint32) >> 16).astype(np.uint16).tobytes()),
                ("model.layers.0.mlp.up_proj.weight", "F32", [2, 3], f32[1, :6].tobytes()),
            ],
            {"format": "pt"},
        ),
    )
    write(
        "safetensors",
        "other_dtypes.safetensors",
        safetensors_file(
            [
                ("ids", "I64", [3], np.arange(3, dtype=np.int64).tobytes()),
                ("mask", "BOOL", [2, 2], bytes([1, 0, 0, 1])),
                ("scalar", "F32", [], np.float32(1.5).tobytes()),
                ("empty", "F16", [0, 5], b""),
            ]
        ),
    )


def main():
    qwen25_template = json.loads(QWEN25_CONFIG.read_text())["chat_template"]
    hf_files(qwen25_template)
    gguf_tokenizer(qwen25_template)
    gguf_models()
    safetensors_seeds()


if __name__ == "__main__":
    main()
