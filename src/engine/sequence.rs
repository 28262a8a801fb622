//! One request's sequence inside the engine: its tokens, how many of them the KV cache holds,
//! its blocks, its sampler, and the text it streams out (held back while it could still be the
//! start of a stop string).

use super::block_pool::BlockKey;
use super::{Event, FinishReason, RequestParams, TokenLogprob, Usage};
use crate::sampling::Sampler;
use crate::tokenizer::{StreamDecoder, Tokenizer};
use crate::Result;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;

pub struct Sequence<'t> {
    pub id: u64,
    /// The prompt, then every generated token.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Tokens whose K/V are in the cache: tokens[..computed].
    pub computed: usize,
    /// Block table: blocks[i] holds positions i·block_size ..
    pub blocks: Vec<u32>,
    /// Prefix keys of the full blocks of `tokens` computed so far.
    pub keys: Vec<BlockKey>,
    /// Blocks offered to the prefix cache (blocks[..registered]).
    pub registered: usize,
    /// Prompt tokens taken from the prefix cache at first admission.
    pub cached_tokens: usize,
    pub admitted_once: bool,
    /// Wait until this sequence's prompt is computed (a sibling choice), to share its blocks.
    pub after: Option<u64>,
    /// Tokens drafted by prompt lookup for this step, after its last token (speculative).
    pub draft: Vec<u32>,
    pub params: RequestParams,
    pub sampler: Sampler,
    decoder: StreamDecoder<'t>,
    stops: StopMatcher,
    events: Sender<Event>,
    cancel: Arc<AtomicBool>,
}

impl<'t> Sequence<'t> {
    pub fn new(
        id: u64,
        prompt: Vec<u32>,
        params: RequestParams,
        tokenizer: &'t Tokenizer,
        events: Sender<Event>,
        cancel: Arc<AtomicBool>,
    ) -> Self {
        Sequence {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            computed: 0,
            blocks: Vec::new(),
            keys: Vec::new(),
            registered: 0,
            cached_tokens: 0,
            admitted_once: false,
            after: None,
            draft: Vec::new(),
            sampler: Sampler::new(params.sampling.clone()),
            decoder: StreamDecoder::new(tokenizer, true),
            stops: StopMatcher::new(params.stop.clone()),
            params,
            events,
            cancel,
        }
    }

    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// Whether picking the next token needs the logits read back (the GPU's argmax is the
    /// answer only for plain greedy decoding without log-probabilities).
    pub fn needs_logits(&self) -> bool {
        !self.params.sampling.is_plain_argmax() || self.params.logprobs.is_some()
    }

    pub fn usage(&self) -> Usage {
        Usage { prompt_tokens: self.prompt_len, cached_tokens: self.cached_tokens, generated_tokens: self.generated() }
    }

    /// Take the next token. Returns why the sequence is finished, if it is. A token that ends the
    /// sequence at eos is not kept; the text of a stop string is never sent.
    pub fn push_token(&mut self, id: u32, logprob: Option<TokenLogprob>, eos: &[u32]) -> Result<Option<FinishReason>> {
        if self.params.stop_at_eos && eos.contains(&id) {
            return Ok(Some(FinishReason::Eos));
        }
        self.tokens.push(id);
        let piece = self.decoder.push(id)?.unwrap_or_default();
        let (text, stopped) = self.stops.push(&piece);
        let sent = self.events.send(Event::Token { id, text, logprob }).is_ok();
        if !sent {
            // The receiver is gone: nobody will read the rest.
            self.cancel.store(true, Ordering::Relaxed);
            return Ok(Some(FinishReason::Cancelled));
        }
        if let Some(stop) = stopped {
            return Ok(Some(FinishReason::Stop(stop)));
        }
        if self.generated() >= self.params.max_tokens {
            return Ok(Some(FinishReason::MaxTokens));
        }
        Ok(None)
    }

    /// Send the end of the stream: text still held back (unless a stop string ended it), then
    /// the finish. Consumes the sequence; its blocks must be released by the caller first.
    pub fn finish(mut self, reason: FinishReason) {
        if matches!(reason, FinishReason::Eos | FinishReason::MaxTokens) {
            let tail = self.decoder.finish().ok().flatten().unwrap_or_default();
            let (mut text, _) = self.stops.push(&tail);
            text += &self.stops.flush();
            if !text.is_empty() {
                let _ = self.events.send(Event::Text(text));
            }
        }
        let usage = self.usage();
        let _ = self.events.send(Event::Done { reason, usage });
    }

    pub fn fail(self, message: String) {
        let _ = self.events.send(Event::Failed(message));
    }
}

/// Finds stop strings in streamed text, holding back any tail that could still begin one, so no
/// part of a stop string is ever sent even when it arrives split across tokens.
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), held: String::new() }
    }

    /// Add `piece`: (text safe to send now, the stop string found if any; text after it is dropped).
    pub fn push(&mut self, piece: &str) -> (String, Option<String>) {
        self.held.push_str(piece);
        if self.stops.is_empty() {
            return (std::mem::take(&mut self.held), None);
        }
        let first = self.stops.iter().filter_map(|s| self.held.find(s.as_str()).map(|at| (at, s))).min();
        if let Some((at, stop)) = first {
            let out = self.held[..at].to_string();
            let stop = stop.clone();
            self.held.clear();
            return (out, Some(stop));
        }
        // Hold the longest tail that is a proper prefix of some stop string.
        let keep = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| self.stops.iter().any(|s| s.starts_with(&self.held[i..])))
            .unwrap_or(self.held.len());
        let out = self.held[..keep].to_string();
        self.held.drain(..keep);
        (out, None)
    }

    /// The text still held back (the stream ended without a stop string).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::StopMatcher;

    #[test]
    fn stop_strings_split_across_pieces_are_never_sent() {
        let mut m = StopMatcher::new(vec!["\n\nUser:".into(), "END".into()]);
        let mut sent = String::new();
        let mut found = None;
        for piece in ["Hello", " world\n", "\nUs", "er: more"] {
            let (text, stop) = m.push(piece);
            sent += &text;
            if stop.is_some() {
                found = stop;
                break;
            }
        }
        assert_eq!(sent, "Hello world");
        assert_eq!(found.as_deref(), Some("\n\nUser:"));
    }

    #[test]
    fn a_false_start_is_released_and_the_earliest_stop_wins() {
        let mut m = StopMatcher::new(vec!["ENDING".into(), "DING".into()]);
        assert_eq!(m.push("EN"), (String::new(), None));
        assert_eq!(m.push("Dx"), ("ENDx".into(), None));
        let (text, stop) = m.push("ENDING!");
        assert_eq!(text, "");
        assert_eq!(stop.as_deref(), Some("ENDING"), "the earlier occurrence wins over DING inside it");
        let mut m = StopMatcher::new(vec!["é!".into()]);
        assert_eq!(m.push("caf"), ("caf".into(), None));
        assert_eq!(m.push("é"), (String::new(), None), "held on a char boundary");
        assert_eq!(m.flush(), "é");
    }
}
