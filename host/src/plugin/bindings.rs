//! The one place where `bindgen!` runs: host-side bindings of the four worlds of
//! `wit/plugins.wit` (`pagedserve:plugins@0.2.0`). The `types` and `host` interfaces are generated
//! with the scheduler world and shared by the other three (`with`), so there is one `Host`
//! implementation for every plugin. Types are owned (`String`, `Vec`) on both sides of the calls.
//!
//! `v0_1` binds the frozen `wit/0.1.0` package only for its `host` and `types` interfaces: a
//! 0.1.0 component imports those, and the host links them too. Its world exports are the same
//! functions over the same records as 0.2.0's, and the component model checks records by
//! structure, so a 0.1.0 scheduler, sampler or filter instantiates through the 0.2.0 bindings.

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

pub mod constraint {
    wasmtime::component::bindgen!({
        world: "constraint",
        path: "../wit",
        with: {
            "pagedserve:plugins/types": super::scheduler::pagedserve::plugins::types,
            "pagedserve:plugins/host": super::scheduler::pagedserve::plugins::host,
        },
    });
}

/// `pagedserve:plugins@0.1.0`'s imports, linked for components built against it.
pub mod v0_1 {
    wasmtime::component::bindgen!({
        world: "scheduler",
        path: "../wit/0.1.0",
    });

    pub use self::pagedserve::plugins::{host, types};
}

pub use self::scheduler::pagedserve::plugins::{host, types};
