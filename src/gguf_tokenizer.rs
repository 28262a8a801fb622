//! The tokenizer of a GGUF file, rebuilt from its `tokenizer.ggml.*` metadata as the
//! Hugging Face `tokenizer.json` it was converted from: byte-level BPE (`tokenizer.ggml.model =
//! gpt2`) with the pre-tokeniser named by `tokenizer.ggml.pre` (llama.cpp's `llama-vocab.cpp`
//! regexes, in the spelling the matching tokenizer.json files use), control tokens as special
//! added tokens, and the chat template of `tokenizer.chat_template`.

use crate::gguf::GgufFile;
use crate::tokenizer::Tokenizer;
use crate::{KilnError, Result};
use serde_json::{json, Value};
use std::path::Path;

/// Llama 3's split regex (tokenizer.json of Meta-Llama-3; `llama-bpe` in llama.cpp).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's: the same with single digits.
const QWEN2_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;

fn split(regex: &str) -> Value {
    json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false})
}

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

/// The tokenizer.json that `file`'s metadata describes.
pub fn tokenizer_json(file: &GgufFile, path: &Path) -> Result<Value> {
    let err = |m: String| KilnError::model(path, m);
    let model = file.get_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(err(format!("tokenizer.ggml.model `{model}`: kiln builds byte-level BPE (`gpt2`) tokenizers")));
    }
    let pre = file.get_str("tokenizer.ggml.pre").unwrap_or("default");
    let (normalizer, pre_tokenizer, ignore_merges) = match pre {
        "llama-bpe" | "llama3" => {
            (Value::Null, json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_REGEX), byte_level(false)]}), true)
        }
        "qwen2" => (
            json!({"type": "NFC"}),
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2_REGEX), byte_level(false)]}),
            false,
        ),
        // SmolLM: every digit alone, then GPT-2's byte-level regex.
        "smollm" => (
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            false,
        ),
        "default" | "gpt2" => (Value::Null, byte_level(true), false),
        other => {
            return Err(err(format!(
                "tokenizer.ggml.pre `{other}` is not supported (kiln knows llama-bpe, qwen2, smollm, gpt2)"
            )))
        }
    };
    let tokens = file.get_str_array("tokenizer.ggml.tokens")?;
    let merges = file.get_str_array("tokenizer.ggml.merges")?;
    let types = file.get_i32_array("tokenizer.ggml.token_type").ok();
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (id, t) in tokens.iter().enumerate() {
        vocab.insert(t.clone(), json!(id));
        let ty = types.and_then(|ts| ts.get(id)).copied().unwrap_or(1);
        if ty == TOKEN_CONTROL || ty == TOKEN_USER_DEFINED {
            added.push(json!({
                "id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": ty == TOKEN_CONTROL,
            }));
        }
    }
    let add_bos = file.get_bool("tokenizer.ggml.add_bos_token").unwrap_or(false);
    let bos = file.get_u32("tokenizer.ggml.bos_token_id").ok();
    let post = match (add_bos, bos) {
        (true, Some(b)) => {
            let bos_text = tokens.get(b as usize).ok_or_else(|| err(format!("bos id {b} outside the vocabulary")))?;
            json!({"type": "Sequence", "processors": [
                {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
                {"type": "TemplateProcessing",
                 "single": [{"SpecialToken": {"id": bos_text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                 "pair": [{"SpecialToken": {"id": bos_text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                          {"SpecialToken": {"id": bos_text, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                 "special_tokens": {bos_text.as_str(): {"id": bos_text, "ids": [b], "tokens": [bos_text]}}}
            ]})
        }
        _ => {
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
        }
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges,
        },
    }))
}

/// The tokenizer config (special tokens, chat template) of `file`, as tokenizer_config.json.
pub fn tokenizer_config(file: &GgufFile) -> Value {
    let tokens = file.get_str_array("tokenizer.ggml.tokens").unwrap_or(&[]);
    let name = |key: &str| file.get_u32(key).ok().and_then(|id| tokens.get(id as usize)).cloned();
    json!({
        "bos_token": name("tokenizer.ggml.bos_token_id"),
        "eos_token": name("tokenizer.ggml.eos_token_id"),
        "unk_token": name("tokenizer.ggml.unknown_token_id"),
        "pad_token": name("tokenizer.ggml.padding_token_id"),
        "chat_template": file.get_str("tokenizer.chat_template").ok(),
    })
}

/// The tokenizer of a GGUF file.
pub fn from_gguf(file: &GgufFile, path: &Path) -> Result<Tokenizer> {
    let json = tokenizer_json(file, path)?;
    Tokenizer::from_json_values(&json, &tokenizer_config(file), path)
}
