//! A hostile sampler for the host's containment tests; its configuration names how it misbehaves
//! in `sample` (`ok` takes the best candidate):
//! `out-of-vocab` (a token id past any vocabulary), `wrong-count` (one output too few), `loop`,
//! `memory`, `trap`, `huge-top-n` (asks for more candidates than the host allows).

use std::hint::black_box;
use std::sync::Mutex;

use pagedserve_plugin_sdk::sampler::{export_sampler, Guest, SampleInput, SampleOutput};

static MODE: Mutex<String> = Mutex::new(String::new());

struct Hostile;

impl Guest for Hostile {
    fn configure(config: String) -> Result<(), String> {
        *MODE.lock().unwrap() = config.trim().to_string();
        Ok(())
    }

    fn top_n() -> u32 {
        if MODE.lock().unwrap().as_str() == "huge-top-n" {
            u32::MAX
        } else {
            8
        }
    }

    fn sample(seqs: Vec<SampleInput>) -> Result<Vec<SampleOutput>, String> {
        let mode = MODE.lock().unwrap().clone();
        let mut out: Vec<SampleOutput> =
            seqs.iter().map(|s| SampleOutput { token: s.token_ids[0], logprob: None }).collect();
        match mode.as_str() {
            "out-of-vocab" => out[0].token = u32::MAX - 1,
            "wrong-count" => {
                out.pop();
            }
            "loop" => loop {
                black_box(&out);
            },
            "memory" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(black_box(Vec::<u8>::with_capacity(8 << 20)));
                }
            }
            "trap" => panic!("hostile sampler traps"),
            _ => {}
        }
        Ok(out)
    }
}

export_sampler!(Hostile);
