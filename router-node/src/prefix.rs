//! The prefix cache: states of prompts already fed, kept so that a request sharing a prefix with an earlier one (a
//! system prompt, the conversation so far) feeds only the rest.
//!
//! **Exact.** A hybrid model's state is more than its KV pages: each Gated DeltaNet layer folds the whole prefix into
//! a fixed-size recurrent state, which cannot be cut back to a shorter prefix. So the cache keeps whole states
//! ([`SequenceState::snapshot`]: the full KV pages shared, the DeltaNet slots copied), taken where the engine's
//! prompt pieces end, at multiples of [`ALIGN_TOKENS`]. There a state depends only on the tokens before it, not on
//! how the load cut them into forward calls, and the kernels are batch-invariant: a request continued from a
//! snapshot computes bit for bit what it computes from scratch.
//!
//! **Keys.** A prefix is found by the hash of its tokens, one per aligned block, chained, so a prompt's keys cost one
//! pass over it; a hit is confirmed against the tokens themselves, so a hash collision cannot give a wrong state.
//!
//! **Memory.** Entries count their whole [`SequenceState::bytes`], the KV pages they share with other entries or
//! with running sequences included, so the count is an upper bound. The engine keeps it within what the state
//! budget leaves after the running sequences' reservations, evicting the least recently used entries first: cached
//! prefixes never keep a request from being admitted.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hasher};

use moe_model::state::ALIGN_TOKENS;
use moe_model::SequenceState;

/// A state taken from the cache: `tokens` of the prompt are already in it.
#[derive(Debug)]
pub struct Hit {
    pub state: SequenceState,
    pub tokens: usize,
}

#[derive(Debug)]
struct Entry {
    tokens: Box<[u32]>,
    state: SequenceState,
    bytes: u64,
    /// The tick of its last use, its key in `by_use`.
    used: u64,
}

/// Prompt-prefix states, least recently used evicted first.
#[derive(Debug, Default)]
pub struct PrefixCache {
    entries: HashMap<u64, Entry>,
    /// Last use → key: the eviction order.
    by_use: BTreeMap<u64, u64>,
    tick: u64,
    bytes: u64,
    /// The keys of the first blocks of prompts looked up, by their last use: whether a prompt's beginning has come
    /// before (at most [`SEEN_CAP`] of them).
    seen: HashMap<u64, u64>,
    seen_by_use: BTreeMap<u64, u64>,
}

/// How many prompt beginnings [`PrefixCache::seen_before`] remembers (16 bytes and a tree node each).
const SEEN_CAP: usize = 1 << 14;

/// The keys of `tokens`' aligned prefixes: entry `b` is the key of the first `(b + 1) · ALIGN_TOKENS` tokens.
fn prefix_keys(tokens: &[u32]) -> Vec<u64> {
    let mut hasher = DefaultHasher::new();
    tokens
        .chunks_exact(ALIGN_TOKENS)
        .map(|block| {
            for &t in block {
                hasher.write_u32(t);
            }
            hasher.clone().finish()
        })
        .collect()
}

/// The last multiple of [`ALIGN_TOKENS`] before a prompt's last token: where its longest useful snapshot is (a request
/// always feeds at least its last token, whose logits it samples from).
pub fn last_boundary(prompt_len: usize) -> usize {
    prompt_len.saturating_sub(1) / ALIGN_TOKENS * ALIGN_TOKENS
}

impl PrefixCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes the entries hold (an upper bound: shared pages are counted by each holder).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn touch(&mut self, key: u64) {
        self.tick += 1;
        if let Some(e) = self.entries.get_mut(&key) {
            self.by_use.remove(&e.used);
            e.used = self.tick;
            self.by_use.insert(self.tick, key);
        }
    }

    /// A copy of the state of `prompt`'s longest cached prefix that leaves at least one token to feed.
    pub fn lookup(&mut self, prompt: &[u32]) -> Option<Hit> {
        let usable = &prompt[..last_boundary(prompt.len())];
        let keys = prefix_keys(usable);
        let (key, len) = keys.iter().enumerate().rev().find_map(|(b, key)| {
            let len = (b + 1) * ALIGN_TOKENS;
            let e = self.entries.get(key)?;
            (*e.tokens == usable[..len]).then_some((*key, len))
        })?;
        self.touch(key);
        let state = self.entries.get(&key)?.state.snapshot()?;
        Some(Hit { state, tokens: len })
    }

    /// Whether a prompt starting with `prompt`'s first aligned block was looked up before (that block is remembered
    /// from now on, the least recently seen forgotten past [`SEEN_CAP`]); false for a prompt shorter than one block.
    pub fn seen_before(&mut self, prompt: &[u32]) -> bool {
        let Some(&key) = prefix_keys(&prompt[..ALIGN_TOKENS.min(prompt.len())]).first() else { return false };
        self.tick += 1;
        let before = self.seen.insert(key, self.tick);
        if let Some(old) = before {
            self.seen_by_use.remove(&old);
        }
        self.seen_by_use.insert(self.tick, key);
        while self.seen.len() > SEEN_CAP {
            let Some((_, oldest)) = self.seen_by_use.pop_first() else { break };
            self.seen.remove(&oldest);
        }
        before.is_some()
    }

    /// Whether the state of exactly `prefix` is cached.
    pub fn contains(&self, prefix: &[u32]) -> bool {
        prefix_keys(prefix).last().and_then(|k| self.entries.get(k)).is_some_and(|e| *e.tokens == *prefix)
    }

    /// Keeps a snapshot of `state`, which has fed exactly `prefix` (a multiple of [`ALIGN_TOKENS`] long), evicting
    /// the least recently used entries so that the cache holds at most `room` bytes; nothing is kept when the snapshot
    /// alone exceeds `room`, or when the state cannot be copied. Returns how many entries were evicted for it when
    /// the prefix is cached now (0 when it already was), `None` when it is not.
    pub fn insert(&mut self, prefix: &[u32], state: &SequenceState, room: u64) -> Option<usize> {
        debug_assert_eq!(state.position(), prefix.len());
        if prefix.is_empty() || !prefix.len().is_multiple_of(ALIGN_TOKENS) || state.position() != prefix.len() {
            return None;
        }
        let key = *prefix_keys(prefix).last()?;
        if self.entries.get(&key).is_some_and(|e| *e.tokens == *prefix) {
            self.touch(key);
            return Some(0);
        }
        let bytes = state.bytes() as u64;
        if bytes > room {
            return None;
        }
        let snapshot = state.snapshot()?;
        let evicted = self.shrink_to(room - bytes);
        // A colliding entry of other tokens gives way to the newer prefix.
        self.remove(key);
        self.tick += 1;
        self.by_use.insert(self.tick, key);
        self.entries.insert(key, Entry { tokens: prefix.into(), state: snapshot, bytes, used: self.tick });
        self.bytes += bytes;
        Some(evicted)
    }

    fn remove(&mut self, key: u64) {
        if let Some(e) = self.entries.remove(&key) {
            self.by_use.remove(&e.used);
            self.bytes -= e.bytes;
        }
    }

    /// Evicts the least recently used entries until at most `room` bytes are held; returns how many went.
    pub fn shrink_to(&mut self, room: u64) -> usize {
        let mut evicted = 0;
        while self.bytes > room {
            let Some((_, key)) = self.by_use.pop_first() else { break };
            if let Some(e) = self.entries.remove(&key) {
                self.bytes -= e.bytes;
                evicted += 1;
            }
        }
        evicted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_model::{LoadedModel, LogitsFor, Segment};

    fn model() -> LoadedModel {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen35");
        LoadedModel::load(&dir).expect("the fixture loads")
    }

    fn fed(lm: &LoadedModel, tokens: &[u32]) -> SequenceState {
        let mut state = lm.model.new_state();
        lm.model
            .forward(&mut [Segment { state: &mut state, tokens, logits: LogitsFor::None }], &lm.experts)
            .expect("forward");
        state
    }

    fn prompt(seed: u32, len: usize) -> Vec<u32> {
        (0..len as u32).map(|i| (seed * 131 + i * 17) % 200).collect()
    }

    #[test]
    fn finds_the_longest_cached_prefix_that_leaves_a_token() {
        let lm = model();
        let p = prompt(1, 100);
        let mut cache = PrefixCache::new();
        assert!(cache.lookup(&p).is_none());
        for len in [32, 64, 96] {
            assert_eq!(cache.insert(&p[..len], &fed(&lm, &p[..len]), u64::MAX), Some(0));
        }
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.lookup(&p).map(|h| h.tokens), Some(96));
        // 96 tokens leave nothing to feed for a prompt of 96: the next shorter one is used.
        assert_eq!(cache.lookup(&p[..96]).map(|h| h.tokens), Some(64));
        assert_eq!(cache.lookup(&p[..40]).map(|h| h.tokens), Some(32));
        assert!(cache.lookup(&p[..32]).is_none());
        // A prompt that differs inside the first block shares nothing; one that differs in the third shares 64.
        let mut other = p.clone();
        other[5] += 1;
        assert!(cache.lookup(&other).is_none());
        let mut other = p.clone();
        other[70] += 1;
        assert_eq!(cache.lookup(&other).map(|h| h.tokens), Some(64));
        let hit = cache.lookup(&p).expect("a hit");
        assert_eq!(hit.state.position(), 96);
    }

    #[test]
    fn a_prompt_beginning_is_seen_from_its_second_lookup_on_and_forgotten_past_the_cap() {
        let mut cache = PrefixCache::new();
        let a: Vec<u32> = (0..40).collect();
        let mut b = a.clone();
        b[35] = 999; // the same first block
        let mut c = a.clone();
        c[3] = 999; // another first block
        assert!(!cache.seen_before(&a));
        assert!(cache.seen_before(&b), "the same first block");
        assert!(!cache.seen_before(&c));
        assert!(!cache.seen_before(&a[..20]), "shorter than a block: its own key");
        for i in 0..SEEN_CAP as u32 {
            cache.seen_before(&[i + 10_000; ALIGN_TOKENS]);
        }
        assert_eq!(cache.seen.len(), SEEN_CAP);
        assert_eq!(cache.seen_by_use.len(), SEEN_CAP);
        assert!(!cache.seen_before(&a), "forgotten: the least recently seen go first");
    }

    #[test]
    fn evicts_the_least_recently_used_within_the_room() {
        let lm = model();
        let prompts: Vec<Vec<u32>> = (0..4).map(|s| prompt(s + 10, 64)).collect();
        let one = fed(&lm, &prompts[0]).bytes() as u64;
        let mut cache = PrefixCache::new();
        for p in &prompts[..3] {
            assert_eq!(cache.insert(p, &fed(&lm, p), 3 * one), Some(0));
        }
        assert_eq!(cache.insert(&prompts[2], &fed(&lm, &prompts[2]), 3 * one), Some(0), "already there");
        assert_eq!(cache.bytes(), 3 * one);
        // Using the first makes the second the oldest; a fourth in a room of three evicts it.
        assert!(cache.lookup(&[prompts[0].clone(), vec![1]].concat()).is_some());
        assert_eq!(cache.insert(&prompts[3], &fed(&lm, &prompts[3]), 3 * one), Some(1));
        assert_eq!(cache.len(), 3);
        assert!(cache.contains(&prompts[0]) && !cache.contains(&prompts[1]));
        assert!(cache.contains(&prompts[2]) && cache.contains(&prompts[3]));
        // Too big for the room: not kept, nothing evicted.
        assert_eq!(cache.insert(&prompts[1], &fed(&lm, &prompts[1]), one - 1), None);
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.shrink_to(one), 2);
        assert!(cache.contains(&prompts[3]));
        assert_eq!(cache.shrink_to(0), 1);
        assert!(cache.is_empty() && cache.bytes() == 0);
    }

    #[test]
    fn keeps_only_aligned_prefixes_of_the_state_given() {
        let lm = model();
        let p = prompt(3, 64);
        let mut cache = PrefixCache::new();
        assert_eq!(cache.insert(&p[..40], &fed(&lm, &p[..40]), u64::MAX), None);
        assert_eq!(cache.insert(&[], &lm.model.new_state(), u64::MAX), None);
        assert!(cache.is_empty());
        assert_eq!(last_boundary(0), 0);
        assert_eq!(last_boundary(32), 0);
        assert_eq!(last_boundary(33), 32);
        assert_eq!(last_boundary(1100), 1088);
    }
}
