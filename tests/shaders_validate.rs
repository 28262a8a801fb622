//! Every kernel family, in every variant the runtime can compose, parses and validates with
//! naga. Needs no GPU: this catches WGSL errors on machines without an adapter.

use kiln::gpu::shaders;

fn validate(source: &str, what: &str) {
    let module = naga::front::wgsl::parse_str(source)
        .unwrap_or_else(|e| panic!("{what}: WGSL parse error:\n{}", e.emit_to_string(source)));
    naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
        .validate(&module)
        .unwrap_or_else(|e| panic!("{what}: validation error:\n{}", e.emit_to_string(source)));
}

#[test]
fn every_shader_variant_validates() {
    let mut checked = 0;
    for shader in shaders::ALL {
        for subgroups in [true, false] {
            for kv_f16 in [true, false] {
                let text = shaders::compose(shader, subgroups, kv_f16);
                validate(&text, &format!("{} (subgroups {subgroups}, f16 KV {kv_f16})", shader.file));
                checked += 1;
            }
        }
    }
    assert_eq!(checked, shaders::ALL.len() * 4);
}

#[test]
fn every_shader_file_is_registered() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".wgsl"))
        .collect();
    files.sort();
    let mut known: Vec<String> = shaders::ALL.iter().map(|s| s.file.to_string()).collect();
    known.extend(["reduce_subgroup.wgsl", "reduce_workgroup.wgsl", "weights.wgsl"].map(String::from));
    known.sort();
    assert_eq!(files, known, "shaders/ and gpu::shaders::ALL disagree");
}
