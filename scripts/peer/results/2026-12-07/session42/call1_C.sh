# Call C (any GPU): cache block sizes 16/32/64 in the decode attention alone, then served 1000
# requests at --block-size 16 and 32 in turn, twice.
set -u
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
source .carry/s42/setup.sh
date
timeout 150 $PAGEDSERVE bench gpu --attention-sweep --batch-sizes 32,64,256 --sweep-contexts 256,512,1024 --sweep-splits 1 --sweep-block-sizes 16,32,64 > $OUT/sweep_bs.txt 2>&1
grep -c "attention sweep" $OUT/sweep_bs.txt; tail -3 $OUT/sweep_bs.txt | cut -c1-150
date
for bs in 16 32 16 32; do
  PS_EXTRA="--block-size $bs" bash scripts/peer/bench_device.sh pagedserve llama-3.1-8b sg=sharegpt:1000:1000 2>&1 | sed "s/^{/{\"bs\":$bs,/" | tee -a $OUT/served_bs.jsonl | cut -c1-260
done
date
