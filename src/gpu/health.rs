//! Device failures that no error scope sees: a lost device (a driver reset, a removed GPU,
//! `Device::destroy`), and errors wgpu raises while no scope is open. wgpu drops the first kind's
//! errors (it reports the loss only through a callback) and by default panics on the second, so
//! `Health` records both and the next scope pop or submission returns them as a `KilnError`.

use crate::error::KilnError;
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub(crate) struct Health {
    /// Why the device was lost, once it is.
    lost: Mutex<Option<String>>,
    /// The first error raised outside any scope since the last check: (out of memory?, message).
    uncaptured: Mutex<Option<(bool, String)>>,
}

impl Health {
    /// Watch `device`: from now on its loss and its unscoped errors are recorded here.
    pub(crate) fn watch(device: &wgpu::Device) -> Arc<Health> {
        let health = Arc::new(Health::default());
        let h = health.clone();
        device.set_device_lost_callback(move |reason, message| {
            let why = if message.is_empty() { format!("{reason:?}") } else { format!("{reason:?}: {message}") };
            h.lost.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(why);
        });
        let h = health.clone();
        device.on_uncaptured_error(Arc::new(move |error: wgpu::Error| {
            let oom = matches!(error, wgpu::Error::OutOfMemory { .. });
            h.uncaptured.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert((oom, error.to_string()));
        }));
        health
    }

    /// The device's loss, if it happened.
    pub(crate) fn lost(&self) -> Option<KilnError> {
        self.lost.lock().unwrap_or_else(|p| p.into_inner()).clone().map(KilnError::DeviceLost)
    }

    /// Whether an error was raised outside any scope since the last check.
    pub(crate) fn has_uncaptured(&self) -> bool {
        self.uncaptured.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// The loss, else the first unscoped error since the last check (attributed to `kernel`, the
    /// work that is about to depend on it).
    pub(crate) fn check(&self, kernel: &str) -> Result<(), KilnError> {
        if let Some(lost) = self.lost() {
            return Err(lost);
        }
        match self.uncaptured.lock().unwrap_or_else(|p| p.into_inner()).take() {
            None => Ok(()),
            Some((true, message)) => Err(KilnError::OutOfMemory { kernel: kernel.into(), message }),
            Some((false, message)) => Err(KilnError::Validation { kernel: kernel.into(), message }),
        }
    }
}
