source _v/run.sh
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv > $OUT/r/smi.txt
timeout 150 python3 -m pytest -q -x tests/test_triton_norm.py > $OUT/r/t_norm.txt 2>&1; echo "norm rc=$?" >> $OUT/r/t_norm.txt
timeout 200 python3 bench/engine.py --batches 1,64,256 --forks '' --llm '' --hf 0 --compile 0 --norm-kernel 1,0 --out $OUT/r/eng_norm > $OUT/r/eng_norm.txt 2>&1; echo "eng rc=$?" >> $OUT/r/eng_norm.txt
timeout 220 python3 -m npr_async bench rollout --config configs/bench_2gpu.yaml --shape qwen3-0.6b --force-plans 4 --samples 96 --calls 4 --compile 0,1 --norm-kernel 0,1 --out $OUT/r/roll.json > $OUT/r/roll.txt 2>&1; echo "roll rc=$?" >> $OUT/r/roll.txt
tail -n 15 $OUT/r/t_norm.txt; tail -n 40 $OUT/r/eng_norm.txt; tail -n 40 $OUT/r/roll.txt
