//! Per-tenant rate limit: a token bucket per tenant (`capacity` requests, refilled at
//! `refill_per_second`); a request finding its bucket empty is refused with 429. The buckets live
//! in the instance and persist across calls while it is healthy (a fresh instance after a fault
//! starts with full buckets).
//!
//! Configuration (JSON, optional): `{"capacity": 10, "refill_per_second": 1.0}`.

use std::collections::BTreeMap;
use std::sync::Mutex;

use pagedserve_plugin_sdk::filter::{export_filter, reject, Guest, OutputVerdict, RequestInfo, RequestVerdict};
use pagedserve_plugin_sdk::serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(crate = "pagedserve_plugin_sdk::serde", deny_unknown_fields, default)]
pub struct Config {
    pub capacity: f64,
    pub refill_per_second: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config { capacity: 10.0, refill_per_second: 1.0 }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated_ns: u64,
}

#[derive(Default)]
pub struct Limiter {
    pub config: Config,
    buckets: BTreeMap<String, Bucket>,
}

impl Limiter {
    pub fn new(config: Config) -> Self {
        Limiter { config, buckets: BTreeMap::new() }
    }

    /// Takes one token from `tenant`'s bucket at time `now_ns`; `Err(wait in ms)` when empty.
    pub fn take(&mut self, tenant: &str, now_ns: u64) -> Result<(), u64> {
        let c = &self.config;
        let bucket = self.buckets.entry(tenant.to_string()).or_insert(Bucket { tokens: c.capacity, updated_ns: now_ns });
        let elapsed = now_ns.saturating_sub(bucket.updated_ns) as f64 / 1e9;
        bucket.tokens = (bucket.tokens + elapsed * c.refill_per_second).min(c.capacity);
        bucket.updated_ns = now_ns;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - bucket.tokens) / c.refill_per_second * 1e3).ceil() as u64)
        }
    }
}

static LIMITER: Mutex<Option<Limiter>> = Mutex::new(None);

struct RateLimit;

impl Guest for RateLimit {
    fn configure(config: String) -> Result<(), String> {
        let config: Config = pagedserve_plugin_sdk::parse_config(&config)?;
        if !(config.capacity >= 1.0 && config.refill_per_second > 0.0) {
            return Err("need capacity >= 1 and refill_per_second > 0".into());
        }
        *LIMITER.lock().unwrap() = Some(Limiter::new(config));
        Ok(())
    }

    fn on_request(req: RequestInfo) -> RequestVerdict {
        let mut limiter = LIMITER.lock().unwrap();
        let limiter = limiter.get_or_insert_with(Limiter::default);
        match limiter.take(&req.params.tenant, pagedserve_plugin_sdk::host::now()) {
            Ok(()) => RequestVerdict::Continue,
            Err(wait_ms) => reject(
                429,
                format!("rate limit exceeded for tenant `{}`; retry in {wait_ms} ms", req.params.tenant),
            ),
        }
    }

    fn on_output(_tenant: String, _text: String, _generated: u32) -> OutputVerdict {
        OutputVerdict::Continue
    }
}

export_filter!(RateLimit);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_empty_per_tenant_and_refill() {
        let mut l = Limiter::new(Config { capacity: 2.0, refill_per_second: 2.0 });
        assert_eq!(l.take("a", 0), Ok(()));
        assert_eq!(l.take("a", 0), Ok(()));
        assert_eq!(l.take("a", 0), Err(500));
        assert_eq!(l.take("b", 0), Ok(()), "tenants have their own buckets");
        assert_eq!(l.take("a", 500_000_000), Ok(()), "half a second refills one");
        assert!(l.take("a", 500_000_000).is_err());
    }
}
