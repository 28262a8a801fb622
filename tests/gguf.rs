//! GGUF reader and CPU dequantisation: bit-exact against gguf-py's reference vectors
//! (`tests/fixtures/gguf/make_quant_vectors.py`), a file written by gguf-py's own writer, a
//! round trip through a small GGUF v3 writer defined here, and every way a crafted or cut-off
//! file must fail with an error (never a panic or a huge allocation).

use kiln::gguf::{Array, GgmlType, GgufFile, TensorInfo, Value, ValueType};
use kiln::quant;
use std::collections::BTreeMap;
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf").join(name)
}

// ---------------------------------------------------------------------------------------------
// Reference vectors (format in make_quant_vectors.py)

struct Case {
    ggml_type: GgmlType,
    label: String,
    data: Vec<u8>,
    expected: Vec<f32>,
}

fn read_cases(name: &str) -> Vec<Case> {
    let bytes = std::fs::read(fixture(name)).expect("vector file (run make_quant_vectors.py)");
    let mut pos = 0usize;
    let mut take = |n: usize| {
        let s = &bytes[pos..pos + n];
        pos += n;
        s.to_vec()
    };
    let u32_at = |b: Vec<u8>| u32::from_le_bytes(b.try_into().unwrap()) as usize;
    assert_eq!(take(4), b"KQV1");
    let n_cases = u32_at(take(4));
    (0..n_cases)
        .map(|_| {
            let type_id = u32_at(take(4)) as u32;
            let n_elements = u32_at(take(4));
            let n_bytes = u32_at(take(4));
            let label_len = u32_at(take(4));
            let label = String::from_utf8(take(label_len)).unwrap();
            let data = take(n_bytes);
            let expected =
                take(4 * n_elements).chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            Case { ggml_type: GgmlType::from_id(type_id).unwrap(), label, data, expected }
        })
        .collect()
}

/// Bit-for-bit equality (NaN payloads and the sign of zero included), reporting the first few
/// mismatches by index.
fn assert_bits_eq(label: &str, actual: &[f32], expected: &[f32]) {
    assert_eq!(actual.len(), expected.len(), "{label}: length");
    let bad: Vec<String> = actual
        .iter()
        .zip(expected)
        .enumerate()
        .filter(|(_, (a, e))| a.to_bits() != e.to_bits())
        .take(5)
        .map(|(i, (a, e))| format!("[{i}] got {a:e} ({:#010x}), want {e:e} ({:#010x})", a.to_bits(), e.to_bits()))
        .collect();
    assert!(bad.is_empty(), "{label}: {} differ from gguf-py:\n{}", bad.len(), bad.join("\n"));
}

#[test]
fn dequantisation_is_bit_exact_against_gguf_py() {
    let cases = read_cases("quant_vectors.bin");
    // Every supported type is covered by at least one case.
    for ty in GgmlType::ALL {
        assert!(cases.iter().any(|c| c.ggml_type == ty), "no vectors for {ty}");
    }
    for c in &cases {
        let got = quant::dequantize(c.ggml_type, &c.data, c.expected.len()).unwrap();
        assert_bits_eq(&c.label, &got, &c.expected);
    }
}

#[test]
fn dequantize_into_matches_dequantize_block_by_block() {
    for c in read_cases("quant_vectors.bin") {
        // Two halves dequantised separately give the same result: blocks are independent.
        let (bs, ts) = (c.ggml_type.block_size(), c.ggml_type.type_size());
        let n_blocks = c.data.len() / ts;
        let split = n_blocks / 2;
        let mut out = vec![f32::NAN; c.expected.len()];
        let (lo, hi) = out.split_at_mut(split * bs);
        quant::dequantize_into(c.ggml_type, &c.data[..split * ts], lo).unwrap();
        quant::dequantize_into(c.ggml_type, &c.data[split * ts..], hi).unwrap();
        assert_bits_eq(&c.label, &out, &c.expected);
    }
}

// ---------------------------------------------------------------------------------------------
// A file written by gguf-py's GGUFWriter

#[test]
fn reads_a_file_written_by_gguf_py() {
    let f = GgufFile::open(fixture("gguf_py_writer.gguf")).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.data_start() % 64, 0);
    assert_eq!(f.architecture().unwrap(), "llama");
    assert_eq!(f.get("test.u8"), Some(&Value::U8(200)));
    assert_eq!(f.get("test.i8"), Some(&Value::I8(-100)));
    assert_eq!(f.get("test.u16"), Some(&Value::U16(60000)));
    assert_eq!(f.get("test.i16"), Some(&Value::I16(-30000)));
    assert_eq!(f.get_u32("test.u32").unwrap(), 4_000_000_000);
    assert_eq!(f.get_i32("test.i32").unwrap(), -2_000_000_000);
    assert_eq!(f.get_f32("test.f32").unwrap(), 0.1f32);
    assert!(f.get_bool("test.bool").unwrap());
    assert_eq!(f.get_str("test.string").unwrap(), "héllo wörld ✓");
    assert_eq!(f.get_u64("test.u64").unwrap(), (1 << 40) + 1);
    assert_eq!(f.get_i64("test.i64").unwrap(), -(1 << 40));
    assert_eq!(f.get_f64("test.f64").unwrap(), std::f64::consts::E);
    assert_eq!(f.get_str_array("test.strings").unwrap(), ["<s>", "Ġthe", "", "✓"]);
    assert_eq!(f.get_f32_array("test.f32s").unwrap(), [0.5, -1.25, 3.0]);
    assert_eq!(f.get_i32_array("test.i32s").unwrap(), [1, -2, 3]);
    assert_eq!(f.get_array("test.nested").unwrap(), &Array::Array(vec![Array::I32(vec![1, 2]), Array::I32(vec![3])]));
    assert_eq!(f.get_array("test.bools").unwrap(), &Array::Bool(vec![true, false, true]));

    let names: Vec<&str> = f.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["token_embd.weight", "blk.0.attn_norm.weight", "blk.0.attn_q.weight", "blk.0.ffn_down.weight"]);
    let embd = f.tensor("token_embd.weight").unwrap();
    assert_eq!(embd.dims, [64, 3], "GGUF dims are innermost first");
    assert_eq!(embd.shape(), [3, 64]);
    assert_eq!(embd.ggml_type, GgmlType::Q8_0);

    let cases = read_cases("gguf_py_writer.bin");
    assert_eq!(cases.len(), f.tensors.len());
    for (t, c) in f.tensors.iter().zip(&cases) {
        assert_eq!(t.name, c.label);
        assert_eq!(t.ggml_type, c.ggml_type, "{}", t.name);
        assert_eq!(t.offset % 64, 0, "{}", t.name);
        assert_eq!(f.tensor_data(t).unwrap(), c.data.as_slice(), "{}", t.name);
        assert_bits_eq(&t.name, &f.dequantize(t).unwrap(), &c.expected);
    }
}

// ---------------------------------------------------------------------------------------------
// A small GGUF v3 writer, for round trips and for crafting broken files

/// Little-endian GGUF primitives.
#[derive(Default)]
struct Out(Vec<u8>);

impl Out {
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn string(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    /// A value's payload (without its type tag).
    fn payload(&mut self, v: &Value) -> &mut Self {
        match v {
            Value::U8(x) => self.0.push(*x),
            Value::I8(x) => self.0.extend_from_slice(&x.to_le_bytes()),
            Value::U16(x) => self.0.extend_from_slice(&x.to_le_bytes()),
            Value::I16(x) => self.0.extend_from_slice(&x.to_le_bytes()),
            Value::U32(x) => self.0.extend_from_slice(&x.to_le_bytes()),
            Value::I32(x) => self.0.extend_from_slice(&x.to_le_bytes()),
            Value::F32(x) => self.0.extend_from_slice(&x.to_le_bytes()),
            Value::Bool(x) => self.0.push(u8::from(*x)),
            Value::String(s) => {
                self.string(s);
            }
            Value::Array(a) => {
                self.array(a);
            }
            Value::U64(x) => self.0.extend_from_slice(&x.to_le_bytes()),
            Value::I64(x) => self.0.extend_from_slice(&x.to_le_bytes()),
            Value::F64(x) => self.0.extend_from_slice(&x.to_le_bytes()),
        }
        self
    }
    /// An array body: element type, count, elements.
    fn array(&mut self, a: &Array) -> &mut Self {
        self.u32(a.element_type().id()).u64(a.len() as u64);
        fn each<T: Clone>(o: &mut Out, v: &[T], f: fn(T) -> Value) {
            for x in v {
                o.payload(&f(x.clone()));
            }
        }
        match a {
            Array::U8(v) => each(self, v, Value::U8),
            Array::I8(v) => each(self, v, Value::I8),
            Array::U16(v) => each(self, v, Value::U16),
            Array::I16(v) => each(self, v, Value::I16),
            Array::U32(v) => each(self, v, Value::U32),
            Array::I32(v) => each(self, v, Value::I32),
            Array::F32(v) => each(self, v, Value::F32),
            Array::Bool(v) => each(self, v, Value::Bool),
            Array::String(v) => each(self, v, Value::String),
            Array::Array(v) => each(self, v, Value::Array),
            Array::U64(v) => each(self, v, Value::U64),
            Array::I64(v) => each(self, v, Value::I64),
            Array::F64(v) => each(self, v, Value::F64),
        }
        self
    }
    fn kv(&mut self, key: &str, v: &Value) -> &mut Self {
        self.string(key).u32(v.value_type().id()).payload(v)
    }
    fn pad_to(&mut self, alignment: u64) {
        while !(self.0.len() as u64).is_multiple_of(alignment) {
            self.0.push(0);
        }
    }
}

struct TensorSpec {
    name: String,
    dims: Vec<u64>,
    type_id: u32,
    /// `None`: the next aligned offset after the previous tensor's data.
    offset: Option<u64>,
    data: Vec<u8>,
}

fn tensor(name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) -> TensorSpec {
    TensorSpec { name: name.to_string(), dims: dims.to_vec(), type_id: ty.id(), offset: None, data }
}

/// A GGUF file: header, metadata, tensor infos, padding, data (each tensor padded to
/// `alignment`, none after the last, so every byte of the file is needed).
fn write_gguf(version: u32, kvs: &[(&str, Value)], tensors: &[TensorSpec], alignment: u64) -> Vec<u8> {
    let mut o = Out::default();
    o.0.extend_from_slice(b"GGUF");
    o.u32(version).u64(tensors.len() as u64).u64(kvs.len() as u64);
    for (k, v) in kvs {
        o.kv(k, v);
    }
    let mut next = 0u64;
    let mut offsets = Vec::new();
    for t in tensors {
        let offset = t.offset.unwrap_or(next);
        offsets.push(offset);
        next = (offset + t.data.len() as u64).div_ceil(alignment) * alignment;
        o.string(&t.name).u32(t.dims.len() as u32);
        for &d in &t.dims {
            o.u64(d);
        }
        o.u32(t.type_id).u64(offset);
    }
    o.pad_to(alignment);
    let data_start = o.0.len();
    for (t, offset) in tensors.iter().zip(offsets) {
        let at = data_start + offset as usize;
        if o.0.len() < at {
            o.0.resize(at, 0);
        }
        let end = at + t.data.len();
        if o.0.len() < end {
            o.0.resize(end, 0);
        }
        o.0[at..end].copy_from_slice(&t.data);
    }
    o.0
}

/// Metadata of every value type, nested arrays included.
fn every_kind_of_metadata() -> Vec<(&'static str, Value)> {
    vec![
        ("general.architecture", Value::String("llama".into())),
        ("general.alignment", Value::U32(32)),
        ("t.u8", Value::U8(255)),
        ("t.i8", Value::I8(-128)),
        ("t.u16", Value::U16(65535)),
        ("t.i16", Value::I16(-32768)),
        ("t.u32", Value::U32(u32::MAX)),
        ("t.i32", Value::I32(i32::MIN)),
        ("t.f32", Value::F32(-0.125)),
        ("t.bool", Value::Bool(false)),
        ("t.string", Value::String("naïve ✓".into())),
        ("t.u64", Value::U64(u64::MAX)),
        ("t.i64", Value::I64(i64::MIN)),
        ("t.f64", Value::F64(1e300)),
        ("t.empty_string", Value::String(String::new())),
        ("t.a.u8", Value::Array(Array::U8(vec![1, 2, 3]))),
        ("t.a.i8", Value::Array(Array::I8(vec![-1]))),
        ("t.a.u16", Value::Array(Array::U16(vec![7, 8]))),
        ("t.a.i16", Value::Array(Array::I16(vec![-7]))),
        ("t.a.u32", Value::Array(Array::U32(vec![1 << 31]))),
        ("t.a.i32", Value::Array(Array::I32(vec![-5, 5]))),
        ("t.a.f32", Value::Array(Array::F32(vec![1.5, -2.5]))),
        ("t.a.bool", Value::Array(Array::Bool(vec![true, false]))),
        ("t.a.string", Value::Array(Array::String(vec!["a".into(), String::new(), "ü".into()]))),
        ("t.a.u64", Value::Array(Array::U64(vec![u64::MAX]))),
        ("t.a.i64", Value::Array(Array::I64(vec![i64::MIN, 0]))),
        ("t.a.f64", Value::Array(Array::F64(vec![0.1]))),
        ("t.a.empty", Value::Array(Array::F32(vec![]))),
        (
            "t.a.nested",
            Value::Array(Array::Array(vec![
                Array::String(vec!["x".into()]),
                Array::Array(vec![Array::U8(vec![9]), Array::I64(vec![])]),
            ])),
        ),
    ]
}

/// Two tensors: F32 (2, 3) and Q4_0 (2, 32).
fn two_tensors() -> Vec<TensorSpec> {
    let f32_data: Vec<u8> = (0..6).flat_map(|i| (i as f32 * 0.5).to_le_bytes()).collect();
    let mut q4 = Vec::new();
    for b in 0..2u8 {
        q4.extend_from_slice(&half::f16::from_f32(0.25).to_le_bytes());
        q4.extend((0..16u8).map(|j| j.wrapping_mul(17).wrapping_add(b)));
    }
    vec![tensor("norm.weight", &[3, 2], GgmlType::F32, f32_data), tensor("proj.weight", &[32, 2], GgmlType::Q4_0, q4)]
}

fn small_file() -> Vec<u8> {
    write_gguf(3, &every_kind_of_metadata(), &two_tensors(), 32)
}

fn parse_err(bytes: &[u8]) -> String {
    match GgufFile::parse(bytes) {
        Ok(_) => panic!("should not parse"),
        Err(e) => e.to_string(),
    }
}

fn assert_err_contains(bytes: &[u8], needles: &[&str]) {
    let e = parse_err(bytes);
    for n in needles {
        assert!(e.contains(n), "error {e:?} should mention {n:?}");
    }
}

#[test]
fn round_trips_a_small_v3_file() {
    let bytes = small_file();
    let f = GgufFile::parse(bytes.as_slice()).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 32);
    let expected: BTreeMap<String, Value> =
        every_kind_of_metadata().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    assert_eq!(f.metadata, expected);

    let specs = two_tensors();
    assert_eq!(f.tensors.len(), 2);
    for (t, s) in f.tensors.iter().zip(&specs) {
        assert_eq!(t.name, s.name);
        assert_eq!(t.dims, s.dims);
        assert_eq!(t.ggml_type.id(), s.type_id);
        assert_eq!(t.offset % 32, 0);
        assert_eq!(f.tensor_data(t).unwrap(), s.data.as_slice());
    }
    let norm = f.dequantize(&f.tensors[0]).unwrap();
    assert_eq!(norm, [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]);
    let proj = f.dequantize(&f.tensors[1]).unwrap();
    assert_eq!(proj.len(), 64);
    // Element 0 of block 0: low nibble of byte 0 (= 0) → (0 - 8) * 0.25.
    assert_eq!(proj[0], -2.0);

    // Version 2 has the same layout.
    let v2 = write_gguf(2, &every_kind_of_metadata(), &two_tensors(), 32);
    assert_eq!(GgufFile::parse(v2).unwrap().version(), 2);
}

#[test]
fn no_tensors_and_no_metadata_is_a_valid_file() {
    let f = GgufFile::parse(write_gguf(3, &[], &[], 32)).unwrap();
    assert!(f.metadata.is_empty() && f.tensors.is_empty());
}

#[test]
fn getters_name_the_key_and_the_types() {
    let f = GgufFile::parse(small_file()).unwrap();
    let e = f.get_u32("llama.block_count").unwrap_err().to_string();
    assert!(e.contains("llama.block_count") && e.contains("missing"), "{e}");
    let e = f.get_u32("t.string").unwrap_err().to_string();
    assert!(e.contains("t.string") && e.contains("string"), "{e}");
    let e = f.get_u32("t.i8").unwrap_err().to_string();
    assert!(e.contains("t.i8") && e.contains("-128"), "{e}");
    let e = f.get_str_array("t.a.f32").unwrap_err().to_string();
    assert!(e.contains("t.a.f32") && e.contains("array of f32"), "{e}");
    assert!(f.get_f32("t.f64").is_err(), "f64 is not narrowed silently");
    // Integers widen and narrow losslessly across widths.
    assert_eq!(f.get_u64("t.u8").unwrap(), 255);
    assert_eq!(f.get_i64("t.u32").unwrap(), i64::from(u32::MAX));
    assert_eq!(f.get_f64("t.f32").unwrap(), -0.125);
    assert!(f.tensor("nope").is_none());
}

// ---------------------------------------------------------------------------------------------
// Broken files

#[test]
fn every_truncation_is_an_error() {
    let bytes = small_file();
    for n in 0..bytes.len() {
        assert!(GgufFile::parse(&bytes[..n]).is_err(), "truncated to {n} of {} bytes parsed", bytes.len());
    }
    assert!(GgufFile::parse(bytes.as_slice()).is_ok());
}

#[test]
fn any_single_corrupt_byte_is_an_error_or_a_consistent_file() {
    // No panic, whatever byte is changed; what still parses has readable, dequantisable tensors.
    let bytes = small_file();
    for i in 0..bytes.len() {
        for v in [0x00, 0x01, 0x7f, 0x80, 0xff] {
            let mut b = bytes.clone();
            b[i] = v;
            if let Ok(f) = GgufFile::parse(b.as_slice()) {
                for t in &f.tensors {
                    let data = f.tensor_data(t).unwrap();
                    assert_eq!(data.len() as u64, t.n_bytes().unwrap());
                    f.dequantize(t).unwrap();
                }
            }
        }
    }
}

#[test]
fn bad_magic_and_versions() {
    let mut b = small_file();
    b[..4].copy_from_slice(b"GGML");
    assert_err_contains(&b, &["not a GGUF file"]);
    assert_err_contains(&write_gguf(1, &[], &[], 32), &["version 1"]);
    assert_err_contains(&write_gguf(4, &[], &[], 32), &["version 4"]);
    assert_err_contains(&write_gguf(3u32.swap_bytes(), &[], &[], 32), &["big-endian"]);
}

/// A header with these counts and nothing (or `rest`) after it.
fn header(n_tensors: u64, n_kv: u64, rest: &[u8]) -> Vec<u8> {
    let mut o = Out::default();
    o.0.extend_from_slice(b"GGUF");
    o.u32(3).u64(n_tensors).u64(n_kv);
    o.0.extend_from_slice(rest);
    o.0
}

#[test]
fn huge_counts_are_refused_before_allocating() {
    assert_err_contains(&header(1 << 60, 0, &[]), &["1152921504606846976 tensor infos", "cannot fit"]);
    assert_err_contains(&header(0, 1 << 60, &[0; 64]), &["metadata entries", "cannot fit"]);
    assert_err_contains(&header(u64::MAX, u64::MAX, &[]), &["cannot fit"]);

    // An array claiming 2^60 strings (or u8s, or nested arrays).
    for (ty, what) in [(ValueType::String, "strings"), (ValueType::U8, "u8s"), (ValueType::Array, "arrays")] {
        let mut o = Out::default();
        o.string("tokenizer.ggml.tokens").u32(ValueType::Array.id()).u32(ty.id()).u64(1 << 60);
        o.0.extend_from_slice(&[0; 64]);
        let e = parse_err(&header(0, 1, &o.0));
        assert!(e.contains("tokenizer.ggml.tokens") && e.contains("cannot fit"), "{what}: {e}");
    }
}

#[test]
fn strings_past_the_end_are_refused() {
    // Key length past the end.
    let mut o = Out::default();
    o.u64(1000).u32(0).0.extend_from_slice(&[0; 16]);
    assert_err_contains(&header(0, 1, &o.0), &["runs past the end"]);
    // Value length past the end, and u64::MAX.
    for len in [100, u64::MAX] {
        let mut o = Out::default();
        o.string("k").u32(ValueType::String.id()).u64(len);
        o.0.extend_from_slice(b"short");
        assert_err_contains(&header(0, 1, &o.0), &["`k`", "runs past the end"]);
    }
    // Tensor name length past the end.
    let mut o = Out::default();
    o.u64(1 << 40).0.extend_from_slice(&[0; 32]);
    assert_err_contains(&header(1, 0, &o.0), &["runs past the end"]);
}

#[test]
fn tensor_data_past_the_end_is_refused() {
    let mut t = two_tensors();
    t[1].dims = vec![32, 1 << 20];
    assert_err_contains(&write_gguf(3, &[], &t, 32), &["proj.weight", "past the end of the file"]);

    let mut t = two_tensors();
    t[1].offset = Some(1 << 40);
    assert_err_contains(&write_gguf_without_data(&t), &["proj.weight", "past the end of the file"]);

    let mut t = two_tensors();
    t[1].offset = Some(!31); // the largest aligned u64
    assert_err_contains(&write_gguf_without_data(&t), &["proj.weight", "overflows"]);

    // Dims whose byte size overflows 64 bits.
    let mut t = two_tensors();
    t[0].dims = vec![1 << 40, 1 << 40];
    assert_err_contains(&write_gguf_without_data(&t), &["norm.weight", "overflows"]);
}

/// Tensor infos whose data would not be written (offsets far away): header and infos only.
fn write_gguf_without_data(tensors: &[TensorSpec]) -> Vec<u8> {
    let mut o = Out::default();
    o.0.extend_from_slice(b"GGUF");
    o.u32(3).u64(tensors.len() as u64).u64(0);
    let mut next = 0;
    for t in tensors {
        let offset = t.offset.unwrap_or(next);
        next = offset.saturating_add(64);
        o.string(&t.name).u32(t.dims.len() as u32);
        for &d in &t.dims {
            o.u64(d);
        }
        o.u32(t.type_id).u64(offset);
    }
    o.pad_to(32);
    o.0.extend_from_slice(&[0; 256]);
    o.0
}

#[test]
fn misaligned_and_overlapping_tensors_are_refused() {
    let mut t = two_tensors();
    t[1].offset = Some(36);
    assert_err_contains(&write_gguf(3, &[], &t, 32), &["proj.weight", "not a multiple of the alignment 32"]);

    let mut t = two_tensors();
    t[1].offset = Some(0);
    assert_err_contains(&write_gguf(3, &[], &t, 32), &["norm.weight", "proj.weight", "overlap"]);

    // Alignment 8 from the metadata: offset 24 is aligned, and adjacent tensors do not overlap.
    let mut t = two_tensors();
    t[1].offset = Some(24);
    let kv = [("general.alignment", Value::U32(8))];
    let f = GgufFile::parse(write_gguf(3, &kv, &t, 8)).unwrap();
    assert_eq!(f.alignment(), 8);
    let mut t = two_tensors();
    t[1].offset = Some(16);
    assert_err_contains(&write_gguf(3, &kv, &t, 8), &["overlap"]);
}

#[test]
fn bad_alignment_is_refused() {
    for v in [Value::U32(0), Value::U32(3), Value::U32(48), Value::I32(-32)] {
        let kv = [("general.alignment", v.clone())];
        assert_err_contains(&write_gguf(3, &kv, &two_tensors(), 32), &["general.alignment", "power of two"]);
    }
    let kv = [("general.alignment", Value::String("32".into()))];
    assert_err_contains(&write_gguf(3, &kv, &two_tensors(), 32), &["general.alignment", "string"]);
}

#[test]
fn bad_tensor_infos_are_refused() {
    for (id, needle) in [(99, "99"), (10, "Q2_K"), (u32::MAX, "4294967295")] {
        let mut t = two_tensors();
        t[1].type_id = id;
        assert_err_contains(&write_gguf(3, &[], &t, 32), &["proj.weight", needle]);
    }
    let mut t = two_tensors();
    t[0].dims = vec![1, 1, 1, 3, 2];
    assert_err_contains(&write_gguf(3, &[], &t, 32), &["norm.weight", "5 dimensions"]);
    let mut t = two_tensors();
    t[0].dims = vec![];
    assert_err_contains(&write_gguf(3, &[], &t, 32), &["norm.weight", "0 dimensions"]);
    // A Q4_0 row of 16 elements is half a block.
    let mut t = two_tensors();
    t[1].dims = vec![16, 2];
    assert_err_contains(&write_gguf(3, &[], &t, 32), &["proj.weight", "whole number"]);
    let mut t = two_tensors();
    t[1].name = "norm.weight".into();
    assert_err_contains(&write_gguf(3, &[], &t, 32), &["duplicate tensor name `norm.weight`"]);
    let mut t = two_tensors();
    t[0].dims = vec![3, 1 << 63];
    assert_err_contains(&write_gguf_without_data(&t), &["norm.weight", "i64::MAX"]);
}

#[test]
fn bad_metadata_is_refused() {
    let kv = [("a", Value::U8(1)), ("a", Value::U8(2))];
    assert_err_contains(&write_gguf(3, &kv, &[], 32), &["duplicate metadata key `a`"]);

    // Unknown value type, unknown array element type.
    let mut o = Out::default();
    o.string("k").u32(13).0.extend_from_slice(&[0; 16]);
    assert_err_contains(&header(0, 1, &o.0), &["`k`", "value type 13"]);
    let mut o = Out::default();
    o.string("k").u32(ValueType::Array.id()).u32(77).u64(1).0.extend_from_slice(&[0; 16]);
    assert_err_contains(&header(0, 1, &o.0), &["`k`", "value type 77"]);

    // A bool that is neither 0 nor 1.
    let mut o = Out::default();
    o.string("flag").u32(ValueType::Bool.id()).0.push(2);
    assert_err_contains(&header(0, 1, &o.0), &["`flag`", "bool byte 2"]);

    // A key that is not UTF-8.
    let mut o = Out::default();
    o.u64(2).0.extend_from_slice(&[0xff, 0xfe]);
    o.u32(ValueType::U8.id()).0.push(0);
    assert_err_contains(&header(0, 1, &o.0), &["not UTF-8"]);

    // Arrays nested deeper than the cap (a stack-overflow attempt at any depth is refused).
    for depth in [9usize, 100_000] {
        let mut o = Out::default();
        o.string("deep").u32(ValueType::Array.id());
        for _ in 0..depth {
            o.u32(ValueType::Array.id()).u64(1);
        }
        o.u32(ValueType::U8.id()).u64(0);
        assert_err_contains(&header(0, 1, &o.0), &["`deep`", "nested"]);
    }
    // Eight levels are fine.
    let mut a = Array::U8(vec![7]);
    for _ in 0..7 {
        a = Array::Array(vec![a]);
    }
    let f = GgufFile::parse(write_gguf(3, &[("deep", Value::Array(a.clone()))], &[], 32)).unwrap();
    assert_eq!(f.get_array("deep").unwrap(), &a);
}

#[test]
fn a_zero_dim_makes_an_empty_tensor_whatever_the_dims_before_it() {
    // Found by the gguf fuzz target: the element count multiplied in order overflowed before it
    // reached the zero, so a tensor the parser accepted (0 bytes) had no element count.
    let mut t = two_tensors();
    t[0].dims = vec![(1 << 32) + 32, 412_383_969_280, 0];
    t[0].data = vec![];
    let file = GgufFile::parse(write_gguf(3, &[], &t, 32)).unwrap();
    let tensor = &file.tensors[0];
    assert_eq!((tensor.n_elements().unwrap(), tensor.n_bytes().unwrap()), (0, 0));
    assert!(file.tensor_data(tensor).unwrap().is_empty());
}

#[test]
fn tensor_data_rechecks_bounds_for_any_tensor_info() {
    let f = GgufFile::parse(small_file()).unwrap();
    let forged = TensorInfo { name: "forged".into(), dims: vec![1 << 30], ggml_type: GgmlType::F32, offset: 0 };
    let e = f.tensor_data(&forged).unwrap_err().to_string();
    assert!(e.contains("forged") && e.contains("past the end"), "{e}");
    let forged = TensorInfo { offset: u64::MAX, dims: vec![1], ..forged };
    assert!(f.tensor_data(&forged).is_err());
}

/// The fuzzer's seed corpus starts from this file; keep the committed copy in step with the
/// writer (`KILN_BLESS=1` rewrites it).
#[test]
fn fuzz_seed_is_current() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/gguf/small_v3.gguf");
    let bytes = small_file();
    if std::env::var_os("KILN_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &bytes).unwrap();
    }
    let committed = std::fs::read(&path).expect("fuzz seed (KILN_BLESS=1 cargo test --test gguf writes it)");
    assert!(committed == bytes, "{} is stale: rerun with KILN_BLESS=1", path.display());
}

/// Real llama.cpp files, when present: every `.gguf` under `$KILN_GGUF_DIR` parses, and every
/// tensor of a supported type slices and dequantises. Prints one summary line per file.
/// `KILN_GGUF_DIR=/path cargo test --test gguf -- --ignored --nocapture`
#[test]
#[ignore = "needs KILN_GGUF_DIR with real GGUF files"]
fn parses_real_gguf_files() {
    let Some(dir) = std::env::var_os("KILN_GGUF_DIR") else {
        return;
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no .gguf files in KILN_GGUF_DIR");
    for path in paths {
        let f = GgufFile::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let mut n_values = 0usize;
        for t in &f.tensors {
            n_values += f.dequantize(t).unwrap_or_else(|e| panic!("{e}")).len();
        }
        let vocab = f.get_str_array("tokenizer.ggml.tokens").map_or(0, |v| v.len());
        println!(
            "{}: v{} arch {:?}, {} keys, {} tensors ({n_values} values), vocab {vocab}",
            path.display(),
            f.version(),
            f.architecture().unwrap_or("?"),
            f.metadata.len(),
            f.tensors.len(),
        );
    }
}

// ---------------------------------------------------------------- rope_freqs (Llama 3.1+)

/// A llama GGUF header with `rope_freqs.weight` holding `factors`, written to a temp file.
fn llama_with_rope_freqs(name: &str, factors: &[f32], dims: &[u64]) -> PathBuf {
    let kvs = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.embedding_length", Value::U32(256)),
        ("llama.feed_forward_length", Value::U32(512)),
        ("llama.block_count", Value::U32(1)),
        ("llama.attention.head_count", Value::U32(2)),
        ("llama.attention.head_count_kv", Value::U32(1)),
        ("llama.rope.freq_base", Value::F32(500000.0)),
        ("llama.context_length", Value::U32(131072)),
        ("llama.vocab_size", Value::U32(64)),
    ];
    let data: Vec<u8> = factors.iter().flat_map(|f| f.to_le_bytes()).collect();
    let bytes = write_gguf(3, &kvs, &[tensor("rope_freqs.weight", dims, GgmlType::F32, data)], 32);
    let path = std::env::temp_dir().join(format!("kiln-rope-freqs-{}-{name}.gguf", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn rope_freqs_carry_llama31_scaling_into_the_rope_frequencies() {
    use kiln::model::gguf_source::GgufSource;
    use kiln::ops::rope::{inv_freq, inv_freq_with_factors, Llama3Scaling};
    // llama.cpp's converter stores Llama 3.1's scaling as per-frequency divisors:
    // factor[j] = unscaled[j] / scaled[j]. Reading them back must give the scaled frequencies.
    let scaling = Llama3Scaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192.0,
    };
    let head_dim = 128;
    let plain = inv_freq(head_dim, 500000.0, None);
    let scaled = inv_freq(head_dim, 500000.0, Some(&scaling));
    let factors: Vec<f32> = plain.iter().zip(&scaled).map(|(p, s)| (*p as f64 / *s as f64) as f32).collect();
    assert!(factors.iter().any(|f| *f > 7.9) && factors.contains(&1.0), "a real mix of scaled bands");

    let path = llama_with_rope_freqs("ok", &factors, &[64]);
    let config = GgufSource::open(&path).unwrap().config().unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(config.head_dim, 128);
    assert_eq!(config.rope_freq_factors.as_deref(), Some(&factors[..]));
    let got = inv_freq_with_factors(head_dim, config.rope_theta, None, config.rope_freq_factors.as_deref());
    for (j, (g, s)) in got.iter().zip(&scaled).enumerate() {
        // f32 factors and f32 results: within 2 ulps of the directly scaled frequency.
        assert!((g - s).abs() <= 2.0 * f32::EPSILON * s.abs(), "frequency {j}: {g} vs {s}");
    }
}

#[test]
fn bad_rope_freqs_are_clear_errors() {
    use kiln::model::gguf_source::GgufSource;
    for (name, factors, dims, needle) in [
        ("short", vec![1.0f32; 32], vec![32u64], "expected F32 [64]"),
        ("zero", [vec![0.0f32], vec![1.0; 63]].concat(), vec![64], "not a positive factor"),
        ("nan", [vec![f32::NAN], vec![1.0; 63]].concat(), vec![64], "not a positive factor"),
    ] {
        let path = llama_with_rope_freqs(name, &factors, &dims);
        let e = GgufSource::open(&path).unwrap().config().err().map(|e| e.to_string());
        std::fs::remove_file(&path).unwrap();
        let e = e.unwrap_or_else(|| panic!("{name}: accepted"));
        assert!(e.contains("rope_freqs.weight") && e.contains(needle), "{name}: {e}");
    }
}
