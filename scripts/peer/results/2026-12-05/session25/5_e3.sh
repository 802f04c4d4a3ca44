source .carry/setup.sh; mkdir -p $OUT
for n in ps_e; do [ -x /tmp/$n ] || { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" .carry/$n.xz /tmp/$n && chmod +x /tmp/$n; }; done
export PAGEDSERVE_SKINNY=on
which compute-sanitizer
timeout 150 compute-sanitizer --tool memcheck --print-limit 4 /tmp/ps_e check --device cuda --model tests/fixtures/gpu/llama --load-format dummy > $OUT/san_mem.txt 2>&1; echo "mem rc=$?"
grep -v "^ *[0-9]*: \|^=========     Host Frame" $OUT/san_mem.txt | head -40
timeout 120 compute-sanitizer --tool synccheck --print-limit 4 /tmp/ps_e check --device cuda --model tests/fixtures/gpu/llama --load-format dummy > $OUT/san_sync.txt 2>&1; echo "sync rc=$?"
grep -v "^ *[0-9]*: \|^=========     Host Frame" $OUT/san_sync.txt | head -30
