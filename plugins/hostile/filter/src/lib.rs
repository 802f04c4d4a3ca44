//! A hostile filter for the host's containment tests; its configuration names how it misbehaves
//! in `on-request` (`ok` lets everything through):
//! `loop`, `trap`, `memory`, `bad-status` (rejects with status 200), `huge-message` (a 1 MiB
//! rejection message).

use std::hint::black_box;
use std::sync::Mutex;

use pagedserve_plugin_sdk::filter::{export_filter, reject, Guest, OutputVerdict, RequestInfo, RequestVerdict};

static MODE: Mutex<String> = Mutex::new(String::new());

struct Hostile;

impl Guest for Hostile {
    fn configure(config: String) -> Result<(), String> {
        *MODE.lock().unwrap() = config.trim().to_string();
        Ok(())
    }

    fn on_request(req: RequestInfo) -> RequestVerdict {
        let mode = MODE.lock().unwrap().clone();
        match mode.as_str() {
            "loop" => loop {
                black_box(&req);
            },
            "trap" => panic!("hostile filter traps"),
            "memory" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(black_box(Vec::<u8>::with_capacity(8 << 20)));
                }
            }
            "bad-status" => reject(200, "not an error status"),
            "huge-message" => reject(400, "x".repeat(1 << 20)),
            _ => RequestVerdict::Continue,
        }
    }

    fn on_output(_tenant: String, _text: String, _generated: u32) -> OutputVerdict {
        OutputVerdict::Continue
    }
}

export_filter!(Hostile);
