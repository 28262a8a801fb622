//! Fuzz the GGUF reader: any bytes either fail to parse with an error or give a file whose every
//! tensor can be sliced and dequantised, without a panic, an out-of-bounds access or a huge
//! allocation.

#![no_main]

use kiln::gguf::GgufFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::parse(data) else {
        return;
    };
    // The getters must not panic on whatever type a key turned out to have.
    for key in file.metadata.keys() {
        let _ = file.get_u32(key);
        let _ = file.get_f32(key);
        let _ = file.get_str(key);
        let _ = file.get_str_array(key);
    }
    let _ = file.architecture();
    for tensor in &file.tensors {
        // parse() accepted the tensor, so its data must be in the file and dequantise.
        let bytes = file.tensor_data(tensor).expect("accepted tensor has data");
        assert_eq!(Ok(bytes.len() as u64), tensor.n_bytes().map_err(|_| ()));
        let values = kiln::quant::dequantize(
            tensor.ggml_type,
            bytes,
            tensor
                .n_elements()
                .expect("accepted tensor has an element count") as usize,
        )
        .expect("accepted tensor dequantises");
        std::hint::black_box(values);
    }
});
