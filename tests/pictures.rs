//! The pictures: `kiln attention` writes a PNG of heatmaps per layer and the probabilities as
//! JSON; `kiln bench --plot` draws its charts as SVG or PNG. The numbers are checked here (the
//! kernels against the CPU reference are in tests/kernels.rs and tests/model.rs); the pictures
//! themselves were checked by looking at them (README).

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn kiln(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "kiln {args:?} panicked:\n{stderr}");
    (out.status.success(), stderr)
}

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-pictures-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// (width, height) of a PNG, from its IHDR chunk.
fn png_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{} is a PNG", path.display());
    let be = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap());
    (be(16), be(20))
}

#[test]
fn kiln_attention_writes_a_png_per_layer_and_the_probabilities() {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama3-tiny");
    let out = scratch("attention");
    let (ok, err) = kiln(&[
        "attention",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "The license grants you the freedom to share",
        "--layers",
        "0,1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    for layer in [0, 1] {
        let (w, h) = png_size(&out.join(format!("layer-{layer}.png")));
        assert!(w >= 400 && h >= 300, "layer {layer}: {w}×{h}");
    }
    let json: Value = serde_json::from_str(&std::fs::read_to_string(out.join("attention.json")).unwrap()).unwrap();
    let n = json["tokens"].as_array().unwrap().len();
    let layers = json["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    for layer in layers {
        let heads = layer["heads"].as_array().unwrap();
        assert!(!heads.is_empty());
        for head in heads {
            let rows = head["probs"].as_array().unwrap();
            assert_eq!(rows.len(), n);
            for (i, row) in rows.iter().enumerate() {
                let row: Vec<f64> = row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
                assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-5, "row {i} sums to 1");
                assert!(row[i + 1..].iter().all(|&p| p == 0.0), "row {i}: causal");
            }
            assert!(head["kv_head"].as_u64().unwrap() <= head["head"].as_u64().unwrap());
        }
    }
    // Bad choices are clear errors.
    for (flag, value, says) in [("--heads", "99", "--heads"), ("--layers", "99", "layer 99")] {
        let args = [
            "attention",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "hi",
            flag,
            value,
            "--out",
            out.to_str().unwrap(),
        ];
        let (ok, err) = kiln(&args);
        assert!(!ok && err.contains(says), "{flag} {value}: {err}");
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn kiln_bench_plot_draws_svg_and_png_charts() {
    let out = scratch("bench");
    std::fs::create_dir_all(&out).unwrap();
    let svg = out.join("bench.svg");
    let common =
        ["bench", "--synthetic", "smollm2-135m-q4_1", "--layers", "2", "--prompt-tokens", "8", "--gen-tokens", "3"];
    let (ok, err) = kiln(
        &[
            &common[..],
            &[
                "--fills",
                "0,40",
                "--concurrency",
                "1,2",
                "--stream-prompt-tokens",
                "4",
                "--plot",
                svg.to_str().unwrap(),
            ],
        ]
        .concat(),
    );
    assert!(ok, "{err}");
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg"), "an SVG");
    for title in [
        "decode speed against KV-cache fill",
        "aggregate decode against concurrent streams",
        "latency against concurrent streams",
        "copy-bandwidth ceiling",
    ] {
        assert!(text.contains(title), "the chart has `{title}`");
    }
    let png = out.join("bench.png");
    let (ok, err) = kiln(&[&common[..], &["--fills", "0", "--plot", png.to_str().unwrap()]].concat());
    assert!(ok, "{err}");
    assert_eq!(png_size(&png), (560, 420), "one panel without --concurrency");
    let (ok, err) = kiln(&[&common[..], &["--fills", "0", "--plot", out.join("bench.gif").to_str().unwrap()]].concat());
    assert!(!ok && err.contains(".svg or .png"), "{err}");
    let _ = std::fs::remove_dir_all(&out);
}
