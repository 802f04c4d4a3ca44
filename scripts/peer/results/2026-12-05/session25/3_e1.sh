source .carry/setup.sh; mkdir -p $OUT
for n in ps_b ps_c ps_d; do [ -x /tmp/$n ] || { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" .carry/$n.xz /tmp/$n && chmod +x /tmp/$n; }; done
export PAGEDSERVE_SKINNY=on PAGEDSERVE_GREEDY_CHUNKS=on
pat="graphs|served|^ +(6144|4096|28672|128256|all) |products at"
timeout 200 /tmp/ps_b bench gpu --breakdown-8b-only --batch-sizes 16,32 --context 512 > $OUT/bd_b.txt 2>&1; echo "== b rc=$?"; grep -E "$pat" $OUT/bd_b.txt
timeout 200 /tmp/ps_d bench gpu --breakdown-8b-only --batch-sizes 16,32 --context 512 > $OUT/bd_d.txt 2>&1; echo "== d rc=$?"; grep -E "$pat" $OUT/bd_d.txt
timeout 200 /tmp/ps_c bench gpu --breakdown-8b-only --batch-sizes 32 --context 512 > $OUT/bd_c.txt 2>&1; echo "== c rc=$?"; grep -E "$pat" $OUT/bd_c.txt
for v in b d; do timeout 200 /tmp/ps_$v check --device cuda --model tests/fixtures/gpu/llama --load-format dummy > $OUT/check_$v.txt 2>&1; echo "check $v rc=$?"; grep -E "passed|skinny|silu" $OUT/check_$v.txt | tail -4; done
