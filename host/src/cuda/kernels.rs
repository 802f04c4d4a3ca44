//! NVRTC compilation of the embedded kernel modules for this GPU's architecture, with an on-disk
//! cache keyed by the source hash and architecture (`$PAGEDSERVE_KERNEL_CACHE`, else
//! `~/.cache/pagedserve/kernels`), so only the first start on a machine pays for compilation.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaContext, CudaFunction};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};
use pagedserve_kernels::{KernelModule, MODULES};

use super::CudaError;

pub struct Kernels {
    functions: HashMap<&'static str, CudaFunction>,
}

fn cache_dir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("PAGEDSERVE_KERNEL_CACHE") {
        return Some(PathBuf::from(dir));
    }
    std::env::var("HOME").ok().map(|home| PathBuf::from(home).join(".cache/pagedserve/kernels"))
}

/// Where NVRTC finds `cuda_bf16.h`: `$CUDA_HOME/include`, `$CUDA_PATH/include`, the usual prefix.
fn include_paths() -> Vec<String> {
    let mut paths = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(root) = std::env::var(var) {
            paths.push(format!("{root}/include"));
        }
    }
    paths.push("/usr/local/cuda/include".into());
    paths.dedup();
    let mut found: Vec<String> = Vec::new();
    for p in paths {
        if std::path::Path::new(&p).join("cuda_bf16.h").exists() && !found.contains(&p) {
            found.push(p);
        }
    }
    found
}

/// Compiles one module to PTX for `arch` (`sm_90`); needs NVRTC but no GPU.
pub fn compile(module: &KernelModule, arch: &str) -> Result<String, CudaError> {
    let started = Instant::now();
    let arch_static: &'static str = Box::leak(arch.to_string().into_boxed_str());
    let options = CompileOptions {
        arch: Some(arch_static),
        include_paths: include_paths(),
        options: vec!["--std=c++17".into()],
        ..Default::default()
    };
    let ptx = compile_ptx_with_opts(module.full_source(), options)
        .map_err(|e| CudaError::Compile { module: module.name.to_string(), message: e.to_string() })?;
    tracing::info!(module = module.name, seconds = started.elapsed().as_secs_f32(), "kernel compiled");
    Ok(ptx.to_src())
}

/// Where the compiled PTX of `module` for `arch` is cached, if there is a cache directory.
fn cached_path(module: &KernelModule, arch: &str) -> Option<PathBuf> {
    let hash = module.source_hash(arch);
    cache_dir().map(|dir| dir.join(format!("{}-{}.ptx", module.name, &hash[..16])))
}

/// The PTX of `module` for `arch`: from the on-disk cache, else compiled and stored there.
fn cached_or_compiled(module: &KernelModule, arch: &str) -> Result<String, CudaError> {
    let cached = cached_path(module, arch);
    if let Some(src) = cached.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
        return Ok(src);
    }
    let src = compile(module, arch)?;
    if let Some(path) = &cached {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = std::fs::write(path, &src);
    }
    Ok(src)
}

/// Compiles every module (a check that needs no GPU, only NVRTC), filling the on-disk cache: its
/// files are what `ptxas -v` reads to report registers and spills without a GPU.
pub fn compile_all(arch: &str) -> Result<(), CudaError> {
    for module in MODULES {
        cached_or_compiled(module, arch)?;
    }
    Ok(())
}

impl Kernels {
    pub fn load(context: &Arc<CudaContext>, arch: &str) -> Result<Self, CudaError> {
        let mut functions = HashMap::new();
        for module in MODULES {
            let loaded = context.load_module(Ptx::from_src(cached_or_compiled(module, arch)?))?;
            for &name in module.functions {
                functions.insert(name, loaded.load_function(name)?);
            }
        }
        Ok(Kernels { functions })
    }

    pub fn get(&self, name: &str) -> &CudaFunction {
        self.functions.get(name).unwrap_or_else(|| panic!("kernel `{name}` is not in any module"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel module compiles for Hopper with NVRTC, which needs no GPU. `scripts/test.sh`
    /// fetches NVRTC (`scripts/fetch-nvrtc.sh`) and sets `PAGEDSERVE_REQUIRE_NVRTC=1`, so the
    /// suite compiles the kernels on every machine it runs on; a bare `cargo test` without NVRTC
    /// says that it skipped.
    #[test]
    fn every_kernel_module_compiles_for_sm_90() {
        let required = std::env::var("PAGEDSERVE_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
        // SAFETY: only tries to open the library.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            assert!(!required, "PAGEDSERVE_REQUIRE_NVRTC=1 but NVRTC is not on the library path");
            eprintln!("skipped: NVRTC is not on the library path (scripts/fetch-nvrtc.sh provides it)");
            return;
        }
        for module in MODULES {
            let ptx = compile(module, "sm_90").unwrap_or_else(|e| panic!("{e}"));
            for function in module.functions {
                assert!(ptx.contains(&format!(".entry {function}(")), "{}: no entry `{function}` in the PTX", module.name);
            }
        }
    }
}
