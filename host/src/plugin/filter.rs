//! The filter seam's host side, for the HTTP layer: a request as filters see it, their verdicts,
//! their answers checked by `answers` (an error status, a bounded message, sane parameters). A
//! fault fails the request closed: `FilterFault` names the plugin and maps to HTTP 503.

use super::answers;
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
            answers::request_verdict(plugin.call_on_request(store, &info)?).map_err(CallFailure::Invalid)
        })
    }

    /// Runs the filter's `on-output`.
    pub fn on_output(&self, tenant: &str, text_so_far: &str, generated_tokens: u32) -> Result<OutputVerdict, PluginError> {
        self.call(|live| {
            let Live::Filter { store, plugin } = live else { unreachable!("a filter slot holds filters") };
            answers::output_verdict(plugin.call_on_output(store, tenant, text_so_far, generated_tokens)?).map_err(CallFailure::Invalid)
        })
    }
}
