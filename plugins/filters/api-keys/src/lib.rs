//! API keys: the request's bearer token (`authorization: Bearer KEY`, or `x-api-key: KEY`) names
//! its tenant and priority; an unknown or missing key is refused with 401.
//!
//! Configuration (JSON): `{"keys": {"sk-acme": {"tenant": "acme", "priority": 0}}}`
//! (`priority` is optional and defaults to 0).

use std::collections::BTreeMap;
use std::sync::Mutex;

use pagedserve_plugin_sdk::filter::{
    bearer_token, export_filter, header, reject, Guest, OutputVerdict, RequestInfo, RequestVerdict,
};
use pagedserve_plugin_sdk::serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(crate = "pagedserve_plugin_sdk::serde", deny_unknown_fields)]
pub struct Key {
    pub tenant: String,
    #[serde(default)]
    pub priority: i32,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(crate = "pagedserve_plugin_sdk::serde", deny_unknown_fields)]
pub struct Config {
    pub keys: BTreeMap<String, Key>,
}

pub fn on_request(mut req: RequestInfo, config: &Config) -> RequestVerdict {
    let key = bearer_token(&req).or_else(|| header(&req, "x-api-key"));
    match key.and_then(|k| config.keys.get(k)) {
        Some(entry) => {
            req.params.tenant = entry.tenant.clone();
            req.params.priority = entry.priority;
            RequestVerdict::Modify(req.params)
        }
        None if key.is_none() => reject(401, "missing API key (send `Authorization: Bearer <key>`)"),
        None => reject(401, "invalid API key"),
    }
}

static CONFIG: Mutex<Option<Config>> = Mutex::new(None);

struct ApiKeys;

impl Guest for ApiKeys {
    fn configure(config: String) -> Result<(), String> {
        *CONFIG.lock().unwrap() = Some(pagedserve_plugin_sdk::parse_config(&config)?);
        Ok(())
    }

    fn on_request(req: RequestInfo) -> RequestVerdict {
        let config = CONFIG.lock().unwrap();
        on_request(req, config.as_ref().unwrap_or(&Config::default()))
    }

    fn on_output(_tenant: String, _text: String, _generated: u32) -> OutputVerdict {
        OutputVerdict::Continue
    }
}

export_filter!(ApiKeys);

#[cfg(test)]
mod tests {
    use super::*;
    use pagedserve_plugin_sdk::filter::RequestParams;

    pub fn request(headers: &[(&str, &str)]) -> RequestInfo {
        RequestInfo {
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            prompt: "hi".into(),
            params: RequestParams {
                max_tokens: 16,
                temperature: 1.0,
                top_p: 1.0,
                top_k: 0,
                seed: None,
                priority: 0,
                tenant: String::new(),
                sampler: None,
            },
        }
    }

    #[test]
    fn known_keys_set_tenant_and_priority_unknown_get_401() {
        let config: Config =
            pagedserve_plugin_sdk::parse_config(r#"{"keys": {"sk-1": {"tenant": "acme", "priority": -2}}}"#).unwrap();
        match on_request(request(&[("authorization", "Bearer sk-1")]), &config) {
            RequestVerdict::Modify(p) => assert_eq!((p.tenant.as_str(), p.priority), ("acme", -2)),
            other => panic!("{other:?}"),
        }
        match on_request(request(&[("x-api-key", "sk-1")]), &config) {
            RequestVerdict::Modify(p) => assert_eq!(p.tenant, "acme"),
            other => panic!("{other:?}"),
        }
        for headers in [&[("authorization", "Bearer nope")][..], &[][..]] {
            match on_request(request(headers), &config) {
                RequestVerdict::Reject(r) => assert_eq!(r.status, 401),
                other => panic!("{other:?}"),
            }
        }
    }
}
