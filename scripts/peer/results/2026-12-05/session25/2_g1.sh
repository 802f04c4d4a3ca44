source .carry/setup.sh; mkdir -p $OUT
for gc in on off; do
PAGEDSERVE_SKINNY=off PAGEDSERVE_GREEDY_CHUNKS=$gc timeout 150 /tmp/ps_new bench gpu --breakdown-8b-only --batch-sizes 1,32 --context 512 > $OUT/gc_$gc.txt 2>&1; echo "== gc $gc rc=$?"
grep -E "graphs|served" $OUT/gc_$gc.txt
done
for gc in on off; do
PAGEDSERVE_SKINNY=off PAGEDSERVE_GREEDY_CHUNKS=$gc timeout 150 /tmp/ps_new bench gpu --breakdown-8b-only --batch-sizes 1,32 --context 512 > $OUT/gc2_$gc.txt 2>&1; echo "== gc $gc rc=$?"
grep -E "served" $OUT/gc2_$gc.txt
done
