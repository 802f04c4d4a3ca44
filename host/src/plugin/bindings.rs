//! The one place where `bindgen!` runs: host-side bindings of the three worlds of
//! `wit/plugins.wit`. The `types` and `host` interfaces are generated with the scheduler world and
//! shared by the other two (`with`), so there is one `Host` implementation for every plugin.
//! Types are owned (`String`, `Vec`) on both sides of the calls.

pub mod scheduler {
    wasmtime::component::bindgen!({
        world: "scheduler",
        path: "../wit",
    });
}

pub mod sampler {
    wasmtime::component::bindgen!({
        world: "sampler",
        path: "../wit",
        with: {
            "pagedserve:plugins/types": super::scheduler::pagedserve::plugins::types,
            "pagedserve:plugins/host": super::scheduler::pagedserve::plugins::host,
        },
    });
}

pub mod filter {
    wasmtime::component::bindgen!({
        world: "filter",
        path: "../wit",
        with: {
            "pagedserve:plugins/types": super::scheduler::pagedserve::plugins::types,
            "pagedserve:plugins/host": super::scheduler::pagedserve::plugins::host,
        },
    });
}

pub use self::scheduler::pagedserve::plugins::{host, types};
