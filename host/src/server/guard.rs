//! Who may talk to the server from a browser: the `Host` allow-list (against DNS rebinding: a
//! page whose name suddenly resolves to 127.0.0.1 still sends its own name as `Host`) and the
//! `Origin` rules (a cross-site page may not call the API unless `--allowed-origins` names it;
//! CORS preflights are answered only for those origins). JSON routes also refuse bodies that are
//! not `application/json` (`body::RequestBody`), so a page cannot send a "simple request" that
//! skips the preflight.
//!
//! Defaults: a server bound to a loopback address accepts only loopback names as `Host`
//! (`localhost`, `127.0.0.1`, `::1`); a server bound elsewhere accepts any `Host` (it cannot know
//! the names it is reached by: set `--allowed-hosts`). No cross-site origin is allowed unless
//! listed; a request from the page's own origin (`Origin` naming the `Host`) always is.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::error::ApiError;

/// A list from a flag: `*` for anything, else exact names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowList {
    Any,
    Only(Vec<String>),
}

impl AllowList {
    /// Parses a comma-separated flag value (`*` alone means any); entries are lower-cased.
    pub fn parse(value: &str) -> Self {
        let entries: Vec<String> =
            value.split(',').map(|e| e.trim().to_ascii_lowercase()).filter(|e| !e.is_empty()).collect();
        if entries.iter().any(|e| e == "*") {
            AllowList::Any
        } else {
            AllowList::Only(entries)
        }
    }

    fn allows(&self, value: &str) -> bool {
        match self {
            AllowList::Any => true,
            AllowList::Only(list) => list.iter().any(|e| e.eq_ignore_ascii_case(value)),
        }
    }
}

/// The browser-facing access rules of one listener.
#[derive(Debug, Clone)]
pub struct AccessPolicy {
    /// Names a request's `Host` may carry (without the port).
    pub hosts: AllowList,
    /// Cross-site origins (`scheme://host[:port]`) that may call the API; CORS preflights are
    /// answered for these.
    pub origins: AllowList,
    /// The admin listener's one extra origin: the built-in page (`/ui`) of this server's API
    /// listener, on this port and an allowed host name, which calls the admin API from the browser.
    pub ui_port: Option<u16>,
}

impl AccessPolicy {
    /// The rules for a listener bound to `bind` (an address or name), with the operator's
    /// `--allowed-hosts` and `--allowed-origins` if given.
    pub fn for_bind(bind: &str, hosts: Option<&str>, origins: Option<&str>) -> Self {
        let hosts = match hosts {
            Some(list) => AllowList::parse(list),
            None if is_loopback(bind) => {
                let mut names: Vec<String> = ["localhost", "127.0.0.1", "::1"].map(String::from).into();
                let bind = bind.trim_matches(|c| c == '[' || c == ']').to_ascii_lowercase();
                if !names.contains(&bind) {
                    names.push(bind);
                }
                AllowList::Only(names)
            }
            None => AllowList::Any,
        };
        let origins = origins.map_or(AllowList::Only(Vec::new()), AllowList::parse);
        AccessPolicy { hosts, origins, ui_port: None }
    }

    /// Also allows the page served by the API listener on `port` (see `ui_port`).
    pub fn with_ui_port(mut self, port: u16) -> Self {
        self.ui_port = Some(port);
        self
    }

    /// Whether a cross-site `origin` may call a request addressed to `host` (its `Host`
    /// header): listed, or the built-in page of this server, which the browser reaches by the
    /// same host name on the API's port.
    fn origin_allowed(&self, origin: &str, host: Option<&str>) -> bool {
        if self.origins.allows(origin) {
            return true;
        }
        let (Some(port), Some(authority), Some(host)) = (self.ui_port, origin_authority(origin), host) else { return false };
        let same_name = host_name(authority).eq_ignore_ascii_case(host_name(host));
        same_name && authority.rsplit_once(':').is_some_and(|(_, p)| p == port.to_string()) && self.hosts.allows(host_name(host))
    }

    /// The CORS layer that answers preflights and marks responses for the allowed origins;
    /// `None` when no cross-site origin is allowed (no CORS headers at all).
    pub fn cors(&self) -> Option<CorsLayer> {
        let allow_origin = match &self.origins {
            AllowList::Any => AllowOrigin::any(),
            AllowList::Only(_) if self.ui_port.is_some() => {
                let policy = self.clone();
                AllowOrigin::predicate(move |origin: &HeaderValue, request: &axum::http::request::Parts| {
                    let host = request.headers.get(header::HOST).and_then(|h| h.to_str().ok());
                    origin.to_str().is_ok_and(|o| policy.origin_allowed(o, host))
                })
            }
            AllowList::Only(list) if list.is_empty() => return None,
            AllowList::Only(list) => AllowOrigin::list(list.iter().filter_map(|o| HeaderValue::from_str(o).ok())),
        };
        Some(
            CorsLayer::new()
                .allow_origin(allow_origin)
                .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
                .allow_headers([
                    header::CONTENT_TYPE,
                    header::AUTHORIZATION,
                    // The admin API's upload headers, sent by the built-in page.
                    header::HeaderName::from_static("x-sha256"),
                    header::HeaderName::from_static("x-plugin-config"),
                ])
                .max_age(std::time::Duration::from_secs(600)),
        )
    }

    /// Why a request may not pass, if it may not.
    fn refuse(&self, request: &Request) -> Option<ApiError> {
        let host = request.headers().get(header::HOST).and_then(|v| v.to_str().ok());
        if let Some(host) = host {
            let name = host_name(host);
            if !self.hosts.allows(name) {
                return Some(ApiError::new(
                    StatusCode::FORBIDDEN,
                    format!("the Host `{host}` is not allowed on this server (see --allowed-hosts)"),
                    None,
                    "host_not_allowed",
                ));
            }
        }
        let origin = request.headers().get(header::ORIGIN)?;
        let origin_text = origin.to_str().unwrap_or("");
        let same_site = host.is_some_and(|host| origin_authority(origin_text).is_some_and(|a| a.eq_ignore_ascii_case(host)));
        if same_site || self.origin_allowed(origin_text, host) {
            return None;
        }
        Some(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("requests from the origin `{origin_text}` are not allowed (see --allowed-origins)"),
            None,
            "origin_not_allowed",
        ))
    }
}

/// Middleware: refuses requests whose `Host` or `Origin` the policy does not allow (403).
pub async fn check_access(State(policy): State<Arc<AccessPolicy>>, request: Request, next: Next) -> Response {
    match policy.refuse(&request) {
        Some(error) => error.into_response(),
        None => next.run(request).await,
    }
}

/// Whether a bind address or name only accepts local connections.
fn is_loopback(bind: &str) -> bool {
    let bare = bind.trim_matches(|c| c == '[' || c == ']');
    bare.eq_ignore_ascii_case("localhost") || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The name in a `Host` value: without the port, without an IPv6 literal's brackets.
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => host,
    }
}

/// `host[:port]` of an `Origin` (`scheme://host[:port]`), to compare with `Host`.
fn origin_authority(origin: &str) -> Option<&str> {
    let (scheme, rest) = origin.split_once("://")?;
    matches!(scheme, "http" | "https").then_some(rest.trim_end_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(host: Option<&str>, origin: Option<&str>) -> Request {
        let mut builder = axum::http::Request::builder().uri("/v1/models");
        if let Some(host) = host {
            builder = builder.header(header::HOST, host);
        }
        if let Some(origin) = origin {
            builder = builder.header(header::ORIGIN, origin);
        }
        builder.body(axum::body::Body::empty()).unwrap()
    }

    #[test]
    fn the_admin_listener_allows_the_page_of_its_api_listener_only() {
        let policy = AccessPolicy::for_bind("127.0.0.1", None, None).with_ui_port(8000);
        assert!(policy.refuse(&request(Some("127.0.0.1:9000"), Some("http://127.0.0.1:8000"))).is_none());
        assert!(policy.refuse(&request(Some("localhost:9000"), Some("http://localhost:8000"))).is_none());
        for origin in ["http://127.0.0.1:8001", "http://evil.example:8000", "http://127.0.0.1", "null", "http://127.0.0.1:80000"] {
            assert!(policy.refuse(&request(Some("127.0.0.1:9000"), Some(origin))).is_some(), "{origin}");
        }
        assert!(policy.refuse(&request(Some("127.0.0.1:9000"), Some("http://localhost:8000"))).is_some(), "another name");
        assert!(policy.cors().is_some(), "preflights from the page are answered");
        assert!(AccessPolicy::for_bind("127.0.0.1", None, None).cors().is_none());
        // On a public bind every Host name is allowed; the page must still come by the name the
        // admin listener is called by.
        let public = AccessPolicy::for_bind("0.0.0.0", None, None).with_ui_port(8000);
        assert!(public.refuse(&request(Some("10.0.0.5:9000"), Some("http://10.0.0.5:8000"))).is_none());
        assert!(public.refuse(&request(Some("10.0.0.5:9000"), Some("http://evil.example:8000"))).is_some());
    }

    #[test]
    fn loopback_binds_accept_only_loopback_names() {
        let policy = AccessPolicy::for_bind("127.0.0.1", None, None);
        for host in ["localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST", "127.0.0.1"] {
            assert!(policy.refuse(&request(Some(host), None)).is_none(), "{host}");
        }
        for host in ["evil.example:8000", "127.0.0.1.evil.example", "localhost.evil:80", "[::2]:8000"] {
            let error = policy.refuse(&request(Some(host), None)).expect(host);
            assert_eq!((error.status, error.label), (StatusCode::FORBIDDEN, "host_not_allowed"), "{host}");
        }
        assert_eq!(AccessPolicy::for_bind("::1", None, None).hosts, policy.hosts);
        assert_eq!(AccessPolicy::for_bind("0.0.0.0", None, None).hosts, AllowList::Any);
        let listed = AccessPolicy::for_bind("0.0.0.0", Some("api.example.com, Other.example"), None);
        assert!(listed.refuse(&request(Some("other.example:443"), None)).is_none());
        assert!(listed.refuse(&request(Some("localhost:8000"), None)).is_some());
    }

    #[test]
    fn cross_site_origins_need_listing_but_the_own_origin_passes() {
        let policy = AccessPolicy::for_bind("127.0.0.1", None, None);
        let host = Some("localhost:8000");
        assert!(policy.refuse(&request(host, Some("http://localhost:8000"))).is_none(), "same origin");
        for origin in ["https://evil.example", "null", "http://localhost:9999", "file://"] {
            let error = policy.refuse(&request(host, Some(origin))).expect(origin);
            assert_eq!(error.label, "origin_not_allowed", "{origin}");
        }
        assert!(policy.cors().is_none(), "no CORS headers by default");
        let open = AccessPolicy::for_bind("127.0.0.1", None, Some("https://app.example"));
        assert!(open.refuse(&request(host, Some("https://app.example"))).is_none());
        assert!(open.refuse(&request(host, Some("https://other.example"))).is_some());
        assert!(open.cors().is_some());
        assert_eq!(AllowList::parse(" * "), AllowList::Any);
    }
}
