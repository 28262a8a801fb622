//! Device failures give a clear error and a clean exit, never a panic, an abort or a hang:
//!
//! - a lost device (`Device::destroy`, what wgpu reports after a driver reset or a removed GPU)
//!   fails the session's next step, the engine's requests, and loading, with `DeviceLost`;
//! - running out of GPU memory while loading weights or allocating the KV pool is an
//!   `OutOfMemory` error naming what was being allocated, the device stays usable, and the CLI
//!   exits with status 1 and one `error:` line.
//!
//! Running out of memory is real, not simulated: a software adapter (lavapipe, SwiftShader,
//! llvmpipe GL) allocates device memory from the process's address space, so a child process
//! under `ulimit -v` gets a genuine `vkAllocateMemory` failure, which wgpu reports as out of
//! memory. On a real GPU, device memory is not bounded by `ulimit`, so those tests say so and
//! check nothing there.

mod common;

use kiln::engine::{Engine, EngineConfig, Event, RequestParams};
use kiln::gpu::{Gpu, GpuOptions};
use kiln::{GenerateParams, KilnError, Model, Session};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{mpsc, Arc};
use std::time::Duration;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// Run `f` on its own thread and return its result; a hang past `limit` or a panic fails the test.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(value) => value,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("still running after {limit:?}: a hang"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("the work panicked (see above)"),
    }
}

/// A device of its own: destroying it must not take the other tests' shared devices along.
fn own_device() -> Arc<Gpu> {
    Gpu::with_options(&GpuOptions::default()).unwrap_or_else(|e| panic!("GPU tests need an adapter: {e}"))
}

fn load(gpu: &Arc<Gpu>) -> kiln::Result<Model> {
    Model::load(&fixture("llama3-tiny"), gpu.clone(), &mut |_, _| {})
}

fn assert_lost(err: &KilnError, what: &str) {
    assert!(matches!(err, KilnError::DeviceLost(_)), "{what}: {err:?}");
    assert!(err.to_string().contains("GPU device was lost"), "{what}: {err}");
}

#[test]
fn a_lost_device_fails_the_session_and_loading_with_device_lost() {
    within(Duration::from_secs(120), || {
        let gpu = own_device();
        let model = load(&gpu).unwrap();
        let prompt = model.tokenizer.encode("The license", true).unwrap();
        let params = GenerateParams { max_tokens: 4, stop_at_eos: false, ..Default::default() };
        let mut session = Session::new(&model, Some(64)).unwrap();
        let before = session.generate(&prompt, &params, |_| {}).expect("the device works before");
        assert_eq!(before.tokens.len(), 4);

        gpu.device.destroy();
        let err = session.generate(&prompt, &params, |_| {}).expect_err("nothing runs on a lost device");
        assert_lost(&err, "generate");
        let err = Session::new(&model, Some(64)).err().expect("no KV cache is allocated on a lost device");
        assert_lost(&err, "a new session");
        let err = load(&gpu).err().expect("nothing loads onto a lost device");
        assert_lost(&err, "load");
    });
}

#[test]
fn a_lost_device_fails_every_engine_request_and_stops_the_engine() {
    within(Duration::from_secs(120), || {
        let gpu = own_device();
        let model = Arc::new(load(&gpu).unwrap());
        let engine = Engine::start(model.clone(), EngineConfig::default()).unwrap();
        let prompt = model.tokenizer.encode("The license", true).unwrap();
        let params = RequestParams { max_tokens: 8, stop_at_eos: false, ..Default::default() };
        let done = engine.submit(prompt.clone(), params.clone()).unwrap().wait().expect("works before");
        assert_eq!(done.tokens.len(), 8);

        gpu.device.destroy();
        let requests: Vec<_> = (0..3).map(|_| engine.submit(prompt.clone(), params.clone()).unwrap()).collect();
        for request in requests {
            let mut events = Vec::new();
            while let Some(event) = request.next_event(Duration::from_secs(60)) {
                events.push(event);
            }
            match events.last() {
                Some(Event::Failed(message)) => assert!(message.contains("GPU device was lost"), "{message}"),
                other => panic!("a request on a lost device must fail, got {other:?} after {events:?}"),
            }
        }
        // The engine has stopped for good and says why, to new requests and in its stats.
        let stopped = engine.stats().stopped.expect("the engine records why it stopped");
        assert!(stopped.contains("GPU device was lost"), "{stopped}");
        match engine.submit(prompt, params) {
            Err(KilnError::Stopped(why)) => assert!(why.contains("GPU device was lost"), "{why}"),
            Err(other) => panic!("expected Stopped, got {other:?}"),
            Ok(_) => panic!("a stopped engine takes no request"),
        }
    });
}

/// Address space for a child process: room for kiln, its driver and a small model, not for
/// gigabytes more.
const ADDRESS_SPACE_KIB: u64 = 3 << 20;

/// Whether memory runs out under `ulimit -v` on this adapter (a CPU adapter), else why not.
fn ulimit_bounds_device_memory() -> Result<(), String> {
    let (_, gpu) = common::devices().remove(0);
    if gpu.info.device_type == wgpu::DeviceType::Cpu {
        Ok(())
    } else {
        Err(format!("{}: device memory is not bounded by ulimit; nothing to check here", gpu.describe()))
    }
}

/// Run `program args` under `ulimit -v ADDRESS_SPACE_KIB`; (exit code, stderr, stdout).
fn under_ulimit(program: &Path, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -v {ADDRESS_SPACE_KIB} && exec \"$0\" \"$@\""))
        .arg(program)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code(), text(&out.stderr), text(&out.stdout))
}

#[test]
fn weights_past_the_device_memory_are_a_clean_error_exit() {
    if let Err(why) = ulimit_bounds_device_memory() {
        eprintln!("{why}");
        return;
    }
    let kiln = Path::new(env!("CARGO_BIN_EXE_kiln"));
    // The limit leaves room for kiln itself: a small model loads and runs under it.
    let tiny = fixture("llama3-tiny");
    let (code, stderr, _) = under_ulimit(
        kiln,
        &["generate", "--model", tiny.to_str().unwrap(), "--prompt", "Hi", "--max-tokens", "2"],
        &[],
    );
    assert_eq!(code, Some(0), "the tiny model runs under the limit:\n{stderr}");

    // 8 layers of Llama 3 8B in f16 with its embeddings: 5.6 GB of weights, past the 3 GiB.
    let (code, stderr, _) = under_ulimit(
        kiln,
        &["bench", "--synthetic", "llama3-8b-f16", "--layers", "8", "--gen-tokens", "2", "--fills", "0"],
        &[],
    );
    assert_eq!(code, Some(1), "a clean exit with status 1, not a signal or a panic (101):\n{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("error: ") && last.contains("out of GPU memory"), "{stderr}");
    assert!(last.contains("weights need"), "the error says how much the weights need: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// The body of `kv_pool_past_the_device_memory_is_an_error_and_the_device_stays_usable`, run in
/// a child process of this test binary under the address-space limit.
fn kv_pool_child() {
    let gpu = own_device();
    // Qwen2.5 0.5B's shapes: 24 layers, so the pool may grow to 48 bindings (6 GiB on lavapipe).
    let model = Arc::new(Model::synthetic("qwen2.5-0.5b-q8_0", None, gpu, 1).unwrap());
    let too_big = EngineConfig { kv_memory: Some(6 << 30), ..Default::default() };
    let err = Engine::start(model.clone(), too_big).err().expect("a 6 GiB KV pool cannot fit in 3 GiB");
    assert!(matches!(err, KilnError::OutOfMemory { .. }), "{err:?}");
    assert!(err.to_string().contains("KV"), "the error names the KV cache: {err}");

    // The failed allocation left the device usable: a pool that fits serves a request.
    let fits = EngineConfig { kv_memory: Some(64 << 20), ..Default::default() };
    let engine = Engine::start(model, fits).expect("a 64 MiB pool fits");
    let params = RequestParams { max_tokens: 3, stop_at_eos: false, ..Default::default() };
    let done = engine.submit(vec![1, 2, 3, 4], params).unwrap().wait().unwrap();
    assert_eq!(done.tokens.len(), 3);
    println!("kv pool child: passed");
}

#[test]
fn kv_pool_past_the_device_memory_is_an_error_and_the_device_stays_usable() {
    if std::env::var_os("KILN_KV_POOL_CHILD").is_some() {
        kv_pool_child();
        return;
    }
    if let Err(why) = ulimit_bounds_device_memory() {
        eprintln!("{why}");
        return;
    }
    let name = "kv_pool_past_the_device_memory_is_an_error_and_the_device_stays_usable";
    let exe = std::env::current_exe().unwrap();
    let (code, stderr, stdout) =
        under_ulimit(&exe, &["--exact", name, "--nocapture", "--test-threads=1"], &[("KILN_KV_POOL_CHILD", "1")]);
    assert_eq!(code, Some(0), "the child's checks:\n{stderr}\n{stdout}");
    assert!(stdout.contains("kv pool child: passed"), "the child ran its checks:\n{stdout}");
}
