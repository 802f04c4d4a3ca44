//! The filter seam's host side, for the HTTP layer: a request as filters see it, their verdicts,
//! and validation of what they answer (an error status, a bounded message, sane parameters). A
//! fault fails the request closed: `FilterFault` names the plugin and maps to HTTP 503.

use super::bindings::types;
use super::slot::{CallFailure, Live, PluginSlot};
use super::PluginError;

/// The common parameters a filter sees and may rewrite.
#[derive(Debug, Clone, PartialEq)]
pub struct FilterParams {
    pub max_tokens: u32,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: u32,
    pub seed: Option<u64>,
    pub priority: i32,
    pub tenant: String,
    pub sampler: Option<String>,
}

/// A request before admission: headers (names lower-cased), prompt text, parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct FilterRequest {
    pub headers: Vec<(String, String)>,
    pub prompt: String,
    pub params: FilterParams,
}

#[derive(Debug, Clone, PartialEq)]
pub enum FilterVerdict {
    Continue,
    Reject { status: u16, message: String },
    Modify(FilterParams),
}

#[derive(Debug, Clone, PartialEq)]
pub enum OutputVerdict {
    Continue,
    Stop(String),
}

/// A filter failed: the request fails closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("request filter `{plugin}` failed: {error}")]
pub struct FilterFault {
    pub plugin: String,
    pub error: PluginError,
}

impl FilterFault {
    /// The HTTP status to answer with.
    pub fn status(&self) -> u16 {
        503
    }
}

/// Longest rejection message or stop reason a filter may answer, in bytes.
pub const MAX_FILTER_MESSAGE: usize = 1024;
/// Longest tenant or sampler name a filter may set, in bytes.
pub const MAX_FILTER_NAME: usize = 256;

fn check_params(p: &FilterParams) -> Result<(), String> {
    if p.max_tokens == 0 {
        return Err("modified max-tokens is 0".into());
    }
    if !(0.0..=2.0).contains(&p.temperature) {
        return Err(format!("modified temperature {} is outside [0, 2]", p.temperature));
    }
    if !(p.top_p > 0.0 && p.top_p <= 1.0) {
        return Err(format!("modified top-p {} is outside (0, 1]", p.top_p));
    }
    if p.tenant.len() > MAX_FILTER_NAME || p.sampler.as_ref().is_some_and(|s| s.len() > MAX_FILTER_NAME) {
        return Err(format!("modified tenant or sampler is longer than {MAX_FILTER_NAME} bytes"));
    }
    Ok(())
}

fn from_wit(p: types::RequestParams) -> FilterParams {
    FilterParams {
        max_tokens: p.max_tokens,
        temperature: p.temperature,
        top_p: p.top_p,
        top_k: p.top_k,
        seed: p.seed,
        priority: p.priority,
        tenant: p.tenant,
        sampler: p.sampler,
    }
}

impl PluginSlot {
    /// Runs the filter's `on-request`.
    pub fn on_request(&self, req: &FilterRequest) -> Result<FilterVerdict, PluginError> {
        let p = &req.params;
        let info = types::RequestInfo {
            headers: req.headers.clone(),
            prompt: req.prompt.clone(),
            params: types::RequestParams {
                max_tokens: p.max_tokens,
                temperature: p.temperature,
                top_p: p.top_p,
                top_k: p.top_k,
                seed: p.seed,
                priority: p.priority,
                tenant: p.tenant.clone(),
                sampler: p.sampler.clone(),
            },
        };
        self.call(|live| {
            let Live::Filter { store, plugin } = live else { unreachable!("a filter slot holds filters") };
            match plugin.call_on_request(store, &info)? {
                types::RequestVerdict::Continue => Ok(FilterVerdict::Continue),
                types::RequestVerdict::Reject(r) => {
                    if !(400..=599).contains(&r.status) {
                        return Err(CallFailure::Invalid(format!("rejected with status {}, not an error status", r.status)));
                    }
                    if r.message.len() > MAX_FILTER_MESSAGE {
                        return Err(CallFailure::Invalid(format!(
                            "rejection message of {} bytes (limit {MAX_FILTER_MESSAGE})",
                            r.message.len()
                        )));
                    }
                    Ok(FilterVerdict::Reject { status: r.status, message: r.message })
                }
                types::RequestVerdict::Modify(params) => {
                    let params = from_wit(params);
                    check_params(&params).map_err(CallFailure::Invalid)?;
                    Ok(FilterVerdict::Modify(params))
                }
            }
        })
    }

    /// Runs the filter's `on-output`.
    pub fn on_output(&self, tenant: &str, text_so_far: &str, generated_tokens: u32) -> Result<OutputVerdict, PluginError> {
        self.call(|live| {
            let Live::Filter { store, plugin } = live else { unreachable!("a filter slot holds filters") };
            match plugin.call_on_output(store, tenant, text_so_far, generated_tokens)? {
                types::OutputVerdict::Continue => Ok(OutputVerdict::Continue),
                types::OutputVerdict::Stop(reason) if reason.len() > MAX_FILTER_MESSAGE => {
                    Err(CallFailure::Invalid(format!("stop reason of {} bytes (limit {MAX_FILTER_MESSAGE})", reason.len())))
                }
                types::OutputVerdict::Stop(reason) => Ok(OutputVerdict::Stop(reason)),
            }
        })
    }
}
