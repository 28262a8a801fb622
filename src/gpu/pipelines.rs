//! Compute pipelines, built once per (shader, entry point, variant) and shared.

use super::{shaders, shaders::Shader, ErrorScope, Gpu};
use crate::error::Result;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Everything that changes the compiled code of a pipeline.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Variant {
    pub subgroups: bool,
    pub kv_f16: bool,
    /// Values of `override` constants, e.g. `("W_DTYPE", 1)`.
    pub overrides: Vec<(&'static str, u32)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PipelineKey {
    pub file: &'static str,
    pub entry: &'static str,
    pub variant: Variant,
}

#[derive(Default)]
pub(super) struct PipelineCache {
    pipelines: Mutex<HashMap<PipelineKey, Arc<wgpu::ComputePipeline>>>,
    modules: Mutex<HashMap<(&'static str, bool, bool), wgpu::ShaderModule>>,
}

impl Gpu {
    /// The variant of every kernel on this device, with the given override constants.
    pub fn variant(&self, overrides: &[(&'static str, u32)]) -> Variant {
        Variant { subgroups: self.caps.subgroups, kv_f16: self.caps.f16, overrides: overrides.to_vec() }
    }

    /// The pipeline for `entry` of `shader`, compiled on first use.
    pub fn pipeline(
        &self,
        shader: &'static Shader,
        entry: &'static str,
        overrides: &[(&'static str, u32)],
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        let key = PipelineKey { file: shader.file, entry, variant: self.variant(overrides) };
        if let Some(p) = self.pipelines.pipelines.lock().unwrap().get(&key) {
            return Ok(p.clone());
        }
        let label = format!("{}:{}", shader.file, entry);
        let module = self.module(shader, &key.variant)?;
        let constants: Vec<(&str, f64)> = key.variant.overrides.iter().map(|(k, v)| (*k, *v as f64)).collect();
        let scope = ErrorScope::push(self);
        let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&label),
            layout: None,
            module: &module,
            entry_point: Some(entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &constants,
                // Every kernel writes its shared memory before reading it; zeroing costs time.
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        scope
            .pop(&label)
            .map_err(|e| crate::error::KilnError::Shader { kernel: label.clone(), message: e.to_string() })?;
        let pipeline = Arc::new(pipeline);
        self.pipelines.pipelines.lock().unwrap().insert(key, pipeline.clone());
        Ok(pipeline)
    }

    fn module(&self, shader: &'static Shader, v: &Variant) -> Result<wgpu::ShaderModule> {
        let key = (shader.file, v.subgroups, v.kv_f16);
        if let Some(m) = self.pipelines.modules.lock().unwrap().get(&key) {
            return Ok(m.clone());
        }
        let source = shaders::compose(shader, v.subgroups, v.kv_f16);
        let scope = ErrorScope::push(self);
        let module = self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(shader.file),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        scope
            .pop(shader.file)
            .map_err(|e| crate::error::KilnError::Shader { kernel: shader.file.into(), message: e.to_string() })?;
        self.pipelines.modules.lock().unwrap().insert(key, module.clone());
        Ok(module)
    }
}
