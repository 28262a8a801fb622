//! The GPU layer's contracts: adapter choice and its error, typed errors naming the kernel,
//! pipelines built once per key.

mod common;

use kiln::gpu::{shaders, Gpu, GpuOptions};
use kiln::ops::rms_norm;
use kiln::KilnError;
use std::sync::Arc;

#[test]
fn missing_adapter_error_says_what_was_looked_for_and_how_to_get_a_driver() {
    let options = GpuOptions { adapter_name: Some("no such adapter 7f3a".into()), ..Default::default() };
    let err = Gpu::with_options(&options).err().expect("no adapter has that name");
    assert!(matches!(err, KilnError::NoAdapter(_)), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("no such adapter 7f3a") && msg.contains("mesa-vulkan-drivers"), "{msg}");
}

#[test]
fn best_adapter_is_chosen_with_its_features() {
    let (_, gpu) = common::devices().remove(0);
    eprintln!("{}", gpu.describe());
    // On lavapipe both SHADER_F16 and SUBGROUP exist: the Vulkan adapter must win over GL's.
    if gpu.info.name.contains("llvmpipe") {
        assert_eq!(gpu.info.backend, wgpu::Backend::Vulkan, "{}", gpu.describe());
        assert!(gpu.caps.f16 && gpu.caps.subgroups && gpu.caps.timestamps, "{}", gpu.describe());
    }
    assert!(
        gpu.max_binding >= 128 << 20
            || gpu.max_binding == gpu.limits.max_storage_buffer_binding_size.min(gpu.limits.max_buffer_size)
    );
    let (_, fallback) = common::devices().remove(1);
    assert!(!fallback.caps.f16 && !fallback.caps.subgroups, "the switches force the fallback paths");
}

#[test]
fn backend_variable_is_checked() {
    // Set for this process only; other tests read options explicitly, not from the environment.
    std::env::set_var("KILN_BACKEND", "glide");
    let err = GpuOptions::from_env().expect_err("glide is no backend");
    std::env::remove_var("KILN_BACKEND");
    assert!(err.to_string().contains("vulkan, metal, dx12, gl"), "{err}");
}

#[test]
fn pipelines_are_built_once_per_key() {
    let (_, gpu) = common::devices().remove(0);
    let a = gpu.pipeline(&shaders::GEMV, "gemv", &[("W_DTYPE", 1)]).unwrap();
    let b = gpu.pipeline(&shaders::GEMV, "gemv", &[("W_DTYPE", 1)]).unwrap();
    let c = gpu.pipeline(&shaders::GEMV, "gemv", &[("W_DTYPE", 0)]).unwrap();
    assert!(Arc::ptr_eq(&a, &b), "same key, same pipeline");
    assert!(!Arc::ptr_eq(&a, &c), "another override value is another pipeline");
}

#[test]
fn validation_errors_come_back_typed_and_name_the_kernel() {
    let (_, gpu) = common::devices().remove(0);
    // A uniform buffer where the kernel needs storage: wgpu rejects the bind group.
    let wrong = gpu.uniform("not storage", &[0f32; 4]);
    let w = gpu.buffer("w", 64).unwrap();
    let err = rms_norm::rms_norm(&gpu, &wrong, &w, &w, 1, 16, 1e-5)
        .err()
        .expect("binding a uniform buffer as storage must fail");
    match &err {
        KilnError::Validation { kernel, .. } => assert_eq!(kernel, "rms_norm"),
        other => panic!("expected a validation error, got {other:?}"),
    }
}

#[test]
fn oversized_allocation_is_a_typed_out_of_memory_error() {
    let (_, gpu) = common::devices().remove(0);
    let err = gpu.buffer("kv cache", gpu.limits.max_buffer_size + 1).expect_err("past max_buffer_size");
    assert!(matches!(err, KilnError::OutOfMemory { ref kernel, .. } if kernel == "kv cache"), "{err:?}");
}

#[test]
fn broken_wgsl_is_a_shader_error_naming_the_kernel() {
    static BROKEN: shaders::Shader = shaders::Shader {
        file: "broken.wgsl",
        source: "fn main( {",
        reduces: false,
        uses_kv: false,
        reads_weights: false,
    };
    let (_, gpu) = common::devices().remove(0);
    let err = gpu.pipeline(&BROKEN, "main", &[]).expect_err("does not parse");
    assert!(matches!(err, KilnError::Shader { ref kernel, .. } if kernel.contains("broken.wgsl")), "{err:?}");
}
