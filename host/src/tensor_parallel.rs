//! `--tensor-parallel-size N` (issue 14): the commands that build a model backend split the model
//! over N ranks with it. At 1 nothing changes. Above 1, the CPU runs the ranks as threads behind
//! one backend (`CpuTensorParallelBackend`: one scheduler and one KV-cache manager over every
//! rank's cache); the shard plan's refusals are startup errors that name the flag. CUDA tensor
//! parallelism (NCCL across the GPUs of a host) is not implemented yet and is refused.

use anyhow::{bail, Context};
use clap::Args;
use pagedserve::kv_cache::KvCacheLayout;
use pagedserve::loader::ModelFiles;
use pagedserve::model::cpu::{CpuModel, CpuTensorParallelModel};
use pagedserve::model::parallel::ShardPlan;
use pagedserve::model::ModelConfig;
use pagedserve::runner::{CpuBackend, CpuTensorParallelBackend, ModelBackend};

#[derive(Args)]
pub(crate) struct TensorParallelArgs {
    /// Split the model over this many ranks (attention heads, MLP slices and vocabulary, as
    /// vLLM does). On the CPU the ranks run as threads over one KV-cache manager; on CUDA only 1
    /// is implemented so far.
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

    /// An error unless the model is whole: the CUDA backend has no collectives yet.
    pub(crate) fn refuse_on_cuda(&self) -> anyhow::Result<()> {
        if self.world() > 1 {
            bail!(
                "--tensor-parallel-size {}: tensor parallelism on CUDA is not implemented yet (it needs NCCL across \
                 several GPUs); use --tensor-parallel-size 1, or --device cpu to split the model over CPU threads",
                self.world()
            );
        }
        Ok(())
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
}

impl CpuModels {
    pub(crate) fn config(&self) -> &ModelConfig {
        match self {
            CpuModels::Whole(model) => model.config(),
            CpuModels::Split(model) => model.config(),
        }
    }

    /// Bytes one KV-cache block of `block_size` tokens takes over every rank (float32).
    pub(crate) fn kv_block_bytes(&self, block_size: usize) -> usize {
        match self {
            CpuModels::Whole(model) => KvCacheLayout::for_model(model.config(), 1, block_size).block_bytes(std::mem::size_of::<f32>()),
            CpuModels::Split(model) => CpuTensorParallelBackend::block_bytes(model, block_size),
        }
    }

    pub(crate) fn into_backend(self, num_blocks: usize, block_size: usize) -> Box<dyn ModelBackend> {
        match self {
            CpuModels::Whole(model) => Box::new(CpuBackend::new(model, num_blocks, block_size)),
            CpuModels::Split(model) => Box::new(CpuTensorParallelBackend::new(model, num_blocks, block_size)),
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
    fn cuda_refuses_more_than_one_rank_naming_the_flag_and_the_issue() {
        assert!(world(1).refuse_on_cuda().is_ok());
        let message = world(2).refuse_on_cuda().unwrap_err().to_string();
        assert!(message.contains("--tensor-parallel-size 2") && message.contains("not implemented yet") && message.contains("NCCL"), "{message}");
    }
}
