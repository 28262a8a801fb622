//! Adapter selection and device creation.
//!
//! The best adapter wins (discrete > integrated > virtual > software), unless `KILN_BACKEND`
//! or `KILN_ADAPTER` narrow the choice. We ask for every feature that changes our kernels
//! (SHADER_F16, SUBGROUP, TIMESTAMP_QUERY) when the adapter has it, and raise the limits that
//! bound model size (storage binding, buffer size, workgroup storage) to what it offers.

use super::{pipelines::PipelineCache, Caps, Gpu};
use crate::error::{KilnError, Result};

/// Which wgpu backend to open (`KILN_BACKEND`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Vulkan,
    Metal,
    Dx12,
    Gl,
}

impl Backend {
    fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "vulkan" | "vk" => Ok(Backend::Vulkan),
            "metal" | "mtl" => Ok(Backend::Metal),
            "dx12" | "d3d12" => Ok(Backend::Dx12),
            "gl" | "gles" | "opengl" => Ok(Backend::Gl),
            other => {
                Err(KilnError::Unsupported(format!("KILN_BACKEND={other}: expected one of vulkan, metal, dx12, gl")))
            }
        }
    }

    fn backends(self) -> wgpu::Backends {
        match self {
            Backend::Vulkan => wgpu::Backends::VULKAN,
            Backend::Metal => wgpu::Backends::METAL,
            Backend::Dx12 => wgpu::Backends::DX12,
            Backend::Gl => wgpu::Backends::GL,
        }
    }
}

/// How to choose and configure the device. `from_env` reads the `KILN_*` variables.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Only adapters of this backend (`KILN_BACKEND`).
    pub backend: Option<Backend>,
    /// Only adapters whose name contains this, case-insensitively (`KILN_ADAPTER`).
    pub adapter_name: Option<String>,
    /// Use the shared-memory reductions even where subgroups exist (`KILN_NO_SUBGROUPS=1`).
    pub disable_subgroups: bool,
    /// Store the KV cache as f32 even where SHADER_F16 exists (`KILN_NO_F16=1`).
    pub disable_f16: bool,
    /// Cap on one storage binding's size, below the adapter's (`KILN_MAX_BINDING`, bytes):
    /// lets tests exercise the split-weight path with small tensors.
    pub max_binding: Option<u64>,
    /// Which kernel family the ops pick (`KILN_KERNELS=cpu|gpu`); default: by adapter type.
    pub kernels: Option<KernelFamily>,
}

/// The two kernel families: for CPU adapters (barrier-free) and for real GPUs (shared memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFamily {
    Cpu,
    Gpu,
}

impl GpuOptions {
    pub fn from_env() -> Result<Self> {
        let flag = |name: &str| std::env::var(name).map(|v| !v.is_empty() && v != "0").unwrap_or(false);
        let backend = match std::env::var("KILN_BACKEND") {
            Ok(s) if !s.is_empty() => Some(Backend::parse(&s)?),
            _ => None,
        };
        let max_binding = match std::env::var("KILN_MAX_BINDING") {
            Ok(s) if !s.is_empty() => Some(
                s.parse::<u64>()
                    .map_err(|_| KilnError::Unsupported(format!("KILN_MAX_BINDING={s}: expected a byte count")))?,
            ),
            _ => None,
        };
        let kernels = match std::env::var("KILN_KERNELS").as_deref() {
            Ok("cpu") => Some(KernelFamily::Cpu),
            Ok("gpu") => Some(KernelFamily::Gpu),
            Ok("") | Err(_) => None,
            Ok(other) => {
                return Err(KilnError::Unsupported(format!("KILN_KERNELS={other}: expected cpu or gpu")));
            }
        };
        Ok(GpuOptions {
            kernels,
            backend,
            adapter_name: std::env::var("KILN_ADAPTER").ok().filter(|s| !s.is_empty()),
            disable_subgroups: flag("KILN_NO_SUBGROUPS"),
            disable_f16: flag("KILN_NO_F16"),
            max_binding,
        })
    }
}

fn rank(device_type: wgpu::DeviceType) -> u32 {
    match device_type {
        wgpu::DeviceType::DiscreteGpu => 4,
        wgpu::DeviceType::IntegratedGpu => 3,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 1,
        wgpu::DeviceType::Cpu => 0,
    }
}

/// Prefer adapters with the features our fast paths use: on one device, Vulkan's lavapipe
/// beats GL's llvmpipe because GL lacks SHADER_F16 and SUBGROUP.
fn feature_score(features: wgpu::Features) -> u32 {
    [wgpu::Features::SUBGROUP, wgpu::Features::SHADER_F16, wgpu::Features::TIMESTAMP_QUERY]
        .iter()
        .filter(|f| features.contains(**f))
        .count() as u32
}

/// Keep Mesa's device-select Vulkan layer out of the way. It is an implicit layer that, on every
/// physical-device enumeration, connects to the Wayland display to order the devices, and on a
/// machine without one prints `error: XDG_RUNTIME_DIR is invalid or not set in the environment.`
/// twice on stderr. kiln ranks adapters itself (and `KILN_ADAPTER` picks one), so the layer's
/// ordering changes nothing here; a user who asked for it (`MESA_VK_DEVICE_SELECT`) or set its
/// switch keeps their choice. Set once, before any instance exists, so no other thread is
/// reading the environment inside the Vulkan loader at that moment.
fn quiet_device_select() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("MESA_VK_DEVICE_SELECT").is_none() && std::env::var_os("NODEVICE_SELECT").is_none() {
            std::env::set_var("NODEVICE_SELECT", "1");
        }
    });
}

/// The adapters of `backends`.
async fn adapters_of(backends: wgpu::Backends) -> Vec<wgpu::Adapter> {
    quiet_device_select();
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backends;
    wgpu::Instance::new(desc).enumerate_adapters(backends).await
}

pub(super) async fn open(options: &GpuOptions) -> Result<Gpu> {
    // Without KILN_BACKEND: Vulkan, Metal and DX12 first, and GL only where none of them has an
    // adapter. Probing GL through EGL makes Mesa print warnings (XDG_RUNTIME_DIR) on stderr,
    // and its adapters lose to the others anyway (no SHADER_F16, no SUBGROUP).
    let adapters = match options.backend {
        Some(b) => adapters_of(b.backends()).await,
        None => {
            let primary = adapters_of(wgpu::Backends::PRIMARY).await;
            if primary.is_empty() {
                adapters_of(wgpu::Backends::SECONDARY).await
            } else {
                primary
            }
        }
    };
    let seen: Vec<String> = adapters
        .iter()
        .map(|a| {
            let i = a.get_info();
            format!("{} ({:?})", i.name, i.backend)
        })
        .collect();

    let wanted = options.adapter_name.as_ref().map(|s| s.to_lowercase());
    let adapter = adapters
        .into_iter()
        .filter(|a| match &wanted {
            Some(w) => a.get_info().name.to_lowercase().contains(w),
            None => true,
        })
        .max_by_key(|a| (rank(a.get_info().device_type), feature_score(a.features())))
        .ok_or_else(|| {
            let asked = match (&options.backend, &options.adapter_name) {
                (None, None) => "any adapter".to_string(),
                (b, n) => format!("backend {:?}, name containing {:?}", b, n),
            };
            KilnError::NoAdapter(format!(
                "looked for {asked}; found {}. Install a GPU driver: a vendor driver, or on \
                 Debian/Ubuntu the software Vulkan driver with `apt-get install \
                 mesa-vulkan-drivers`. KILN_BACKEND and KILN_ADAPTER narrow the choice.",
                if seen.is_empty() { "none".to_string() } else { seen.join(", ") }
            ))
        })?;

    let info = adapter.get_info();
    let offered = adapter.features();
    let mut wanted_features = wgpu::Features::empty();
    for f in [wgpu::Features::SHADER_F16, wgpu::Features::SUBGROUP, wgpu::Features::TIMESTAMP_QUERY] {
        if offered.contains(f) {
            wanted_features |= f;
        }
    }
    // Take the adapter's limits whole: model size is bounded by storage binding and buffer size.
    let limits = adapter.limits();
    let (device, queue) = adapter
        .request_device(&wgpu::DeviceDescriptor {
            label: Some("kiln"),
            required_features: wanted_features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::default(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        })
        .await
        .map_err(|e| KilnError::DeviceRequest { adapter: info.name.clone(), reason: e.to_string() })?;
    let health = super::health::Health::watch(&device);

    let caps = Caps {
        f16: wanted_features.contains(wgpu::Features::SHADER_F16) && !options.disable_f16,
        subgroups: wanted_features.contains(wgpu::Features::SUBGROUP) && !options.disable_subgroups,
        timestamps: wanted_features.contains(wgpu::Features::TIMESTAMP_QUERY),
        cpu_kernels: match options.kernels {
            Some(k) => k == KernelFamily::Cpu,
            None => info.device_type == wgpu::DeviceType::Cpu,
        },
    };
    let adapter_max = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size);
    let max_binding = options.max_binding.map_or(adapter_max, |m| m.min(adapter_max)).max(256);
    let empty = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("empty"),
        size: 16,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    Ok(Gpu { empty, device, queue, info, limits, caps, max_binding, pipelines: PipelineCache::default(), health })
}
