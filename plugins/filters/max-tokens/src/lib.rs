//! Clamps `max_tokens`: a request asking for more than the limit (per tenant, or the default) is
//! admitted with the limit instead.
//!
//! Configuration (JSON, optional): `{"max_tokens": 256, "per_tenant": {"free": 32}}`.

use std::collections::BTreeMap;
use std::sync::Mutex;

use pagedserve_plugin_sdk::filter::{export_filter, Guest, OutputVerdict, RequestInfo, RequestParams, RequestVerdict};
use pagedserve_plugin_sdk::serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(crate = "pagedserve_plugin_sdk::serde", deny_unknown_fields, default)]
pub struct Config {
    pub max_tokens: u32,
    pub per_tenant: BTreeMap<String, u32>,
}

impl Default for Config {
    fn default() -> Self {
        Config { max_tokens: 256, per_tenant: BTreeMap::new() }
    }
}

pub fn clamp(mut params: RequestParams, config: &Config) -> RequestVerdict {
    let limit = config.per_tenant.get(&params.tenant).copied().unwrap_or(config.max_tokens);
    if params.max_tokens <= limit {
        return RequestVerdict::Continue;
    }
    params.max_tokens = limit;
    RequestVerdict::Modify(params)
}

static CONFIG: Mutex<Option<Config>> = Mutex::new(None);

struct MaxTokens;

impl Guest for MaxTokens {
    fn configure(config: String) -> Result<(), String> {
        *CONFIG.lock().unwrap() = Some(pagedserve_plugin_sdk::parse_config(&config)?);
        Ok(())
    }

    fn on_request(req: RequestInfo) -> RequestVerdict {
        clamp(req.params, CONFIG.lock().unwrap().as_ref().unwrap_or(&Config::default()))
    }

    fn on_output(_tenant: String, _text: String, _generated: u32) -> OutputVerdict {
        OutputVerdict::Continue
    }
}

export_filter!(MaxTokens);

#[cfg(test)]
mod tests {
    use super::*;

    fn params(max_tokens: u32, tenant: &str) -> RequestParams {
        RequestParams {
            max_tokens,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            priority: 0,
            tenant: tenant.into(),
            sampler: None,
        }
    }

    #[test]
    fn clamps_only_above_the_limit() {
        let config = Config { max_tokens: 100, per_tenant: [("free".to_string(), 10)].into() };
        assert!(matches!(clamp(params(50, "x"), &config), RequestVerdict::Continue));
        match clamp(params(500, "x"), &config) {
            RequestVerdict::Modify(p) => assert_eq!(p.max_tokens, 100),
            other => panic!("{other:?}"),
        }
        match clamp(params(50, "free"), &config) {
            RequestVerdict::Modify(p) => assert_eq!(p.max_tokens, 10),
            other => panic!("{other:?}"),
        }
    }
}
