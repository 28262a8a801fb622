//! Every kernel, in every variant the runtime composes and with the override constants it sets,
//! goes through naga's back ends for the platforms this machine cannot run: SPIR-V (checked with
//! `spirv-val`, Debian's spirv-tools), MSL (Metal), HLSL (DX12: shader model 6.2, and 5.1 for FXC
//! where subgroups and f16 are off) and GLSL ES 3.1 (wgpu's GL backend: no subgroups, no f16;
//! checked with `glslangValidator`, Debian's glslang-tools). A translation error anywhere fails.
//! `scripts/setup-test-tools.sh` installs the two validators.

use kiln::gpu::shaders;
use naga::back::{glsl, hlsl, msl, spv};
use naga::valid::{Capabilities, ModuleInfo, ValidationFlags, Validator};
use naga::{Module, ShaderStage};
use std::path::{Path, PathBuf};
use std::process::Command;

fn tool(name: &str) -> PathBuf {
    let p = Path::new("/usr/bin").join(name);
    assert!(p.exists(), "{} is missing: run scripts/setup-test-tools.sh", p.display());
    p
}

/// The override values the runtime sets for an entry point (ops/*.rs): every weight encoding,
/// every gemv_blocks workgroup size, the head shapes decode_lanes is built for.
fn constant_sets(module: &Module, entry: &str) -> Vec<naga::back::PipelineConstants> {
    let declared: Vec<String> = module.overrides.iter().filter_map(|(_, o)| o.name.clone()).collect();
    let mut sets = vec![naga::back::PipelineConstants::default()];
    let mut vary = |name: &str, values: &[f64]| {
        if declared.iter().any(|d| d == name) {
            sets = sets
                .iter()
                .flat_map(|s| {
                    values.iter().map(move |&v| {
                        let mut s = s.clone();
                        s.insert(name.to_string(), v);
                        s
                    })
                })
                .collect();
        }
    };
    vary("W_DTYPE", &(0..=10).map(f64::from).collect::<Vec<_>>());
    if entry == "gemv_blocks" {
        vary("BLOCKS_WG", &[4.0, 8.0, 16.0]);
    }
    if entry == "decode_lanes" {
        vary("HEAD_DIM", &[64.0, 128.0]);
        vary("HEADS_PER_LANE", &[1.0, 3.0]);
    }
    sets
}

struct Outcome {
    translations: usize,
    spirv: Vec<(String, Vec<u32>)>,
    glsl: Vec<(String, String)>,
    errors: Vec<String>,
}

fn translate(shader: &shaders::Shader, subgroups: bool, kv_f16: bool, out: &mut Outcome) {
    let source = shaders::compose(shader, subgroups, kv_f16);
    let module = naga::front::wgsl::parse_str(&source).expect("every_shader_variant_validates covers parsing");
    let info = Validator::new(ValidationFlags::all(), Capabilities::all()).validate(&module).expect("validates");
    for ep in &module.entry_points {
        for constants in constant_sets(&module, &ep.name) {
            let what = format!("{} {} (subgroups {subgroups}, f16 {kv_f16}, {constants:?})", shader.file, ep.name);
            let (m, i) = match naga::back::pipeline_constants::process_overrides(
                &module,
                &info,
                Some((ShaderStage::Compute, &ep.name)),
                &constants,
            ) {
                Ok(r) => r,
                Err(e) => {
                    out.errors.push(format!("{what}: overrides: {e:?}"));
                    continue;
                }
            };
            let (m, i): (&Module, &ModuleInfo) = (&m, &i);
            let mut attempt = |backend: &str, r: Result<(), String>| {
                out.translations += 1;
                if let Err(e) = r {
                    out.errors.push(format!("{what}: {backend}: {e}"));
                }
            };

            let spv_options = spv::Options { lang_version: (1, 3), ..Default::default() };
            let pipeline = spv::PipelineOptions { shader_stage: ShaderStage::Compute, entry_point: ep.name.clone() };
            attempt(
                "SPIR-V",
                spv::write_vec(m, i, &spv_options, Some(&pipeline))
                    .map(|w| out.spirv.push((what.clone(), w)))
                    .map_err(|e| format!("{e:?}")),
            );

            let msl_options = msl::Options { lang_version: (2, 4), ..Default::default() };
            let msl_pipeline = msl::PipelineOptions {
                entry_point: Some((ShaderStage::Compute, ep.name.clone())),
                allow_and_force_point_size: false,
                vertex_pulling_transform: false,
                vertex_buffer_mappings: Vec::new(),
                binding_array_length_map: Default::default(),
            };
            attempt(
                "MSL",
                msl::write_string(m, i, &msl_options, &msl_pipeline).map(|_| ()).map_err(|e| format!("{e:?}")),
            );

            let models: &[hlsl::ShaderModel] = if subgroups || kv_f16 {
                &[hlsl::ShaderModel::V6_2]
            } else {
                &[hlsl::ShaderModel::V6_2, hlsl::ShaderModel::V5_1]
            };
            for &shader_model in models {
                let options = hlsl::Options { shader_model, ..Default::default() };
                let pipeline = hlsl::PipelineOptions { entry_point: Some((ShaderStage::Compute, ep.name.clone())) };
                let mut text = String::new();
                let r = hlsl::Writer::new(&mut text, &options, &pipeline).write(m, i, None);
                attempt(&format!("HLSL {shader_model:?}"), r.map(|_| ()).map_err(|e| format!("{e:?}")));
            }

            if !subgroups && !kv_f16 {
                let options = glsl::Options { version: glsl::Version::new_gles(310), ..Default::default() };
                let pipeline = glsl::PipelineOptions {
                    shader_stage: ShaderStage::Compute,
                    entry_point: ep.name.clone(),
                    multiview: None,
                };
                let mut text = String::new();
                let r =
                    glsl::Writer::new(&mut text, m, i, &options, &pipeline, naga::proc::BoundsCheckPolicies::default())
                        .and_then(|mut w| w.write().map(|_| ()));
                attempt("GLSL ES 3.1", r.map_err(|e| format!("{e:?}")));
                out.glsl.push((what.clone(), text));
            }
        }
    }
}

#[test]
fn every_kernel_translates_for_vulkan_metal_dx12_and_gl() {
    let mut out = Outcome { translations: 0, spirv: Vec::new(), glsl: Vec::new(), errors: Vec::new() };
    for shader in shaders::ALL {
        for subgroups in [true, false] {
            for kv_f16 in [true, false] {
                translate(shader, subgroups, kv_f16, &mut out);
            }
        }
    }
    assert!(
        out.errors.is_empty(),
        "{} of {} translations failed:\n{}",
        out.errors.len(),
        out.translations,
        out.errors.join("\n")
    );

    // The SPIR-V and GLSL are checked by the Khronos validators, each distinct module once.
    let dir = std::env::temp_dir().join(format!("kiln-translate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (spirv_val, glslang) = (tool("spirv-val"), tool("glslangValidator"));
    let mut seen = std::collections::HashSet::new();
    let mut failures = Vec::new();
    for (i, (what, words)) in out.spirv.iter().enumerate() {
        if !seen.insert(words.clone()) {
            continue;
        }
        let path = dir.join(format!("{i}.spv"));
        std::fs::write(&path, bytemuck::cast_slice::<u32, u8>(words)).unwrap();
        let r = Command::new(&spirv_val).args(["--target-env", "vulkan1.1"]).arg(&path).output().unwrap();
        if !r.status.success() {
            failures.push(format!(
                "{what}: spirv-val: {}{}",
                String::from_utf8_lossy(&r.stdout),
                String::from_utf8_lossy(&r.stderr)
            ));
        }
    }
    let mut glsl_seen = std::collections::HashSet::new();
    for (i, (what, text)) in out.glsl.iter().enumerate() {
        if !glsl_seen.insert(text.clone()) {
            continue;
        }
        let path = dir.join(format!("{i}.comp"));
        std::fs::write(&path, text).unwrap();
        let r = Command::new(&glslang).arg(&path).output().unwrap();
        if !r.status.success() {
            failures.push(format!("{what}: glslangValidator: {}", String::from_utf8_lossy(&r.stdout)));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!(
        "{} translations; {} distinct SPIR-V modules and {} GLSL shaders validated",
        out.translations,
        seen.len(),
        glsl_seen.len()
    );
    assert!(failures.is_empty(), "{} modules failed validation:\n{}", failures.len(), failures.join("\n"));
}
