source _v/run.sh
timeout 470 python3 -m npr_async bench e2e --config configs/bench_2gpu.yaml --shape qwen3-0.6b --force-plans 4 --generators 1 --streaming on --steps 2 --chunks 96,48 --set engine.cuda_graphs=true --out $OUT/r/e2e.json > $OUT/r/e2e.txt 2>&1; echo "e2e rc=$?" >> $OUT/r/e2e.txt
grep -v "Writing model" $OUT/r/e2e.txt | tail -n 60 | cut -c1-300
