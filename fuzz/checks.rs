//! What each fuzz target checks, in one place: the targets in `fuzz_targets/` call these under
//! libFuzzer, and `tests/fuzz_corpora.rs` replays every seed and corpus input through them on
//! stable Rust in CI. Each takes arbitrary bytes; a file kiln accepts must then work as a loaded
//! model's would, and a file it refuses must be refused with an error. A panic, a hang or a huge
//! allocation is a failure (libFuzzer's `-timeout` and `-rss_limit_mb` catch the last two).

use kiln::gguf::GgufFile;
use kiln::model::checkpoint::{check_tensors, to_f32, Checkpoint, TensorSource};
use kiln::model::gguf_source::GgufSource;
use kiln::model::weights::expected_tensors;
use kiln::model::ModelConfig;
use kiln::tokenizer::{ChatMessage, StreamDecoder, Tokenizer};
use std::path::Path;

/// Text for every tokenizer that loads: ASCII, digits, accents, CJK, an emoji (four UTF-8 bytes,
/// split across byte-level tokens), special-looking tags and newlines.
const TEXT: &str = "Hello, world! 1234 héllo 你好 🦀\n<|im_start|>user\n\tdone.";

/// A GGUF file: the header and metadata parse or are refused; every tensor of a file that parses
/// has its data in the file and dequantises; the model configuration its metadata describes is
/// built or refused, and then checked against the tensors present.
pub fn gguf(data: &[u8]) {
    let Some(file) = parse_gguf(data) else { return };
    // The getters must not panic on whatever type a key turned out to have.
    for key in file.metadata.keys() {
        let _ = file.get_u32(key);
        let _ = file.get_u64(key);
        let _ = file.get_f32(key);
        let _ = file.get_bool(key);
        let _ = file.get_str(key);
        let _ = file.get_str_array(key);
        let _ = file.get_i32_array(key);
    }
    let _ = file.architecture();
    for tensor in &file.tensors {
        // parse() accepted the tensor, so its data must be in the file and dequantise.
        let bytes = file.tensor_data(tensor).expect("accepted tensor has data");
        assert_eq!(Ok(bytes.len() as u64), tensor.n_bytes().map_err(|_| ()));
        let n = tensor.n_elements().expect("accepted tensor has an element count") as usize;
        let values = kiln::quant::dequantize(tensor.ggml_type, bytes, n).expect("accepted tensor dequantises");
        std::hint::black_box(values);
    }
    let path = Path::new("fuzz.gguf");
    let source = GgufSource::new(file, path);
    if let Ok(config) = source.config() {
        model_config(&config);
        let _ = check_tensors(&source, &expected_tensors(&config), path);
    }
}

/// A GGUF file's tokenizer (`tokenizer.ggml.*` and `tokenizer.chat_template`): built or refused;
/// one that builds encodes, decodes, streams and renders its chat template (or says why not).
pub fn gguf_tokenizer(data: &[u8]) {
    let Some(file) = parse_gguf(data) else { return };
    if let Ok(tokenizer) = kiln::gguf_tokenizer::from_gguf(&file, Path::new("fuzz.gguf")) {
        use_tokenizer(&tokenizer);
    }
}

/// A safetensors file: its header parses or is refused; every tensor of a file that parses has
/// exactly the bytes its dtype and shape call for, and float vectors convert.
pub fn safetensors(data: &[u8]) {
    let path = Path::new("model.safetensors");
    let Ok(checkpoint) = Checkpoint::from_bytes(path, data.to_vec()) else { return };
    for name in checkpoint.names() {
        let info = &checkpoint.tensors[&name];
        let bytes = checkpoint.bytes(&name).expect("a listed tensor has bytes");
        let elements = info.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).expect("the header's shape fits");
        assert_eq!(bytes.len() * 8, elements * info.dtype.bitsize(), "{name}: {:?} {:?}", info.dtype, info.shape);
        if let Ok((dtype, _, bytes)) = checkpoint.tensor(&name) {
            let values = to_f32(dtype, bytes).expect("F32, F16 and BF16 convert");
            assert_eq!(values.len(), elements);
        }
    }
}

/// A Hugging Face model directory's text files, given as one input split at NUL bytes into
/// config.json, tokenizer.json and tokenizer_config.json: each loads or is refused; a config that
/// loads yields its tensor list and sizes, and a tokenizer that loads is used as generation uses
/// it, chat template included.
pub fn hf_files(data: &[u8]) {
    let mut parts = data.splitn(3, |&b| b == 0);
    let config = parts.next().unwrap_or_default();
    let tokenizer = parts.next().unwrap_or_default();
    let tokenizer_config = parts.next();
    if let Ok(text) = std::str::from_utf8(config) {
        if let Ok(config) = ModelConfig::from_json(text, Path::new("config.json")) {
            model_config(&config);
        }
    }
    if let Ok(t) = Tokenizer::from_bytes(tokenizer, tokenizer_config, Path::new("tokenizer.json")) {
        use_tokenizer(&t);
    }
}

/// GGUF bytes in a read-only anonymous map: the type `GgufFile::open` gives, so the rest of the
/// loader (`GgufSource`, the tokenizer builder) runs on it unchanged.
fn parse_gguf(data: &[u8]) -> Option<GgufFile> {
    // An anonymous map cannot be empty; an empty file is refused (tests/gguf.rs checks that).
    if data.is_empty() {
        return None;
    }
    let mut map = memmap2::MmapMut::map_anon(data.len()).ok()?;
    map.copy_from_slice(data);
    GgufFile::parse(map.make_read_only().ok()?).ok()
}

/// Everything derived from a configuration must be computable: the tensor list (one entry per
/// layer, so the layer count must have been bounded) and the sizes.
fn model_config(config: &ModelConfig) {
    let expected = expected_tensors(config);
    assert!(expected.len() >= 2 + 9 * config.n_layers);
    std::hint::black_box((config.parameter_count(), config.kv_bytes_per_token(4)));
}

fn use_tokenizer(tokenizer: &Tokenizer) {
    if let Ok(ids) = tokenizer.encode(TEXT, true) {
        let _ = tokenizer.decode(&ids, false);
        let _ = tokenizer.decode(&ids, true);
        // Streaming, with ids past the vocabulary mixed in (a padded embedding table samples them).
        let mut stream = StreamDecoder::new(tokenizer, true);
        for &id in ids.iter().chain([u32::MAX, tokenizer.vocab_size() as u32].iter()) {
            let _ = stream.push(id);
        }
        let _ = stream.finish();
    }
    for id in [0, 1, u32::MAX] {
        let _ = tokenizer.id_to_token(id);
    }
    let conversation = [
        ChatMessage::new("system", "You are helpful."),
        ChatMessage::new("user", "Hi <|im_end|> there"),
        ChatMessage::new("assistant", "Hello."),
        ChatMessage::new("user", "Write a haiku."),
    ];
    for add_generation_prompt in [true, false] {
        let _ = tokenizer.encode_chat(&conversation, add_generation_prompt);
    }
}
