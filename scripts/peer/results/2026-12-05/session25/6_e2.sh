source .carry/setup.sh; mkdir -p $OUT
for n in ps_e; do [ -x /tmp/$n ] || { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" .carry/$n.xz /tmp/$n && chmod +x /tmp/$n; }; done
export PAGEDSERVE_SKINNY=on
pat="graphs|served|^ +(6144|4096|28672|128256|all) |products at"
timeout 200 /tmp/ps_e bench gpu --breakdown-8b-only --batch-sizes 2,8,16,32,64 --context 512 > $OUT/bd_e.txt 2>&1; echo "== e rc=$?"; grep -E "$pat" $OUT/bd_e.txt
PAGEDSERVE_SKINNY=off timeout 200 /tmp/ps_e bench gpu --breakdown-8b-only --batch-sizes 8,16,32,64 --context 512 > $OUT/bd_e_off.txt 2>&1; echo "== off rc=$?"; grep -E "graphs|served" $OUT/bd_e_off.txt
timeout 200 /tmp/ps_e check --device cuda --model tests/fixtures/gpu/llama --load-format dummy > $OUT/check_e.txt 2>&1; echo "check e rc=$?"; grep -E "passed| no " $OUT/check_e.txt | tail -4
