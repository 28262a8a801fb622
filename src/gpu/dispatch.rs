//! A recorded unit of GPU work: pipeline + bind group + grid, built once and replayed.

use super::Gpu;
use crate::error::Result;
use std::sync::Arc;

/// One compute dispatch with its resources bound. Ops build these; the executor keeps them
/// for the model's lifetime and records them into a pass each step, updating `params` (with
/// `queue.write_buffer`) and `workgroups` when the step's shape changes.
pub struct Dispatch {
    pub label: String,
    pub pipeline: Arc<wgpu::ComputePipeline>,
    pub bind_group: wgpu::BindGroup,
    /// The op's uniform params buffer (binding 0).
    pub params: wgpu::Buffer,
    /// A host copy of the params, for plans that patch a field (the position) between steps.
    pub host_params: Vec<u8>,
    pub workgroups: [u32; 3],
}

impl Dispatch {
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        if self.workgroups.contains(&0) {
            return;
        }
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &self.bind_group, &[]);
        pass.dispatch_workgroups(self.workgroups[0], self.workgroups[1], self.workgroups[2]);
    }

    /// Overwrite the params uniform (takes effect at the next submit).
    pub fn set_params<T: bytemuck::Pod>(&mut self, gpu: &Gpu, params: &T) {
        let bytes = bytemuck::bytes_of(params);
        if bytes != self.host_params.as_slice() {
            gpu.queue.write_buffer(&self.params, 0, bytes);
            self.host_params = bytes.to_vec();
        }
    }
}

impl Gpu {
    /// Bind `params` at binding 0 and `buffers` at bindings 1.. of `pipeline`'s group 0.
    pub fn dispatch<T: bytemuck::Pod>(
        &self,
        label: impl Into<String>,
        pipeline: Arc<wgpu::ComputePipeline>,
        params: &T,
        buffers: &[&wgpu::Buffer],
        workgroups: [u32; 3],
    ) -> Result<Dispatch> {
        let at: Vec<(u32, &wgpu::Buffer)> = buffers.iter().enumerate().map(|(i, b)| (i as u32 + 1, *b)).collect();
        self.dispatch_at(label, pipeline, params, &at, workgroups)
    }

    /// Bind `params` at binding 0 and each buffer at its given binding (for shaders whose entry
    /// points use different subsets of one binding list).
    pub fn dispatch_at<T: bytemuck::Pod>(
        &self,
        label: impl Into<String>,
        pipeline: Arc<wgpu::ComputePipeline>,
        params: &T,
        buffers: &[(u32, &wgpu::Buffer)],
        workgroups: [u32; 3],
    ) -> Result<Dispatch> {
        let label = label.into();
        let params_buffer = self.uniform(&label, params);
        let mut entries = vec![wgpu::BindGroupEntry { binding: 0, resource: params_buffer.as_entire_binding() }];
        for (binding, b) in buffers {
            entries.push(wgpu::BindGroupEntry { binding: *binding, resource: b.as_entire_binding() });
        }
        let scope = super::ErrorScope::push(self);
        let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(&label),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        scope.pop(&label)?;
        Ok(Dispatch {
            label,
            pipeline,
            bind_group,
            params: params_buffer,
            host_params: bytemuck::bytes_of(params).to_vec(),
            workgroups,
        })
    }
}
