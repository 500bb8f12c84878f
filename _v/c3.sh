source _v/run.sh
for c in 0 1 0; do timeout 250 python3 bench/engine.py --batches 64,256 --hf 0 --forks '' --llm '' --compile $c --out $OUT/r/ab$c > $OUT/r/ab.txt.$c.$RANDOM 2>&1; done
grep -h "b=\|compile" $OUT/r/ab.txt.* | cut -c1-400
