//! Blocklist: refuses (400) prompts containing a blocked word, and stops outputs that produce one.
//! Words match case-insensitively at word boundaries (letters, digits and `_` make words).
//!
//! Configuration (JSON): `{"words": ["forbidden", "secret plan"]}`.

use std::sync::Mutex;

use pagedserve_plugin_sdk::filter::{export_filter, reject, Guest, OutputVerdict, RequestInfo, RequestVerdict};
use pagedserve_plugin_sdk::serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(crate = "pagedserve_plugin_sdk::serde", deny_unknown_fields)]
pub struct Config {
    pub words: Vec<String>,
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The first blocked word found in `text`, if any.
pub fn find_blocked<'a>(text: &str, words: &'a [String]) -> Option<&'a str> {
    let text = text.to_lowercase();
    words.iter().map(String::as_str).find(|word| {
        let word = word.to_lowercase();
        text.match_indices(&word).any(|(i, m)| {
            let before = text[..i].chars().next_back().is_none_or(|c| !is_word_char(c));
            let after = text[i + m.len()..].chars().next().is_none_or(|c| !is_word_char(c));
            before && after
        })
    })
}

static CONFIG: Mutex<Option<Config>> = Mutex::new(None);

struct Blocklist;

impl Guest for Blocklist {
    fn configure(config: String) -> Result<(), String> {
        let config: Config = pagedserve_plugin_sdk::parse_config(&config)?;
        if config.words.iter().any(|w| w.trim().is_empty()) {
            return Err("blocked words must not be empty".into());
        }
        *CONFIG.lock().unwrap() = Some(config);
        Ok(())
    }

    fn on_request(req: RequestInfo) -> RequestVerdict {
        let config = CONFIG.lock().unwrap();
        let words = config.as_ref().map_or(&[][..], |c| &c.words[..]);
        match find_blocked(&req.prompt, words) {
            Some(word) => reject(400, format!("the prompt contains a blocked word (`{word}`)")),
            None => RequestVerdict::Continue,
        }
    }

    fn on_output(_tenant: String, text: String, _generated: u32) -> OutputVerdict {
        let config = CONFIG.lock().unwrap();
        let words = config.as_ref().map_or(&[][..], |c| &c.words[..]);
        match find_blocked(&text, words) {
            Some(word) => OutputVerdict::Stop(format!("the output contains a blocked word (`{word}`)")),
            None => OutputVerdict::Continue,
        }
    }
}

export_filter!(Blocklist);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_words_case_insensitive() {
        let words = vec!["secret".to_string(), "bad plan".to_string()];
        assert_eq!(find_blocked("The SECRET is out", &words), Some("secret"));
        assert_eq!(find_blocked("secretary", &words), None);
        assert_eq!(find_blocked("a bad plan!", &words), Some("bad plan"));
        assert_eq!(find_blocked("nothing here", &words), None);
    }
}
