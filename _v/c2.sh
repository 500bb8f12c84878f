source _v/run.sh
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv > $OUT/r/smi.txt
timeout 560 python3 bench/engine.py --batches 1,16,64,256 --hf 1 --hf-compile 64,256 --forks 2,4,8 --llm '' --out $OUT/r/eng > $OUT/r/eng.txt 2>&1; echo "eng rc=$?" >> $OUT/r/eng.txt
tail -n 30 $OUT/r/eng.txt
