source _v/run.sh
timeout 60 python3 -m pytest -q tests/test_jit_compiles.py > $OUT/r/t_jit.txt 2>&1; tail -n 3 $OUT/r/t_jit.txt
timeout 330 python3 -m npr_async bench e2e --config configs/bench_2gpu.yaml --shape qwen3-0.6b --force-plans 4 --generators 1 --streaming on --steps 3 --chunks 96 --set engine.cuda_graphs=true --out $OUT/r/e2e.json > $OUT/r/e2e.txt 2>&1; echo "e2e rc=$?" >> $OUT/r/e2e.txt
grep -v "Writing model" $OUT/r/e2e.txt | tail -n 25 | cut -c1-400
