//! Speculative decoding: greedy output identical, token for token, to the target alone (prompt
//! lookup and draft models, one with a larger padded vocabulary whose extra ids the target has
//! no row for, on every device path), the target's sampling distribution kept
//! exactly (a chi-square test against the distribution computed from the target's logits), and
//! drafts with another vocabulary refused.

mod common;

use kiln::sampling::{Sampler, SamplingParams};
use kiln::speculative::{lookup, Speculator};
use kiln::{GenerateParams, Gpu, Model, Session};
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn load(path: &Path, gpu: &Arc<Gpu>) -> Model {
    Model::load(path, gpu.clone(), &mut |_, _| {}).unwrap()
}

/// A copy of llama3-tiny with the same tokenizer, its config edited by `config` and each tensor
/// (name, shape, values) by `tensor`, in a directory named after `tag`.
fn llama3_tiny_variant(
    tag: &str,
    config: impl Fn(&mut serde_json::Value),
    tensor: impl Fn(&str, &mut Vec<usize>, &mut Vec<f32>),
) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-llama3-tiny-{tag}-{}", std::process::id()));
    if dir.join("model.safetensors").exists() {
        return dir;
    }
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixture("llama3-tiny");
    for f in ["generation_config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config(&mut json);
    std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        let mut shape = view.shape().to_vec();
        let mut values: Vec<f32> = bytemuck::pod_collect_to_vec(view.data());
        tensor(&name, &mut shape, &mut values);
        data.push((name, shape, bytemuck::cast_slice(&values).to_vec()));
    }
    let views: Vec<(String, TensorView)> = data
        .iter()
        .map(|(n, shape, d)| (n.clone(), TensorView::new(safetensors::Dtype::F32, shape.clone(), d).unwrap()))
        .collect();
    let tmp = dir.join("model.safetensors.tmp");
    std::fs::write(&tmp, safetensors::serialize(views, None).unwrap()).unwrap();
    std::fs::rename(tmp, dir.join("model.safetensors")).unwrap();
    dir
}

/// llama3-tiny with layer 1's MLP output and the lm-head scaled by `down` and `head`: a draft
/// that agrees with the target some of the time (a negated MLP output disagrees on most greedy
/// picks).
fn perturbed_llama3_tiny(down: f32, head: f32) -> PathBuf {
    llama3_tiny_variant(
        &format!("{down}-{head}"),
        |_| {},
        |name, _, values| {
            let scale = match name {
                "model.layers.1.mlp.down_proj.weight" => down,
                "lm_head.weight" => head,
                _ => 1.0,
            };
            values.iter_mut().for_each(|v| *v *= scale);
        },
    )
}

/// llama3-tiny with 100 more embedding and lm-head rows than the tokenizer has (as real models
/// pad their tables), the new lm-head rows large and random, so the draft often picks an id the
/// target has no row for.
fn padded_llama3_tiny() -> PathBuf {
    const EXTRA: usize = 100;
    llama3_tiny_variant(
        "padded",
        |config| config["vocab_size"] = serde_json::json!(1000 + EXTRA),
        |name, shape, values| {
            if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
                let cols = shape[1];
                let mut rng = common::rng("padded draft");
                let scale = if name == "lm_head.weight" { 5.0 } else { 0.02 };
                values.extend(common::uniform(&mut rng, EXTRA * cols, -scale, scale));
                shape[0] += EXTRA;
            }
        },
    )
}

fn greedy(max_tokens: usize) -> GenerateParams {
    GenerateParams { max_tokens, stop_at_eos: false, ..Default::default() }
}

/// Prompts whose continuations repeat what came before (so prompt lookup finds n-grams) and one
/// that does not.
const PROMPTS: [&str; 3] = [
    "The license grants you the right to use the license. The license grants you",
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return",
    "Hello",
];

#[test]
fn prompt_lookup_proposes_what_followed_the_latest_match() {
    // The longest n-gram wins; among its matches, the most recent.
    assert_eq!(lookup(&[1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 1, 3, 2), vec![7, 8]);
    // Only a 1-gram matches: what followed its latest occurrence, cut at the end of the history.
    assert_eq!(lookup(&[5, 6, 4, 5], 1, 3, 4), vec![6, 4, 5]);
    // ... unless matches must be longer.
    assert_eq!(lookup(&[5, 6, 4, 5], 2, 3, 4), Vec::<u32>::new());
    assert_eq!(lookup(&[4, 5, 6, 1, 4, 5], 2, 3, 4), vec![6, 1, 4, 5]);
    assert_eq!(lookup(&[1, 2, 3], 1, 3, 4), Vec::<u32>::new());
    assert_eq!(lookup(&[], 1, 3, 4), Vec::<u32>::new());
}

#[test]
fn greedy_speculation_gives_the_targets_own_tokens() {
    let perturbed = perturbed_llama3_tiny(-1.0, 0.7);
    let padded = padded_llama3_tiny();
    for (device, gpu) in common::model_devices() {
        for name in ["llama3-tiny", "qwen2-tiny"] {
            let target = load(&fixture(name), &gpu);
            let same = load(&fixture(name), &gpu);
            let other = (name == "llama3-tiny").then(|| (load(&perturbed, &gpu), load(&padded, &gpu)));
            for prompt in PROMPTS {
                let ids = target.tokenizer.encode(prompt, true).unwrap();
                let params = greedy(48);
                let plain = Session::new(&target, Some(128)).unwrap().generate(&ids, &params, |_| {}).unwrap();
                let mut drafters: Vec<(&str, Speculator)> = vec![
                    // The tiny models' output rarely repeats two tokens of the prompt: 1-grams.
                    ("lookup, 4 a step", Speculator::lookup_ngrams(1, 3, 4).unwrap().fixed()),
                    ("lookup, adaptive", Speculator::lookup(6).unwrap()),
                    ("itself as draft", Speculator::with_model(&same, &target, 128, 3).unwrap().fixed()),
                ];
                if let Some((other, padded)) = &other {
                    drafters.push(("perturbed draft", Speculator::with_model(other, &target, 128, 4).unwrap().fixed()));
                    drafters.push(("padded draft", Speculator::with_model(padded, &target, 128, 4).unwrap().fixed()));
                }
                for (what, mut spec) in drafters {
                    let mut session = Session::new(&target, Some(128)).unwrap();
                    let mut streamed = String::new();
                    let out = spec.generate(&mut session, &ids, &params, |t| streamed += t).unwrap();
                    let at = format!("{device} {name} {what} {prompt:?}");
                    assert_eq!(out.tokens, plain.tokens, "{at}: {:?}", spec.stats);
                    assert_eq!((out.stop, &out.text, &streamed), (plain.stop, &plain.text, &out.text), "{at}");
                    // The cache holds what plain generation's would, so a chat can go on.
                    assert_eq!(session.tokens().len(), ids.len() + out.tokens.len() - 1, "{at}");
                    if what == "itself as draft" {
                        assert!(spec.stats.drafted > 0, "{at}");
                        assert_eq!(spec.stats.accepted, spec.stats.drafted, "{at}: a model agrees with itself");
                    }
                    if what == "lookup, 4 a step" && prompt != "Hello" {
                        assert!(spec.stats.drafted > 0, "{at}: the prompt repeats, so lookup drafts");
                    }
                }
            }
        }
    }
}

#[test]
fn a_draft_with_another_vocabulary_is_refused() {
    let (_, gpu) = common::devices().remove(0);
    let llama = load(&fixture("llama3-tiny"), &gpu);
    let qwen = load(&fixture("qwen2-tiny"), &gpu);
    let err = Speculator::with_model(&llama, &qwen, 64, 4).err().expect("different vocabularies").to_string();
    assert!(err.contains("cannot draft") && err.contains("vocabulary"), "{err}");
}

/// The 0.999 quantile of the chi-square distribution with `df` degrees of freedom, by the
/// Wilson–Hilferty approximation (accurate to well under 1% for df ≥ 3): a correct sampler
/// fails the test with probability 0.001.
fn chi_square_999(df: usize) -> f64 {
    let (d, z) = (df as f64, 3.0902); // z: the standard normal's 0.999 quantile
    d * (1.0 - 2.0 / (9.0 * d) + z * (2.0 / (9.0 * d)).sqrt()).powi(3)
}

#[test]
fn sampling_speculation_keeps_the_targets_distribution() {
    // Three tokens at temperature 1, top-k 4: at most 64 outcomes, whose exact probabilities
    // come from the target's own logits. The test has the power to see a wrong rule: accepting
    // with twice the right probability gave chi-square 174.6, resampling from p instead of
    // max(0, p - q) 248.2, against the limit of 43.9 (20 bins); the rule as written, 21.1. The first token comes from the prompt; the second is
    // drafted by a model that disagrees with the target (so drafts are rejected and resampled
    // from max(0, p - q)), the third is the target's own token after an accepted draft.
    let (_, gpu) = common::devices().remove(0);
    let target = load(&fixture("llama3-tiny"), &gpu);
    // A draft with the target's greedy picks but flatter probabilities: its drafts are often
    // kept and often not, so both branches of the rule are exercised.
    let draft = load(&perturbed_llama3_tiny(0.6, 1.0), &gpu);
    let prompt = target.tokenizer.encode("The license grants", true).unwrap();
    let sampling = SamplingParams { temperature: 1.0, top_k: 4, ..Default::default() };
    let distribution = |history: &[u32]| {
        let mut session = Session::new(&target, Some(64)).unwrap();
        let mut logits = session.feed(history).unwrap();
        Sampler::new(sampling.clone()).distribution(&mut logits, history, prompt.len())
    };

    // The exact distribution of (t1, t2, t3).
    let mut exact: HashMap<Vec<u32>, f64> = HashMap::new();
    for (t1, p1) in distribution(&prompt) {
        let h1 = [prompt.clone(), vec![t1]].concat();
        for (t2, p2) in distribution(&h1) {
            let h2 = [h1.clone(), vec![t2]].concat();
            for (t3, p3) in distribution(&h2) {
                exact.insert(vec![t1, t2, t3], f64::from(p1) * f64::from(p2) * f64::from(p3));
            }
        }
    }

    let runs = 1500;
    let mut counts: HashMap<Vec<u32>, usize> = HashMap::new();
    let mut spec = Speculator::with_model(&draft, &target, 64, 2).unwrap().fixed();
    for seed in 0..runs {
        let params =
            GenerateParams { max_tokens: 3, stop_at_eos: false, sampling: SamplingParams { seed, ..sampling.clone() } };
        let mut session = Session::new(&target, Some(64)).unwrap();
        let out = spec.generate(&mut session, &prompt, &params, |_| {}).unwrap();
        *counts.entry(out.tokens).or_default() += 1;
    }
    let acceptance = spec.stats.acceptance();
    assert!((0.2..0.9).contains(&acceptance), "drafts are both kept and rejected: {:?}", spec.stats);
    for outcome in counts.keys() {
        assert!(exact.contains_key(outcome), "{outcome:?} has probability 0 under the target");
    }

    // Pearson's statistic over the outcomes expected at least 5 times, the rest pooled.
    let n = runs as f64;
    let (mut chi2, mut bins) = (0.0, 0);
    let (mut rest_expected, mut rest_observed) = (0.0, 0.0);
    for (outcome, p) in &exact {
        let (expected, observed) = (p * n, counts.get(outcome).copied().unwrap_or(0) as f64);
        if expected >= 5.0 {
            chi2 += (observed - expected).powi(2) / expected;
            bins += 1;
        } else {
            rest_expected += expected;
            rest_observed += observed;
        }
    }
    if rest_expected > 0.0 {
        chi2 += (rest_observed - rest_expected).powi(2) / rest_expected;
        bins += 1;
    }
    let limit = chi_square_999(bins - 1);
    eprintln!("chi-square {chi2:.1} over {bins} bins, limit {limit:.1}; {:?}", spec.stats);
    assert!(bins >= 4, "enough outcomes to test: {bins}");
    assert!(chi2 < limit, "speculative sampling departs from the target: chi-square {chi2:.1} ≥ {limit:.1}");
}

#[test]
fn the_cli_speculates_with_the_same_output_and_refuses_a_foreign_draft() {
    let kiln = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    let llama = fixture("llama3-tiny");
    let llama = llama.to_str().unwrap();
    let base = ["generate", "--model", llama, "--prompt", PROMPTS[0], "--max-tokens", "40", "--temperature", "0"];
    let (code, plain, _) = kiln(&base);
    assert_eq!(code, Some(0));
    for extra in [&["--lookup"][..], &["--draft", llama, "--draft-tokens", "3"]] {
        let (code, out, err) = kiln(&[&base[..], extra].concat());
        assert_eq!(code, Some(0), "{extra:?}: {err}");
        assert_eq!(out, plain, "{extra:?}: the same text");
        assert!(err.contains("drafted tokens accepted"), "{extra:?} reports acceptance: {err}");
    }
    let qwen = fixture("qwen2-tiny");
    let (code, _, err) = kiln(&[&base[..], &["--draft", qwen.to_str().unwrap()]].concat());
    assert_eq!(code, Some(1), "{err}");
    assert!(err.lines().last().unwrap_or_default().starts_with("error: ") && err.contains("vocabulary"), "{err}");
}
