//! A hostile scheduler for the host's containment tests: its configuration names how it
//! misbehaves in `rank` (`ok` behaves like fcfs):
//! `loop` (never returns), `memory` (allocates 8 MiB blocks without end), `trap` (panics: `unreachable`),
//! `recursion` (unbounded recursion), `unknown-ids` (an index out of range), `duplicates`, `missing`, `huge` (an answer
//! of a million indices), `error` (returns an error string).

use std::hint::black_box;
use std::sync::Mutex;

use pagedserve_plugin_sdk::scheduler::{export_scheduler, rank_by, Budget, Guest, QueueView};

static MODE: Mutex<String> = Mutex::new(String::new());

pub fn recurse(depth: u64) -> u64 {
    if black_box(depth) == u64::MAX {
        return 0;
    }
    let mut frame = [depth; 16];
    black_box(&mut frame);
    recurse(depth + 1) + frame[3]
}

pub fn allocate_forever() -> usize {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        hoard.push(black_box(Vec::<u8>::with_capacity(8 << 20)));
        black_box(&hoard);
    }
}


struct Hostile;

impl Guest for Hostile {
    fn configure(config: String) -> Result<(), String> {
        *MODE.lock().unwrap() = config.trim().to_string();
        Ok(())
    }

    fn rank(queue: QueueView, _budget: Budget) -> Result<Vec<u32>, String> {
        let mode = MODE.lock().unwrap().clone();
        let mut order = rank_by(&queue, |s| (s.arrival, s.id));
        match mode.as_str() {
            "loop" => loop {
                black_box(&order);
            },
            "memory" => {
                allocate_forever();
            }
            "trap" => panic!("hostile scheduler traps"),
            "recursion" => {
                black_box(recurse(0));
            }
            "unknown-ids" => order[0] = u32::MAX - 7,
            "duplicates" => {
                let first = order[0];
                order.push(first);
            }
            "missing" => {
                order.pop();
            }
            "huge" => return Ok((0..1_000_000u32).collect()),
            "error" => return Err("hostile scheduler refuses".into()),
            _ => {}
        }
        Ok(order)
    }
}

export_scheduler!(Hostile);
