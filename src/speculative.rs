//! Speculative decoding for one sequence (Leviathan et al. 2023; Chen et al. 2023). A drafter
//! proposes up to K tokens; the target scores all of them in one step (K + 1 positions for the
//! weight reads of about one decode step), keeps the longest prefix it agrees with plus one token
//! of its own, and both caches roll back past what was rejected.
//!
//! - Greedy: a drafted token is kept when it is the target's own pick, so the output is token for
//!   token what the target alone generates.
//! - Sampling: the rejection rule. A drafted token `d` drawn from the draft's distribution `q` is
//!   kept with probability min(1, p(d) / q(d)) under the target's distribution `p`; otherwise the
//!   target's token is drawn from max(0, p − q), renormalised. Both distributions are the
//!   sampler's, after the same penalties, temperature and filters, so the output is distributed
//!   exactly as target-only sampling with those settings.
//!
//! Drafters: prompt lookup (the longest n-gram ending the text that occurred before, proposing
//! what followed it; no second model, as llama.cpp's `lookup` and transformers'
//! `prompt_lookup_num_tokens`) and a smaller model sharing the target's vocabulary. K adapts:
//! the expected tokens per step, (1 − a^(K+1)) / (1 − a) for a per-token acceptance `a`, over the
//! measured cost of a step of K + 1 tokens plus K draft steps, picks K each step; when drafting
//! does not pay, K is 0 and a step is a plain decode step.

use crate::engine::batch::Readback;
use crate::model::Model;
use crate::sampling::Sampler;
use crate::session::{GenerateParams, Generation, Output, Session, StopReason};
use crate::{KilnError, Result};
use std::collections::HashMap;
use std::time::Instant;

/// Where drafted tokens come from.
pub enum Drafter<'m> {
    /// Prompt lookup: n-grams of `min_ngram` to `max_ngram` tokens matched in the prompt and
    /// output.
    Lookup { min_ngram: usize, max_ngram: usize },
    /// A smaller model with the target's vocabulary, in its own session.
    Model(Box<Session<'m>>),
}

/// Drafted tokens and, for each, the distribution it was drawn from (a certain token: one entry
/// of probability 1).
#[derive(Default)]
struct Draft {
    tokens: Vec<u32>,
    distributions: Vec<Vec<(u32, f32)>>,
}

/// What speculation did over one generation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SpeculationStats {
    /// Target steps after the prompt (each yields at least one token).
    pub steps: usize,
    /// Steps that carried drafted tokens.
    pub drafting_steps: usize,
    pub drafted: usize,
    pub accepted: usize,
}

impl SpeculationStats {
    /// Accepted over drafted tokens.
    pub fn acceptance(&self) -> f64 {
        self.accepted as f64 / self.drafted.max(1) as f64
    }

    /// Mean accepted drafted tokens per drafting step.
    pub fn accepted_per_drafting_step(&self) -> f64 {
        self.accepted as f64 / self.drafting_steps.max(1) as f64
    }
}

/// Speculative generation: a drafter, the most tokens it may draft per step, and the running
/// estimates that choose how many it does.
pub struct Speculator<'m> {
    drafter: Drafter<'m>,
    max_draft: usize,
    adaptive: bool,
    /// Decayed counts of accepted drafted tokens and of trials (accepted + first rejections).
    accepted: f64,
    trials: f64,
    /// Seconds: a target step of one token, each extra token in it, each draft-model token.
    step_seconds: Option<f64>,
    extra_token_seconds: Option<f64>,
    draft_token_seconds: Option<f64>,
    /// Steps since drafting last ran (probes when the estimates say it does not pay).
    idle_steps: usize,
    pub stats: SpeculationStats,
}

/// Weight of the newest observation in the running estimates.
const EMA: f64 = 0.2;
/// The acceptance counts decay by this per step, so they follow the text as it changes.
const DECAY: f64 = 0.95;
/// With drafting off, try one drafted token every this many steps to see whether it pays again.
const PROBE_EVERY: usize = 8;

impl<'m> Speculator<'m> {
    /// Prompt lookup drafting, up to `max_draft` tokens a step.
    pub fn lookup(max_draft: usize) -> Result<Self> {
        // One matching token predicts little (measured on SmolLM2: with 1-gram matches allowed,
        // adaptive drafting ran 7% slower than plain decoding on a code prompt; with two or
        // more, 6% faster), so a match takes at least two.
        Self::lookup_ngrams(2, 3, max_draft)
    }

    /// Prompt lookup drafting with matches of `min_ngram` to `max_ngram` tokens.
    pub fn lookup_ngrams(min_ngram: usize, max_ngram: usize, max_draft: usize) -> Result<Self> {
        if min_ngram == 0 || min_ngram > max_ngram {
            return Err(KilnError::Request(format!("n-gram lengths {min_ngram}..={max_ngram} are not a range from 1")));
        }
        Self::new(Drafter::Lookup { min_ngram, max_ngram }, max_draft)
    }

    /// Drafting with `draft`, which must share `target`'s vocabulary, in a session of `ctx`
    /// positions (the target session's).
    pub fn with_model(draft: &'m Model, target: &Model, ctx: usize, max_draft: usize) -> Result<Self> {
        check_vocabularies(draft, target)?;
        let session = Session::new(draft, Some(ctx))?;
        Self::new(Drafter::Model(Box::new(session)), max_draft)
    }

    fn new(drafter: Drafter<'m>, max_draft: usize) -> Result<Self> {
        if max_draft == 0 {
            return Err(KilnError::Request("--draft-tokens must be at least 1".into()));
        }
        Ok(Speculator {
            drafter,
            max_draft,
            adaptive: true,
            accepted: 0.0,
            trials: 0.0,
            step_seconds: None,
            extra_token_seconds: None,
            draft_token_seconds: None,
            idle_steps: 0,
            stats: SpeculationStats::default(),
        })
    }

    /// Always draft `max_draft` tokens (when the drafter has them), for tests and measurements.
    pub fn fixed(mut self) -> Self {
        self.adaptive = false;
        self
    }

    /// As [`Session::generate`], speculatively: the same tokens for greedy decoding, the same
    /// distribution when sampling. `self.stats` accumulates over calls.
    pub fn generate(
        &mut self,
        target: &mut Session<'m>,
        prompt: &[u32],
        params: &GenerateParams,
        mut on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        params.sampling.validate()?;
        target.check_generation(prompt.len(), params.max_tokens)?;
        let model = target.model();
        let vocab = model.config.vocab_size;
        let mut sampler = Sampler::new(params.sampling.clone());
        let mut draft_sampler = Sampler::new(crate::sampling::SamplingParams {
            seed: params.sampling.seed ^ 0x5eed_d4af,
            ..params.sampling.clone()
        });
        // Plain greedy picks come from the GPU; anything else needs the target's distributions.
        let gpu_greedy = params.sampling.is_plain_argmax();
        let prompt_end = target.tokens().len() + prompt.len();
        let mut output = Output::new(model, params, prompt.len(), &mut on_text);

        let mut next = target.next_token(prompt, gpu_greedy, &mut sampler, prompt_end)?;
        // The draft model reads the prompt now, as part of the prefill, so that a proposal only
        // feeds it the few tokens since the last one (and its cost per token is measured so).
        if let Drafter::Model(draft) = &mut self.drafter {
            let kept = draft.keep_common_prefix(target.tokens());
            draft.feed_greedy(&target.tokens()[kept..])?;
        }
        output.prefilled();

        let stop = 'generation: loop {
            // `next` is the target's own token.
            if let Some(stop) = output.push(next)? {
                break stop;
            }

            // Draft at most what can still be emitted after `next` (the step's own token comes
            // after the drafts) and what the context and one step hold.
            let room = (params.max_tokens - output.tokens().len() - 1)
                .min(target.context() - target.tokens().len() - 1)
                .min(target.max_rows_per_step() - 1);
            let k = self.choose_draft_len().min(room);
            let base = target.tokens().len();
            let mut history = target.tokens().to_vec();
            history.push(next);
            let draft_start = Instant::now();
            let Draft { tokens: draft, distributions: q } =
                self.propose(&history, k, prompt_end, gpu_greedy, &mut draft_sampler)?;
            if !draft.is_empty() {
                self.observe_draft(draft_start.elapsed().as_secs_f64(), draft.len());
            }

            // A drafted id past the target's embedding rows (a draft whose table is padded
            // further) cannot be fed to the target. The target gives it probability 0, so the
            // rule rejects it for certain: it stays in the draft, to be checked (its replacement
            // comes from the row before it), and nothing after it is kept.
            let feedable = draft.iter().position(|&d| d as usize >= vocab).unwrap_or(draft.len());
            let mut draft = draft;
            draft.truncate((feedable + 1).min(draft.len()));

            // Verify: the target's rows after `next` and after each drafted token it can take.
            let mut ids = vec![next];
            ids.extend_from_slice(&draft[..feedable]);
            let verify_start = Instant::now();
            let readback = if gpu_greedy { Readback::Argmax } else { Readback::Logits };
            let out = target.feed_rows(&ids, readback)?;
            self.observe_step(verify_start.elapsed().as_secs_f64(), feedable);

            let (accepted, following) = if gpu_greedy {
                let m = draft[..feedable].iter().zip(&out.argmax).take_while(|(d, a)| d == a).count();
                (m, out.argmax[m])
            } else {
                let history = target.tokens().to_vec();
                let mut verdict = None;
                for (i, &d) in draft.iter().enumerate() {
                    let mut logits = out.logits[i * vocab..(i + 1) * vocab].to_vec();
                    let p = sampler.distribution(&mut logits, &history[..base + 1 + i], prompt_end);
                    if let Some(replacement) = reject(&mut sampler, &p, q[i].as_slice(), d) {
                        verdict = Some((i, replacement));
                        break;
                    }
                }
                verdict.unwrap_or_else(|| {
                    let m = draft.len();
                    let mut logits = out.logits[m * vocab..(m + 1) * vocab].to_vec();
                    let p = sampler.distribution(&mut logits, &history[..base + 1 + m], prompt_end);
                    (m, sampler.draw(&p))
                })
            };
            self.observe_acceptance(draft.len(), accepted);
            // Keep `next` and the accepted drafts; the rest of the step is forgotten.
            target.rollback(base + 1 + accepted);

            for &t in &draft[..accepted] {
                if let Some(stop) = output.push(t)? {
                    break 'generation stop;
                }
            }
            next = following;
        };
        // The cache holds what plain generation's would: every emitted token but the last one
        // (nothing has read its logits) when stopping at max_tokens, all of them at an eos.
        let emitted = output.tokens().len();
        let fed = match stop {
            StopReason::MaxTokens => emitted - 1,
            StopReason::Eos => emitted,
        };
        target.rollback(prompt_end + fed);
        output.finish(stop)
    }

    /// How many tokens to draft this step.
    fn choose_draft_len(&mut self) -> usize {
        if !self.adaptive {
            return self.max_draft;
        }
        // Measure first: a plain step, then a drafting one.
        let Some(step) = self.step_seconds else { return 0 };
        let Some(extra) = self.extra_token_seconds else { return self.max_draft };
        let draft = self.draft_token_seconds.unwrap_or(0.0);
        // Per-token acceptance with a uniform prior.
        let a = (self.accepted + 1.0) / (self.trials + 2.0);
        let rate = |k: usize| {
            let expected = (0..=k).map(|j| a.powi(j as i32)).sum::<f64>();
            expected / (step + k as f64 * (extra + draft))
        };
        let best = (0..=self.max_draft).max_by(|&x, &y| rate(x).total_cmp(&rate(y))).unwrap_or(0);
        if best > 0 {
            self.idle_steps = 0;
            return best;
        }
        self.idle_steps += 1;
        if self.idle_steps >= PROBE_EVERY {
            self.idle_steps = 0;
            return 1;
        }
        0
    }

    /// Up to `k` drafted tokens after `history`, each with the distribution it was drawn from
    /// (lookup proposals and greedy drafts count as certain).
    fn propose(
        &mut self,
        history: &[u32],
        k: usize,
        prompt_end: usize,
        greedy: bool,
        sampler: &mut Sampler,
    ) -> Result<Draft> {
        if k == 0 {
            return Ok(Draft::default());
        }
        match &mut self.drafter {
            Drafter::Lookup { min_ngram, max_ngram } => {
                let tokens = lookup(history, *min_ngram, *max_ngram, k);
                let distributions = tokens.iter().map(|&d| vec![(d, 1.0)]).collect();
                Ok(Draft { tokens, distributions })
            }
            Drafter::Model(session) => {
                let kept = session.keep_common_prefix(history);
                let mut feed = history[kept..].to_vec();
                let mut draft = Draft::default();
                for _ in 0..k {
                    let (d, q) = if greedy {
                        let d = session.feed_greedy(&feed)?;
                        (d, vec![(d, 1.0)])
                    } else {
                        let mut logits = session.feed(&feed)?;
                        let q = sampler.distribution(&mut logits, session.tokens(), prompt_end);
                        (sampler.draw(&q), q)
                    };
                    draft.tokens.push(d);
                    draft.distributions.push(q);
                    feed = vec![d];
                }
                Ok(draft)
            }
        }
    }

    fn observe_step(&mut self, seconds: f64, drafted: usize) {
        let ema = |old: Option<f64>, new: f64| Some(old.map_or(new, |o| o + EMA * (new - o)));
        match (drafted, self.step_seconds) {
            (0, _) => self.step_seconds = ema(self.step_seconds, seconds),
            (k, Some(step)) => {
                self.extra_token_seconds = ema(self.extra_token_seconds, ((seconds - step) / k as f64).max(0.0))
            }
            // A multi-token step before any one-token step: nothing to separate it from.
            (_, None) => {}
        }
    }

    fn observe_draft(&mut self, seconds: f64, drafted: usize) {
        if matches!(self.drafter, Drafter::Model(_)) {
            let per = seconds / drafted as f64;
            self.draft_token_seconds = Some(self.draft_token_seconds.map_or(per, |o| o + EMA * (per - o)));
        }
    }

    fn observe_acceptance(&mut self, drafted: usize, accepted: usize) {
        self.stats.steps += 1;
        if drafted == 0 {
            return;
        }
        self.stats.drafting_steps += 1;
        self.stats.drafted += drafted;
        self.stats.accepted += accepted;
        self.accepted = self.accepted * DECAY + accepted as f64;
        self.trials = self.trials * DECAY + accepted as f64 + if accepted < drafted { 1.0 } else { 0.0 };
    }
}

/// The rejection rule for a drafted token `d` drawn from `q`: `None` if it is kept (with
/// probability min(1, p(d) / q(d))), else the replacement drawn from max(0, p − q) renormalised.
fn reject(sampler: &mut Sampler, p: &[(u32, f32)], q: &[(u32, f32)], d: u32) -> Option<u32> {
    let prob = |dist: &[(u32, f32)], t: u32| dist.iter().find(|e| e.0 == t).map_or(0.0, |e| f64::from(e.1));
    let (pd, qd) = (prob(p, d), prob(q, d));
    if qd > 0.0 && sampler.uniform() < (pd / qd).min(1.0) {
        return None;
    }
    let q: HashMap<u32, f32> = q.iter().copied().collect();
    let residual: Vec<(u32, f32)> =
        p.iter().map(|&(t, pt)| (t, (pt - q.get(&t).copied().unwrap_or(0.0)).max(0.0))).filter(|e| e.1 > 0.0).collect();
    // p = q exactly leaves nothing, and then rejection has probability 0: only rounding gets here.
    Some(if residual.is_empty() { sampler.draw(p) } else { sampler.draw(&residual) })
}

pub use crate::engine::lookup::prompt_lookup as lookup;

/// Draft and target must tokenise alike: the same tokens at the same ids. Their embedding tables
/// may be padded differently (the config's `vocab_size` rows, often rounded up past the
/// tokenizer's ids): a drafted id past the target's rows is never fed to the target; it has
/// target probability 0, so greedy verification never matches it and the rejection rule replaces
/// it for certain, from the target's row before it.
pub fn check_vocabularies(draft: &Model, target: &Model) -> Result<()> {
    let (d, t) = (&draft.tokenizer, &target.tokenizer);
    let mismatch = |why: String| {
        Err(KilnError::Request(format!(
            "the draft model {} cannot draft for {}: {why}; a draft must share the target's vocabulary",
            draft.dir.display(),
            target.dir.display()
        )))
    };
    if d.vocab_size() != t.vocab_size() {
        return mismatch(format!("its tokenizer has {} tokens, the target's {}", d.vocab_size(), t.vocab_size()));
    }
    for id in 0..t.vocab_size() as u32 {
        if d.id_to_token(id) != t.id_to_token(id) {
            return mismatch(format!(
                "token {id} is {:?} in the draft, {:?} in the target",
                d.id_to_token(id),
                t.id_to_token(id)
            ));
        }
    }
    Ok(())
}
