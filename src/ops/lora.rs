//! LoRA adapters applied unmerged, chosen per token (`shaders/lora.wgsl`): y += Σ_i s_i·(x·A_iᵀ)·B_iᵀ
//! over the adapters in each token's bit mask.

use crate::gpu::{shaders, Dispatch, Gpu};
use crate::{KilnError, Result};

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    pub n_tokens: u32,
    pub n_adapters: u32,
    pub in_dim: u32,
    pub out_dim: u32,
    pub total_rank: u32,
    pub _pad: [u32; 3],
}

/// Where one adapter's matrices for one module sit (`shaders/lora.wgsl` `Entry`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Entry {
    /// Offset of A (rank × in) in the module's f32 buffer.
    pub a: u32,
    /// Offset of B (out × rank).
    pub b: u32,
    /// 0: the adapter leaves this module alone.
    pub rank: u32,
    /// Its first column of the shrink output.
    pub u: u32,
    pub scale: f32,
    pub _pad: [u32; 3],
}

/// The most adapters one model holds (a token's adapters are a u32 bit mask).
pub const MAX_ADAPTERS: usize = 32;

/// One module's adapters on the GPU: every A and B back to back, and the table.
pub struct LoraModule {
    pub ab: wgpu::Buffer,
    pub table: wgpu::Buffer,
    pub entries: Vec<Entry>,
    pub in_dim: u32,
    pub out_dim: u32,
}

impl LoraModule {
    /// Columns of the shrink output: the adapters' ranks for this module, summed.
    pub fn total_rank(&self) -> u32 {
        self.entries.iter().map(|e| e.rank).sum()
    }

    /// `adapters[i]` = Some((A (rank × in), B (out × rank), scale)) for the adapters that touch
    /// this module, None for the others.
    pub fn upload(
        gpu: &Gpu,
        label: &str,
        in_dim: u32,
        out_dim: u32,
        adapters: &[Option<(&[f32], &[f32], f32)>],
    ) -> Result<LoraModule> {
        if adapters.len() > MAX_ADAPTERS {
            return Err(KilnError::Request(format!("{} adapters: at most {MAX_ADAPTERS}", adapters.len())));
        }
        let mut ab: Vec<f32> = Vec::new();
        let mut entries = Vec::new();
        let mut u = 0;
        for m in adapters {
            let entry = match m {
                None => Entry::default(),
                Some((a, b, scale)) => {
                    let rank = (a.len() / in_dim as usize) as u32;
                    if a.len() != (rank * in_dim) as usize || b.len() != (out_dim * rank) as usize || rank == 0 {
                        return Err(KilnError::shape(
                            "lora",
                            format!("{label}: A of {} and B of {} values for {in_dim} → {out_dim}", a.len(), b.len()),
                        ));
                    }
                    let e = Entry {
                        a: ab.len() as u32,
                        b: (ab.len() + a.len()) as u32,
                        rank,
                        u,
                        scale: *scale,
                        _pad: [0; 3],
                    };
                    ab.extend_from_slice(a);
                    ab.extend_from_slice(b);
                    u += rank;
                    e
                }
            };
            entries.push(entry);
        }
        if u > MAX_RANK {
            return Err(KilnError::Request(format!(
                "{label}: the adapters' ranks add up to {u}; kiln applies at most {MAX_RANK} per module"
            )));
        }
        Ok(LoraModule {
            ab: gpu.upload(&format!("{label} lora"), bytemuck::cast_slice(&ab))?,
            table: gpu.upload(&format!("{label} lora table"), bytemuck::cast_slice(&entries))?,
            entries,
            in_dim,
            out_dim,
        })
    }
}

/// The widest shrink (`MAX_RANK` in lora.wgsl).
pub const MAX_RANK: u32 = 1024;

/// y (n_tokens, out) += the adapters of each token's mask applied to x (n_tokens, in): one
/// dispatch.
pub fn apply(
    gpu: &Gpu,
    m: &LoraModule,
    adapters: &wgpu::Buffer,
    x: &wgpu::Buffer,
    y: &wgpu::Buffer,
    n_tokens: u32,
) -> Result<Dispatch> {
    let params = Params {
        n_tokens,
        n_adapters: m.entries.len() as u32,
        in_dim: m.in_dim,
        out_dim: m.out_dim,
        total_rank: m.total_rank(),
        _pad: [0; 3],
    };
    let pipeline = gpu.pipeline(&shaders::LORA, "apply", &[])?;
    super::check_groups(gpu, "lora", "tokens", n_tokens)?;
    let buffers = [(1, &m.ab), (2, &m.table), (3, adapters), (4, x), (5, y)];
    gpu.dispatch_at("lora", pipeline, &params, &buffers, [1, n_tokens, 1])
}

/// Reference in f64: y + Σ over each token's adapters of s·(x·Aᵀ)·Bᵀ. `adapters[i]` as for
/// `LoraModule::upload`.
pub fn apply_cpu(
    y: &[f32],
    x: &[f32],
    masks: &[u32],
    in_dim: usize,
    out_dim: usize,
    adapters: &[Option<(&[f32], &[f32], f32)>],
) -> Vec<f32> {
    let mut out = y.to_vec();
    for (t, &mask) in masks.iter().enumerate() {
        let xt = &x[t * in_dim..][..in_dim];
        for (i, m) in adapters.iter().enumerate() {
            let Some((a, b, s)) = m else { continue };
            if mask & (1 << i) == 0 {
                continue;
            }
            let rank = a.len() / in_dim;
            let u: Vec<f64> = (0..rank)
                .map(|j| a[j * in_dim..][..in_dim].iter().zip(xt).map(|(p, q)| *p as f64 * *q as f64).sum())
                .collect();
            for o in 0..out_dim {
                let v: f64 = (0..rank).map(|j| b[o * rank + j] as f64 * u[j]).sum();
                out[t * out_dim + o] = (out[t * out_dim + o] as f64 + *s as f64 * v) as f32;
            }
        }
    }
    out
}
