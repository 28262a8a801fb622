//! GPU time for benchmarks: timestamp queries around a compute pass where the adapter has
//! TIMESTAMP_QUERY, otherwise host wall-clock time from submit to completion.

use super::{Dispatch, Gpu};
use crate::error::{KilnError, Result};
use std::time::Instant;

/// How a duration was measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuTimer {
    Timestamps,
    HostSync,
}

impl Gpu {
    pub fn timer(&self) -> GpuTimer {
        if self.caps.timestamps {
            GpuTimer::Timestamps
        } else {
            GpuTimer::HostSync
        }
    }

    /// Seconds the GPU spends running `dispatches` `reps` times in one compute pass.
    /// With timestamps this excludes submit and wake-up latency; without, it includes them.
    pub fn time(&self, label: &str, dispatches: &[&Dispatch], reps: u32) -> Result<f64> {
        let timestamps = self.caps.timestamps;
        let query_set = timestamps.then(|| {
            self.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("kiln timer"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            })
        });
        let resolve = if timestamps { Some(self.alloc_resolve(2)?) } else { None };
        let mut encoder = self.encoder(label);
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(label),
                timestamp_writes: query_set.as_ref().map(|qs| wgpu::ComputePassTimestampWrites {
                    query_set: qs,
                    beginning_of_pass_write_index: Some(0),
                    end_of_pass_write_index: Some(1),
                }),
            });
            for _ in 0..reps {
                for d in dispatches {
                    d.record(&mut pass);
                }
            }
        }
        if let (Some(qs), Some(buf)) = (&query_set, &resolve) {
            encoder.resolve_query_set(qs, 0..2, buf, 0);
        }
        let start = Instant::now();
        self.submit_and_wait(label, encoder)?;
        let host = start.elapsed().as_secs_f64();
        match resolve {
            Some(buf) => {
                let ticks: Vec<u64> = bytemuck::pod_collect_to_vec(&self.read_bytes(&buf, 16)?);
                let ns = ticks[1].saturating_sub(ticks[0]) as f64 * self.queue.get_timestamp_period() as f64;
                Ok(ns * 1e-9)
            }
            None => Ok(host),
        }
    }

    /// GPU seconds of each dispatch of `dispatches`, run once in order, each in its own compute
    /// pass with timestamps at its start and end (a profile: the per-pass boundaries add a
    /// little time of their own). Needs TIMESTAMP_QUERY.
    pub fn profile(&self, label: &str, dispatches: &[&Dispatch]) -> Result<Vec<f64>> {
        if !self.caps.timestamps {
            return Err(KilnError::Unsupported(format!(
                "a per-dispatch profile needs TIMESTAMP_QUERY, which {} does not offer",
                self.info.name
            )));
        }
        let count = 2 * dispatches.len() as u32;
        if count > wgpu::QUERY_SET_MAX_QUERIES {
            return Err(KilnError::Unsupported(format!(
                "{label}: {} dispatches are more than one query set can time",
                dispatches.len()
            )));
        }
        let query_set = self.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("kiln profile"),
            ty: wgpu::QueryType::Timestamp,
            count: count.max(2),
        });
        let resolve = self.alloc_resolve(count.max(2))?;
        let mut encoder = self.encoder(label);
        for (i, d) in dispatches.iter().enumerate() {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(&d.label),
                timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                    query_set: &query_set,
                    beginning_of_pass_write_index: Some(2 * i as u32),
                    end_of_pass_write_index: Some(2 * i as u32 + 1),
                }),
            });
            d.record(&mut pass);
        }
        if count > 0 {
            encoder.resolve_query_set(&query_set, 0..count, &resolve, 0);
        }
        self.submit_and_wait(label, encoder)?;
        let ticks: Vec<u64> = bytemuck::pod_collect_to_vec(&self.read_bytes(&resolve, count as u64 * 8)?);
        let period = self.queue.get_timestamp_period() as f64;
        Ok(ticks.chunks_exact(2).map(|t| t[1].saturating_sub(t[0]) as f64 * period * 1e-9).collect())
    }

    fn alloc_resolve(&self, queries: u32) -> Result<wgpu::Buffer> {
        let scope = super::ErrorScope::push(self);
        let b = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("kiln timer resolve"),
            size: queries as u64 * 8,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        scope.pop("kiln timer")?;
        Ok(b)
    }
}
