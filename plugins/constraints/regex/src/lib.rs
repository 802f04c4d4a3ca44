//! Regex: the generated text (not the prompt) matches a regular expression, whole: anchored at
//! its start, and EOS only where the text so far is a full match.
//!
//! Request configuration (JSON, the request's `constraint.config`, required):
//! `{"pattern": "[0-9]{4}-[0-9]{2}"}`, in the syntax of the `regex` crate, matched over the bytes
//! of the output. An invalid or missing pattern fails the request at `start`. No operator
//! configuration (`""` or `{}`).
//!
//! How: the pattern becomes a dense DFA (`regex-automata`), reduced once to the states from which
//! a full match is still reachable. Each sequence keeps its state after the text generated so far;
//! a token is allowed when its bytes lead from that state to a live one (walked over a byte trie
//! of the vocabulary, so a dead prefix rules out every token that starts with it at once); special
//! tokens (empty bytes) never are, except EOS, allowed exactly when the text is a full match.
//! Masks are cached per pattern and state: sequences in the same state share one.
//!
//! A sequence whose tokens the plugin cannot all see (after a fault, a fresh instance starts it
//! again, and the step keeps only its last 64 tokens) can no longer be constrained: it gets EOS
//! only, and a warning in the log, rather than an error that would fail every sequence of the call.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};

use pagedserve_plugin_sdk::constraint::{
    self, export_constraint, MaskCache, new_tokens, only, token_bytes, ConstraintRequest, ConstraintStep, Guest, TokenMask,
};
use pagedserve_plugin_sdk::serde::Deserialize;
use regex_automata::dfa::{dense, Automaton, StartKind};
use regex_automata::nfa::thompson;
use regex_automata::util::start;
use regex_automata::{Anchored, MatchKind};

#[derive(Debug, Clone, Deserialize)]
#[serde(crate = "pagedserve_plugin_sdk::serde", deny_unknown_fields)]
pub struct Config {
    pub pattern: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(crate = "pagedserve_plugin_sdk::serde", deny_unknown_fields)]
struct NoConfig {}

/// The pattern a request's configuration names.
pub fn parse_request(config: &str) -> Result<String, String> {
    const EXPECTED: &str = r#"expected {"pattern": "<regular expression>"}"#;
    if config.trim().is_empty() {
        return Err(format!("the regex constraint needs a pattern: {EXPECTED}"));
    }
    let config: Config = pagedserve_plugin_sdk::serde_json::from_str(config)
        .map_err(|e| format!("invalid regex constraint configuration ({e}): {EXPECTED}"))?;
    Ok(config.pattern)
}

/// No state: the text can no longer become a full match.
pub const DEAD: u32 = u32::MAX;

/// Bounds on the automata, so that a pattern too big to build within `start`'s deadline (20 ms
/// by default) is refused with an error for its request, rather than trapping on the deadline (a
/// fault, which fails the other requests of the call too and counts against the plugin). Building
/// costs about 50 ns per byte of NFA and 100-150 ns per byte of DFA in wasm (measured with
/// wasmtime): these allow about 6 ms and 8 ms, and a refusal comes within 7 ms. Unicode classes
/// are what make automata big (a DFA for `\w+` takes 180 KB, too much; `(?-u:\w)+` 1 KB),
/// counted repetitions multiply them.
const NFA_LIMIT: usize = 128 << 10;
const DFA_LIMIT: usize = 64 << 10;
/// The determinizer's own memory besides the DFA.
const DETERMINIZE_LIMIT: usize = 1 << 20;

/// The last line of a syntax error (`regex-syntax` draws the pattern and a caret above it).
fn syntax_error(pattern: &str) -> Option<String> {
    let e = regex_automata::util::syntax::parse(pattern).err()?.to_string();
    let last = e.lines().last().unwrap_or_default();
    Some(last.strip_prefix("error: ").unwrap_or(last).to_string())
}

/// The pattern's DFA reduced to its live states (those from which some continuation is a full
/// match), renumbered densely; every transition to a state that is not live leads to `DEAD`.
/// The pruning is what makes "not dead" mean "can still match": the DFA itself keeps states that
/// cannot reach a match (an unsatisfiable look-around, say) apart from its dead state.
#[derive(Debug, Clone)]
pub struct Machine {
    /// Byte equivalence classes (bytes no transition tells apart share one).
    classes: [u8; 256],
    /// Classes per state.
    stride: usize,
    /// `table[state + class]`: the next state, or `DEAD`. A state is the offset of its row (its
    /// index times `stride`), which saves a multiplication per byte of the walks.
    table: Vec<u32>,
    /// By state index: whether the text that led to the state is a full match (its end-of-input
    /// transition matches: `$` and `\b` at the end are decided there).
    accepting: Vec<bool>,
}

impl Machine {
    pub fn new(pattern: &str) -> Result<Machine, String> {
        // Parsed on its own first: the builder's errors (without `std`) do not say what is wrong.
        if let Some(error) = syntax_error(pattern) {
            return Err(format!("invalid pattern {pattern:?}: {error}"));
        }
        let dfa = dense::Builder::new()
            .configure(
                dense::Config::new()
                    // Every match, not leftmost-first: with `a|ab`, leftmost-first would drop the
                    // `ab` branch once `a` matched, and "ab" is a full match too.
                    .match_kind(MatchKind::All)
                    .start_kind(StartKind::Anchored)
                    // Acceleration speeds up searches, and the plugin never searches.
                    .accelerate(false)
                    .dfa_size_limit(Some(DFA_LIMIT))
                    .determinize_size_limit(Some(DETERMINIZE_LIMIT)),
            )
            .thompson(thompson::Config::new().nfa_size_limit(Some(NFA_LIMIT)))
            .build(pattern)
            .map_err(|e| {
                // The pattern parsed, so an NFA error is its size limit.
                if e.is_size_limit_exceeded() || e.to_string() == "error building NFA" {
                    format!(
                        "pattern {pattern:?} is too big for the regex constraint (its automaton would take too long to \
                         build); use fewer or smaller repetitions, or ASCII classes such as (?-u:\\w) for Unicode ones"
                    )
                } else {
                    format!("pattern {pattern:?} is not supported: {e}")
                }
            })?;
        let start = dfa
            .start_state(&start::Config::new().anchored(Anchored::Yes))
            .map_err(|e| format!("pattern {pattern:?}: {e}"))?;

        // One representative byte per class, and each byte's class.
        let byte_classes = dfa.byte_classes();
        let mut classes = [0u8; 256];
        let mut representatives: Vec<u8> = Vec::new();
        for byte in 0..=255u8 {
            let class = byte_classes.get(byte);
            classes[byte as usize] = class;
            if class as usize == representatives.len() {
                representatives.push(byte);
            }
        }
        let stride = representatives.len();

        // Every state reachable from the start, numbered in the order found.
        let mut ids = vec![start];
        let mut index = BTreeMap::from([(start, 0u32)]);
        let mut table: Vec<u32> = Vec::new();
        let mut i = 0;
        while i < ids.len() {
            let id = ids[i];
            for &byte in &representatives {
                let next = dfa.next_state(id, byte);
                if dfa.is_dead_state(next) || dfa.is_quit_state(next) {
                    table.push(DEAD);
                    continue;
                }
                let n = *index.entry(next).or_insert_with(|| {
                    ids.push(next);
                    (ids.len() - 1) as u32
                });
                table.push(n);
            }
            i += 1;
        }
        let accepting: Vec<bool> = ids.iter().map(|&id| dfa.is_match_state(dfa.next_eoi_state(id))).collect();

        // Live states: the accepting ones and, backwards, every state with a transition to one.
        let n = ids.len();
        let mut predecessors: Vec<Vec<u32>> = vec![Vec::new(); n];
        for (from, row) in table.chunks(stride).enumerate() {
            for &to in row.iter().filter(|&&to| to != DEAD) {
                predecessors[to as usize].push(from as u32);
            }
        }
        let mut live = accepting.clone();
        let mut work: Vec<u32> = (0..n as u32).filter(|&s| live[s as usize]).collect();
        while let Some(s) = work.pop() {
            for &p in &predecessors[s as usize] {
                if !live[p as usize] {
                    live[p as usize] = true;
                    work.push(p);
                }
            }
        }
        if !live[0] {
            return Err(format!("pattern {pattern:?} matches no text"));
        }

        // Renumber the live states densely, as row offsets (the start stays 0), and drop the others.
        let mut renumbered = vec![DEAD; n];
        let mut count = 0u32;
        for s in (0..n).filter(|&s| live[s]) {
            renumbered[s] = count * stride as u32;
            count += 1;
        }
        let mut live_table = Vec::with_capacity(count as usize * stride);
        let mut live_accepting = Vec::with_capacity(count as usize);
        for s in (0..n).filter(|&s| live[s]) {
            let row = &table[s * stride..(s + 1) * stride];
            live_table.extend(row.iter().map(|&to| if to == DEAD { DEAD } else { renumbered[to as usize] }));
            live_accepting.push(accepting[s]);
        }
        Ok(Machine { classes, stride, table: live_table, accepting: live_accepting })
    }

    /// The state before any text.
    pub fn start(&self) -> u32 {
        0
    }

    /// The state after `byte` from `state` (`DEAD` stays `DEAD`).
    #[inline]
    pub fn step(&self, state: u32, byte: u8) -> u32 {
        if state == DEAD {
            return DEAD;
        }
        self.table[state as usize + self.classes[byte as usize] as usize]
    }

    /// The state after `bytes` from `state`.
    pub fn feed(&self, mut state: u32, bytes: &[u8]) -> u32 {
        for &byte in bytes {
            state = self.step(state, byte);
            if state == DEAD {
                break;
            }
        }
        state
    }

    /// Whether the text that led to `state` is a full match.
    pub fn accepts(&self, state: u32) -> bool {
        state != DEAD && self.accepting[state as usize / self.stride]
    }

    /// Live states.
    pub fn len(&self) -> usize {
        self.accepting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.accepting.is_empty()
    }
}

/// The vocabulary's tokens as a byte trie, laid out in preorder: node `i`'s subtree is
/// `i..nodes[i].skip`, so a walk that finds a dead prefix jumps over every token that starts
/// with it. Tokens with no bytes (special ones) are not in it, nor the (unheard-of) tokens longer
/// than 65535 bytes.
#[derive(Debug, Clone)]
pub struct Trie {
    nodes: Vec<Node>,
    tokens: Vec<u32>,
    max_depth: usize,
}

/// One byte of the trie; the fields a walk reads for it side by side (one load per node).
#[derive(Debug, Clone, Copy)]
struct Node {
    skip: u32,
    /// The tokens ending at node `i` are `tokens[nodes[i - 1].tokens_end..nodes[i].tokens_end]`
    /// (more than one when the vocabulary repeats a byte string).
    tokens_end: u32,
    /// 1 for the root's children.
    depth: u16,
    byte: u8,
}

impl Trie {
    pub const EMPTY: Trie = Trie { nodes: Vec::new(), tokens: Vec::new(), max_depth: 0 };

    pub fn new(vocab: &[Vec<u8>]) -> Trie {
        let mut order: Vec<u32> =
            (0..vocab.len() as u32).filter(|&t| (1..=u16::MAX as usize).contains(&vocab[t as usize].len())).collect();
        // Sorted byte strings put a prefix right before its extensions: nodes come in preorder.
        order.sort_by(|&a, &b| vocab[a as usize].cmp(&vocab[b as usize]));
        let mut trie = Trie::EMPTY;
        let mut path: Vec<u32> = Vec::new(); // the node at each depth of the previous token
        let mut previous: &[u8] = &[];
        for token in order {
            let bytes = &vocab[token as usize][..];
            let shared = previous.iter().zip(bytes).take_while(|(a, b)| a == b).count();
            let next = trie.nodes.len() as u32;
            for node in path.drain(shared..) {
                trie.nodes[node as usize].skip = next;
            }
            for (d, &byte) in bytes[shared..].iter().enumerate() {
                path.push(trie.nodes.len() as u32);
                let tokens_end = trie.tokens.len() as u32;
                trie.nodes.push(Node { skip: 0, tokens_end, depth: (shared + d + 1) as u16, byte });
            }
            // The token ends at the node created last (a repeated string's node included).
            trie.tokens.push(token);
            trie.nodes.last_mut().expect("a token has bytes").tokens_end = trie.tokens.len() as u32;
            trie.max_depth = trie.max_depth.max(bytes.len());
            previous = bytes;
        }
        let end = trie.nodes.len() as u32;
        for node in path {
            trie.nodes[node as usize].skip = end;
        }
        trie
    }

    /// Calls `allow` with every token whose bytes lead from `state` to a live state.
    pub fn walk(&self, machine: &Machine, state: u32, mut allow: impl FnMut(u32)) {
        if state == DEAD {
            return;
        }
        // states[d]: the state after the current node's first d bytes.
        let mut states = vec![DEAD; self.max_depth + 1];
        states[0] = state;
        let mut i = 0;
        let mut first = 0; // where the tokens of node i begin: the previous node's tokens_end
        while let Some(node) = self.nodes.get(i) {
            let depth = node.depth as usize;
            let next = machine.step(states[depth - 1], node.byte);
            if next == DEAD {
                i = node.skip as usize;
                first = self.nodes[i - 1].tokens_end as usize;
                continue;
            }
            states[depth] = next;
            for &token in &self.tokens[first..node.tokens_end as usize] {
                allow(token);
            }
            first = node.tokens_end as usize;
            i += 1;
        }
    }
}

/// The tokens allowed after the text that led to `state`.
pub fn mask(machine: &Machine, trie: &Trie, state: u32, vocab_size: u32, eos: u32) -> TokenMask {
    let mut words = vec![0u32; vocab_size.div_ceil(32) as usize];
    let mut any = false;
    trie.walk(machine, state, |token| {
        if token < vocab_size && token != eos {
            words[(token / 32) as usize] |= 1 << (token % 32);
            any = true;
        }
    });
    if !any {
        // Nothing may follow (a dead state, which a host that honours the masks never reaches,
        // or a match no token of the vocabulary can spell): ending is the only answer left.
        return only(&[eos]);
    }
    if machine.accepts(state) && eos < vocab_size {
        words[(eos / 32) as usize] |= 1 << (eos % 32);
    }
    TokenMask::Bits(words)
}

/// Patterns kept compiled; past this, those no live sequence uses are dropped.
const MAX_PATTERNS: usize = 8;
/// Masks kept per pattern (a mask is `vocab-size / 8` bytes: 6 KiB for 49k tokens).
const MAX_MASKS: usize = 128;

#[derive(Debug)]
struct Pattern {
    machine: Machine,
    /// By (state, vocab-size, eos).
    masks: MaskCache<(u32, u32, u32)>,
}

#[derive(Debug, Clone)]
struct Seq {
    pattern: String,
    state: u32,
    /// Generated tokens already fed to `state`.
    consumed: u32,
    vocab_size: u32,
    eos: u32,
}

/// Every live sequence's state and the compiled patterns: the plugin's logic, over a vocabulary
/// it is given.
#[derive(Debug, Default)]
pub struct Regexes {
    patterns: BTreeMap<String, Pattern>,
    seqs: BTreeMap<u64, Seq>,
    /// For the log (the logic runs natively in tests, where the host's log cannot be called).
    warnings: Vec<String>,
}

impl Regexes {
    pub fn start(&mut self, req: &ConstraintRequest) -> Result<(), String> {
        let pattern = parse_request(&req.config)?;
        if !self.patterns.contains_key(&pattern) {
            let machine = Machine::new(&pattern)?;
            if self.patterns.len() >= MAX_PATTERNS {
                let seqs = &self.seqs;
                self.patterns.retain(|p, _| seqs.values().any(|s| &s.pattern == p));
            }
            self.patterns.insert(pattern.clone(), Pattern { machine, masks: MaskCache::new(MAX_MASKS) });
        }
        let state = self.patterns[&pattern].machine.start();
        // A repeated `start` (a fresh instance, or a reused id) starts over.
        self.seqs.insert(req.id, Seq { pattern, state, consumed: 0, vocab_size: req.vocab_size, eos: req.eos_token });
        Ok(())
    }

    /// Brings the sequence's state up to date with the tokens it took, and answers its mask.
    pub fn next(&mut self, step: &ConstraintStep, vocab: &[Vec<u8>], trie: &Trie) -> Result<TokenMask, String> {
        let seq = self.seqs.get_mut(&step.id).ok_or_else(|| format!("sequence {} was not started", step.id))?;
        let pattern = self.patterns.get_mut(&seq.pattern).expect("a live sequence's pattern is kept");
        match new_tokens(step, seq.consumed) {
            Ok(tokens) => {
                for &token in tokens {
                    if token != seq.eos {
                        seq.state = pattern.machine.feed(seq.state, token_bytes(vocab, token));
                    }
                }
            }
            Err(lost) => {
                self.warnings.push(format!("{lost}: the pattern can no longer be followed, the output ends here"));
                seq.state = DEAD;
            }
        }
        seq.consumed = step.generated_tokens;
        let machine = &pattern.machine;
        Ok(pattern.masks.get_or_insert_with((seq.state, seq.vocab_size, seq.eos), || mask(machine, trie, seq.state, seq.vocab_size, seq.eos)))
    }

    pub fn end(&mut self, ids: &[u64]) {
        for id in ids {
            self.seqs.remove(id);
        }
    }

    /// The warnings since the last call, for the log.
    pub fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }
}

static REGEXES: Mutex<Option<Regexes>> = Mutex::new(None);
static TRIE: OnceLock<Trie> = OnceLock::new();

/// The vocabulary's trie, built once (not while the host has no vocabulary to give).
fn trie() -> &'static Trie {
    static EMPTY: Trie = Trie::EMPTY;
    if let Some(trie) = TRIE.get() {
        return trie;
    }
    match constraint::vocabulary() {
        [] => &EMPTY,
        vocab => TRIE.get_or_init(|| Trie::new(vocab)),
    }
}

struct Regex;

impl Guest for Regex {
    fn configure(config: String) -> Result<(), String> {
        pagedserve_plugin_sdk::parse_config::<NoConfig>(&config)
            .map_err(|e| format!("the regex constraint takes no configuration: {e}"))?;
        // The vocabulary and its trie now, under the setup deadline, rather than in a `start`
        // or `next` with a step's deadline.
        trie();
        Ok(())
    }

    fn start(req: ConstraintRequest) -> Result<(), String> {
        REGEXES.lock().unwrap().get_or_insert_with(Regexes::default).start(&req)?;
        trie();
        Ok(())
    }

    fn next(steps: Vec<ConstraintStep>) -> Result<Vec<TokenMask>, String> {
        let mut regexes = REGEXES.lock().unwrap();
        let regexes = regexes.get_or_insert_with(Regexes::default);
        let (vocab, trie) = (constraint::vocabulary(), trie());
        let masks = steps.iter().map(|step| regexes.next(step, vocab, trie)).collect();
        for warning in regexes.take_warnings() {
            pagedserve_plugin_sdk::host::warn(&warning);
        }
        masks
    }

    fn end(ids: Vec<u64>) {
        if let Some(regexes) = REGEXES.lock().unwrap().as_mut() {
            regexes.end(&ids);
        }
    }
}

export_constraint!(Regex);

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(tokens: &[&str]) -> Vec<Vec<u8>> {
        tokens.iter().map(|t| t.as_bytes().to_vec()).collect()
    }

    fn matches(machine: &Machine, text: &str) -> bool {
        machine.accepts(machine.feed(machine.start(), text.as_bytes()))
    }

    fn live(machine: &Machine, text: &str) -> bool {
        machine.feed(machine.start(), text.as_bytes()) != DEAD
    }

    #[test]
    fn the_machine_matches_whole_texts_only() {
        let m = Machine::new("[0-9]{4}-[0-9]{2}").unwrap();
        assert!(matches(&m, "2024-05"));
        assert!(!matches(&m, "2024-0") && live(&m, "2024-0"), "a prefix of a match is live, not a match");
        assert!(!live(&m, "2024-055"), "nothing may follow a full match here");
        assert!(!live(&m, "x2024-05"), "anchored at the start");
        assert!(!live(&m, "202a"));
        // Every match counts, not only the leftmost-first one.
        let m = Machine::new("a|ab").unwrap();
        assert!(matches(&m, "a") && matches(&m, "ab") && !live(&m, "abb"));
        let m = Machine::new("a+?").unwrap();
        assert!(matches(&m, "aaa"), "a lazy repetition still matches the whole text");
        let m = Machine::new(r"(?-u:\w)+(?-u:\b)").unwrap();
        assert!(matches(&m, "abc"), "a word boundary at the end is decided at end of input");
    }

    #[test]
    fn states_that_cannot_reach_a_match_are_dead() {
        // After "a", the DFA is in a state of its own (the boundary is still pending), yet no
        // text can satisfy it: that prefix must be refused, not allowed into a dead end.
        let m = Machine::new(r"x|a(?-u:\b)b").unwrap();
        assert!(!live(&m, "a"));
        assert!(matches(&m, "x"));
        let e = Machine::new(r"a(?-u:\b)b").unwrap_err();
        assert!(e.contains("matches no text"), "{e}");
    }

    #[test]
    fn bad_configurations_fail_start_with_a_clear_message() {
        assert!(parse_request("").unwrap_err().contains("needs a pattern"));
        assert!(parse_request("{}").unwrap_err().contains(r#"expected {"pattern""#));
        assert!(parse_request(r#"{"pattern": 5}"#).is_err());
        assert!(parse_request(r#"{"pattern": "a", "flags": "i"}"#).is_err(), "unknown fields are refused");
        assert_eq!(parse_request(r#"{"pattern": "a+"}"#).unwrap(), "a+");
        let e = Machine::new("(unclosed").unwrap_err();
        assert_eq!(e, r#"invalid pattern "(unclosed": unclosed group"#);
        let e = Machine::new("[z-a]").unwrap_err();
        assert!(e.ends_with("invalid character class range, the start must be <= the end"), "{e}");
        let e = Machine::new(r"\bword").unwrap_err();
        assert!(e.contains("is not supported") && e.contains("Unicode word boundaries"), "{e}");
        // Too big to build in time: refused, whether the NFA or the DFA is what grows too big.
        for pattern in [r"\w{100000}", r"\w+( \w+){0,5}", r"(?s).{0,1000}"] {
            let e = Machine::new(pattern).unwrap_err();
            assert!(e.contains("is too big for the regex constraint"), "{pattern}: {e}");
        }
        assert!(Machine::new(r"(?-u:\w)+( (?-u:\w)+){0,5}").is_ok(), "ASCII classes keep it small");
    }

    #[test]
    fn the_trie_walk_allows_what_feeding_each_token_allows() {
        let words = ["", "a", "ab", "abc", "ab", "b", "ba", "bab", "c", "", "abcabc", "ca", "aa", "b"];
        let vocab = vocab(&words);
        let trie = Trie::new(&vocab);
        for pattern in ["(ab)*c?", "a*b+", "[abc]{0,4}", "c(a|b)*", "ab|ba|bab"] {
            let m = Machine::new(pattern).unwrap();
            for prefix in ["", "a", "ab", "b", "c", "ca", "aab"] {
                let state = m.feed(m.start(), prefix.as_bytes());
                let mut walked = Vec::new();
                trie.walk(&m, state, |t| walked.push(t));
                walked.sort_unstable();
                let fed: Vec<u32> = (0..vocab.len() as u32)
                    .filter(|&t| !vocab[t as usize].is_empty() && m.feed(state, &vocab[t as usize]) != DEAD)
                    .collect();
                assert_eq!(walked, fed, "pattern {pattern:?} after {prefix:?}");
            }
        }
    }

    const EOS: u32 = 20;

    /// Digits, a few multi-digit and mixed tokens, a dash, letters, specials (EOS among them).
    fn date_vocab() -> Vec<Vec<u8>> {
        let mut v = vocab(&["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]);
        v.extend(vocab(&["-", "20", "2024", "-0", "a", "5-", "05-1", "", "", "x9"]));
        v.push(Vec::new()); // 20: EOS
        v.push(b"\n".to_vec());
        v
    }

    fn request(id: u64, config: &str) -> ConstraintRequest {
        ConstraintRequest { id, prompt_tokens: vec![14, 14], config: config.into(), vocab_size: 24, eos_token: EOS }
    }

    fn step(id: u64, prompt: &[u32], generated: &[u32]) -> ConstraintStep {
        let mut recent = prompt.to_vec();
        recent.extend(generated);
        let recent = recent[recent.len().saturating_sub(64)..].to_vec();
        ConstraintStep { id, recent_tokens: recent, generated_tokens: generated.len() as u32 }
    }

    #[test]
    fn a_date_is_generated_token_by_token() {
        let vocab = date_vocab();
        let trie = Trie::new(&vocab);
        let mut r = Regexes::default();
        r.start(&request(1, r#"{"pattern": "[0-9]{4}-[0-9]{2}"}"#)).unwrap();
        let prompt = [14, 14]; // "aa": the prompt is not part of the matched text
        let mut generated = Vec::new();
        let first = r.next(&step(1, &prompt, &generated), &vocab, &trie).unwrap();
        assert!(first.validate(24).is_ok());
        assert_eq!(first.allowed(24), vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12], "digits, 20 and 2024");
        for (token, allowed) in [
            (12, vec![10, 13]),                              // "2024": "-" or "-0"
            (13, vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),        // "2024-0": one digit
            (5, vec![EOS]),                                  // "2024-05": a full match, only EOS
        ] {
            generated.push(token);
            let mask = r.next(&step(1, &prompt, &generated), &vocab, &trie).unwrap();
            assert!(mask.validate(24).is_ok());
            assert_eq!(mask.allowed(24), allowed, "after {generated:?}");
        }
    }

    #[test]
    fn a_state_with_nothing_left_allows_eos_only() {
        let vocab = date_vocab();
        let trie = Trie::new(&vocab);
        let mut r = Regexes::default();
        r.start(&request(3, r#"{"pattern": "[0-9]+"}"#)).unwrap();
        // A host that ignored the mask took "a": the text can no longer match.
        let mask = r.next(&step(3, &[], &[14]), &vocab, &trie).unwrap();
        assert_eq!(mask, only(&[EOS]));
        // And a pattern whose every match is made of tokens the vocabulary lacks.
        r.start(&request(4, r#"{"pattern": "z+"}"#)).unwrap();
        assert_eq!(r.next(&step(4, &[], &[]), &vocab, &trie).unwrap(), only(&[EOS]));
    }

    #[test]
    fn text_is_matched_as_bytes_across_token_boundaries() {
        // "é" is C3 A9 in UTF-8: tokens that split it are allowed, each half where it fits.
        let vocab = vec![vec![0xC3], vec![0xA9], "é".as_bytes().to_vec(), b"e".to_vec(), Vec::new()];
        let trie = Trie::new(&vocab);
        let m = Machine::new("é+").unwrap();
        assert_eq!(mask(&m, &trie, m.start(), 5, 4).allowed(5), vec![0, 2]);
        let half = m.feed(m.start(), &[0xC3]);
        assert_eq!(mask(&m, &trie, half, 5, 4).allowed(5), vec![1]);
        assert_eq!(mask(&m, &trie, m.feed(half, &[0xA9]), 5, 4).allowed(5), vec![0, 2, 4]);
    }

    #[test]
    fn sequences_keep_their_own_state_and_end_drops_it() {
        let vocab = date_vocab();
        let trie = Trie::new(&vocab);
        let mut r = Regexes::default();
        r.start(&request(1, r#"{"pattern": "[0-9]{4}-[0-9]{2}"}"#)).unwrap();
        r.start(&request(2, r#"{"pattern": "a*"}"#)).unwrap();
        let date = r.next(&step(1, &[], &[12]), &vocab, &trie).unwrap();
        let letters = r.next(&step(2, &[], &[14, 14]), &vocab, &trie).unwrap();
        assert_eq!(date.allowed(24), vec![10, 13]);
        assert_eq!(letters.allowed(24), vec![14, EOS]);
        // Two tokens at once (a step the plugin did not see) are both consumed.
        assert_eq!(r.next(&step(1, &[], &[12, 10, 0]), &vocab, &trie).unwrap().allowed(24), (0..10).collect::<Vec<_>>());
        r.end(&[1]);
        assert!(r.next(&step(1, &[], &[12, 10, 0]), &vocab, &trie).unwrap_err().contains("not started"));
        assert!(r.next(&step(2, &[], &[14, 14, 14]), &vocab, &trie).is_ok());
        // A restarted sequence starts over from the text it is given.
        r.start(&request(1, r#"{"pattern": "[0-9]{4}-[0-9]{2}"}"#)).unwrap();
        let after_dash = r.next(&step(1, &[], &[12, 10]), &vocab, &trie).unwrap();
        assert_eq!(after_dash.allowed(24), (0..10).chain([11]).collect::<Vec<_>>(), "\"2024-\": a digit or \"20\"");
    }

    #[test]
    fn a_sequence_with_tokens_lost_past_the_recent_window_can_only_end() {
        let vocab = date_vocab();
        let trie = Trie::new(&vocab);
        let mut r = Regexes::default();
        // As after a fault: a fresh start, and a first step 70 tokens in.
        r.start(&request(1, r#"{"pattern": "[0-9]*"}"#)).unwrap();
        r.start(&request(2, r#"{"pattern": "[0-9]*"}"#)).unwrap();
        assert_eq!(r.next(&step(1, &[], &[1; 70]), &vocab, &trie).unwrap(), only(&[EOS]));
        let warnings = r.take_warnings();
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("only the last 64 are known"), "{warnings:?}");
        assert!(r.take_warnings().is_empty());
        assert_eq!(r.next(&step(1, &[], &[1; 71]), &vocab, &trie).unwrap(), only(&[EOS]), "and stays so");
        // The other sequences are unaffected.
        assert!(r.next(&step(2, &[], &[1; 60]), &vocab, &trie).unwrap().allows(1));
    }

    #[test]
    fn unused_patterns_are_dropped_past_the_cache_size_but_live_ones_stay() {
        let vocab = date_vocab();
        let trie = Trie::new(&vocab);
        let mut r = Regexes::default();
        r.start(&request(100, r#"{"pattern": "kept"}"#)).unwrap();
        for i in 0..20u64 {
            r.start(&request(i, &format!(r#"{{"pattern": "a{{{i}}}"}}"#))).unwrap();
            r.end(&[i]);
        }
        assert!(r.patterns.len() <= MAX_PATTERNS);
        assert!(r.patterns.contains_key("kept"));
        assert_eq!(r.next(&step(100, &[], &[]), &vocab, &trie).unwrap(), only(&[EOS]), "no token spells \"kept\"");
    }
}
