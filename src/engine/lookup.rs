//! Prompt lookup (Saxena 2023, "prompt lookup decoding"; vLLM's n-gram speculator): drafts
//! tokens for free by finding the text's last few tokens earlier in the prompt or the output and
//! proposing what followed them there. Both `Session` speculation (`crate::speculative`) and the
//! engine's speculative steps use it.

/// Prompt lookup: for n from `max_ngram` down to `min_ngram` (at least 1), the most recent earlier
/// occurrence of the last n tokens of `history`, and up to `k` tokens that followed it.
pub fn prompt_lookup(history: &[u32], min_ngram: usize, max_ngram: usize, k: usize) -> Vec<u32> {
    let len = history.len();
    for n in (min_ngram.max(1)..=max_ngram.min(len.saturating_sub(1))).rev() {
        let tail = &history[len - n..];
        for start in (0..len - n).rev() {
            if &history[start..start + n] == tail {
                let follow = start + n;
                return history[follow..(follow + k).min(len)].to_vec();
            }
        }
    }
    Vec::new()
}
