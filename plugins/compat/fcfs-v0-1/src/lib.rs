//! First come, first served, built against the frozen 0.1.0 contract (`wit/0.1.0`) with
//! wit-bindgen directly rather than through the SDK (which builds 0.2.0 components): a genuine
//! `pagedserve:plugins@0.1.0` scheduler component, which proves the host still loads the
//! components built before 0.2.0. The same order as `schedulers/fcfs`: arrival, then id.
//! No configuration. It logs one debug line at `configure`, through 0.1.0's `host.log`, so that
//! it imports 0.1.0's `host` interface as well as its `types` (a component imports only the host
//! functions it calls), as the 0.1.0 plugins that read `host.now` do.

wit_bindgen::generate!({
    world: "scheduler",
    path: "../../../wit/0.1.0",
});

// `Budget` and `QueueView` are in scope already: the world `use`s them.

/// Indices of the view by arrival, then id (ties keep view order). Zips the columns rather than
/// indexing them, so a view with a short column (never sent by the host) cannot panic.
pub fn rank(queue: &QueueView) -> Vec<u32> {
    let mut keyed: Vec<(u64, u64, u32)> =
        queue.arrivals.iter().zip(&queue.ids).enumerate().map(|(i, (&arrival, &id))| (arrival, id, i as u32)).collect();
    keyed.sort_unstable();
    keyed.into_iter().map(|(_, _, i)| i).collect()
}

struct Fcfs;

impl Guest for Fcfs {
    fn configure(_config: String) -> Result<(), String> {
        use pagedserve::plugins::{host, types::LogLevel};
        host::log(LogLevel::Debug, "fcfs-v0-1: a pagedserve:plugins@0.1.0 scheduler");
        Ok(())
    }

    fn rank(queue: QueueView, _budget: Budget) -> Result<Vec<u32>, String> {
        Ok(rank(&queue))
    }
}

export!(Fcfs);

#[cfg(test)]
mod tests {
    use super::*;

    fn view(seqs: &[(u64, u64)]) -> QueueView {
        let n = seqs.len();
        QueueView {
            ids: seqs.iter().map(|&(id, _)| id).collect(),
            priorities: vec![0; n],
            tenants: vec![0; n],
            tenant_names: vec![String::new()],
            arrivals: seqs.iter().map(|&(_, arrival)| arrival).collect(),
            prompt_tokens: vec![4; n],
            computed_tokens: vec![0; n],
            generated_tokens: vec![0; n],
            max_tokens: vec![8; n],
            blocks_held: vec![0; n],
            running: vec![false; n],
        }
    }

    #[test]
    fn arrival_order_then_id() {
        // (id, arrival): the same case as schedulers/fcfs.
        let queue = view(&[(3, 2), (1, 0), (5, 0), (2, 1)]);
        let ranking = rank(&queue);
        assert_eq!(ranking, vec![1, 2, 3, 0]);
        assert_eq!(ranking.iter().map(|&i| queue.ids[i as usize]).collect::<Vec<_>>(), vec![1, 5, 2, 3]);
    }
}
