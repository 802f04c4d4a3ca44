source .carry/setup.sh; mkdir -p $OUT
export PAGEDSERVE_SKINNY=on PAGEDSERVE_GREEDY_CHUNKS=on
timeout 240 /tmp/ps_new check --device cuda --model tests/fixtures/gpu/llama --load-format dummy > $OUT/check_new.txt 2>&1; echo "check rc=$?"
grep -E "sampling|small-M|skinny| no |passed" $OUT/check_new.txt | head -80
timeout 200 /tmp/ps_new bench gpu --breakdown-8b-only --batch-sizes 1,2,8,16,32,64 --context 512 > $OUT/bd_new.txt 2>&1; echo "== new rc=$?"
grep -E "registers|graphs|served|copy bandwidth|products at|^ +(6144|4096|28672|128256|all) " $OUT/bd_new.txt
PAGEDSERVE_SKINNY=off PAGEDSERVE_GREEDY_CHUNKS=off timeout 150 /tmp/ps_new bench gpu --breakdown-8b-only --batch-sizes 2,8,16,32,64 --context 512 > $OUT/bd_off.txt 2>&1; echo "== off rc=$?"
grep -E "graphs|served" $OUT/bd_off.txt
