//! The WGSL sources, compiled into the binary, and how a variant of one is put together.
//!
//! Each kernel family is one real `.wgsl` file in `shaders/`. A variant differs only in
//! (a) which reduction library is prepended (`reduce_subgroup.wgsl` or `reduce_workgroup.wgsl`:
//! both define the same `workgroup_sum`/`workgroup_max`/... functions), (b) the element type of
//! the KV cache (`alias kv_t = f16;` or `f32`), and (c) pipeline-overridable constants
//! (`override W_DTYPE: u32;` in weights.wgsl, prepended to kernels that read weights), which WGSL sets at pipeline creation without any
//! text substitution. `compose` writes (a) and (b) in front of the file; nothing else is edited.

/// One kernel family's source and what it needs composed in front of it.
#[derive(Debug)]
pub struct Shader {
    pub file: &'static str,
    pub source: &'static str,
    /// Calls the `workgroup_*` reductions.
    pub reduces: bool,
    /// Reads or writes the KV cache through `kv_t`.
    pub uses_kv: bool,
    /// Decodes weights with `weights.wgsl`.
    pub reads_weights: bool,
}

macro_rules! shader {
    ($name:ident, $file:literal, reduces: $r:expr, uses_kv: $kv:expr, reads_weights: $w:expr) => {
        pub const $name: Shader = Shader {
            file: $file,
            source: include_str!(concat!("../../shaders/", $file)),
            reduces: $r,
            uses_kv: $kv,
            reads_weights: $w,
        };
    };
}

shader!(MATMUL, "matmul.wgsl", reduces: false, uses_kv: false, reads_weights: true);
shader!(GEMV, "gemv.wgsl", reduces: true, uses_kv: false, reads_weights: true);
shader!(RMS_NORM, "rms_norm.wgsl", reduces: true, uses_kv: false, reads_weights: false);
shader!(ROPE, "rope.wgsl", reduces: false, uses_kv: true, reads_weights: false);
shader!(ELEMENTWISE, "elementwise.wgsl", reduces: false, uses_kv: false, reads_weights: false);
shader!(EMBEDDING, "embedding.wgsl", reduces: false, uses_kv: false, reads_weights: true);
shader!(SOFTMAX, "softmax.wgsl", reduces: true, uses_kv: false, reads_weights: false);
shader!(ARGMAX, "argmax.wgsl", reduces: true, uses_kv: false, reads_weights: false);
shader!(ATTENTION, "attention.wgsl", reduces: false, uses_kv: true, reads_weights: false);
shader!(MOE, "moe.wgsl", reduces: false, uses_kv: false, reads_weights: true);
shader!(LORA, "lora.wgsl", reduces: false, uses_kv: false, reads_weights: false);

/// The two interchangeable reduction libraries.
pub const REDUCE_SUBGROUP: &str = include_str!("../../shaders/reduce_subgroup.wgsl");
pub const REDUCE_WORKGROUP: &str = include_str!("../../shaders/reduce_workgroup.wgsl");
/// Weight element decoding, for kernels that read weights.
pub const WEIGHTS: &str = include_str!("../../shaders/weights.wgsl");

/// Every kernel family, for validation tests and cache warm-up.
pub const ALL: &[&Shader] =
    &[&MATMUL, &GEMV, &RMS_NORM, &ROPE, &ELEMENTWISE, &EMBEDDING, &SOFTMAX, &ARGMAX, &ATTENTION, &MOE, &LORA];

/// The full WGSL text of `shader` for the given paths.
pub fn compose(shader: &Shader, subgroups: bool, kv_f16: bool) -> String {
    let mut text = String::new();
    if shader.uses_kv && kv_f16 {
        text.push_str("enable f16;\n");
    }
    // Subgroup builtins need the SUBGROUP device feature but no `enable` directive in naga.
    if shader.uses_kv {
        text.push_str(if kv_f16 { "alias kv_t = f16;\n" } else { "alias kv_t = f32;\n" });
    }
    if shader.reduces {
        text.push_str(if subgroups { REDUCE_SUBGROUP } else { REDUCE_WORKGROUP });
        text.push('\n');
    }
    if shader.reads_weights {
        text.push_str(WEIGHTS);
        text.push('\n');
    }
    text.push_str(shader.source);
    text
}
