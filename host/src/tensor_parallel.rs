//! `--tensor-parallel-size N` (issue 14): the commands that build a model backend split the model
//! over N ranks with it. At 1 nothing changes. Above 1, the CPU runs the ranks as threads behind
//! one backend (`CpuTensorParallelBackend`), and CUDA runs one rank per GPU of the host, meeting in
//! NCCL (`GpuTensorParallelBackend`); both keep one scheduler and one KV-cache manager over every
//! rank's cache. The shard plan's refusals are startup errors that name the flag.

use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use pagedserve::cuda::collective::RankComm;
use pagedserve::cuda::{GpuBackend, GpuDevice, GpuKvCache, GpuModel, GpuTensorParallelBackend};
use pagedserve::kv_cache::{KvCacheDtype, KvCacheLayout};
use pagedserve::loader::ModelFiles;
use pagedserve::model::cpu::{CpuKvCache, CpuModel, CpuTensorParallelModel};
use pagedserve::model::parallel::{ShardPlan, TensorParallel};
use pagedserve::model::ModelConfig;
use pagedserve::runner::{CpuBackend, CpuTensorParallelBackend, ModelBackend};

use crate::ModelArgs;

#[derive(Args)]
pub(crate) struct TensorParallelArgs {
    /// Split the model over this many ranks (attention heads, MLP slices and vocabulary, as
    /// vLLM does). On the CPU the ranks run as threads over one KV-cache manager; on CUDA one rank
    /// per GPU (devices 0..N), meeting in NCCL.
    #[arg(long, env = "PAGEDSERVE_TENSOR_PARALLEL_SIZE", default_value_t = 1)]
    pub(crate) tensor_parallel_size: usize,
}

/// The CPU's weights as the flag asks: the whole model, or one shard per rank.
pub(crate) enum CpuModels {
    Whole(CpuModel),
    Split(CpuTensorParallelModel),
}

impl TensorParallelArgs {
    pub(crate) fn world(&self) -> usize {
        self.tensor_parallel_size
    }

    /// Why `config` cannot be split into the flag's ranks, before any weight is read.
    pub(crate) fn check_plan(&self, config: &ModelConfig) -> anyhow::Result<()> {
        if self.world() == 0 {
            bail!("--tensor-parallel-size must be at least 1");
        }
        ShardPlan::all(config, self.world())
            .map(drop)
            .with_context(|| format!("--tensor-parallel-size {} does not fit this model", self.world()))
    }

    /// `files`' weights on the host, whole at 1, else split over the ranks.
    pub(crate) fn load_cpu(&self, files: ModelFiles) -> anyhow::Result<CpuModels> {
        self.check_plan(&files.config)?;
        match self.world() {
            1 => Ok(CpuModels::Whole(files.load_cpu()?.model)),
            world => Ok(CpuModels::Split(files.load_cpu_split(world)?)),
        }
    }

    /// `files`' weights on the GPU as `model` asks (quantized or not): the whole model on device
    /// 0 at 1, else rank `r`'s shard on device `r`, every rank joined to one NCCL group.
    pub(crate) fn load_gpu(&self, model: &ModelArgs, files: &ModelFiles) -> anyhow::Result<GpuModels> {
        self.check_plan(&files.config)?;
        let world = self.world();
        if world == 1 {
            return Ok(GpuModels::Whole(model.load_gpu(GpuDevice::new(0)?, files)?));
        }
        // cudarc panics where the driver is absent: ask first.
        if !pagedserve::cuda::is_available() {
            bail!("--tensor-parallel-size {world} on CUDA: no CUDA driver or no GPU found");
        }
        let visible = cudarc::driver::CudaContext::device_count().context("counting GPUs")? as usize;
        if visible < world {
            bail!("--tensor-parallel-size {world} needs {world} GPUs, one per rank; {visible} visible");
        }
        let devices = (0..world).map(GpuDevice::new).collect::<Result<Vec<_>, _>>()?;
        let comms = RankComm::group(&devices).context("setting up NCCL across the GPUs")?;
        tracing::info!(world, nccl = %pagedserve::cuda::collective::version().unwrap_or_default(), "NCCL group ready");
        let mut ranks = Vec::with_capacity(world);
        for (rank, (dev, comm)) in devices.into_iter().zip(comms).enumerate() {
            let shard = model.load_gpu_shard(dev, files, TensorParallel::new(rank, world)?).with_context(|| format!("loading rank {rank}'s shard"))?;
            ranks.push(shard.with_collective(Arc::new(comm))?);
        }
        Ok(GpuModels::Split(ranks))
    }
}

/// The KV cache a backend is built with: `num_blocks` blocks of `block_size` tokens of `dtype`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CacheShape {
    pub num_blocks: usize,
    pub block_size: usize,
    pub dtype: KvCacheDtype,
}

/// The GPU's weights as the flag asks: the whole model, or one shard per GPU.
pub(crate) enum GpuModels {
    Whole(GpuModel),
    Split(Vec<GpuModel>),
}

impl GpuModels {
    fn ranks(&self) -> &[GpuModel] {
        match self {
            GpuModels::Whole(model) => std::slice::from_ref(model),
            GpuModels::Split(ranks) => ranks,
        }
    }

    /// Bytes one KV-cache block of `block_size` tokens of `dtype` takes over every rank (each
    /// holding its own key/value heads).
    pub(crate) fn kv_block_bytes(&self, block_size: usize, dtype: KvCacheDtype) -> usize {
        self.ranks().iter().map(|rank| GpuKvCache::block_bytes(rank.config(), block_size, dtype)).sum()
    }

    /// The blocks every rank's GPU has room for: `utilization` of what is free on it, less a
    /// quarter (at most 4 GiB) left for activations and cuBLAS; the fewest over the ranks, since
    /// every rank holds every block.
    pub(crate) fn blocks_that_fit(&self, block_size: usize, utilization: f64, dtype: KvCacheDtype) -> anyhow::Result<usize> {
        let mut fewest = usize::MAX;
        for rank in self.ranks() {
            let (free, _total) = rank.device().memory()?;
            let reserve = (free / 4).min(4 << 30);
            fewest = fewest.min(((free - reserve) as f64 * utilization / GpuKvCache::block_bytes(rank.config(), block_size, dtype) as f64) as usize);
        }
        Ok(fewest)
    }

    /// The serving backend over `cache` (`num_blocks` blocks of `block_size` tokens of a type),
    /// its decode graphs captured unless `graphs` is false.
    pub(crate) fn into_backend(self, config: &ModelConfig, cache: CacheShape, graphs: bool, max_num_seqs: usize, max_model_len: usize) -> anyhow::Result<Box<dyn ModelBackend>> {
        let CacheShape { num_blocks, block_size, dtype } = cache;
        Ok(match self {
            GpuModels::Whole(model) => {
                let mut backend = GpuBackend::with_kv_cache(model, num_blocks, block_size, dtype)?;
                backend.prepare_for_serving(graphs, max_num_seqs, max_model_len).context("capturing CUDA graphs")?;
                Box::new(backend)
            }
            GpuModels::Split(ranks) => {
                let mut backend = GpuTensorParallelBackend::new(config.clone(), ranks, num_blocks, block_size, dtype)?;
                backend.prepare_for_serving(graphs, max_num_seqs, max_model_len).context("capturing every rank's CUDA graphs")?;
                Box::new(backend)
            }
        })
    }
}

impl CpuModels {
    pub(crate) fn config(&self) -> &ModelConfig {
        match self {
            CpuModels::Whole(model) => model.config(),
            CpuModels::Split(model) => model.config(),
        }
    }

    /// Bytes one KV-cache block of `block_size` tokens of `dtype` takes over every rank.
    pub(crate) fn kv_block_bytes(&self, block_size: usize, dtype: KvCacheDtype) -> usize {
        match self {
            CpuModels::Whole(model) => CpuKvCache::bytes_for(&KvCacheLayout::for_model(model.config(), 1, block_size), dtype),
            CpuModels::Split(model) => CpuTensorParallelBackend::block_bytes(model, block_size, dtype),
        }
    }

    pub(crate) fn into_backend(self, cache: CacheShape) -> Box<dyn ModelBackend> {
        let CacheShape { num_blocks, block_size, dtype } = cache;
        match self {
            CpuModels::Whole(model) => Box::new(CpuBackend::with_kv_cache(model, num_blocks, block_size, dtype)),
            CpuModels::Split(model) => Box::new(CpuTensorParallelBackend::new(model, num_blocks, block_size, dtype)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::TensorParallelArgs;

    fn world(tensor_parallel_size: usize) -> TensorParallelArgs {
        TensorParallelArgs { tensor_parallel_size }
    }

    #[test]
    fn splits_the_model_refuses_fail_before_loading_naming_the_flag() {
        // 9 query heads, as SmolLM2's.
        let config = pagedserve::model::ModelConfig::dense(pagedserve::model::arch::Arch::Llama, 64, 96, 2, 9, 3, 8, 100).unwrap();
        let message = world(0).check_plan(&config).unwrap_err().to_string();
        assert!(message.contains("--tensor-parallel-size must be at least 1"), "{message}");
        let message = format!("{:#}", world(2).check_plan(&config).unwrap_err());
        assert!(message.contains("--tensor-parallel-size 2 does not fit") && message.contains("9 query heads"), "{message}");
        assert!(world(3).check_plan(&config).is_ok());
    }
}
