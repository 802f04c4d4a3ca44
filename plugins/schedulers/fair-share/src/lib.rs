//! Per-tenant fair share: weighted round robin over tenants. Within a tenant, sequences go in
//! arrival order; across tenants, the k-th sequence of a tenant of weight w ranks at k / w, so a
//! tenant that floods the server gets its share and no more, and a second tenant's first request
//! ranks near the top however long the first tenant's queue is. Ties go to the tenant that arrived
//! first. Stateless: the same queues always give the same order.
//!
//! Configuration (JSON, optional): `{"weights": {"tenant-a": 2, "tenant-b": 1}}`; unlisted
//! tenants weigh 1 (`"default_weight"` changes that).

use std::collections::BTreeMap;
use std::sync::Mutex;

use pagedserve_plugin_sdk::scheduler::{export_scheduler, Budget, Guest, QueueView};
use pagedserve_plugin_sdk::serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(crate = "pagedserve_plugin_sdk::serde", deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub weights: BTreeMap<String, f64>,
    #[serde(default = "one")]
    pub default_weight: f64,
}

fn one() -> f64 {
    1.0
}

impl Default for Config {
    fn default() -> Self {
        Config { weights: BTreeMap::new(), default_weight: 1.0 }
    }
}

pub fn rank(queue: &QueueView, config: &Config) -> Vec<u32> {
    // Each tenant's sequences as (arrival, id, index), grouped by the view's tenant index.
    let mut by_tenant: Vec<Vec<(u64, u64, u32)>> = vec![Vec::new(); queue.tenant_names.len()];
    for s in queue.iter() {
        by_tenant[queue.tenants[s.index as usize] as usize].push((s.arrival, s.id, s.index));
    }
    let mut order: Vec<(f64, u64, u64, u64, u32)> = Vec::with_capacity(queue.len());
    for (tenant, mut list) in by_tenant.into_iter().enumerate().filter(|(_, l)| !l.is_empty()) {
        list.sort_unstable();
        let name = queue.tenant_names[tenant].as_str();
        let weight = config.weights.get(name).copied().unwrap_or(config.default_weight).max(1e-6);
        let first_arrival = list[0].0;
        for (k, (arrival, id, index)) in list.into_iter().enumerate() {
            order.push((k as f64 / weight, first_arrival, arrival, id, index));
        }
    }
    order.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then((a.1, a.2, a.3).cmp(&(b.1, b.2, b.3))));
    order.into_iter().map(|o| o.4).collect()
}

static CONFIG: Mutex<Option<Config>> = Mutex::new(None);

struct FairShare;

impl Guest for FairShare {
    fn configure(config: String) -> Result<(), String> {
        let config: Config = pagedserve_plugin_sdk::parse_config(&config)?;
        if config.weights.values().chain([&config.default_weight]).any(|w| !(*w > 0.0)) {
            return Err("weights must be positive".into());
        }
        *CONFIG.lock().unwrap() = Some(config);
        Ok(())
    }

    fn rank(queue: QueueView, _budget: Budget) -> Result<Vec<u32>, String> {
        let config = CONFIG.lock().unwrap();
        Ok(rank(&queue, config.as_ref().unwrap_or(&Config::default())))
    }
}

export_scheduler!(FairShare);

#[cfg(test)]
mod tests {
    use super::*;
    use pagedserve_plugin_sdk::scheduler::Seq;

    fn seq(id: u64, tenant: &'static str, arrival: u64) -> Seq<'static> {
        Seq { tenant, ..pagedserve_plugin_sdk::scheduler::seq(id, arrival) }
    }

    #[test]
    fn a_flooding_tenant_does_not_starve_a_late_one() {
        let mut seqs: Vec<Seq> = (0..10).map(|i| seq(i, "flood", i)).collect();
        seqs.push(seq(100, "late", 50));
        seqs.push(seq(101, "late", 51));
        let queue = QueueView::from_seqs(&seqs);
        let order = queue.ids_of(&rank(&queue, &Config::default()));
        assert_eq!(&order[..4], &[0, 100, 1, 101]);
        assert_eq!(order.len(), 12);
    }

    #[test]
    fn weights_give_proportional_shares() {
        let mut seqs: Vec<Seq> = (0..6).map(|i| seq(i, "a", i)).collect();
        seqs.extend((0..6).map(|i| seq(10 + i, "b", 100 + i)));
        let config = Config { weights: [("a".to_string(), 2.0)].into(), default_weight: 1.0 };
        let queue = QueueView::from_seqs(&seqs);
        let order = queue.ids_of(&rank(&queue, &config));
        // a's k-th at k/2, b's k-th at k: a, b, a, a, b, a, ...
        assert_eq!(&order[..6], &[0, 10, 1, 2, 11, 3]);
    }
}
