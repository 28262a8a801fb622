//! Choosing the next token from a row of logits: greedy argmax, or seeded sampling with
//! temperature, top-k, top-p (nucleus) and min-p, after an optional repetition penalty.
//!
//! Semantics and order follow Hugging Face transformers' generation utilities
//! (`RepetitionPenaltyLogitsProcessor`, then `TemperatureLogitsWarper`, `TopKLogitsWarper`,
//! `TopPLogitsWarper`, `MinPLogitsWarper`, then `torch.multinomial` over the softmax), so a
//! `generation_config.json`'s values mean here what they mean there. Top-p follows Holtzman et al.
//! 2019, "The Curious Case of Neural Text Degeneration"; min-p follows Nguyen et al. 2024,
//! "Turning Up the Heat: Min-p Sampling".

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{KilnError, Result};

/// How to pick tokens. The default is greedy decoding.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// Logits are divided by this before sampling; `<= 0` means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 = off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probabilities sum to at least `top_p`;
    /// 1.0 = off.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the most likely token's probability; 0 = off.
    pub min_p: f32,
    /// Penalise every token already in the prompt or output (HF semantics, see
    /// [`apply_repetition_penalty`]); 1.0 = off.
    pub repeat_penalty: f32,
    /// OpenAI's penalties on the generated tokens (not the prompt): every token already
    /// generated loses `presence_penalty` once and `frequency_penalty` per occurrence from its
    /// logit. 0 = off; each in [-2, 2].
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Seed of the sampler's random number generator: the same seed and logits give the same tokens.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding: argmax, no randomness (temperature `<= 0`).
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Greedy with no penalty: the argmax of the raw logits is the pick (the GPU can make it).
    pub fn is_plain_argmax(&self) -> bool {
        self.is_greedy() && self.repeat_penalty == 1.0 && self.presence_penalty == 0.0 && self.frequency_penalty == 0.0
    }

    /// Reject values that have no meaning, naming the parameter, so a bad request or flag fails
    /// before any work is done.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(KilnError::Request(what));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(format!("temperature must be a finite number >= 0 (0 = greedy), got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1] (1 = off), got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min_p must be in [0, 1] (0 = off), got {}", self.min_p));
        }
        if !self.repeat_penalty.is_finite() || self.repeat_penalty <= 0.0 {
            return bad(format!("repeat_penalty must be a finite number > 0 (1 = off), got {}", self.repeat_penalty));
        }
        for (name, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(format!("{name} must be in [-2, 2] (0 = off), got {v}"));
            }
        }
        Ok(())
    }
}

/// Picks tokens according to [`SamplingParams`], with its own seeded random number generator.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Scratch reused across calls (one per vocabulary entry) so a decode step allocates nothing.
    seen: Vec<bool>,
    /// Scratch: (token id, logit, then probability) of the tokens still in the running.
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    /// The parameters are not checked here; call [`SamplingParams::validate`] on user input first.
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Sampler { params, rng, seen: Vec::new(), candidates: Vec::new() }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// As [`Sampler::sample`], after OpenAI's presence and frequency penalties on the tokens of
    /// `history` past `prompt_len` (the generated ones).
    pub fn sample_output(&mut self, logits: &mut [f32], history: &[u32], prompt_len: usize) -> u32 {
        self.apply_output_penalties(logits, history, prompt_len);
        self.sample(logits, history)
    }

    /// The distribution [`Sampler::sample_output`] draws from, as (token, probability) pairs
    /// summing to 1, most likely first: the penalties, temperature and filters applied, the
    /// survivors renormalised. Greedy: the argmax with probability 1. Speculative decoding's
    /// rejection rule compares these between the draft and the target.
    pub fn distribution(&mut self, logits: &mut [f32], history: &[u32], prompt_len: usize) -> Vec<(u32, f32)> {
        self.apply_output_penalties(logits, history, prompt_len);
        let candidates = self.candidates(logits, history);
        let total: f64 = candidates.iter().map(|c| f64::from(c.1)).sum();
        candidates.iter().map(|&(id, p)| (id, (f64::from(p) / total) as f32)).collect()
    }

    /// A draw from `distribution` (pairs of token and probability; their total need not be 1).
    pub fn draw(&mut self, distribution: &[(u32, f32)]) -> u32 {
        draw(&mut self.rng, distribution)
    }

    /// A uniform number in [0, 1) from this sampler's generator (the rejection rule's coin).
    pub fn uniform(&mut self) -> f64 {
        self.rng.random::<f64>()
    }

    fn apply_output_penalties(&mut self, logits: &mut [f32], history: &[u32], prompt_len: usize) {
        let (presence, frequency) = (self.params.presence_penalty, self.params.frequency_penalty);
        if presence != 0.0 || frequency != 0.0 {
            let mut counts = std::collections::HashMap::new();
            for &id in &history[prompt_len.min(history.len())..] {
                *counts.entry(id).or_insert(0u32) += 1;
            }
            for (id, n) in counts {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l -= presence + frequency * n as f32;
                }
            }
        }
    }

    /// Pick the next token from one row of logits (`[vocab]`). `history` holds every id of the
    /// prompt and of the output so far (for the repetition penalty). The repetition penalty and
    /// temperature are applied to `logits` in place; the filters only choose among them.
    ///
    /// Tokens with NaN or `-inf` logits are never picked. If no logit is usable at all (all NaN),
    /// token 0 is returned: there is nothing meaningful to choose.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        if self.params.is_greedy() {
            // No draw: greedy consumes nothing from the generator.
            return self.candidates(logits, history)[0].0;
        }
        self.candidates(logits, history);
        draw(&mut self.rng, &self.candidates)
    }

    /// The tokens still in the running, most likely first, with their probabilities after the
    /// filters (not renormalised: a draw scales by their total). Greedy: the argmax alone.
    fn candidates(&mut self, logits: &mut [f32], history: &[u32]) -> &[(u32, f32)] {
        if self.params.repeat_penalty != 1.0 {
            apply_repetition_penalty(logits, history, self.params.repeat_penalty, &mut self.seen);
        }
        let candidates = &mut self.candidates;
        candidates.clear();
        if self.params.is_greedy() {
            candidates.push((argmax(logits).unwrap_or(0), 1.0));
            return candidates;
        }

        // Temperature (TemperatureLogitsWarper): logits / T.
        let temperature = self.params.temperature;
        for l in logits.iter_mut() {
            *l /= temperature;
        }

        // Candidates: every token with a usable logit. NaN and -inf have probability zero.
        candidates.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| !l.is_nan() && **l != f32::NEG_INFINITY)
                .map(|(i, &l)| (i as u32, l)),
        );
        if candidates.is_empty() {
            candidates.push((0, 1.0));
            return candidates;
        }
        // +inf logits take all the probability, shared equally (softmax's limit).
        if candidates.iter().any(|c| c.1 == f32::INFINITY) {
            candidates.retain(|c| c.1 == f32::INFINITY);
            for c in candidates.iter_mut() {
                c.1 = 0.0;
            }
        }

        // Top-k (TopKLogitsWarper): drop logits below the k-th largest; ties with it stay, as
        // `scores < topk(scores, k)[-1]` keeps them in transformers.
        let top_k = self.params.top_k;
        if top_k > 0 && top_k < candidates.len() {
            let by_logit_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1);
            let (_, kth, _) = candidates.select_nth_unstable_by(top_k - 1, by_logit_desc);
            let threshold = kth.1;
            candidates.retain(|c| c.1 >= threshold);
        }

        // Sort by probability, most likely first (ties by id, so the order is deterministic),
        // and turn logits into probabilities: softmax over what is left.
        candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        softmax_in_place(candidates);

        // Top-p (TopPLogitsWarper): keep the most likely tokens until their cumulative
        // probability reaches top_p; always at least one.
        let top_p = self.params.top_p;
        if top_p < 1.0 {
            let mut cumulative = 0.0f32;
            let mut keep = candidates.len();
            for (i, c) in candidates.iter().enumerate() {
                cumulative += c.1;
                if cumulative >= top_p {
                    keep = i + 1;
                    break;
                }
            }
            candidates.truncate(keep);
        }

        // Min-p (MinPLogitsWarper): drop tokens with probability < min_p × the top probability.
        // Renormalising after top-p does not change the ratio, so the current values serve.
        let min_p = self.params.min_p;
        if min_p > 0.0 {
            let threshold = min_p * candidates[0].1;
            // Sorted descending, so the survivors are a prefix; the first always survives.
            let keep = candidates.iter().take_while(|c| c.1 >= threshold).count().max(1);
            candidates.truncate(keep);
        }
        candidates
    }
}

/// Draw from (token, probability) pairs, proportional to probability (the filters removed mass,
/// so the total may be below 1: the draw is scaled instead of renormalising).
fn draw(rng: &mut StdRng, candidates: &[(u32, f32)]) -> u32 {
    let total: f64 = candidates.iter().map(|c| f64::from(c.1)).sum();
    let mut u = rng.random::<f64>() * total;
    for c in candidates {
        u -= f64::from(c.1);
        if u < 0.0 {
            return c.0;
        }
    }
    // Rounding can leave u a hair above 0 after the last token; that token is the draw.
    candidates[candidates.len() - 1].0
}

/// HF's `RepetitionPenaltyLogitsProcessor` (Keskar et al. 2019, CTRL): for every distinct id in
/// `history`, a positive logit is divided by `penalty`, a negative one multiplied by it, so the
/// token always becomes less likely when `penalty > 1`. Each id is penalised once however often it
/// occurs. Ids outside `logits` are ignored (a prompt may hold added tokens past the model's
/// vocabulary). `seen` is scratch space.
pub fn apply_repetition_penalty(logits: &mut [f32], history: &[u32], penalty: f32, seen: &mut Vec<bool>) {
    seen.clear();
    seen.resize(logits.len(), false);
    for &id in history {
        let i = id as usize;
        if i >= logits.len() || seen[i] {
            continue;
        }
        seen[i] = true;
        let l = logits[i];
        logits[i] = if l > 0.0 { l / penalty } else { l * penalty };
    }
}

/// The log-probability of `id` under softmax(`logits`), and the `top` most likely tokens with
/// theirs (most likely first, ties by id). NaN logits count as impossible.
pub fn logprobs(logits: &[f32], id: u32, top: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().copied().filter(|l| !l.is_nan()).fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().filter(|l| !l.is_nan()).map(|&l| (l as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    let lp = |l: f32| if l.is_nan() { f32::NEG_INFINITY } else { (l as f64 - lse) as f32 };
    let chosen = logits.get(id as usize).map_or(f32::NEG_INFINITY, |&l| lp(l));
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &l) in logits.iter().enumerate() {
            if l.is_nan() || (best.len() == top && l <= best[top - 1].1) {
                continue;
            }
            let at = best.partition_point(|b| b.1 >= l);
            best.insert(at, (i as u32, l));
            best.truncate(top);
        }
    }
    (chosen, best.into_iter().map(|(i, l)| (i, lp(l))).collect())
}

/// Index of the largest logit; the first one on ties; NaN never wins. `None` if every value is
/// NaN (or the row is empty).
pub fn argmax(logits: &[f32]) -> Option<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &l) in logits.iter().enumerate() {
        if l.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| l > b) {
            best = Some((i, l));
        }
    }
    best.map(|(i, _)| i as u32)
}

/// Replace each candidate's logit by its softmax probability (max subtracted first, for range).
fn softmax_in_place(candidates: &mut [(u32, f32)]) {
    let max = candidates.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for c in candidates.iter_mut() {
        c.1 = (c.1 - max).exp();
        sum += c.1;
    }
    for c in candidates.iter_mut() {
        c.1 /= sum;
    }
}
